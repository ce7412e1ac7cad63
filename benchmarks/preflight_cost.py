"""What the pre-flight costs at train start: one dry-run cut to the final ratio (plan, cut, forward, undo).

Next to it, for scale: building the dependency graph (paid at train start anyway) and one real cut of the same plan.
Timings are interleaved per repetition (pre-flight, then graph, then cut on a fresh model) and reported as median
[min - max] over the repetitions. Run: ``PYTHONPATH=src python benchmarks/preflight_cost.py`` (writes
``benchmarks/preflight_cost.md``).
"""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from lightning_halfprune.core.measure import count_params
from lightning_halfprune.core.preflight import preflight
from lightning_halfprune.core.scoring import get_scorer
from lightning_halfprune.core.surgeon import Surgeon
from lightning_halfprune.demo import CNN1D

REPS = 7


def conv_net(width: int) -> nn.Module:
    layers, c = [], 3
    for _ in range(4):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, build, x) -> str:
    pre, graph, cut = [], [], []
    for _ in range(REPS):
        model = build()
        surgeon = Surgeon.__new__(Surgeon)
        graph.append(timed(lambda: Surgeon.__init__(surgeon, model, x)))  # noqa: B023
        pre.append(timed(lambda: preflight(surgeon, [0.5])))  # noqa: B023
        plan = surgeon.plan(0.5, get_scorer("l2"))
        cut.append(timed(lambda: surgeon.cut(plan)))  # noqa: B023
    params = count_params(build())
    share = statistics.median(pre) / statistics.median(graph)
    return f"| {name} | {params:,} | {_fmt(pre)} | {_fmt(graph)} | {_fmt(cut)} | {share:.2f} |"


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.1f} [{min(values) * 1e3:.1f} - {max(values) * 1e3:.1f}]"


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # less sensitive to a loaded machine than 2 threads
    rows = [measure("demo CNN1D (64 channels, the README's model)", lambda: CNN1D(channels=64), torch.zeros(1, 1, 40))]
    for width in (64, 256, 512):
        rows.append(measure(f"4-conv 2-D net, width {width}", lambda w=width: conv_net(w), torch.zeros(1, 3, 8, 8)))
    text = (
        "# Pre-flight cost\n\n"
        f"`python benchmarks/preflight_cost.py`, torch {torch.__version__}, 1 thread, a shared 2-core machine; "
        f"milliseconds, median [min - max] of {REPS} repetitions. Pre-flight: `preflight(surgeon, [0.5])`, one dry-run "
        "cut to half the channels with the forward check, undone (model and torch-pruning graph). Graph: building the "
        "Surgeon (tracing, paid at train start anyway). Cut: the real cut of the same plan, with its forward check.\n\n"
        "| model | params | pre-flight ms | graph build ms | one cut ms | pre-flight / graph build |\n"
        "|---|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n"
    )
    Path(__file__).with_name("preflight_cost.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
