"""The score phase of a prune event against model size, timed side by side (issue 19's slope check).

``scale.py`` times each phase once per size, in separate processes; the score phase is short (10 ms at 10M) and its
slope over 10M-400M came out at 1.10 from single runs. Here every size's Llama (the configs of ``scale.py``) is
built in one process and ``Surgeon.plan(0.5, l2)`` (score every group and plan the cut: the event's score phase
without calibration data) is timed interleaved, ``--repeats`` rounds, with the median and spread per size and the
log-log slope of the medians.

    python benchmarks/scale_score.py                       # 10M 30M 125M 400M, 7 rounds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from scale import SIZES, _config, _slope  # noqa: E402


def main() -> None:
    import torch
    import transformers as tf

    from lightning_halfprune.core.scoring import get_scorer
    from lightning_halfprune.core.surgeon import Surgeon

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)

    class LM(torch.nn.Module):
        def __init__(self, size: str) -> None:
            super().__init__()
            self.net = tf.LlamaForCausalLM(_config(size, small=False))

        def forward(self, ids):
            return self.net(input_ids=ids).logits

    surgeons, params = {}, {}
    for size in args.sizes:
        model = LM(size)
        params[size] = sum(p.numel() for p in model.parameters())
        surgeons[size] = Surgeon(model, torch.randint(0, SIZES[size][5], (2, 128)))
        surgeons[size].plan(0.5, get_scorer("l2"))  # groups found and cached, as at train start
    times: dict[str, list[float]] = {size: [] for size in args.sizes}
    for _ in range(args.repeats):
        for size in args.sizes:
            start = time.perf_counter()
            surgeons[size].plan(0.5, get_scorer("l2"))
            times[size].append(time.perf_counter() - start)
    print("| size | params | score + plan s: median [min-max] |\n|---|---|---|")
    for size in args.sizes:
        t = times[size]
        print(f"| {size} | {params[size] / 1e6:.1f}M | {statistics.median(t):.4f} [{min(t):.4f}-{max(t):.4f}] |")
    medians = [(params[s], statistics.median(times[s])) for s in args.sizes]
    lows = [(params[s], min(times[s])) for s in args.sizes]
    print(f"\nlog-log slope of the medians: {_slope(medians):.2f}; of the minima: {_slope(lows):.2f}")
    print(f"({args.repeats} rounds, the sizes interleaved in one process, 2 threads)")


if __name__ == "__main__":
    main()
