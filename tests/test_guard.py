"""The accuracy guard undoes a cut that hurt the monitored metric, exactly, and then stops or halves the step."""

import copy

import lightning.pytorch as pl
import pytest
import torch

from lightning_halfprune import HalfPrune
from models import Classifier, loaders, trainer


class WidthScored(Classifier):
    """Logs the fraction of conv channels left as its validation "accuracy": every cut makes it deterministically
    worse by exactly the fraction removed, so the guard's decisions are known in advance."""

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        widths = self.net.features[0].out_channels + self.net.features[3].out_channels
        self.log("capacity", widths / 48)


class Snapshotter(pl.Callback):
    """Listed before HalfPrune: copies the model and optimizer state right before each cut."""

    def __init__(self):
        self.taken = {}

    def on_train_epoch_end(self, trainer, pl_module):
        self.taken[trainer.current_epoch] = (
            {n: t.detach().clone() for n, t in pl_module.state_dict().items()},
            copy.deepcopy(trainer.optimizers[0].state_dict()),
        )


def test_a_destructive_cut_is_rolled_back_bit_for_bit_and_later_cuts_stop(tmp_path):
    model, snaps = WidthScored("plain_cnn"), Snapshotter()
    prune = HalfPrune({1: 0.5, 3: 0.6}, monitor="capacity", max_drop=0.1, patience=2)
    trainer(tmp_path, max_epochs=5, callbacks=[snaps, prune]).fit(model, *loaders())

    assert prune.history == [] and prune.skipped == [1] and prune.stopped
    assert len(prune.reports) == 1 and prune.reports[0].rolled_back
    assert model.net.features[0].out_channels == 16  # the full model is back, and epoch 3's cut never happened
    weights, _ = snaps.taken[1]
    assert all(p.shape == weights[n].shape for n, p in model.state_dict().items())
    assert len(model.losses) == 5 * 4  # training went on after the rollback


def test_rollback_restores_the_exact_snapshot(tmp_path):
    model, snaps = WidthScored("plain_cnn", optimizer="adamw"), Snapshotter()
    prune = HalfPrune({1: 0.5}, monitor="capacity", max_drop=0.1, patience=1)

    class StopRightAfterRollback(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            if prune.skipped:
                trainer.should_stop = True

    callbacks = [snaps, prune, StopRightAfterRollback()]
    trainer(tmp_path, max_epochs=4, callbacks=callbacks, limit_train_batches=4).fit(model, *loaders())
    weights, opt_state = snaps.taken[1]
    # epoch 2 trained the pruned model, its validation triggered the rollback, training stopped right there
    assert prune.skipped == [1]
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    now = model.trainer.optimizers[0].state_dict()
    for key, state in opt_state["state"].items():
        for k, v in state.items():
            assert torch.equal(now["state"][key][k], v)
    assert [id(p) for p in model.trainer.optimizers[0].param_groups[0]["params"]] == [id(p) for p in model.parameters()]


def test_halve_retries_with_half_the_step(tmp_path):
    model = WidthScored("plain_cnn")
    prune = HalfPrune({0: 0.5}, monitor="capacity", max_drop=0.3, patience=1, on_violation="halve")
    trainer(tmp_path, max_epochs=4, callbacks=[prune]).fit(model, *loaders())
    assert prune.skipped == [0] and prune.retries == {2: 0.25}
    assert [e["ratio"] for e in prune.history] == [0.25]
    assert model.net.features[0].out_channels == 12 and len(model.losses) == 16


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"guard": {"max_drop": 0.01}}, "also pass `monitor=`"),
        ({"monitor": "val_acc", "guard": {"max_drop": -1}}, "`guard.max_drop` must be a number >= 0, got -1"),
        ({"monitor": "val_acc", "mode": "maximum"}, r"`mode` must be one of \['max', 'min'\], got 'maximum'"),
        ({"monitor": "val_acc", "guard": {"max_drop": 0.1, "on_violation": "retry"}}, "`guard.on_violation` must be"),
    ],
)
def test_bad_guard_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HalfPrune({1: 0.5}, **kwargs)


# The guard's timeline, table-driven. ``capacity`` drops by exactly the cut ratio (ratios are multiples of 1/16),
# so every verdict is known: a cut is undone when ratio - kept ratio > max_drop at the validation after it.
# columns: schedule, max_drop, on_violation, max_epochs, kept ratios, (ratio, rolled back) per report, skipped
TIMELINES = {
    "a later point is capped at the retried ratio, the satisfied retry is no event": (
        {0: 0.25, 1: 0.5}, 0.2, "halve", 4, [0.125], [(0.25, True), (0.125, False)], [0, 2],
    ),
    "once the retry holds the schedule goes on": (
        {0: 0.5, 1: 0.75, 3: 0.75}, 0.3, "halve", 5, [0.25], [(0.5, True), (0.25, False), (0.75, True)], [0, 2, 3],
    ),
    "a retry that fails is halved again": (
        {0: 0.5}, 0.1, "halve", 6, [], [(0.5, True), (0.25, True), (0.125, True)], [0, 2, 4],
    ),
    "a cut in the last epoch is judged at the end of fit": (
        {0: 0.25, 2: 0.75}, 0.3, "stop", 3, [0.25], [(0.25, False), (0.75, True)], [2],
    ),
    "a cut in the last epoch that holds is kept": (
        {0: 0.25, 2: 0.5}, 0.3, "stop", 3, [0.25, 0.5], [(0.25, False), (0.5, False)], [],
    ),
}


@pytest.mark.filterwarnings("ignore:.*the pruned model gets no training to recover")  # deliberate in two rows
@pytest.mark.parametrize("case", list(TIMELINES))
def test_guard_timeline(tmp_path, case):
    schedule, max_drop, on_violation, epochs, kept, reports, skipped = TIMELINES[case]
    model = WidthScored("plain_cnn")
    prune = HalfPrune(
        schedule, monitor="capacity", max_drop=max_drop, on_violation=on_violation, latency_batch_size=0
    )
    trainer(tmp_path, max_epochs=epochs, callbacks=[prune], limit_train_batches=2).fit(model, *loaders())
    assert [e["ratio"] for e in prune.history] == kept
    assert [(r.ratio, r.rolled_back) for r in prune.reports] == reports
    assert prune.skipped == skipped
    width = 16 - int(16 * kept[-1]) if kept else 16
    assert model.net.features[0].out_channels == width


def test_a_point_that_removes_no_channel_is_no_event(tmp_path):
    prune = HalfPrune({0: 0.5, 1: 0.75}, max_layer_ratio=0.5, latency_batch_size=0)
    with pytest.warns(UserWarning, match="removes no channel at ratio 0.75"):
        trainer(tmp_path, callbacks=[prune]).fit(Classifier("plain_cnn"), *loaders())
    assert [r.ratio for r in prune.reports] == [0.5] and prune.skipped == [1]
