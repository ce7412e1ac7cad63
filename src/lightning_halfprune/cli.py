"""The ``halfprune`` command: a LightningCLI with a ``--halfprune.*`` argument group and the MNIST-1D demo as default.

``halfprune fit --config examples/mnist1d.yaml`` trains the demo and prunes half its channels. Your own classes
work like in any LightningCLI: ``--model my_pkg.MyModel --data my_pkg.MyData``. HalfPrune can be configured in its
own group (``halfprune: {schedule: ..., scorer: ...}``) or as a trainer callback (``class_path``).
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_halfprune._compat import lightning as lc
from lightning_halfprune.callback import HalfPrune


class HalfPruneCLI(LightningCLI):
    """LightningCLI with HalfPrune's arguments under ``halfprune`` (optional) and the demo task as defaults."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(HalfPrune, "halfprune", subclass_mode=True, required=False)
        parser.set_defaults(
            {
                "model": {"class_path": "lightning_halfprune.demo.CNN1D"},
                "data": {"class_path": "lightning_halfprune.demo.MNIST1DDataModule"},
            }
        )

    def _instantiate_trainer(self, config: dict, callbacks: list) -> pl.Trainer:
        # the optional `halfprune` group is None when not configured: not a callback
        return lc.instantiate_trainer(HalfPruneCLI, self, config, [c for c in callbacks if c is not None])

    def before_fit(self) -> None:
        for logger in self.trainer.loggers:
            if type(logger).__name__ == "WandbLogger" and os.environ.get("WANDB_MODE") == "offline":
                where = f"{logger.save_dir}/wandb/offline-run-*"
                print(f"W&B logs offline (no API key found); sync the run later with: wandb sync {where}")


def _wandb_offline_without_key() -> None:
    """Without a W&B API key (or no network), log offline instead of failing or prompting."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    os.environ["WANDB_MODE"] = "offline"


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``halfprune`` console script and ``python -m lightning_halfprune``."""
    _wandb_offline_without_key()
    HalfPruneCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,  # None: LightningCLI reads sys.argv itself (passing it explicitly makes Lightning warn)
        save_config_kwargs={"overwrite": True},
    )
