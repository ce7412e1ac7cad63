"""What HalfPrune costs on Hugging Face Llama models of growing size: memory and time (issue 19).

Every run is its own process, so its peak RSS is its own: a Llama from a config (fp32, AdamW, batch 2 x 128 tokens of
random ids), a few optimizer steps, and one cut to ratio 0.5 right after step 1
(``HalfPrune(Schedule({1: 0.5}, interval="step"))``). Variants:

- ``dense``: the fit without HalfPrune; ``small``: the pruned widths (MLP and heads halved) trained without HalfPrune;
- ``halfprune``: the defaults; ``notiming``: ``timing=None``; ``distill``: with ``distill=Distill()``.

Measured: peak RSS (``ru_maxrss``); the event's own peak (the RSS at the end of step 1 before HalfPrune's hook, and
the highest RSS until the hook returns, after resetting Linux's high-water mark ``VmHWM``; for ``dense`` and ``small``
the same span, without a cut); the bytes of every live tensor at the end of training (found through ``gc``, each
storage once), the time of HalfPrune's ``on_train_start`` and ``on_fit_end`` (wall and process CPU), and the phases of
the event (``PruneReport.timings``). The log-log slope of each against the parameter count is fitted over the sizes.

    python benchmarks/scale.py                 # 10M, 30M, 125M: writes benchmarks/scale.md and scale.json
    python benchmarks/scale.py --sizes 10M 30M 125M 400M   # and 400M (about 9 GB peak; 17 min in all)
    python benchmarks/scale.py --sizes 10M     # one size
    python benchmarks/scale.py --sizes 400M --keep   # adds 400M (about 7 GB) to the rows already there
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "10M": (256, 4, 4, 2, 688, 16000),
    "30M": (384, 8, 6, 2, 1024, 32000),
    "125M": (768, 12, 12, 4, 2048, 32000),
    "400M": (1024, 24, 16, 4, 4096, 32000),  # about 7 GB with AdamW: on demand (--sizes 400M --keep)
}
DEFAULT_SIZES = ("10M", "30M", "125M")
VARIANTS = ("dense", "small", "halfprune", "notiming", "distill")
STEPS = 4


def _config(size: str, small: bool):
    import transformers as tf

    hidden, layers, heads, kv, inter, vocab = SIZES[size]
    if small:  # the widths HalfPrune({1: 0.5}) leaves: half the MLP neurons and half the key/value groups
        heads, kv, inter = heads // 2, kv // 2, inter // 2
    return tf.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=SIZES[size][0] // SIZES[size][2],
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


def _live_tensor_bytes() -> int:
    import gc

    import torch

    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj) and obj.device.type != "meta":
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        except Exception:  # noqa: BLE001, S112 - objects half torn down by gc
            continue
    return sum(storages.values())


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``: the peak since the last reset) in MB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def child(size: str, variant: str) -> dict:
    import resource

    import lightning.pytorch as pl
    import torch
    import transformers as tf
    from lightning.pytorch.callbacks import Callback

    from lightning_halfprune import Distill, HalfPrune, Schedule

    torch.manual_seed(0)
    torch.set_num_threads(2)

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = tf.LlamaForCausalLM(_config(size, variant == "small"))
            self.example_input_array = torch.randint(0, SIZES[size][5], (2, 128))

        def forward(self, ids):
            return self.net(input_ids=ids).logits

        def training_step(self, batch, _):
            (ids,) = batch
            logits = self(ids)
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    class Clock(Callback):  # one before HalfPrune and one after it: the difference is HalfPrune's hook
        def __init__(self, marks: dict, tag: str) -> None:
            self.marks, self.tag = marks, tag

        def on_train_batch_end(self, trainer, *_):  # the event's own peak: the high-water mark reset right before it
            if trainer.global_step != 1 or f"event_{self.tag}" in self.marks:
                return
            if self.tag == "a":
                self.marks["peak_before_event_mb"] = _status_mb("VmHWM")
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)
            self.marks[f"event_{self.tag}"] = _status_mb("VmRSS" if self.tag == "a" else "VmHWM")

        def on_train_start(self, *_):
            self.marks[f"start_{self.tag}"] = (time.perf_counter(), time.process_time())

        def on_fit_end(self, *_):
            self.marks[f"end_{self.tag}"] = (time.perf_counter(), time.process_time())

        def on_train_end(self, trainer, pl_module):
            self.marks["live_bytes"] = _live_tensor_bytes()

    ids = torch.randint(0, SIZES[size][5], (STEPS * 2, 128))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)
    marks: dict = {}
    prune = None
    callbacks = [Clock(marks, "a")]
    if variant in ("halfprune", "notiming", "distill"):
        distill = Distill() if variant == "distill" else None
        timing = {"timing": None} if variant == "notiming" else {}
        prune = HalfPrune(Schedule({1: 0.5}, interval="step"), distill=distill, verbose=False, **timing)
        callbacks.append(prune)
    callbacks.append(Clock(marks, "b"))
    model = LM()
    params = sum(p.numel() for p in model.parameters())
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, loader)
    out = {
        "size": size,
        "variant": variant,
        "params": params,
        "params_after": sum(p.numel() for p in model.parameters()),
        "peak_rss_mb": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, marks["peak_before_event_mb"]),
        "live_mb": marks["live_bytes"] / 2**20,
        "event_rss_mb": marks["event_a"],  # RSS at the end of step 1, before HalfPrune's hook (its cut)
        "event_peak_mb": marks["event_b"],  # the highest RSS from there to the end of HalfPrune's hook
    }
    if prune is not None:
        out["train_start_s"] = marks["start_b"][0] - marks["start_a"][0]
        out["train_start_cpu_s"] = marks["start_b"][1] - marks["start_a"][1]
        out["fit_end_s"] = marks["end_b"][0] - marks["end_a"][0]
        out["event_s"] = {k: round(v, 3) for k, v in prune.reports[0].timings.items()}
        out["event_without_latency_s"] = sum(v for k, v in prune.reports[0].timings.items() if k != "latency")
        out["teacher_mb"] = (prune.reports[0].teacher_bytes or 0) / 2**20
    return out


def _slope(points: list[tuple[float, float]]) -> float | None:
    points = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y > 0]
    if len(points) < 2:
        return None
    mx, my = sum(x for x, _ in points) / len(points), sum(y for _, y in points) / len(points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def table(rows: list[dict]) -> str:
    lines = [
        "| size | params | variant | peak RSS MB | event: RSS before, peak during (MB) | live MB at end "
        "| on_train_start s (CPU s) | event s without latency | phases s | on_fit_end s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        start = f"{r['train_start_s']:.2f} ({r['train_start_cpu_s']:.2f})" if "train_start_s" in r else "-"
        event = f"{r['event_without_latency_s']:.2f}" if "event_s" in r else "-"
        phases = ", ".join(f"{k} {v:.2f}" for k, v in r.get("event_s", {}).items()) or "-"
        end = f"{r['fit_end_s']:.2f}" if "fit_end_s" in r else "-"
        memory = f"{r['event_rss_mb']:.0f}, {r['event_peak_mb']:.0f}" if "event_peak_mb" in r else "-"
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['variant']} | {r['peak_rss_mb']:.0f} | {memory} "
            f"| {r['live_mb']:.0f} "
            f"| {start} | {event} | {phases} | {end} |"
        )
    ours = [r for r in rows if r["variant"] == "halfprune"]
    slopes = {
        key: _slope([(r["params"], r[key]) for r in ours if key in r])
        for key in ("train_start_cpu_s", "event_without_latency_s", "fit_end_s")
    }
    phases = sorted({k for r in ours for k in r.get("event_s", {})})
    for phase in phases:
        points = [(r["params"], r["event_s"][phase]) for r in ours if phase in r.get("event_s", {})]
        slopes[f"event {phase}"] = _slope(points)
    lines.append("")
    lines.append(
        "Log-log slope against params (HalfPrune defaults): "
        + ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in slopes.items())
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES), choices=list(SIZES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--keep", action="store_true", help="keep the rows of scale.json this run does not redo")
    args = parser.parse_args()
    rows = []
    if args.keep and (HERE / "scale.json").exists():
        redo = {(size, variant) for size in args.sizes for variant in args.variants}
        rows = [r for r in json.loads((HERE / "scale.json").read_text()) if (r["size"], r["variant"]) not in redo]
    for size in args.sizes:
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--child", size, variant]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(f"{size} {variant} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    rows.sort(key=lambda r: (r["params"], VARIANTS.index(r["variant"])))
    (HERE / "scale.json").write_text(json.dumps(rows, indent=1))
    sizes = " ".join(dict.fromkeys(r["size"] for r in rows))
    text = f"# Scale: HalfPrune on Llama models\n\n`python benchmarks/scale.py --sizes {sizes}`"
    text += " (rows of several runs joined with `--keep`)\n\n"
    (HERE / "scale.md").write_text(text + table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3])))
    else:
        main()
