"""Time and memory of the `redundancy` scorer on wide layers: 8 calibration batches through an MLP whose hidden
layers have up to 4096 channels.

    python benchmarks/redundancy_wide.py
"""

from __future__ import annotations

import resource
import time

import torch
from torch import nn

from lightning_halfprune import RedundancyScorer
from lightning_halfprune.core.surgeon import Surgeon


def main() -> None:
    torch.set_num_threads(2)
    print("| width | calibrate s (8 batches of 256) | score all groups s | Gram bytes per layer | peak RSS MB |")
    print("|---:|---:|---:|---:|---:|")
    for width in (256, 1024, 4096):
        model = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
        batches = [torch.randn(256, 64) for _ in range(8)]
        scorer = RedundancyScorer()
        start = time.perf_counter()
        scorer.calibrate(model, batches, loss_fn=None)
        calibrate = time.perf_counter() - start
        gram = scorer._stats[model[0]][2]
        surgeon = Surgeon(model, batches[0][:2])
        start = time.perf_counter()
        for g in surgeon.groups():
            scorer(g.group)
        score = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"| {width} | {calibrate:.3f} | {score:.3f} | {gram.numel() * gram.element_size():,} | {peak:.0f} |")


if __name__ == "__main__":
    main()
