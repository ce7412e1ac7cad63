"""Issues 23 and 27: prune a causal LM during training and during fine-tuning, measured on real text.

Task (``lm_task.py``): a byte-level Qwen3 (1.05M params) on the Python standard library's sources, bits per byte.

* ``--setting finetune`` (issue 27): a dense parent trained N steps; then K = N/2 steps on new data: the dense
  fine-tune, HalfPrune at 0.3 and 0.5 with the fine-tuning preset, the pruned widths trained from scratch for N + K
  steps, and the loss right after the cut (before any training) per scorer.
* ``--setting scratch`` (issue 23): N steps from scratch: dense (= the parent); HalfPrune 0.5 with the recovery
  recipe (``l2``, cubic, distillation from the model before each cut until 2 epochs after the last) cutting half
  the heads and half the MLP neurons (``attention="heads"``), and with ``scorer="activation"``; the pruned widths
  from scratch (and the steps they need to reach HalfPrune's loss) and distilled from the dense model; the recipe
  and the widths from scratch at 0.75.

``python benchmarks/lm.py --seeds 2 --jobs 2`` writes ``benchmarks/lm.json`` and ``benchmarks/lm.md``; each seed
runs in its own process (``--one-seed S``) on one thread.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lm_task import STEPS_PER_EPOCH, Arch, CausalLM, Data, Optim, evaluate, trainer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SCORERS = ("l2", "taylor", "activation", "minitron")


def recipe_kwargs(setting: str, ratio: float, steps: int, **over) -> dict:
    """The ``HalfPrune`` keyword arguments of each setting's recipe: the one place to adapt to API changes."""
    from lightning_halfprune import Cubic, presets
    from lightning_halfprune.options import Distill

    quiet = {"verbose": False, "timing": None}
    if setting == "finetune":
        return {**presets.finetuning(ratio, **over), **quiet}
    epochs = steps // STEPS_PER_EPOCH  # the MNIST-1D recipe, in epochs of 50 steps
    schedule = Cubic(start=epochs // 6, end=epochs // 2, ratio=ratio, every=1)
    kwargs = {"schedule": schedule, "scorer": "l2", "attention": "heads",
              "distill": Distill(alpha=1.0, temperature=2.0, teacher="each", epochs=2)}
    return {**kwargs, **over, **quiet}


def halfprune(kwargs: dict):
    """``HalfPrune`` and its companion callbacks from ``recipe_kwargs`` (re-warm-up until HalfPrune takes it)."""
    from lightning_halfprune import HalfPrune
    from lightning_halfprune.fit.rewarm import RewarmAfterCut

    kwargs = dict(kwargs)
    rewarm = kwargs.pop("rewarm_steps", 0)
    prune = HalfPrune(**kwargs)
    return prune, [prune, RewarmAfterCut(prune, rewarm)] if rewarm else [prune]


class Curve:
    """Validation bits per byte every ``every`` steps (for the token budget of the from-scratch model)."""

    def __init__(self, val: torch.Tensor, every: int) -> None:
        self.val, self.every, self.points = val, every, []

    def __call__(self, module: CausalLM, step: int) -> None:
        if step % self.every == 0:
            self.points.append((step, evaluate(module, self.val)))


def fit(module: CausalLM, loader, steps: int, callbacks=(), curve: Curve | None = None) -> float:
    """Train ``steps`` optimizer steps; returns the wall time."""
    import lightning.pytorch as pl

    class Tick(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            if curve is not None:
                curve(pl_module, trainer.global_step)

    start = time.perf_counter()
    trainer(steps, [*callbacks, Tick()]).fit(module, loader)
    return time.perf_counter() - start


def row(name: str, module: CausalLM, data: Data, steps: int, seconds: float, prune=None, **extra) -> dict:
    from lightning_halfprune.core.measure import MacCounter, count_params

    out = {"row": name, "val_bpb": evaluate(module, data.val), "test_bpb": evaluate(module, data.test),
           "params": count_params(module.model), "steps": steps, "seconds": seconds,
           "macs_per_token": MacCounter()(module, module.example_input_array) / module.example_input_array.shape[1],
           "arch": vars(Arch.of(module.model)), **extra}
    if prune is not None:
        out["prune_seconds"] = sum(r.seconds for r in prune.reports)
        out["prune_share"] = out["prune_seconds"] / seconds
    log(out)
    return out


LOG: list = []  # the JSONL file each finished row is appended to (``--one-seed``), so partial runs keep rows


def log(entry: dict) -> None:
    print(json.dumps(entry), file=sys.stderr, flush=True)
    if LOG:
        with open(LOG[0], "a") as f:
            f.write(json.dumps({**{k: v for k, v in entry.items() if k != "module"}, "seed": LOG[1]}) + "\n")


def parent(data: Data, n: int) -> tuple[CausalLM, float, bool]:
    """The dense model trained ``n`` steps: loaded if a process of this run already trained it, else trained.

    Returns it, the seconds its training took, and whether it was trained here.
    """
    module = CausalLM(Arch().build(), Optim(steps=n))
    path = f"{LOG[0][: -len('.jsonl')]}.parent{n}.pt" if LOG else None
    if path and os.path.exists(path):
        saved = torch.load(path, weights_only=True)
        module.model.load_state_dict(saved["state"])
        return module, float(saved["seconds"]), False
    seconds = fit(module, data.train_loader("pretrain"), n)
    if path:
        torch.save({"state": module.model.state_dict(), "seconds": seconds}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return module, seconds, True


def cut_loss(parent_module: CausalLM, data: Data, ratio: float, scorer: str, attention: str) -> float:
    """Bits per byte of the parent cut to ``ratio`` by ``scorer`` (calibrated on the fine-tune's first batches).

    ``attention``: ``"heads"`` cuts half of the heads and of the MLP at 0.5; ``"heads_last"`` keeps the same params,
    split between heads and MLP by the calibration loss (as HalfPrune does in a fit).
    """
    from lightning_halfprune.core.scoring import get_scorer, needs_data
    from lightning_halfprune.core.surgeon import Surgeon
    from lightning_halfprune.fit.batches import take_batches, training_loss, undisturbed

    module = copy.deepcopy(parent_module)
    surgeon = Surgeon(module, module.example_input_array, attention=attention)
    score = get_scorer(scorer)
    batches = take_batches(data.train_loader("finetune"), 8, torch.device("cpu"))
    loss = training_loss(module)

    def judge() -> float:
        with torch.no_grad():
            module.eval()
            return sum(float(loss(b)) for b in batches) / len(batches)

    with undisturbed(module):
        if needs_data(score):
            if hasattr(score, "inputs_of"):
                score.inputs_of = lambda batch: batch[:, :-1]
            score.calibrate(module, batches, loss)
        cuts = surgeon.plan(ratio, score, judge)
    surgeon.cut(cuts)
    return evaluate(module, data.val)


def finetune_rows(data: Data, n: int, over: dict) -> list[dict]:
    """Issue 27's rows, the most telling first (a run cut short keeps them): ratio 0.5, then 0.3."""
    k = n // 2
    dense, seconds, _ = parent(data, n)
    rows = [row("parent: dense, N steps", dense, data, n, seconds)]
    for ratio in (0.5, 0.3):
        for scorer in SCORERS:
            for attention in ("heads", "heads_last"):
                rows.append({"row": f"cut {ratio} by {scorer}, before training", "ratio": ratio, "scorer": scorer,
                             "attention": attention, "val_bpb": cut_loss(dense, data, ratio, scorer, attention)})
                log(rows[-1])
        module = copy.deepcopy(dense)
        module.optim = Optim(steps=k)
        prune, callbacks = halfprune(recipe_kwargs("finetune", ratio, k, **over))
        seconds = fit(module, data.train_loader("finetune"), k, callbacks)
        rows.append(row(f"HalfPrune {ratio} fine-tune, K steps", module, data, n + k, seconds, prune, ratio=ratio))
        if ratio == 0.5:
            module = copy.deepcopy(dense)
            module.optim = Optim(steps=k)
            seconds = fit(module, data.train_loader("finetune"), k)
            rows.append(row("dense fine-tune, K steps", module, data, n + k, seconds))
        small = CausalLM(Arch(**rows[-1 if ratio == 0.3 else -2]["arch"]).build(), Optim(steps=n + k))
        curve = Curve(data.val, STEPS_PER_EPOCH)
        seconds = fit(small, data.train_loader("pretrain", then_after=n), n + k, curve=curve)
        rows.append(row(f"widths of {ratio} from scratch, N+K steps", small, data, n + k, seconds, ratio=ratio,
                        curve=curve.points))
        if ratio == 0.5:  # the other way to the same params: half the heads and half the MLP, from scratch
            small = CausalLM(Arch(heads=2, kv_heads=1, intermediate=256).build(), Optim(steps=n + k))
            seconds = fit(small, data.train_loader("pretrain", then_after=n), n + k)
            rows.append(row("half heads, half MLP from scratch, N+K steps", small, data, n + k, seconds, ratio=ratio))
    return rows


def scratch_rows(data: Data, n: int, over: dict) -> list[dict]:
    """Issue 23's rows, the most telling first (a run cut short keeps them); the dense model last if no process has it.

    At 0.5: the recipe (``l2``), the recipe with ``scorer="activation"``, the pruned widths from scratch (validated
    every epoch: the steps it needs to reach HalfPrune's loss) and distilled from the dense model; then 0.75.
    """
    rows, archs = [], {}
    for ratio, scorer in ((0.5, "l2"), (0.5, "activation"), (0.75, "l2")):
        module = CausalLM(Arch().build(), Optim(steps=n))
        prune, callbacks = halfprune(recipe_kwargs("scratch", ratio, n, **{"scorer": scorer, **over}))
        seconds = fit(module, data.train_loader("pretrain"), n, callbacks)
        name = f"HalfPrune {ratio} recipe{'' if scorer == 'l2' else f' ({scorer})'}, N steps"
        rows.append(row(name, module, data, n, seconds, prune, ratio=ratio, scorer=scorer))
        archs.setdefault(ratio, Arch(**rows[-1]["arch"]))
        if ratio == 0.75 or scorer != "l2":
            continue
        small = CausalLM(archs[ratio].build(), Optim(steps=n))
        curve = Curve(data.val, STEPS_PER_EPOCH)
        seconds = fit(small, data.train_loader("pretrain"), n, curve=curve)
        rows.append(row(f"widths of {ratio} from scratch, N steps", small, data, n, seconds, ratio=ratio,
                        curve=curve.points))
    small = CausalLM(archs[0.75].build(), Optim(steps=n))
    rows.append(row("widths of 0.75 from scratch, N steps", small, data, n,
                    fit(small, data.train_loader("pretrain"), n), ratio=0.75))
    dense, seconds, trained = parent(data, n)
    if trained:
        rows.append(row("parent: dense, N steps", dense, data, n, seconds))
    student = CausalLM(archs[0.5].build(), Optim(steps=n), teacher=dense.model)
    rows.append(row("widths of 0.5 distilled from the dense model, N steps", student, data, n,
                    fit(student, data.train_loader("pretrain"), n), ratio=0.5))
    return rows


def one_seed(seed: int, setting: str, n: int, over: dict, out: str) -> None:
    """One seed's rows of ``setting``, appended to ``OUT.seedS.jsonl`` as they finish."""
    import lightning.pytorch as pl

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    data = Data(seed)
    LOG[:] = [f"{out}.seed{seed}.jsonl", seed]
    if setting in ("finetune", "all"):
        pl.seed_everything(seed, verbose=False)
        finetune_rows(data, n, over)
    if setting in ("scratch", "all"):
        pl.seed_everything(seed, verbose=False)
        scratch_rows(data, n, over)


def latency(archs: dict[str, dict]) -> dict[str, float]:
    """Milliseconds per token of a 128-byte forward pass, batch 1, one thread, the models timed interleaved."""
    from torch.utils import benchmark

    torch.set_num_threads(1)
    x = torch.zeros(1, 128, dtype=torch.long)
    models = {name: Arch(**a).build().eval() for name, a in archs.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for _ in range(7):
            for name, m in models.items():
                t = benchmark.Timer("m(input_ids=x)", globals={"m": m, "x": x}, num_threads=1)
                times[name].append(t.blocked_autorange(min_run_time=0.3).median)
    return {name: sorted(v)[len(v) // 2] * 1e3 / x.shape[1] for name, v in times.items()}


def run_seeds(args: argparse.Namespace) -> None:
    """One process per (seed, setting), ``--jobs`` at a time; each appends its rows to ``OUT.seedS.jsonl``."""
    settings = ("finetune", "scratch") if args.setting == "all" else (args.setting,)
    for seed in range(args.seeds):
        for suffix in (".jsonl", f".parent{args.steps}.pt"):
            if os.path.exists(f"{args.out}.seed{seed}{suffix}"):
                os.remove(f"{args.out}.seed{seed}{suffix}")
    tasks = [(seed, setting) for seed in range(args.seeds) for setting in settings]
    running: list[subprocess.Popen] = []
    while tasks or running:
        while tasks and len(running) < args.jobs:
            seed, setting = tasks.pop(0)
            cmd = [sys.executable, __file__, "--one-seed", str(seed), "--setting", setting, "--steps",
                   str(args.steps), "--recipe", args.recipe, "--out", args.out]
            running.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
        time.sleep(1)
        for p in [p for p in running if p.poll() is not None]:
            running.remove(p)
            if p.returncode != 0:
                print(f"{' '.join(p.args[2:])} failed (exit {p.returncode}); the table holds the rows that finished.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--setting", choices=("scratch", "finetune", "all"), default="all")
    parser.add_argument("--steps", type=int, default=600, help="N: the parent's / from-scratch steps (K = N/2)")
    parser.add_argument("--jobs", type=int, default=4, help="processes (seed x setting) at a time, 1 thread each")
    parser.add_argument("--recipe", default="{}", help="JSON overrides of the recipe's HalfPrune kwargs")
    parser.add_argument("--out", default=os.path.join(HERE, "lm"), help="writes OUT.json and OUT.md")
    parser.add_argument("--collect", action="store_true", help="only build the table from OUT.seed*.jsonl")
    parser.add_argument("--one-seed", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    over = json.loads(args.recipe)
    if args.one_seed is not None:
        one_seed(args.one_seed, args.setting, args.steps, over, args.out)
        return
    start = time.perf_counter()
    if not args.collect:
        run_seeds(args)
    rows = []
    for seed in range(args.seeds):
        path = f"{args.out}.seed{seed}.jsonl"
        if os.path.exists(path):
            with open(path) as f:
                rows += [json.loads(line) for line in f if line.strip()]
    archs = {json.dumps(r["arch"], sort_keys=True): r["arch"] for r in rows if "arch" in r}
    per_token = latency(archs)
    for r in rows:
        if "arch" in r:
            r["ms_per_token"] = per_token[json.dumps(r["arch"], sort_keys=True)]
    minutes = None if args.collect else (time.perf_counter() - start) / 60
    result = {"command": "python benchmarks/lm.py " + " ".join(sys.argv[1:]), "steps": args.steps,
              "seeds": args.seeds, "minutes": minutes, "rows": rows}
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    from lm_table import markdown

    with open(args.out + ".md", "w") as f:
        f.write(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
