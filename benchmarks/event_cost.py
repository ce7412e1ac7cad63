"""What one prune event costs next to one training epoch, and how much memory the optimizer carry-over copies.

    python benchmarks/event_cost.py

The CNN is the MNIST-1D 1-D CNN at 56 channels per conv (30.7k parameters) trained with AdamW; the event cuts it to
half its channels at the end of epoch 1 (the second epoch), with latency measurement at batch 64 and the monitored
validation metric re-evaluated right after the cut (the defaults a user gets with `monitor=`).
"""

from __future__ import annotations

import time
import warnings

import lightning.pytorch as pl
import torch
from common import quiet_trainer

from lightning_halfprune import HalfPrune
from lightning_halfprune.demo import CNN1D, MNIST1DDataModule


class EpochTimer(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):  # listed first: runs before HalfPrune's cut
        self.last = time.perf_counter() - self.start
        opt = trainer.optimizers[0]
        self.state_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values())


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    print(
        "| scorer | params | training epoch s | event s | share | score s | cut s | measure s | log s "
        "| AdamW state before -> after the cut |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for scorer, measured in (("l2", True), ("taylor", True), ("redundancy", True), ("l2", False)):
        pl.seed_everything(0, verbose=False)
        model, timer = CNN1D(channels=56), EpochTimer()
        extra = {"monitor": "val_acc"} if measured else {"latency_batch_size": 0}
        prune = HalfPrune({1: 0.5}, scorer=scorer, verbose=False, **extra)
        trainer = quiet_trainer(2, [timer, prune])
        trainer.fit(model, MNIST1DDataModule())
        r = prune.reports[0]
        after = sum(v.numel() * v.element_size() for s in trainer.optimizers[0].state.values() for v in s.values())
        t = r.timings
        print(
            f"| {scorer} | {r.before.params:,} | {timer.last:.3f} | {r.seconds:.3f} | {r.seconds / timer.last:.1%} "
            f"| {t['score']:.3f} | {t['cut']:.3f} | {t['measure']:.3f} | {t['log']:.4f} "
            f"| {timer.state_bytes / 1024:.1f} KiB -> {after / 1024:.1f} KiB |"
        )


if __name__ == "__main__":
    main()
