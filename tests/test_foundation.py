"""The core loop: channels are removed mid-fit, on every architecture family, and training carries on."""

import copy

import lightning.pytorch as pl
import pytest
import torch

from lightning_halfprune import HalfPrune, Schedule
from models import FAMILIES, Classifier, loaders, trainer


class Recorder(pl.Callback):
    """Snapshots parameters and optimizer state just before HalfPrune's hook runs (it is listed first)."""

    def __init__(self):
        self.params, self.states = {}, {}

    def on_train_epoch_end(self, trainer, pl_module):
        self.params[trainer.current_epoch] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        opt = trainer.optimizers[0]
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.states[trainer.current_epoch] = {
            names[id(p)]: copy.deepcopy(s) for p, s in opt.state.items() if id(p) in names
        }


def expected_width(original: int, ratio: float, slots: int = 1) -> int:
    keep = int(original * (1 - ratio) + 0.5)
    return -(-keep // slots) * slots


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_is_cut_to_the_schedule_and_keeps_training(tmp_path, family):
    model = Classifier(family)
    train, val = loaders()
    prune = HalfPrune(schedule={0: 0.25, 1: 0.5})
    trainer(tmp_path, max_epochs=3, callbacks=[prune]).fit(model, train, val)

    assert [e["ratio"] for e in prune.history] == [0.25, 0.5]
    widths = prune.surgeon.widths
    for name, original in prune.original_widths.items():
        slots = model.net.attn.num_heads if family == "transformer" and name == "net.ff.2" else 1
        assert widths[name] == expected_width(original, 0.5, slots), name
    assert prune.reports[-1].after.params < 0.6 * prune.reports[0].before.params
    # the smaller model trained a whole epoch after the last cut, and still runs forward
    assert len(model.losses) == 3 * 4 and all(torch.isfinite(torch.tensor(model.losses)))
    assert model(torch.randn(5, 3, 8, 8)).shape == (5, 4)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_optimizer_follows_the_cut_with_its_state_sliced(tmp_path, optimizer):
    model = Classifier("plain_cnn", optimizer=optimizer)
    train, val = loaders()
    recorder, prune = Recorder(), HalfPrune(schedule={1: 0.5})
    trainer(tmp_path, max_epochs=2, callbacks=[recorder, prune]).fit(model, train, val)

    opt = model.trainer.optimizers[0]
    model_params = list(model.parameters())
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model_params}
    assert opt.param_groups[0]["lr"] == 0.05
    assert all(s[k].shape == p.shape for p, s in opt.state.items() for k in s if s[k].dim() > 0)

    # the first conv lost exactly the recorded channels: its state rows are the old rows at the kept indices
    removed = dict(prune.history[0]["cuts"])["net.features.0"]
    keep = [i for i in range(16) if i not in removed]
    old = recorder.states[1]["net.features.0.weight"]
    new = opt.state[model.net.features[0].weight]
    for key in ("momentum_buffer",) if optimizer == "sgd" else ("exp_avg", "exp_avg_sq", "step"):
        expected = old[key] if old[key].dim() == 0 else old[key][keep]
        torch.testing.assert_close(new[key], expected)
    torch.testing.assert_close(model.net.features[0].weight.detach(), recorder.params[1]["net.features.0.weight"][keep])


def test_every_remaining_parameter_trains_after_the_cut(tmp_path):
    model = Classifier("resnet")
    train, val = loaders()
    recorder, prune = Recorder(), HalfPrune(schedule={0: 0.5})
    trainer(tmp_path, max_epochs=2, callbacks=[recorder, prune]).fit(model, train, val)
    right_after = {n: p.detach().clone() for n, p in model.named_parameters()}
    # epoch 1 trained the pruned model; compare its end against the cut weights replayed onto epoch 0's snapshot
    trainer(tmp_path, max_epochs=3, callbacks=[]).fit(model, train, val)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), right_after[n])]
    assert not unchanged


def test_lr_schedule_is_not_reset_by_the_cut(tmp_path):
    runs = []
    for schedule in ({1: 0.5}, None):
        model = Classifier("plain_cnn", scheduler=True)
        callbacks = [HalfPrune(schedule=schedule)] if schedule else []
        trainer(tmp_path, max_epochs=4, callbacks=callbacks).fit(model, *loaders())
        runs.append(model.lrs)
    assert runs[0] == runs[1] and len(set(runs[0])) > 1


def test_frozen_parameters_stay_frozen(tmp_path):
    model = Classifier("plain_cnn")
    model.net.features[0].weight.requires_grad_(False)
    frozen_before = model.net.features[0].weight.detach().clone()
    prune = HalfPrune(schedule={0: 0.5})
    trainer(tmp_path, max_epochs=2, callbacks=[prune]).fit(model, *loaders())
    weight = model.net.features[0].weight
    assert not weight.requires_grad and weight.shape[0] == 8
    keep = [i for i in range(16) if i not in dict(prune.history[0]["cuts"])["net.features.0"]]
    torch.testing.assert_close(weight.detach(), frozen_before[keep])


def test_accumulation_clipping_and_bf16_mixed_on_cpu(tmp_path):
    model = Classifier("resnet")
    prune = HalfPrune(schedule=Schedule({3: 0.5}, interval="step"))
    trainer(
        tmp_path,
        max_epochs=2,
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        precision="bf16-mixed",
        callbacks=[prune],
    ).fit(model, *loaders())
    assert prune.history[0]["global_step"] == 3 and prune.history[0]["point"] == 3
    assert model.trainer.global_step == 4  # 8 batches / 2 accumulated
    assert prune.surgeon.widths["net.blocks.1.conv2"] == 8


class TwoOptimizers(Classifier):
    def __init__(self):
        super().__init__("plain_cnn")
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()
        self.losses.append(loss.item())

    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.net.features.parameters(), lr=0.05, momentum=0.9),
            torch.optim.Adam(self.net.head.parameters(), lr=0.01),
        ]


def test_several_optimizers_each_keep_their_own_parameters(tmp_path):
    model = TwoOptimizers()
    trainer(tmp_path, max_epochs=2, callbacks=[HalfPrune(schedule={0: 0.5})]).fit(model, *loaders())
    features, head = model.trainer.optimizers
    assert {id(p) for g in features.param_groups for p in g["params"]} == {
        id(p) for p in model.net.features.parameters()
    }
    assert {id(p) for g in head.param_groups for p in g["params"]} == {id(p) for p in model.net.head.parameters()}
    assert model.net.head.weight.shape == (4, 16)
    assert len(model.losses) == 8


def test_graph_is_built_once_and_modes_restored(tmp_path):
    model = Classifier("plain_cnn")
    prune = HalfPrune(schedule={0: 0.25, 1: 0.5})
    trainer(tmp_path, max_epochs=3, callbacks=[prune]).fit(model, *loaders())
    assert prune.surgeon.graph_builds == 1
    assert model.training and all(m.training for m in model.modules())


def test_surgery_under_inference_mode_restores_eval_mode(tmp_path):
    from lightning_halfprune.core.scoring import get_scorer
    from lightning_halfprune.core.surgeon import Surgeon

    model = Classifier("resnet").eval()
    with torch.inference_mode():
        surgeon = Surgeon(model, torch.zeros(2, 3, 8, 8))
        surgeon.cut(surgeon.plan(0.5, get_scorer("l1")))
    assert not any(m.training for m in model.modules())
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 4)
