"""The project's bar, measured: half the channels removed during training against what users pick instead.

    python benchmarks/run.py            # 3 seeds, 20 epochs: writes BENCHMARKS.md (takes ~15 min on 2 CPU cores)
    python benchmarks/run.py --quick    # 1 seed, 4 epochs, small data, small sweep: a smoke run (~2 min)

Every variant trains the MNIST-1D 1-D CNN for the same total epochs, in its own process (so peak memory is its
own). Latency: median of 3 x 30 timed forward passes at batch 256 on the CPU, torch threads fixed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import BATCH, THREADS, mean_std, median, quiet_trainer, run_variant, sweep_net  # noqa: E402

from lightning_halfprune import SCORERS  # noqa: E402

DEFAULT_SCORER = "l2"


def table(seeds: list[int], epochs: int, quick: bool) -> tuple[list[str], dict]:
    variants = [
        ("dense 64-channel CNN (reference)", "dense64", "l2"),
        ("dense 32-channel CNN from scratch", "dense32", "l2"),
    ]
    variants.append((f"HalfPrune, gradual, `{DEFAULT_SCORER}` (default)", "halfprune", DEFAULT_SCORER))
    variants += [(f"HalfPrune, gradual, `{s}`", "halfprune", s) for s in sorted(SCORERS) if s != DEFAULT_SCORER]
    variants += [
        ("torch-pruning by hand after training + fine-tune (fresh optimizer)", "tp_by_hand", "l2"),
        ("Lightning ModelPruning 50% l1_unstructured (masks)", "modelpruning_l1", "l2"),
        ("Lightning ModelPruning 50% ln_structured on channels (masks)", "modelpruning_ln", "l2"),
    ]
    if quick:
        variants = variants[:3] + variants[-3:]
    results = {}
    for label, variant, scorer in variants:
        results[label] = [run_variant(variant, s, epochs, scorer, quick) for s in seeds]
        print(label, [round(r["test_acc"], 4) for r in results[label]], flush=True)
    ref = results[variants[0][0]]
    ref_macs, ref_lat = ref[0]["macs"], median([r["latency_ms"] for r in ref])
    lines = [
        "| variant | test acc (mean ± std) | params | MACs / sample | latency ms @256 (median) "
        "| speed-up / MACs reduction | prune events' share of training | peak RSS MB | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, runs in results.items():
        acc = mean_std([r["test_acc"] for r in runs])
        latency = median([r["latency_ms"] for r in runs])
        speedup, reduction = ref_lat / latency, ref_macs / runs[0]["macs"]
        share = mean_std([r["event_seconds"] / r["wall_seconds"] for r in runs])[0]
        lines.append(
            f"| {label} | {acc[0]:.4f} ± {acc[1]:.4f} | {runs[0]['params']:,} | {runs[0]['macs']:,} | {latency:.3f} "
            f"| {speedup:.2f}x / {reduction:.2f}x = {speedup / reduction:.2f} | {share:.2%} "
            f"| {max(r['peak_rss_mb'] for r in runs):.0f} | {mean_std([r['wall_seconds'] for r in runs])[0]:.1f} |"
        )
    return lines, results


def sweep(widths: list[int]) -> tuple[list[str], list[tuple[int, float]]]:
    """Time of one prune event (l2 scores, cut, optimizer carry-over, measuring) against model size."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_halfprune import HalfPrune

    data = DataLoader(TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))), batch_size=8)
    lines = [
        "| width | params | event s | score s | cut s | measure s | s per M params |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    points = []
    for width in widths:
        reports = []
        for _ in range(3):  # the median of 3 events: single timings of the big models are noisy
            model = sweep_net(width)
            prune = HalfPrune({0: 0.5}, latency_batch_size=0, verbose=False)
            quiet_trainer(1, [prune]).fit(model, data)
            reports.append(prune.reports[0])
        r = sorted(reports, key=lambda x: x.seconds)[1]
        points.append((r.before.params, r.seconds))
        t = r.timings
        lines.append(
            f"| {width} | {r.before.params:,} | {r.seconds:.3f} | {t['score']:.3f} | {t['cut']:.3f} "
            f"| {t['measure']:.3f} | {r.seconds / (r.before.params / 1e6):.3f} |"
        )
    return lines, points


def targets(results: dict, points: list[tuple[int, float]]) -> list[str]:
    labels = list(results)
    ref, small, ours = (results[labels[i]] for i in range(3))
    acc = {k: mean_std([r["test_acc"] for r in v])[0] for k, v in (("ref", ref), ("small", small), ("ours", ours))}
    ref_lat = median([r["latency_ms"] for r in ref])
    our_lat = median([r["latency_ms"] for r in ours])
    ratio = (ref_lat / our_lat) / (ref[0]["macs"] / ours[0]["macs"])
    share = max(r["event_seconds"] / r["wall_seconds"] for r in ours)
    xs, ys = [math.log(p) for p, _ in points[-3:]], [math.log(t) for _, t in points[-3:]]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)

    def mark(ok: bool) -> str:
        return "met" if ok else "**MISSED**"

    return [
        "| target | measured | |",
        "|---|---|---|",
        f"| accuracy at half the channels >= 32-channel from scratch | {acc['ours']:.4f} vs {acc['small']:.4f} "
        f"| {mark(acc['ours'] >= acc['small'])} |",
        f"| ... and within 0.5 points of the dense 64-channel CNN | {acc['ours']:.4f} vs {acc['ref']:.4f} "
        f"({(acc['ours'] - acc['ref']) * 100:+.2f} points) | {mark(acc['ours'] >= acc['ref'] - 0.005)} |",
        f"| latency speed-up >= 0.8 x MACs reduction at batch {BATCH} | {ratio:.2f} | {mark(ratio >= 0.8)} |",
        f"| prune events < 5% of training time | {share:.2%} (worst seed) | {mark(share < 0.05)} |",
        f"| event cost grows no worse than linearly with params | least-squares log-log slope {slope:.2f} over the "
        f"three largest models | {mark(slope <= 1.05)} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="default: BENCHMARKS.md (full) or benchmarks/quick.md (--quick)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    seeds, epochs = ([0], 4) if args.quick else ([0, 1, 2], 20)
    widths = [32, 64, 128] if args.quick else [64, 128, 256, 512, 960]
    start = time.time()
    rows, results = table(seeds, epochs, args.quick)
    sweep_rows, points = sweep(widths)
    text = "\n".join(
        [
            "# Benchmarks",
            "",
            f"Made by `python benchmarks/run.py{' --quick' if args.quick else ''}` in {time.time() - start:.0f} s on "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{THREADS} torch threads. MNIST-1D (`mnist1d.make_dataset`), 1-D CNN with 64 channels per conv layer, "
            f"{epochs} epochs for every variant, {len(seeds)} seed(s). HalfPrune rows cut on a cubic schedule "
            f"to half the channels; the other pruning rows cut once at epoch {epochs * 2 // 5}.",
            "",
            *rows,
            "",
            "## Targets",
            "",
            *targets(results, points),
            "",
            "## Cost of one prune event against model size",
            "",
            "A 2-D conv net (4 conv layers of `width` channels, 8x8 inputs) cut to half its channels once, with SGD "
            "momentum carried over; latency measurement off so the event is scoring, cutting and counting. Each row is "
            "the median of 3 events.",
            "",
            *sweep_rows,
            "",
            "## Elsewhere",
            "",
            "- `benchmarks/scorers.md` (`python benchmarks/scorers.py`): every scorer after one cut, 3 seeds.",
            "- `benchmarks/event_cost.md` (`python benchmarks/event_cost.py`): one event next to one training epoch.",
            "- `benchmarks/redundancy_wide.md` (`python benchmarks/redundancy_wide.py`): the redundancy scorer on "
            "layers up to 4096 channels.",
        ]
    )
    out = args.out or ("benchmarks/quick.md" if args.quick else "BENCHMARKS.md")
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({"rows": results, "sweep": points}, f, indent=1)
    with open(out, "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
