"""Which scorer should be the default? Every scorer prunes the MNIST-1D 64-channel CNN to half width in one cut at
40% of training (same total epochs for all), 3 seeds each, next to `random` and a 32-channel CNN from scratch.

    python benchmarks/scorers.py            # writes the table to stdout and benchmarks/scorers.md
    python benchmarks/scorers.py --quick    # 1 seed, 4 epochs, small data: a smoke run
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import THREADS, mean_std, run_variant  # noqa: E402

from lightning_halfprune import SCORERS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "scorers.md"))
    args = parser.parse_args()
    seeds, epochs = ([0], 4) if args.quick else ([0, 1, 2], 20)
    rows = []
    for scorer in sorted(SCORERS):
        runs = [run_variant("oneshot", s, epochs, scorer, args.quick) for s in seeds]
        rows.append((scorer, runs))
        print(scorer, [round(r["test_acc"], 4) for r in runs], flush=True)
    small = [run_variant("dense32", s, epochs, quick=args.quick) for s in seeds]
    lines = [
        f"One cut to half the channels at epoch {epochs * 2 // 5} of {epochs}; MNIST-1D, CNN with 64 channels per "
        f"conv; {len(seeds)} seed(s); {THREADS} CPU threads. Accuracy right after the cut is on the validation split "
        "(before any recovery); final accuracy on the test split.",
        "",
        "| scorer | val acc right after the cut | final test acc | event seconds |",
        "|---|---:|---:|---:|",
    ]
    ranked = sorted(rows, key=lambda r: -mean_std([x["test_acc"] for x in r[1]])[0])
    for scorer, runs in ranked:
        cut = mean_std([r["acc_after_cut"] for r in runs])
        final = mean_std([r["test_acc"] for r in runs])
        event = mean_std([r["event_seconds"] for r in runs])[0]
        lines.append(f"| {scorer} | {cut[0]:.4f} ± {cut[1]:.4f} | {final[0]:.4f} ± {final[1]:.4f} | {event:.3f} |")
    final = mean_std([r["test_acc"] for r in small])
    lines.append(f"| 32-channel CNN from scratch | - | {final[0]:.4f} ± {final[1]:.4f} | - |")
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
