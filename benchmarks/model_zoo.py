"""Model zoo: HalfPrune with default arguments on real timm, torchvision and Hugging Face models (on demand, never CI).

Each model is fitted for 2 epochs of a few batches of tiny random data on CPU with
``HalfPrune(schedule={0: 0.3, 1: 0.5})`` and eight checks: the fit finishes, params drop (>= 30% at 0.5), the output
shape is right, the loss after the cut is finite, attention heads are never mixed (whole heads or the same offsets in
every head; head attributes in sync), tied parameters stay tied, ``load_pruned`` of the last checkpoint equals the
trained module (still tied), and a resume from the checkpoint written after the first cut works (same final shape and
losses). A model whose fit
fails is also checked for what it was left as: untouched, or changed/broken. Every model runs in its own process with
a timeout, so one hang does not stop the table. Two more columns say what happened to the structure
(``zoo_columns.py``): whether attention heads were cut (yes / head dims only / left out, with HalfPrune's reason) and
whether the residual stream kept its width; the pre-flight column is the wall time of the train-start dry run. The
models and how each task is fed are in ``zoo_models.py``.

Needs torchvision and timm, which do not import beside the project's torch 2.13.0: run it in its own venv::

    python3 -m venv /work/zoo-venv
    /work/zoo-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm==1.0.31 transformers==5.25.0 \\
        lightning torchmetrics torch-pruning==1.6.1 wandb mnist1d "jsonargparse[signatures]"
    PYTHONPATH=src nice -n 5 /work/zoo-venv/bin/python benchmarks/model_zoo.py        # -> benchmarks/model_zoo.md
    PYTHONPATH=src /work/zoo-venv/bin/python benchmarks/model_zoo.py --only timm_vit_tiny hf_bert
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from zoo_columns import heads_column, record_warnings, residual_column, time_preflight  # noqa: E402
from zoo_models import BATCH, BATCHES, CLASSES, EPOCHS, MODELS, forward, inputs, next_token  # noqa: E402

# arguments beyond the defaults, for the rows that show one; `--prune-args` adds to every row
PRUNE_ARGS = {"hf_gpt2_lm_hidden": dict(prune_hidden_size=True)}


def _prune_args(name: str) -> dict:
    return PRUNE_ARGS.get(name, {}) | json.loads(os.environ.get("ZOO_PRUNE_ARGS", "{}"))


# ----------------------------------------------------------------------------------------------- one model (child)
def _module_class():
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F

    class ZooModule(pl.LightningModule):
        """Cross-entropy on any zoo model; images or token ids in, logits out."""

        def __init__(self, name: str) -> None:
            super().__init__()
            self.save_hyperparameters()
            build, (self.task, img) = MODELS[name]
            torch.manual_seed(0)
            self.net = build()
            self.example_input_array = inputs(self.task, img, 2, seed=1)
            self.losses: list[float] = []

        def forward(self, x):
            return forward(self.net, self.task, x)

        def loss(self, batch):
            x, y = batch
            logits = self(x)
            if next_token(self.task):
                return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            return F.cross_entropy(logits, y)

        def training_step(self, batch, idx):
            loss = self.loss(batch)
            self.losses.append(float(loss))
            return loss

        def validation_step(self, batch, idx):
            self.log("val_loss", self.loss(batch))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    return ZooModule


def _loader(task: str, img: int):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    x = inputs(task, img, BATCH * BATCHES, seed=2)
    y = torch.randint(0, CLASSES, (len(x),), generator=torch.Generator().manual_seed(3))
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def _trainer(root: str, callbacks: list, epochs: int = EPOCHS):
    import lightning.pytorch as pl

    return pl.Trainer(
        default_root_dir=root,
        max_epochs=epochs,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def _checkpoints(root: str):
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(dirpath=root, save_top_k=-1, save_on_train_epoch_end=True, filename="{epoch}")


def run_one(name: str) -> dict:
    """Fit one model and run the eight checks; returns the row."""
    import torch

    from lightning_halfprune import HalfPrune, load_pruned
    from lightning_halfprune.core.measure import count_params

    warnings.filterwarnings("ignore")
    caught = record_warnings()
    preflight_seconds = time_preflight()
    torch.set_num_threads(2)
    ZooModule = _module_class()
    row: dict = {"model": name}
    model = ZooModule(name)
    task, img = model.task, MODELS[name][1][1]
    data = _loader(task, img)
    x = model.example_input_array
    with torch.no_grad():
        shape = tuple(model.eval()(x).shape)
    model.train()  # Lightning keeps the mode a module comes in: left in eval, a model trains in eval mode
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tied_before = _tied(model)
    row["params_before"] = count_params(model)
    embeddings = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    row["embedding_share"] = sum(embeddings.values()) / row["params_before"]
    root = tempfile.mkdtemp(prefix="zoo-")
    prune = HalfPrune(schedule={0: 0.3, 1: 0.5}, verbose=False, **_prune_args(name))
    start = time.perf_counter()
    try:
        _trainer(root, [prune, _checkpoints(root)]).fit(model, data, data)
    except Exception as err:
        row["fit_seconds"] = time.perf_counter() - start
        row.update(warnings=caught[:8], preflight_seconds=preflight_seconds[:1] or None, left_out=prune.left_out)
        row["error"] = f"{type(err).__name__}: {err}"
        row["left"] = _left_as(model, state, x)
        row["trained_steps"] = len(model.losses)
        return row
    row["fit_seconds"] = time.perf_counter() - start
    row.update(warnings=caught[:8], preflight_seconds=preflight_seconds[:1] or None, left_out=prune.left_out)
    fresh = ZooModule(name)
    row["heads"] = heads_column(fresh, model, prune.left_out, caught)
    row["residual"] = residual_column(fresh, model)
    reports = prune.reports
    row.update(
        params_after=count_params(model),
        macs=(reports[0].before.macs, reports[-1].after.macs) if reports else None,
        latency=(reports[0].before.latency_ms, reports[-1].after.latency_ms) if reports else None,
        event_seconds=reports[0].seconds if reports else None,
    )
    checks = {}
    checks["fit"] = len(reports) == 2 or f"{len(reports)} prune events"
    drop = 1 - row["params_after"] / row["params_before"]
    checks["params"] = drop >= 0.3 or f"params dropped only {drop:.0%}"
    with torch.no_grad():
        out = model.eval()(x)
    checks["shape"] = tuple(out.shape) == shape or f"output {tuple(out.shape)} != {shape}"
    after_first = model.losses[BATCHES:]
    with torch.no_grad():
        final_loss = float(model.loss(next(iter(data))))
    finite = all(map(_finite, after_first)) and _finite(final_loss)
    checks["finite"] = finite or "non-finite loss after a cut"
    checks["heads"] = _heads_whole(fresh, prune.history, model)
    checks["tied"] = _tied(model) == tied_before or f"tied parameters {tied_before} -> {_tied(model)}"
    last = os.path.join(root, f"epoch={EPOCHS - 1}.ckpt")
    try:
        loaded = load_pruned(ZooModule, last)
        with torch.no_grad():
            same = torch.equal(loaded(x), out) and _tied(loaded) == tied_before
        checks["load_pruned"] = same or "load_pruned output differs (or tied weights came apart)"
    except Exception as err:
        checks["load_pruned"] = f"load_pruned: {type(err).__name__}: {str(err)[:120]}"
    checks["resume"] = _resume(ZooModule, name, root, data, model)
    row["checks"] = {k: v for k, v in checks.items() if v is not True}
    row["resume_exact"] = getattr(model, "resume_exact", None)
    return row


def _resume(ZooModule, name: str, root: str, data, model) -> bool | str:
    from lightning_halfprune import HalfPrune
    from lightning_halfprune.core.measure import count_params

    again = ZooModule(name)
    sub = os.path.join(root, "resume")
    try:
        resumed = HalfPrune(  # latency: no check
            schedule={0: 0.3, 1: 0.5}, latency_batch_size=0, verbose=False, **_prune_args(name)
        )
        _trainer(sub, [resumed]).fit(again, data, data, ckpt_path=os.path.join(root, "epoch=0.ckpt"))
    except Exception as err:
        return f"resume: {type(err).__name__}: {str(err)[:120]}"
    if count_params(again) != count_params(model):
        return f"resume ends at {count_params(again)} params, not {count_params(model)}"
    if not all(map(_finite, again.losses)):
        return "resume: non-finite loss"
    model.resume_exact = again.losses == model.losses[BATCHES:]  # dropout draws differ: exact only without it
    return True


def _heads_whole(fresh, history: list, model) -> bool | str:
    """The first event's attention cuts (against the original shapes) are whole heads or the same offsets in every
    head, and every attention module's head count x head size matches its q width after fit."""
    from lightning_halfprune.core import attention as attn

    specs = {s.root_name: s for s in attn.find_attention(fresh)}
    try:
        for layer, channels in history[0]["cuts"] if history else ():
            if layer in specs:
                attn._decode(specs[layer], [c for c in channels if c < specs[layer].q_width])
    except attn.AttentionError as err:
        return str(err)
    bad = [s.root_name for s in attn.find_attention(model) if s.num_heads * s.head_dim != s.q_width]
    return not bad or f"head attributes out of sync in {bad[:3]}"


