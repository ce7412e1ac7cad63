"""Bad input is refused with a message naming the argument and the value, before any training step."""

import pytest
import torch
from torch import nn

from lightning_halfprune import HalfPrune
from models import Classifier, loaders, trainer


def fit(tmp_path, model, prune, **kwargs):
    trainer(tmp_path, callbacks=[prune], **kwargs).fit(model, *loaders())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": {2: 1.5}}, r"ratio at epoch 2 must be in \[0, 1\), got 1.5"),
        ({"schedule": {1: 0.5, 2: 0.3}}, "may not decrease"),
        ({"schedule": {1: 0.5}, "scorer": "taylr"}, r"`scorer` 'taylr' is not a known scorer.*Did you mean 'taylor'"),
        ({"schedule": {1: 0.5}, "max_layer_ratio": 1.0}, r"`max_layer_ratio` must be in \(0, 1\), got 1.0"),
        ({"schedule": {1: 0.5}, "round_to": 0}, "`round_to` must be an int >= 1, got 0"),
        ({"schedule": [0.5]}, "`schedule` must be a mapping"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        HalfPrune(**kwargs)


def test_unmatched_ignored_layer_names_the_closest_real_ones(tmp_path):
    model = Classifier("plain_cnn")
    with pytest.raises(ValueError, match=r"'net.featurs.0' matches no layer.*'net.features.0'"):
        fit(tmp_path, model, HalfPrune({1: 0.5}, ignored_layers=["net.featurs.0"]))
    assert model.losses == []


def test_ignored_layers_by_regex_are_left_alone(tmp_path):
    model = Classifier("plain_cnn")
    fit(tmp_path, model, HalfPrune({0: 0.5}, ignored_layers=[r"net\.features\.3"]))
    assert model.net.features[3].out_channels == 32 and model.net.features[0].out_channels == 8


class OnlyHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        return self.head(x.flatten(1))


def test_a_model_with_nothing_prunable_is_refused_before_training(tmp_path):
    model = Classifier(OnlyHead())
    with pytest.raises(ValueError, match="nothing prunable"):
        fit(tmp_path, model, HalfPrune({1: 0.5}))
    assert model.losses == []


def test_an_example_input_the_model_cannot_run(tmp_path):
    model = Classifier("plain_cnn")
    with pytest.raises(ValueError, match=r"`example_input` could not be traced through Classifier"):
        fit(tmp_path, model, HalfPrune({1: 0.5}, example_input=torch.zeros(2, 5)))
    assert model.losses == []


def test_a_prune_point_past_max_epochs_warns(tmp_path):
    with pytest.warns(UserWarning, match=r"prune points \[7\].*max_epochs=3"):
        fit(tmp_path, Classifier("plain_cnn"), HalfPrune({0: 0.25, 7: 0.5}))


class BadScorer:
    def __call__(self, group):
        return torch.full((len(group[0].idxs),), float("nan"))


def test_a_scorer_returning_nan_fails_before_training(tmp_path):
    model = Classifier("plain_cnn")
    shapes = {n: p.shape for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="NaN or inf scores for layer 'net.features"):
        fit(tmp_path, model, HalfPrune({2: 0.5}, scorer=BadScorer()))
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    assert model.losses == []  # found by the dry run at train start, not an epoch later


class ShortScorer:
    def __call__(self, group):
        return torch.ones(3)


def test_a_scorer_returning_the_wrong_shape_fails_before_training(tmp_path):
    model = Classifier("plain_cnn")
    with pytest.raises(RuntimeError, match=r"returned 3 scores for layer 'net.features.[03]', which has (16|32) chan"):
        fit(tmp_path, model, HalfPrune({2: 0.5}, scorer=ShortScorer()))
    assert model.losses == []


def test_nan_weights_are_named_as_weights_not_as_scores(tmp_path):
    model = Classifier("plain_cnn")
    with torch.no_grad():
        model.net.features[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"the weights of layer 'net.features.0' hold NaN or inf \(has training"):
        fit(tmp_path, model, HalfPrune({2: 0.5}))


def test_a_guard_without_validation_warns_that_it_is_inactive(tmp_path):
    with pytest.warns(UserWarning, match=r"no validation runs in this fit \(`limit_val_batches=0`\): the accuracy gu"):
        fit(tmp_path, Classifier("plain_cnn"), HalfPrune({0: 0.5}, monitor="val_acc", max_drop=0.1),
            limit_val_batches=0)


def test_epoch_points_past_max_steps_warn(tmp_path):
    with pytest.warns(UserWarning, match=r"prune points \[2\] \(epochs\) past the trainer's max_steps=6 \(4 steps"):
        fit(tmp_path, Classifier("plain_cnn"), HalfPrune({0: 0.25, 2: 0.5}), max_epochs=-1, max_steps=6)


def test_a_qat_model_refused_is_exactly_as_before_observers_included(tmp_path):
    from torch.ao.quantization import get_default_qat_qconfig, prepare_qat

    model = Classifier("plain_cnn")
    model.net.qconfig = get_default_qat_qconfig("fbgemm")
    prepare_qat(model.net.train(), inplace=True)
    model(torch.randn(4, 3, 8, 8))  # observers have seen data: per-channel scales of the full widths
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="the model is exactly as before"):
        fit(tmp_path, model, HalfPrune({1: 0.5}))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_interrupted_surgery_leaves_the_model_and_optimizer_wholly_before(tmp_path):
    from lightning_halfprune.core.scoring import get_scorer
    from lightning_halfprune.core.surgeon import Surgeon

    model = Classifier("resnet")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    opt.step()
    before = {n: p for n, p in model.named_parameters()}
    values = {n: p.detach().clone() for n, p in before.items()}
    state = {id(p): s["momentum_buffer"].clone() for p, s in opt.state.items()}
    surgeon = Surgeon(model, torch.zeros(2, 3, 8, 8))
    cuts = surgeon.plan(0.5, get_scorer("l2"))

    def interrupt(remap):
        assert len(remap) > 0  # surgery really happened before the interrupt
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        surgeon.cut(cuts, then=interrupt)
    for n, p in model.named_parameters():
        assert p is before[n] and torch.equal(p, values[n])
    assert model.net.blocks[0].bn1.running_mean.shape == (16,) and model.net.blocks[0].conv1.out_channels == 16
    assert all(torch.equal(s["momentum_buffer"], state[id(p)]) for p, s in opt.state.items())
    # and the same surgeon can cut afterwards, rebuilding its graph
    surgeon.cut(surgeon.plan(0.5, get_scorer("l2")))
    assert model.net.blocks[0].conv1.out_channels == 8
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 4)
