"""EMA and SWA keep averaged copies of the model: HalfPrune cuts them alike, so the fit finishes and they load."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, StochasticWeightAveraging

from lightning_halfprune import HalfPrune, load_pruned
from models import Classifier, loaders, trainer


def widths(module):
    return module.net.features[0].out_channels, module.net.features[3].out_channels


def test_swa_copy_is_cut_alike_and_the_final_model_loads(tmp_path):
    model, swa = Classifier("plain_cnn"), StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    prune = HalfPrune({0: 0.25, 2: 0.5}, latency_batch_size=0, verbose=False)
    fit = trainer(tmp_path, max_epochs=4, callbacks=[swa, prune])
    fit.fit(model, *loaders())
    assert widths(swa._average_model) == widths(model) == (8, 16)
    assert int(swa.n_averaged) == 4  # epochs 1 to 4 (SWA adds one for BatchNorm), across the cut at epoch 2
    fit.save_checkpoint(tmp_path / "final.ckpt")
    loaded = load_pruned(Classifier, tmp_path / "final.ckpt")
    assert widths(loaded) == (8, 16)
    for a, b in zip(loaded.parameters(), swa._average_model.parameters(), strict=True):
        torch.testing.assert_close(a, b)  # SWA put its average into the model at the end


def test_ema_copy_is_cut_alike_resumes_and_loads(tmp_path):
    model, ema = Classifier("plain_cnn"), EMAWeightAveraging(decay=0.9)
    prune = HalfPrune({0: 0.25, 1: 0.5}, latency_batch_size=0, verbose=False)
    every = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    trainer(tmp_path, max_epochs=3, callbacks=[ema, prune, every], enable_checkpointing=True).fit(
        model, *loaders()
    )
    assert widths(ema._average_model.module) == widths(model) == (8, 16)
    steps = int(ema._average_model.n_averaged)
    assert steps == 12  # one update per step, across both cuts

    # the checkpoint's state_dict is the average (Lightning's EMA puts it there): it loads pruned
    loaded = load_pruned(Classifier, tmp_path / "epoch=2.ckpt")
    assert widths(loaded) == (8, 16)
    for a, b in zip(loaded.parameters(), ema._average_model.module.parameters(), strict=True):
        torch.testing.assert_close(a, b)

    # resume from after the first cut: the new EMA copy is brought to the checkpoint's shape before it loads
    again, ema2 = Classifier("plain_cnn"), EMAWeightAveraging(decay=0.9)
    prune2 = HalfPrune({0: 0.25, 1: 0.5}, latency_batch_size=0, verbose=False)
    trainer(tmp_path / "b", max_epochs=3, callbacks=[ema2, prune2]).fit(
        again, *loaders(), ckpt_path=tmp_path / "epoch=0.ckpt"
    )
    assert widths(ema2._average_model.module) == widths(again) == (8, 16)
    assert int(ema2._average_model.n_averaged) == steps


def test_rollback_puts_the_averaged_copy_back_too(tmp_path):
    from test_guard import WidthScored

    model, ema = WidthScored("plain_cnn"), EMAWeightAveraging(decay=0.9)
    prune = HalfPrune({0: 0.5}, monitor="capacity", max_drop=0.1, latency_batch_size=0, verbose=False)
    trainer(tmp_path, max_epochs=3, callbacks=[ema, prune]).fit(model, *loaders())
    assert prune.reports[0].rolled_back and prune.history == []
    assert widths(ema._average_model.module) == widths(model) == (16, 32)


class KeepsACopy(pl.Callback):
    def setup(self, trainer, pl_module, stage):
        self.frozen = copy.deepcopy(pl_module)


def test_a_callback_holding_a_copy_it_cannot_update_is_refused_before_training(tmp_path):
    model = Classifier("plain_cnn")
    prune = HalfPrune({0: 0.5}, latency_batch_size=0)
    with pytest.raises(ValueError, match=r"KeepsACopy keeps in `frozen`"):
        trainer(tmp_path, callbacks=[KeepsACopy(), prune]).fit(model, *loaders())
    assert model.losses == []