def _tied(model) -> int:
    """How many parameters are shared by more than one module (tied embeddings)."""
    holders: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            holders[id(p)] = holders.get(id(p), 0) + 1
    return sum(n > 1 for n in holders.values())


def _left_as(model, state: dict, x) -> str:
    """After a failed fit: is the model untouched, changed but running, or broken?"""
    import torch

    now = model.state_dict()
    same = now.keys() == state.keys() and all(
        now[k].shape == v.shape and torch.equal(now[k], v) for k, v in state.items()
    )
    try:
        with torch.no_grad():
            model.eval()(x)
        runs = True
    except Exception:
        runs = False
    if same and runs:
        return "model untouched"
    shapes = all(now[k].shape == v.shape for k, v in state.items() if k in now)
    return ("weights changed (trained)" if shapes else "pruned") + (", runs" if runs else ", BROKEN (forward fails)")


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


# ----------------------------------------------------------------------------------------------- the table (parent)
def _fmt_n(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _cell(row: dict) -> str:
    if "not_run" in row:
        return f"not run: {row['not_run']}"
    if "crash" in row:
        return f"FAIL: {row['crash']}"
    if "error" in row:
        when = "before training" if row.get("trained_steps") == 0 else f"after {row['trained_steps']} steps"
        return f"FAIL {when}, {row['left']}: {_short(row['error'])}"
    if row["checks"]:
        return "FAIL: " + "; ".join(_short(str(v)) for v in row["checks"].values())
    return "pass (8/8)" + (", resume exact" if row.get("resume_exact") else "")


def _short(text: str, n: int = 160) -> str:
    line = text.replace("|", "/").replace("\n", " ").strip()
    return line if len(line) <= n else line[: n - 3] + "..."


def table(rows: list[dict]) -> str:
    lines = [
        "| model | params | MACs / sample | CPU latency (batch 64) | pre-flight | one event | fit | result "
        "| attention heads cut | residual stream kept |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        params = f"{_fmt_n(r.get('params_before'))} -> {_fmt_n(r.get('params_after'))}"
        if r.get("embedding_share", 0) > 0.05:
            params += f" (embeddings {r['embedding_share']:.0%} before)"
        args = ", ".join(f"`{k}={v}`" for k, v in _prune_args(r["model"]).items())
        macs = f"{_fmt_n(r['macs'][0])} -> {_fmt_n(r['macs'][1])}" if r.get("macs") else "-"
        lat = r.get("latency")
        latency = f"{lat[0]:.1f} -> {lat[1]:.1f} ms" if lat and None not in lat else "-"
        event = f"{r['event_seconds']:.2f} s" if r.get("event_seconds") is not None else "-"
        fit = f"{r['fit_seconds']:.0f} s" if r.get("fit_seconds") is not None else "-"
        name = f"{r['model']} ({args})" if args else r["model"]
        pre = f"{r['preflight_seconds'][0]:.1f} s" if r.get("preflight_seconds") else "-"
        heads, stream = _short(r.get("heads", "-"), 200), _short(r.get("residual", "-"))
        cells = [name, params, macs, latency, pre, event, fit, _cell(r), heads, stream]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model names (default: all)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model")
    parser.add_argument("--keep", action="store_true", help="keep the other rows of the existing table")
    parser.add_argument("--jobs", type=int, default=1, help="models fitted at the same time")
    parser.add_argument("--prune-args", default="{}", help='HalfPrune arguments for every row, JSON: \'{"a": 1}\'')
    parser.add_argument("--out", default=str(Path(__file__).with_name("model_zoo.md")))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        try:
            row = run_one(args.child)
        except Exception as err:
            row = {"model": args.child, "crash": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
        print(json.dumps(row, default=str))
        return
    os.environ["ZOO_PRUNE_ARGS"] = json.dumps(json.loads(args.prune_args))  # the children read it
    started, done = time.perf_counter(), {}
    if args.keep and Path(args.out).with_suffix(".json").exists():  # rows of an earlier run, replaced if rerun
        done = {row["model"]: row for row in json.loads(Path(args.out).with_suffix(".json").read_text())}
    with ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(lambda name: _run_child(name, args.timeout), args.only or list(MODELS)):
            print(f"{row['model']}: {_cell(row)}", flush=True)
            done[row["model"]] = row
            order = sorted(done, key=lambda n: list(MODELS).index(n) if n in MODELS else len(MODELS))
            _write(args.out, [done[n] for n in order], started)  # a partial table survives, in MODELS' order


def _run_child(name: str, timeout: int) -> dict:
    try:
        command = [sys.executable, __file__, "--child", name]
        out = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else {"model": name, "crash": _short(out.stderr[-400:])}
    except subprocess.TimeoutExpired:
        return {"model": name, "crash": f"timed out after {timeout} s"}


def _write(out: str, rows: list[dict], started: float) -> None:
    text = (
        f"# Model zoo\n\n`HalfPrune(schedule={{0: 0.3, 1: 0.5}})` with {_arguments()}, {EPOCHS} epochs of {BATCHES} "
        f"batches of {BATCH} random samples on CPU (torch {_version('torch')}, torchvision {_version('torchvision')}, "
        f"timm {_version('timm')}, transformers {_version('transformers')}, "
        f"torch-pruning {_version('torch-pruning')}); "
        f"this run {time.perf_counter() - started:.0f} s (`--keep` keeps rows of earlier runs; rows from before the "
        "structure columns existed show `-` there). Params and MACs per "
        "sample before the first cut -> after the last; latency: median of 10 forward passes at batch 64 (one run "
        "each, a shared machine: indicative only); "
        "pre-flight: the train-start dry run; one event: wall time of the first prune event; fit: the whole fit "
        "with its two events. Attention heads cut / residual stream kept: see `zoo_columns.py`. Text models "
        "have the proportions of the real ones (see `REAL_TEXT` in the script); their embedding share is shown. "
        "Produced by `PYTHONPATH=src python benchmarks/model_zoo.py` in the zoo venv (see the script).\n\n"
        + table(rows)
        + "\n"
    )
    Path(out).write_text(text)
    Path(out).with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))


def _arguments() -> str:
    extra = json.loads(os.environ.get("ZOO_PRUNE_ARGS", "{}"))
    return ", ".join(f"`{k}={v}`" for k, v in extra.items()) + " for every row" if extra else "default arguments"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    main()
