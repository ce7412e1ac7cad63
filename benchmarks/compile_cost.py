"""What a prune event costs with ``torch.compile`` (inductor) against without, on the MNIST-1D CNN.

    python benchmarks/compile_cost.py [REPEATS]

The demo CNN1D (3 conv blocks, 56 channels, 1000 samples, batch 256) gets 5 cuts (epochs 0-4 to ratios 0.2 ... 0.6)
over 7 epochs, once with ``model.features = torch.compile(model.features)`` (inductor) and once without,
interleaved, REPEATS times each (default 2). Per run: the events' own seconds (HalfPrune's passes run eagerly under
compile, so these should match), the first training epoch after each cut (where the recompilation lands) against
the last epoch (epoch 6: no cut before it), and the compilations HalfPrune counted per cut.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import lightning.pytorch as pl
import torch
from common import quiet_trainer

from lightning_halfprune import HalfPrune
from lightning_halfprune.demo import CNN1D, MNIST1DDataModule

SCHEDULE = {0: 0.2, 1: 0.3, 2: 0.4, 3: 0.5, 4: 0.6}


class EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.epochs: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):  # listed first: runs before HalfPrune's cut
        self.epochs.append(time.perf_counter() - self.start)


def run(compiled: bool, seed: int) -> dict:
    pl.seed_everything(seed, verbose=False)
    torch._dynamo.reset()
    model, timer = CNN1D(channels=56), EpochTimer()
    if compiled:
        model.features = torch.compile(model.features)
    prune = HalfPrune(SCHEDULE, verbose=False, latency_batch_size=64)
    quiet_trainer(7, [timer, prune], num_sanity_val_steps=0).fit(model, MNIST1DDataModule(num_samples=1000))
    return {
        "events": [r.seconds for r in prune.reports],
        "epochs": timer.epochs,
        "compiles": prune.compiles.counts if compiled else [],
        "macs": [r.after.macs for r in prune.reports],
    }


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} s ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for seed in range(repeats):
        for compiled in (False, True):  # interleaved
            runs[compiled].append(run(compiled, seed))
            print(f"<!-- compiled={compiled} seed={seed}: {runs[compiled][-1]} -->", flush=True)
    print("| | event s, median (min-max) over 5 cuts x runs | epoch 0 s (first compile) | first epoch after a cut s | last epoch s (no cut before) | compilations after each cut | MACs after the last cut |")  # noqa: E501
    print("|---|---:|---:|---:|---:|---|---:|")
    for compiled, label in ((False, "eager"), (True, "torch.compile (inductor)")):
        rs = runs[compiled]
        events = [s for r in rs for s in r["events"]]
        after_cut = [s for r in rs for s in r["epochs"][1:6]]
        print(
            f"| {label} | {spread(events)} | {spread([r['epochs'][0] for r in rs])} | {spread(after_cut)} "
            f"| {spread([r['epochs'][6] for r in rs])} | {rs[0]['compiles'][1:] or '-'} | {rs[0]['macs'][-1]:,} |"
        )


if __name__ == "__main__":
    main()
