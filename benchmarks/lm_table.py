"""The markdown tables of ``benchmarks/lm.py`` from its JSON result (``python benchmarks/lm_table.py lm.json``)."""

from __future__ import annotations

import json
import statistics
import sys


def _stat(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{mean:.{digits}f}{spread}"


def _group(rows: list[dict], name: str) -> list[dict]:
    return [r for r in rows if r["row"] == name]


def _mean(rows: list[dict], name: str, key: str = "val_bpb") -> float | None:
    values = [r[key] for r in _group(rows, name) if key in r]
    return statistics.fmean(values) if values else None


def _line(rows: list[dict], name: str, reference: str | None) -> str:
    group = _group(rows, name)
    if not group:
        return ""
    first = group[0]
    ref = _mean(rows, reference) if reference else None
    delta = f"{100 * (_mean(rows, name) / ref - 1):+.1f}%" if ref else "-"
    share = _stat([100 * r["prune_share"] for r in group if "prune_share" in r], 1)
    arch = first.get("arch")
    widths = f"{arch['heads']}/{arch['kv_heads']}, {arch['intermediate']}" if arch else "-"
    return (
        f"| {name} | {widths} | {first['steps']} | {_stat([r['val_bpb'] for r in group])} | "
        f"{_stat([r['test_bpb'] for r in group])} | {delta} | {first['params']:,} | "
        f"{first['macs_per_token'] / 1e3:.0f}k | {first.get('ms_per_token', float('nan')):.3f} | "
        f"{share if share != '-' else '-'} |\n"
    )


HEADER = (
    "| row | heads/kv, MLP | steps | val bits/byte | test bits/byte | val vs {ref} | params | MACs/token "
    "| ms/token | prune % of time |\n"
    "|---|---|---|---|---|---|---|---|---|---|\n"
)


def _budget(rows: list[dict], target_row: str, curve_row: str) -> str:
    """Per seed: the first step of the from-scratch curve at or below the HalfPrune row's validation loss."""
    out = []
    for r in _group(rows, target_row):
        curves = [c for c in _group(rows, curve_row) if c["seed"] == r["seed"] and "curve" in c]
        if not curves:
            continue
        steps = [s for s, v in curves[0]["curve"] if v <= r["val_bpb"]]
        out.append(str(steps[0]) if steps else f"more than {curves[0]['steps']}")
    return ", ".join(out) or "-"


def _targets(rows: list[dict]) -> str:
    """Issue 23's acceptance, row against row: met or missed, and by how much."""
    dense = _mean(rows, "parent: dense, N steps")
    half, scratch = _mean(rows, "HalfPrune 0.5 recipe, N steps"), _mean(rows, "widths of 0.5 from scratch, N steps")
    most = _mean(rows, "HalfPrune 0.75 recipe, N steps")
    scratch_most = _mean(rows, "widths of 0.75 from scratch, N steps")
    if None in (dense, half, scratch, most, scratch_most):
        return ""
    spread = max(
        (statistics.stdev(v) for name in ("HalfPrune 0.75 recipe, N steps", "widths of 0.75 from scratch, N steps")
         if len(v := [r["val_bpb"] for r in _group(rows, name)]) > 1),
        default=0.0,
    )
    verdict = lambda ok: "met" if ok else "missed"  # noqa: E731
    return (
        "\nTargets: 0.5 within 3% of dense: "
        f"{verdict(half <= 1.03 * dense)} ({100 * (half / dense - 1):+.1f}%); "
        f"0.5 at or below its widths from scratch: {verdict(half <= scratch)} ({half - scratch:+.3f} bpb); "
        f"0.75 below its widths from scratch by more than the seeds' spread ({spread:.3f}): "
        f"{verdict(scratch_most - most > spread)} ({most - scratch_most:+.3f} bpb).\n"
    )


def _minutes(result: dict) -> str:
    if result.get("minutes") is not None:
        return f"{result['minutes']:.1f} min wall"
    train = sum(r.get("seconds", 0) for r in result["rows"]) / 60
    return f"rows collected from finished runs, {train:.0f} min of training in all"


def markdown(result: dict) -> str:
    rows, n = result["rows"], result["steps"]
    text = [
        f"# Pruning a causal LM (issues 23, 27)\n\n`{result['command']}`: {result['seeds']} seed(s), N = {n} steps, "
        f"K = {n // 2}; {_minutes(result)}. Byte-level Qwen3 on the Python stdlib's sources; bits per byte "
        "(mean ± std over seeds); MACs/token: linear layers of a 128-byte forward pass; ms/token: batch 1 x 128 bytes, "
        "1 thread, all architectures timed interleaved (torch.utils.benchmark).\n"
    ]
    if _group(rows, "dense fine-tune, K steps"):
        ref = "dense fine-tune, K steps"
        text.append("\n## Fine-tune setting (issue 27): parent N steps, then K steps on new data\n\n")
        text.append(HEADER.format(ref="dense fine-tune"))
        for name in ("parent: dense, N steps", ref, "HalfPrune 0.3 fine-tune, K steps",
                     "widths of 0.3 from scratch, N+K steps", "HalfPrune 0.5 fine-tune, K steps",
                     "widths of 0.5 from scratch, N+K steps", "half heads, half MLP from scratch, N+K steps"):
            text.append(_line(rows, name, ref))
        for ratio in (0.3, 0.5):
            pruned, small = f"HalfPrune {ratio} fine-tune, K steps", f"widths of {ratio} from scratch, N+K steps"
            budget = _budget(rows, pruned, small)
            text.append(
                f"\nSteps the widths of {ratio} from scratch (validated every 50 steps) need to reach the validation "
                f"loss of HalfPrune {ratio} (N + K = {n + n // 2} steps in all, per seed): "
                f"{budget}.\n"
            )
        scorers = sorted({r["scorer"] for r in rows if "scorer" in r})
        text.append("\nValidation bits per byte of the parent right after the cut, before any training (`heads`: "
                    "that fraction of the heads and of the MLP neurons; `heads_last`: the same params, split "
                    "between heads and MLP by the loss on 8 calibration batches, as the preset does):\n\n")
        text.append("| ratio | attention | " + " | ".join(scorers) + " |\n|---|---|" + "---|" * len(scorers) + "\n")
        for ratio in (0.3, 0.5):
            for attention in ("heads", "heads_last"):
                cells = [_stat([r["val_bpb"] for r in _group(rows, f"cut {ratio} by {s}, before training")
                                if r.get("attention", "heads") == attention]) for s in scorers]
                text.append(f"| {ratio} | {attention} | " + " | ".join(cells) + " |\n")
    if _group(rows, "HalfPrune 0.5 recipe, N steps"):
        ref = "parent: dense, N steps"
        text.append("\n## From-scratch setting (issue 23): N steps\n\n")
        text.append(HEADER.format(ref="dense"))
        for name in (ref, "HalfPrune 0.5 recipe, N steps", "HalfPrune 0.5 recipe (activation), N steps",
                     "widths of 0.5 from scratch, N steps", "widths of 0.5 distilled from the dense model, N steps",
                     "HalfPrune 0.75 recipe, N steps", "widths of 0.75 from scratch, N steps"):
            text.append(_line(rows, name, ref))
        budget = _budget(rows, "HalfPrune 0.5 recipe, N steps", "widths of 0.5 from scratch, N steps")
        text.append(f"\nSteps the widths of 0.5 from scratch (validated every 50 steps) need to reach the validation "
                    f"loss of the HalfPrune 0.5 recipe ({n} steps, per seed): {budget}.\n")
        text.append(_targets(rows))
    return "".join(text)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(markdown(json.load(f)))
