"""``monitor`` with several validation dataloaders: Lightning's suffixed names, the plain name when unambiguous."""

import pytest
import torch.nn.functional as F

from lightning_halfprune import HalfPrune
from models import Classifier, loaders, trainer


class TwoLoaders(Classifier):
    """Logs ``val_acc`` on both loaders (Lightning suffixes them) and ``val_only0`` on loader 0 only."""

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        logits = self(x)
        self.log("val_acc", (logits.argmax(1) == y).float().mean())
        if dataloader_idx == 0:
            self.log("val_only0", -F.cross_entropy(logits, y))


def fit(tmp_path, monitor):
    train, val = loaders()
    prune = HalfPrune({0: 0.5}, monitor=monitor, latency_batch_size=0, verbose=False)
    trainer(tmp_path, max_epochs=2, callbacks=[prune]).fit(TwoLoaders(), train, [val, val])
    return prune


@pytest.mark.parametrize("monitor", ["val_acc/dataloader_idx_1", "val_only0", "val_only0/dataloader_idx_0"])
def test_before_right_after_and_recovered_are_all_filled(tmp_path, monitor):
    report = fit(tmp_path, monitor).reports[0]
    assert report.metric_before is not None
    assert report.metric_after_cut is not None
    assert report.metric_recovered is not None


def test_an_ambiguous_or_wrong_name_warns_at_the_first_validation_listing_the_logged_keys(tmp_path):
    with pytest.warns(UserWarning, match=r"several validation dataloaders.*val_acc/dataloader_idx_0"):
        fit(tmp_path, "val_acc")
    with pytest.warns(UserWarning, match=r"not logged.*val_only0/dataloader_idx_0"):
        fit(tmp_path, "val_accuracy")
