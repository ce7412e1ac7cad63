"""Scorers decide which channels go: every named scorer works in a fit, and data-driven scoring disturbs nothing."""

import lightning.pytorch as pl
import pytest
import torch
import torch_pruning as tp
from torch import nn

from lightning_halfprune import SCORERS, CalibratedScorer, HalfPrune, RedundancyScorer
from lightning_halfprune.core.surgeon import Surgeon
from models import Classifier, loaders, trainer


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_every_named_scorer_halves_a_cnn_mid_fit(tmp_path, name):
    model = Classifier("resnet")
    prune = HalfPrune({0: 0.5}, scorer=name, scoring_batches=2)
    trainer(tmp_path, max_epochs=2, callbacks=[prune]).fit(model, *loaders())
    assert model.net.blocks[0].conv1.out_channels == 8 and len(model.losses) == 8


@pytest.mark.parametrize("name", ["taylor", "activation", "redundancy", "random"])
def test_scoring_leaves_the_fit_exactly_as_it_was(tmp_path, name):
    """A ratio-0 event calibrates and scores but cuts nothing: the losses must equal a run without the callback."""
    runs = []
    for callbacks in ([HalfPrune({0: 0.0, 1: 0.0}, scorer=name, scoring_batches=3)], []):
        pl.seed_everything(0)
        model = Classifier("plain_cnn")
        trainer(tmp_path, max_epochs=3, callbacks=callbacks).fit(model, *loaders(seed=1))
        runs.append(model.losses)
    assert runs[0] == runs[1]


def test_redundancy_removes_the_copy_not_the_original_and_dead_channels_first():
    conv = nn.Conv1d(16, 6, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.normal_()
        conv.weight[1] = conv.weight[0] * 0.5  # a weaker copy of channel 0: perfectly correlated
        conv.weight[2] = 0.0  # dead
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv1d(6, 4, 1), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(64, 16, 10)
    model(x)
    scorer = RedundancyScorer()
    scorer.calibrate(model, [x[:32], x[32:]], loss_fn=None)
    surgeon = Surgeon(model, x[:2], ignored_layers=[model[2]])
    (group,) = [g for g in surgeon.groups() if g.name == "0"]
    scores = scorer(group.group)
    assert scores[2] == 0 and scores[1] < 1e-4  # the dead channel and the copy score (near) zero
    assert scores[0] > 0.3 and scores[0] > 100 * scores[1]  # the original keeps its score
    assert set(torch.argsort(scores)[:2].tolist()) == {1, 2}


def test_redundancy_keeps_only_a_gram_matrix_for_wide_layers():
    wide = nn.Sequential(nn.Linear(16, 1024), nn.ReLU(), nn.Linear(1024, 2))
    scorer = RedundancyScorer(max_positions=256)
    scorer.calibrate(wide, [torch.randn(512, 16) for _ in range(4)], loss_fn=None)
    n, total, gram = scorer._stats[wide[0]]
    assert n == 4 * 256 and gram.shape == (1024, 1024) and total.shape == (1024,)


class Recorder(CalibratedScorer):
    """A user's own data-driven scorer: the protocol is calibrate(model, batches, loss_fn) and __call__(group)."""

    def __init__(self):
        self.batches = []

    def calibrate(self, model, batches, loss_fn):
        self.batches = batches
        if len(batches[0]) == 2:  # (x, y): the training loss is available
            assert torch.isfinite(loss_fn(batches[0]))

    def __call__(self, group):
        return torch.arange(len(group[0].idxs), dtype=torch.float)  # keeps the highest-index channels


def test_a_custom_scorer_and_a_torch_pruning_importance_are_accepted(tmp_path):
    model, scorer = Classifier("plain_cnn"), Recorder()
    prune = HalfPrune({0: 0.5}, scorer=scorer, scoring_batches=3)
    trainer(tmp_path, max_epochs=1, callbacks=[prune]).fit(model, *loaders())
    assert len(scorer.batches) == 3
    assert dict(prune.history[0]["cuts"])["net.features.0"] == list(range(8))

    trainer(tmp_path, max_epochs=1, callbacks=[HalfPrune({0: 0.5}, scorer=tp.importance.LAMPImportance())]).fit(
        Classifier("plain_cnn"), *loaders()
    )


class WrongLength:
    def __call__(self, group):
        return torch.ones(3)


def test_a_scorer_with_the_wrong_number_of_scores_names_the_layer(tmp_path):
    model = Classifier("plain_cnn")
    with pytest.raises(RuntimeError, match=r"returned 3 scores for layer 'net.features.\d', which has \d+ channels"):
        trainer(tmp_path, max_epochs=1, callbacks=[HalfPrune({0: 0.5}, scorer=WrongLength())]).fit(model, *loaders())
    assert model.net.features[0].out_channels == 16


def test_a_data_driven_scorer_without_data_says_what_to_pass(tmp_path):
    from lightning_halfprune.fit.batches import take_batches

    with pytest.raises(ValueError, match="pass `calibration_dataloader=`"):
        take_batches(None, 8, torch.device("cpu"))


def test_calibration_dataloader_is_used_instead_of_the_training_data(tmp_path):
    scorer = Recorder()
    calib = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.full((10, 3, 8, 8), 7.0)), batch_size=5)
    prune = HalfPrune({0: 0.5}, scorer=scorer, calibration_dataloader=calib)
    trainer(tmp_path, max_epochs=1, callbacks=[prune]).fit(Classifier("plain_cnn"), *loaders())
    assert len(scorer.batches) == 2 and torch.all(scorer.batches[0][0] == 7.0)


def test_group_lasso_regularisation_shrinks_the_channels_before_the_cut(tmp_path):
    norms = []
    for strength in (0.0, 0.5):
        pl.seed_everything(0)
        model = Classifier("plain_cnn")
        trainer(tmp_path, max_epochs=3, callbacks=[HalfPrune({2: 0.5}, regularization=strength)]).fit(model, *loaders())
        norms.append(model.net.features[0].weight.norm().item())
    assert norms[1] < 0.8 * norms[0]


def test_groups_a_scorer_cannot_score_are_named_not_skipped_silently():
    """`bn_scale` reads BatchNorm scales: the MLP's hidden group has none, so it stays uncut, and HalfPrune says so."""
    from lightning_halfprune.core.scoring import get_scorer

    conv = (nn.Conv1d(1, 8, 3), nn.BatchNorm1d(8), nn.ReLU(), nn.Flatten())
    model = nn.Sequential(*conv, nn.Linear(8 * 6, 16), nn.ReLU(), nn.Linear(16, 2))
    surgeon = Surgeon(model, torch.randn(2, 1, 8))
    with pytest.warns(UserWarning, match=r"no scores for 1 coupled group\(s\), so they are not cut: '4'"):
        cuts = surgeon.plan(0.5, get_scorer("bn_scale"))
    assert [c.layer for c in cuts] == ["0"]
