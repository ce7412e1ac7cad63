"""torch.compile: a compiled inner module and a compiled LightningModule are pruned, recompile once per cut, and
their MACs are counted."""

import logging

import pytest
import torch
import torch.nn.functional as F

from lightning_halfprune import HalfPrune
from lightning_halfprune.report import ModelStats, PruneReport, final_summary, summary_table
from models import Classifier, PlainCNN, loaders, trainer

FIVE_CUTS = {0: 0.2, 1: 0.3, 2: 0.4, 3: 0.5, 4: 0.6}


class Quiet(Classifier):
    """No ``self.log`` inside the steps: Lightning 2.6's ``self.log`` does not trace under Dynamo in torch 2.13,
    so a compiled LightningModule cannot log from its steps (with or without HalfPrune)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


@pytest.mark.parametrize("what", ["inner module", "LightningModule"])
def test_five_cuts_recompile_once_each_and_count_macs(tmp_path, what, caplog):
    if what == "inner module":
        model = Classifier(torch.compile(PlainCNN(), backend="eager"))
        fitted = model
    else:
        model = Quiet("plain_cnn")
        fitted = torch.compile(model, backend="eager")
    prune = HalfPrune(FIVE_CUTS, scorer="activation", scoring_batches=2, latency_batch_size=4)
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        fit = trainer(tmp_path, max_epochs=6, callbacks=[prune], limit_train_batches=2, limit_val_batches=1)
        fit.fit(fitted, *loaders())

    assert [r.ratio for r in prune.reports] == list(FIVE_CUTS.values())
    macs = [prune.reports[0].before.macs] + [r.after.macs for r in prune.reports]
    assert macs[0] > 0 and all(a > b for a, b in zip(macs, macs[1:], strict=False))
    assert all(r.after.latency_ms for r in prune.reports)
    counts = prune.compiles.counts
    assert len(counts) == 6 and counts[0] >= 1
    assert all(1 <= n <= 2 for n in counts[1:]), counts  # the train and eval graphs of the new shapes, once
    assert not [r for r in caplog.records if "recompile" in r.getMessage().lower()]
    net = model.net._orig_mod if what == "inner module" else model.net
    assert net.features[0].out_channels == 6  # 16 * (1 - 0.6), rounded


def test_the_summary_never_divides_by_zero():
    empty = ModelStats(params=0, macs=0)
    report = PruneReport(epoch=0, global_step=1, ratio=0.5, before=empty, after=empty, monitor="val_acc")
    assert "n/a" in summary_table([report])
    assert final_summary([report]) == {"halfprune/events": 1.0}
    assert report.scalars()["halfprune/ratio"] == 0.5
