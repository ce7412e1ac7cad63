"""Recovery after the cut: pruning a dense net (with and without distillation, LR rewinding) against training the
small net from scratch (with and without the dense net as teacher), at ratios 0.5 and 0.75.

    python benchmarks/recovery.py              # 3 seeds, MNIST-1D and Fashion-MNIST: writes benchmarks/recovery.md
    python benchmarks/recovery.py --quick      # 1 seed, few epochs, small data: a smoke run (~3 min)
    python benchmarks/recovery.py --tasks mnist1d --jobs 2

Every run trains in its own process (1 torch thread; ``--jobs`` runs in parallel) and appends one JSON line to
``benchmarks/recovery_runs.jsonl`` (runs already there are not redone; ``--fresh`` starts over). Latency is timed
afterwards in this process, side by side: the dense, half and quarter width nets interleaved, rounds of 20 timed
forward passes each, median and spread over rounds. Fashion-MNIST is read from
/usr/share/datasets/fashion-mnist (``apt-get install dataset-fashion-mnist``); it is never used by tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join(HERE, "recovery_runs.jsonl")
TEACHERS = os.path.join(HERE, ".recovery_teachers")
ALPHA, TEMPERATURE, REWIND = 1.0, 2.0, 2  # distillation as in examples/recipe_recovery.yaml
EPOCHS = {"mnist1d": 20, "fmnist": 15}
QUICK_EPOCHS = {"mnist1d": 5, "fmnist": 2}
# the data size: MNIST-1D samples generated (the data module splits them); Fashion-MNIST training images taken from
# the training file (then 2k validation images after them; the test set is the full 10k test file)
DATA = {"mnist1d": 5000, "fmnist": 12000}
QUICK_DATA = {"mnist1d": 1000, "fmnist": 3000}
# runs recorded before the data size was part of a run's record (Fashion-MNIST then: 4k training images, 5 epochs)
LEGACY_DATA = {("mnist1d", False): 5000, ("mnist1d", True): 1000, ("fmnist", False): 4000, ("fmnist", True): 3000}
WIDTH = {"mnist1d": 64, "fmnist": 32}

# variant -> (label, what it is)
VARIANTS = {
    "dense": "dense net (reference; also the teacher of `scratch_kd`)",
    "scratch": "small net of the final width, from scratch",
    "scratch_kd": "small net from scratch, distilled from the trained dense net all the way",
    "hp": "HalfPrune, cubic schedule, `l2` (no recovery lever)",
    "hp_kd": "HalfPrune + distillation (teacher: model before the first cut)",
    "hp_kd_each": "HalfPrune + distillation (teacher: model before each cut)",
    "hp_rw": "HalfPrune + LR rewinding (2 epochs)",
    "hp_kd_rw": "HalfPrune + distillation + LR rewinding (2 epochs)",
    "hp_kd_short": "HalfPrune + distillation (teacher: before each cut) only until 2 epochs after the last cut",
    "hp_kd_short_oneshot": "the recipe (short distillation), but one cut at 2/5 of the fit",
    "hp_kd_short_reg": "the recipe (short distillation) + group-lasso `regularization=1e-4`",
    "hp_kd_short_taylor": "the recipe (short distillation), `taylor` scorer",
}
LEVERS = ["hp_kd_short_oneshot", "hp_kd_short_reg", "hp_kd_short_taylor"]  # each changes one thing in the recipe


# ---------------------------------------------------------------------------------------------- one run (child)
def _protocol(task: str, quick: bool) -> tuple[int, int]:
    """(epochs, data size) of the current protocol; runs are recorded and looked up under it."""
    return (QUICK_EPOCHS if quick else EPOCHS)[task], (QUICK_DATA if quick else DATA)[task]


def _fmnist_data(n: int):
    import lightning.pytorch as pl
    import torch
    from common import fashion_mnist  # on the path: the child put HERE there
    from torch.utils.data import DataLoader, TensorDataset

    class FashionMNIST(pl.LightningDataModule):
        """A fixed subset: ``n`` training, then 2k validation images of the shuffled training file; full test file."""

        def setup(self, stage=None):
            if hasattr(self, "train_set"):
                return
            x, y = fashion_mnist("train")
            xt, yt = fashion_mnist("t10k")
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
            norm = lambda a: (torch.as_tensor(a, dtype=torch.float32) / 255 - 0.286) / 0.353  # noqa: E731
            x, y = norm(x)[order], torch.as_tensor(y, dtype=torch.long)[order]
            self.train_set = TensorDataset(x[:n], y[:n])
            self.val_set = TensorDataset(x[n : n + 2000], y[n : n + 2000])
            self.test_set = TensorDataset(norm(xt), torch.as_tensor(yt, dtype=torch.long))

        def train_dataloader(self):
            return DataLoader(self.train_set, batch_size=128, shuffle=True)

        def val_dataloader(self):
            return DataLoader(self.val_set, batch_size=512)

        def test_dataloader(self):
            return DataLoader(self.test_set, batch_size=512)

    return FashionMNIST()


def cnn2d(channels: int):
    """A small 2-D CNN for Fashion-MNIST: 3 conv blocks (the last two strided) and a linear classifier."""
    import torch
    from torch import nn

    from lightning_halfprune.demo import CNN1D

    class CNN2D(CNN1D):
        def __init__(self, channels: int = 32, lr: float = 0.01, weight_decay: float = 1e-4) -> None:
            super().__init__(channels=4, layers=1, lr=lr, weight_decay=weight_decay)
            self.save_hyperparameters()
            blocks, width = [], 1
            for stride in (1, 2, 2):
                blocks += [nn.Conv2d(width, channels, 3, stride, 1), nn.BatchNorm2d(channels), nn.ReLU()]
                width = channels
            self.features = nn.Sequential(*blocks)
            self.classifier = nn.Linear(channels * 7 * 7, 10)
            self.example_input_array = torch.zeros(1, 1, 28, 28)

    return CNN2D(channels)


def _model(task: str, channels: int):
    from lightning_halfprune.demo import CNN1D

    return CNN1D(channels=channels) if task == "mnist1d" else cnn2d(channels)


def _train(task: str, variant: str, ratio: float, seed: int, quick: bool) -> dict:
    import lightning.pytorch as pl
    import torch

    from lightning_halfprune import Distill, HalfPrune, OneShot, Sparsity
    from lightning_halfprune.core.measure import MacCounter, count_params
    from lightning_halfprune.demo import MNIST1DDataModule
    from lightning_halfprune.fit.distill import Distiller

    sys.path.insert(0, HERE)
    from common import quiet_trainer

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    pl.seed_everything(seed, verbose=False)
    epochs, size = _protocol(task, quick)
    data = MNIST1DDataModule(num_samples=size) if task == "mnist1d" else _fmnist_data(size)
    full = WIDTH[task]
    width = full if variant == "dense" or variant.startswith("hp") else round(full * (1 - ratio))
    model = _model(task, width)
    callbacks: list = []
    prune = distiller = None
    if variant == "scratch_kd":
        teacher = _model(task, full)
        teacher.load_state_dict(torch.load(_teacher_path(task, seed, quick)))
        distiller = Distiller(Distill(alpha=ALPHA, temperature=TEMPERATURE))
        distiller.take_teacher(teacher)
        distiller.attach(model)
    elif variant.startswith("hp"):
        if variant.endswith("oneshot"):
            schedule = OneShot(at=epochs * 2 // 5, ratio=ratio)
        else:
            schedule = _cubic(epochs, ratio)
        prune = HalfPrune(
            schedule,
            scorer="taylor" if variant.endswith("taylor") else "l2",
            monitor="val_acc",
            verbose=False,
            timing=None,
            sparsity=Sparsity(1e-4) if variant.endswith("reg") else None,
            distill=Distill(
                alpha=ALPHA,
                temperature=TEMPERATURE,
                teacher="each" if "_each" in variant or "_short" in variant else "first",
                epochs=2 if "_short" in variant else None,
            )
            if "_kd" in variant
            else None,
            lr_rewind=REWIND if "_rw" in variant else 0,
        )
        callbacks.append(prune)
    start = time.perf_counter()
    trainer = quiet_trainer(epochs, callbacks, num_sanity_val_steps=0)
    trainer.fit(model, data)
    wall = time.perf_counter() - start
    if distiller is not None:
        distiller.drop_teacher()
        distiller.detach(model)
    test_acc = trainer.test(model, data, verbose=False)[0]["test_acc"]
    if variant == "dense":
        os.makedirs(TEACHERS, exist_ok=True)
        torch.save(model.state_dict(), _teacher_path(task, seed, quick))
    kd = prune._distiller if prune is not None and prune._distiller is not None else distiller
    return {
        "task": task,
        "variant": variant,
        "ratio": ratio,
        "seed": seed,
        "epochs": epochs,
        "data_size": size,
        "quick": quick,
        "test_acc": test_acc,
        "params": count_params(model),
        "macs": MacCounter()(model, model.example_input_array),
        "wall_seconds": wall,
        "event_seconds": sum(r.seconds for r in prune.reports) if prune else 0.0,
        "distill_seconds": kd.seconds if kd is not None else 0.0,
        "teacher_bytes": kd.teacher_bytes if kd is not None else 0,
        "acc_after_cut": [r.metric_after_cut for r in prune.reports] if prune else None,
    }


def _cubic(epochs: int, ratio: float):
    """The main job's schedule: cubic from 1/5 to 1/2 of the fit, a cut every 1/10 (at least every epoch)."""
    from lightning_halfprune import Cubic

    return Cubic(start=epochs // 5, end=epochs // 2, ratio=ratio, every=max(1, epochs // 10))


def _teacher_path(task: str, seed: int, quick: bool) -> str:
    epochs, size = _protocol(task, quick)
    return os.path.join(TEACHERS, f"{task}_{seed}_{epochs}ep_{size}{'_quick' if quick else ''}.pt")


# ---------------------------------------------------------------------------------------------- the table (parent)
def _key(r: dict) -> tuple:
    """A run's key: the protocol (epochs, data size) is part of it, so runs of an older protocol never mix in."""
    size = r.get("data_size", LEGACY_DATA[r["task"], r["quick"]])
    return (r["task"], r["variant"], r["ratio"], r["seed"], r["quick"], r["epochs"], size)


def _k(task: str, variant: str, ratio: float, seed: int, quick: bool) -> tuple:
    return (task, variant, ratio, seed, quick, *_protocol(task, quick))


def _load() -> dict[tuple, dict]:
    if not os.path.exists(RUNS):
        return {}
    with open(RUNS) as f:
        return {_key(r): r for r in map(json.loads, f) if r and not r.get("skipped")}


def _run(task: str, variant: str, ratio: float, seed: int, quick: bool) -> dict:
    args = [sys.executable, __file__, "--one", task, variant, str(ratio), str(seed), str(int(quick))]
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{task} {variant} {ratio} seed {seed} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    with open(RUNS, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(task, variant, ratio, seed, round(result["test_acc"], 4), f"{result['wall_seconds']:.0f}s", flush=True)
    return result


def _plan(tasks: list[str], seeds: list[int], levers: bool) -> list[tuple[str, str, float]]:
    """What runs, most needed first (the table renders whatever has finished)."""
    plan = []
    if "mnist1d" in tasks:
        plan.append(("mnist1d", "dense", 0.0))
        for ratio in (0.5, 0.75):
            plan += [("mnist1d", v, ratio) for v in ("hp_kd", "hp", "scratch", "scratch_kd")]
    if "fmnist" in tasks:  # the default recipe (no lever) against dense and scratch first, then the best lever
        plan.append(("fmnist", "dense", 0.0))
        plan += [("fmnist", v, 0.5) for v in ("hp", "scratch", "hp_kd_short")]
        plan += [("fmnist", v, 0.75) for v in ("hp", "scratch", "hp_kd_short")]
        plan += [("fmnist", v, r) for r in (0.5, 0.75) for v in ("hp_kd", "scratch_kd")]
    if "mnist1d" in tasks:
        plan += [("mnist1d", v, 0.5) for v in ("hp_kd_rw", "hp_kd_each", "hp_rw", "hp_kd_short")]
        plan += [("mnist1d", "hp_kd_short", 0.75)]
    if levers and "mnist1d" in tasks:
        plan += [("mnist1d", v, 0.75) for v in LEVERS]
    return plan


def latency_side_by_side(task: str, rounds: int = 7) -> dict[int, tuple[float, float, float]]:
    """Median (and min/max over rounds) ms per batch of 256 for the dense, half and quarter width nets, interleaved."""
    import torch
    from common import measure_latency

    from lightning_halfprune.core.measure import MacCounter

    torch.set_num_threads(1)
    models = {}
    for w in (WIDTH[task], WIDTH[task] // 2, WIDTH[task] // 4):
        m = _model(task, w).eval()
        models[MacCounter()(m, m.example_input_array)] = m
    times: dict[int, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for macs, m in models.items():
            times[macs].append(measure_latency(m, m.example_input_array, 256, runs=20))
    return {k: (statistics.median(v), min(v), max(v)) for k, v in times.items()}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def render(runs: dict, tasks: list[str], seeds: list[int], quick: bool, levers: bool) -> str:
    lines = []
    for task in tasks:
        latency = latency_side_by_side(task)
        dense = [runs[k] for k in (_k(task, "dense", 0.0, s, quick) for s in seeds) if k in runs]
        if not dense:
            continue
        ref_acc, ref_macs = _mean_std([r["test_acc"] for r in dense])[0], dense[0]["macs"]
        name = {"mnist1d": "MNIST-1D, 1-D CNN of the main job", "fmnist": "Fashion-MNIST, small 2-D CNN"}[task]
        epochs, size = _protocol(task, quick)
        data = (
            f"{size:,} samples"
            if task == "mnist1d"
            else f"{size:,} training / 2,000 validation images of the training file, the full 10,000 test images"
        )
        cuts = ", ".join(map(str, sorted(_cubic(epochs, 0.5).points)))
        lines += [
            f"### {name} ({WIDTH[task]} channels, {epochs} epochs every row, {len(seeds)} seed(s))",
            "",
            f"Data: {data}. HalfPrune's prune points: the end of epochs {cuts} (0-based; cubic, the main job's "
            f"shape), so {epochs - 1 - max(_cubic(epochs, 0.5).points)} epochs of recovery follow the last one.",
            "",
            "| ratio | variant | test acc (mean ± std) | vs dense (points) | params | MACs / sample | MACs reduction "
            "| latency ms @256, side by side (median [min-max]) | teacher MB | distill s | wall s |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        skipped: list[str] = []
        for t, variant, ratio in _plan([task], seeds, levers):
            rows = [runs.get(_k(t, variant, ratio, s, quick)) for s in seeds]
            rows = [r for r in rows if r is not None]
            if not rows:
                skipped.append(f"{ratio:g} {VARIANTS[variant]} (`{variant}`)")
                continue
            acc = _mean_std([r["test_acc"] for r in rows])
            lat = latency.get(rows[0]["macs"])
            lat_text = f"{lat[0]:.2f} [{lat[1]:.2f}-{lat[2]:.2f}]" if lat else "n/a"
            n = f" ({len(rows)} seeds)" if len(rows) != len(seeds) else ""
            lines.append(
                f"| {ratio:g} | {VARIANTS[variant]}{n} | {acc[0]:.4f} ± {acc[1]:.4f} | {(acc[0] - ref_acc) * 100:+.2f} "
                f"| {rows[0]['params']:,} | {rows[0]['macs']:,} | {ref_macs / rows[0]['macs']:.2f}x | {lat_text} "
                f"| {rows[0]['teacher_bytes'] / 1e6:.2f} | {_mean_std([r['distill_seconds'] for r in rows])[0]:.1f} "
                f"| {_mean_std([r['wall_seconds'] for r in rows])[0]:.1f} |"
            )
        if skipped:
            lines += ["", "Skipped (not run for lack of time): " + "; ".join(skipped) + "."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="forget the runs recorded so far")
    parser.add_argument("--tasks", nargs="+", default=["mnist1d", "fmnist"])
    parser.add_argument("--no-levers", action="store_true", help="skip the one-shot/regularization/scorer rows")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (1 torch thread each)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these variants")
    parser.add_argument("--render-only", action="store_true", help="write the table from the runs recorded so far")
    parser.add_argument("--note", default="", help="a sentence for the header (how and when the runs were made)")
    parser.add_argument("--out", default=None, help="default benchmarks/recovery.md (quick: recovery_quick.md)")
    args = parser.parse_args()
    if args.fresh and os.path.exists(RUNS):
        os.remove(RUNS)
    seeds = [0] if args.quick else [0, 1, 2]
    levers = not args.no_levers
    start = time.time()
    runs = _load()
    plan = _plan(args.tasks, seeds, levers)
    order = sorted(range(len(plan)), key=lambda i: (plan[i][1] != "dense", plan[i][0] != "mnist1d", i))
    plan_in_order = [plan[i] for i in order]
    todo = [(t, v, r, s) for t, v, r in plan_in_order for s in seeds if _k(t, v, r, s, args.quick) not in runs]
    todo = [] if args.render_only else [x for x in todo if args.only is None or x[1] in args.only]
    with ThreadPoolExecutor(args.jobs) as pool:  # started in order: the dense runs (scratch_kd's teachers) first
        list(pool.map(lambda x: _run(*x, args.quick), todo))
    runs = _load()
    made = (
        f"Rendered by `python benchmarks/recovery.py{' --quick' if args.quick else ''} --render-only` from the runs "
        "recorded in `benchmarks/recovery_runs.jsonl`"
        if args.render_only
        else f"Made by `python benchmarks/recovery.py{' --quick' if args.quick else ''} --jobs {args.jobs}` "
        f"({time.time() - start:.0f} s for the runs not yet recorded)"
    )
    text = "\n".join(
        [
            f"{made} on {platform.machine()}, {os.cpu_count()} cores shared with other work, torch 1 thread per run. "
            + (args.note + " " if args.note else "")
            + f"Distillation: alpha={ALPHA}, T={TEMPERATURE}; LR rewinding {REWIND} epochs. HalfPrune rows use the "
            "main job's cubic schedule (from 1/5 to 1/2 of the fit, every 1/10 or every epoch); teacher MB = its "
            "params + buffers; distill s = time in teacher forwards and the KL term; wall s = fit time (training "
            "only; runs in parallel share the cores). Latency: the dense, half and quarter width nets timed side by "
            "side in one process at render time (7 interleaved rounds of 20 forward passes at batch 256, 1 thread).",
            "",
            render(runs, args.tasks, seeds, args.quick, levers),
        ]
    )
    out = args.out or os.path.join(HERE, "recovery_quick.md" if args.quick else "recovery.md")
    with open(out, "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        task, variant, ratio, seed, quick = sys.argv[2:7]
        skip = os.path.join(HERE, ".recovery_skip")  # variants listed there are skipped by a running benchmark
        names = {variant, f"{task}:{variant}", f"{task}:{variant}:{float(ratio)}"}
        if os.path.exists(skip) and names & set(open(skip).read().split()) and not os.environ.get("RECOVERY_NOSKIP"):
            print(json.dumps({"skipped": True, "task": task, "variant": variant, "test_acc": 0.0, "wall_seconds": 0}))
        else:
            print(json.dumps(_train(task, variant, float(ratio), int(seed), quick == "1")))
    else:
        main()
