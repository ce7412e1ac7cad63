"""``ckpt_path="best"`` is the best checkpoint of the pruned architecture, not the dense model before the cut."""

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_halfprune import HalfPrune, load_pruned
from models import loaders, trainer
from test_guard import WidthScored


class WidthTested(WidthScored):
    """Its "capacity" is highest for the dense model: without the reset, the dense checkpoint is best."""

    def test_step(self, batch, batch_idx):
        self.log("test_width", float(self.net.features[0].out_channels))


@pytest.mark.parametrize("reset", [True, False])
def test_best_has_the_final_architecture(tmp_path, reset):
    model = WidthTested("plain_cnn")
    keep = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="capacity", mode="max", save_top_k=2)
    prune = HalfPrune({1: 0.25, 2: 0.5}, latency_batch_size=0, reset_best_on_cut=reset, verbose=False)
    fit = trainer(tmp_path, max_epochs=5, callbacks=[prune, keep], enable_checkpointing=True)
    train, val = loaders()
    fit.fit(model, train, val)
    if reset:  # the dense checkpoint stays on disk, beside the top 2 of the final architecture
        assert len(list((tmp_path / "ckpt").glob("*.ckpt"))) == 3
    ranked = sorted(p.rpartition("/")[2] for p in keep.best_k_models)
    if reset:  # (the live model is pruned: a dense checkpoint cannot be loaded back into it)
        assert fit.test(model, val, ckpt_path="best")[0]["test_width"] == 8.0
    assert load_pruned(WidthTested, keep.best_model_path).net.features[0].out_channels == (8 if reset else 16)
    if reset:
        assert ranked == ["epoch=3-step=16.ckpt", "epoch=4-step=20.ckpt"]  # no checkpoint right after a cut
