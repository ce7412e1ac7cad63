"""One run of an ablation of the LM recipes (``lm.py``'s task and protocol), one JSON line per run.

Each call trains (or loads) the seed's dense parent of N steps, then one of:

* ``finetune JSON``: K = N/2 fine-tune steps with ``presets.finetuning`` overridden by ``JSON`` (any ``HalfPrune`` or
  preset argument; ``"ratio"``; ``"distill": "none"`` for no distillation; ``"schedule": {"step": ratio}``);
* ``scratch JSON``: N steps from scratch with the issue-23 recipe overridden by ``JSON``;
* ``dense``: the dense fine-tune; ``small JSON`` / ``small_nk JSON``: the widths of ``JSON`` (``Arch`` fields)
  trained from scratch for N / N + K steps.

    python benchmarks/lm_ablate.py --seed 0 --name no-distill finetune '{"distill": "none"}'
    python benchmarks/lm_ablate.py --seed 0 --name mlp-only finetune '{"attention": "none", "ratio": 0.625}'

Rows are appended to ``--out`` (default ``benchmarks/lm_ablate.jsonl``); the parents are cached beside it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import lm  # noqa: E402
from lm_task import Arch, CausalLM, Data, Optim, evaluate  # noqa: E402


def recipe(setting: str, over: dict, k: int, n: int) -> tuple[float, dict]:
    """The ratio and ``HalfPrune`` kwargs of ``setting`` with the JSON overrides applied."""
    from lightning_halfprune import Schedule
    from lightning_halfprune.options import Distill

    over = dict(over)
    ratio = over.pop("ratio", 0.5)
    if "schedule" in over:
        over["schedule"] = Schedule({int(s): r for s, r in over["schedule"].items()}, interval="step")
    if over.get("distill") == "none":
        over["distill"] = None
    elif isinstance(over.get("distill"), dict):
        over["distill"] = Distill(**over["distill"])
    return ratio, lm.recipe_kwargs(setting, ratio, k if setting == "finetune" else n, **over)


def main() -> None:
    import lightning.pytorch as pl

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("finetune", "scratch", "dense", "small", "small_nk"))
    parser.add_argument("json", nargs="?", default="{}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None)
    parser.add_argument("--steps", type=int, default=600, help="N (K = N/2)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default=os.path.join(HERE, "lm_ablate.jsonl"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    n, k, over = args.steps, args.steps // 2, json.loads(args.json)
    data = Data(args.seed)
    path = f"{args.out}.parent{n}_s{args.seed}.pt"
    pl.seed_everything(args.seed, verbose=False)
    dense = CausalLM(Arch().build(), Optim(steps=n))
    if os.path.exists(path):
        dense.model.load_state_dict(torch.load(path, weights_only=True))
    else:
        lm.fit(dense, data.train_loader("pretrain"), n)
        torch.save(dense.model.state_dict(), path + ".tmp")
        os.replace(path + ".tmp", path)
    pl.seed_everything(args.seed, verbose=False)
    start = time.perf_counter()
    if args.kind in ("small", "small_nk"):
        steps = n if args.kind == "small" else n + k
        module = CausalLM(Arch(**over).build(), Optim(steps=steps, lr=args.lr))
        then = None if args.kind == "small" else n
        lm.fit(module, data.train_loader("pretrain", then_after=then), steps)
    elif args.kind == "scratch":
        module = CausalLM(Arch().build(), Optim(steps=n, lr=args.lr))
        _, kwargs = recipe("scratch", over, k, n)
        lm.fit(module, data.train_loader("pretrain"), n, lm.halfprune(kwargs)[1])
    else:
        module = copy.deepcopy(dense)
        module.optim = Optim(steps=k, lr=args.lr)
        callbacks = lm.halfprune(recipe("finetune", over, k, n)[1])[1] if args.kind == "finetune" else []
        lm.fit(module, data.train_loader("finetune"), k, callbacks)
    from lightning_halfprune.core.measure import count_params

    out = {"name": args.name or args.kind, "kind": args.kind, "json": args.json, "seed": args.seed, "N": n,
           "lr": args.lr, "val_bpb": evaluate(module, data.val), "params": count_params(module.model),
           "arch": vars(Arch.of(module.model)), "seconds": round(time.perf_counter() - start)}
    print(json.dumps(out), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
