"""What one prune event costs next to one training epoch, and how much memory the optimizer carry-over copies.

    python benchmarks/event_cost.py            # one event next to one training epoch
    python benchmarks/event_cost.py --sweep    # event cost at 1.8M / 7M / 25M params and its log-log slope
    python benchmarks/event_cost.py --sweep --torch-pruning   # the same with torch-pruning's GroupMagnitudeImportance

The CNN is the MNIST-1D 1-D CNN at 56 channels per conv (30.7k parameters) trained with AdamW; the event cuts it to
half its channels at the end of epoch 1 (the second epoch), with latency measurement at batch 64 and the monitored
validation metric re-evaluated right after the cut (the defaults a user gets with `monitor=`).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from common import quiet_trainer, sweep_net

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


class CPUClock(pl.Callback):
    """The main thread's CPU time across the callbacks listed between ``CPUClock("start")`` and ``CPUClock("stop")``.

    With one torch thread all of an event's work runs on the main thread, so this is the event's cost without the
    time other processes on a shared machine held the core.
    """

    def __init__(self, role: str, shared: dict) -> None:
        self.role, self.shared = role, shared

    def on_train_epoch_end(self, trainer, pl_module):
        if self.role == "start":
            self.shared["t0"] = time.thread_time()
        else:
            self.shared["cpu"] = time.thread_time() - self.shared["t0"]


def sweep(widths: tuple[int, ...] = (256, 512, 960), scorer: Any = "l2") -> None:
    """One event (l2 scores, cut, optimizer carry-over, counting) against model size, and the log-log slope."""
    from torch.utils.data import DataLoader, TensorDataset

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # on a machine shared by other jobs, two threads mostly wait for each other
    data = DataLoader(TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))), batch_size=8)
    print(
        "| width | params | event wall s (median of 3) | event CPU s (median of 3) | score s | cut s | measure s "
        "| CPU s per M params |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    walls, cpus = [], []
    for width in widths:
        reports, cpu = [], []
        for _ in range(3):
            prune, clock = HalfPrune({0: 0.5}, scorer=scorer, latency_batch_size=0, verbose=False), {}
            quiet_trainer(1, [CPUClock("start", clock), prune, CPUClock("stop", clock)]).fit(sweep_net(width), data)
            reports.append(prune.reports[0])
            cpu.append(clock["cpu"])
        r = sorted(reports, key=lambda x: x.seconds)[1]
        params, c = r.before.params, sorted(cpu)[1]
        walls.append((params, r.seconds))
        cpus.append((params, c))
        t = r.timings
        print(
            f"| {width} | {params:,} | {r.seconds:.3f} | {c:.3f} | {t['score']:.3f} | {t['cut']:.3f} "
            f"| {t['measure']:.3f} | {c / (params / 1e6):.4f} |"
        )
    print(f"\nleast-squares log-log slope over params: wall clock {_slope(walls):.2f}, CPU time {_slope(cpus):.2f}")


def _slope(points: list[tuple[int, float]]) -> float:
    xs, ys = [math.log(p) for p, _ in points], [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


if __name__ == "__main__":
    if "--sweep" in sys.argv:
        import torch_pruning as tp

        sweep(scorer=tp.importance.GroupMagnitudeImportance(p=2) if "--torch-pruning" in sys.argv else "l2")
    else:
        main()
