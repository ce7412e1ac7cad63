"""The fine-tuning preset and the LR re-warm-up after a cut (real optimizers, a real Trainer)."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_halfprune import HalfPrune, Schedule, presets
from lightning_halfprune.fit.rewarm import RewarmAfterCut, Rewarmer


def test_finetuning_preset_builds_a_halfprune() -> None:
    kwargs = presets.finetuning(0.5)
    assert kwargs["schedule"] == Schedule({5: 0.5}, interval="step")
    distill = kwargs["distill"]
    assert distill.alpha == 1.0 and distill.teacher == "first" and distill.epochs is None
    assert kwargs["calibration"].batches == 8
    assert kwargs["rewarm_steps"] == 30
    rewarm = kwargs.pop("rewarm_steps")
    prune = HalfPrune(**kwargs)
    assert prune.scorer_name == "taylor" and rewarm == 30


def test_finetuning_preset_overrides_and_checks() -> None:
    kwargs = presets.finetuning(0.3, at_step=12, scorer="minitron", monitor="val_loss", mode="min")
    assert kwargs["schedule"].points == {12: 0.3}
    assert kwargs["scorer"] == "minitron" and kwargs["monitor"] == "val_loss"
    with pytest.raises(ValueError, match="`ratio`"):
        presets.finetuning(1.5)
    with pytest.raises(ValueError, match="`at_step`"):
        presets.finetuning(0.5, at_step=0)


def test_rewarmer_scales_only_the_next_steps_and_restores_the_lr() -> None:
    param = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([param], lr=0.3)
    rewarm = Rewarmer(3)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    for step in range(6):
        if step == 1:
            rewarm.start()
        param.grad = torch.ones(3)
        rewarm.before_step(opt)
        opt.step()
        assert opt.param_groups[0]["lr"] == 0.3  # the scheduler's value is back after every step
    assert seen == pytest.approx([0.3, 0.3 / 4, 0.6 / 4, 0.9 / 4, 0.3, 0.3])
    with pytest.raises(ValueError, match="rewarm_steps"):
        Rewarmer(-1)


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
        self.example_input_array = torch.zeros(1, 4)
        self.lrs: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def on_before_optimizer_step(self, optimizer) -> None:  # runs after the callbacks' hook, inside step()
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_rewarm_after_cut_in_a_real_fit() -> None:
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    model = Net()
    kwargs = presets.finetuning(0.5, at_step=2, rewarm_steps=3, scorer="l2")
    rewarm = kwargs.pop("rewarm_steps")
    prune = HalfPrune(**{**kwargs, "verbose": False, "timing": None})
    trainer = pl.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[prune, RewarmAfterCut(prune, rewarm)])
    trainer.fit(model, DataLoader(data, batch_size=8))
    assert model.net[0].out_features == 8
    assert model.lrs == pytest.approx([1e-2, 1e-2, 0.25e-2, 0.5e-2, 0.75e-2, 1e-2, 1e-2, 1e-2])


def test_finetuning_callbacks_are_halfprune_and_the_rewarm_up():
    from lightning_halfprune import HalfPrune, presets
    from lightning_halfprune.fit.rewarm import RewarmAfterCut

    prune, rewarm = presets.finetuning_callbacks(0.3)
    assert isinstance(prune, HalfPrune) and isinstance(rewarm, RewarmAfterCut)
    assert prune.schedule.points == {5: 0.3} and prune.options.distill is not None
    assert len(presets.finetuning_callbacks(0.5, rewarm_steps=0)) == 1
