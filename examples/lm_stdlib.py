"""Prune a language model while you fine-tune it: one command, CPU, no download.

    python examples/lm_stdlib.py                # parent 600 steps, then 300 fine-tune steps: dense vs HalfPrune 0.5
    python examples/lm_stdlib.py --ratio 0.3 --steps 400

A byte-level Hugging Face Qwen3 (1.05M params) is trained on the Python standard library's sources (the parent),
then fine-tuned on other files twice: dense, and with ``HalfPrune(**presets.finetuning(ratio))``, which removes
``ratio`` of the MLP and attention params after the 5th step (ranked by Taylor importance on calibration batches,
heads last: the split between heads and MLP neurons with the lowest calibration loss), lets the parent teach the
pruned model on its logits for the rest of the fine-tune, and warms the LR up again after the cut. Prints
validation bits per byte, parameters and MACs per token of both. See the README's
"Language models: prune while you fine-tune" and ``benchmarks/lm.md`` for what to expect.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from lm_task import Arch, CausalLM, Data, Optim, evaluate, trainer  # noqa: E402

from lightning_halfprune import presets  # noqa: E402
from lightning_halfprune.core.measure import MacCounter, count_params  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of the MLP and attention params to remove")
    parser.add_argument("--steps", type=int, default=600, help="parent steps; the fine-tune takes half as many")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    pl.seed_everything(args.seed, verbose=False)
    data = Data(args.seed)
    k = args.steps // 2

    parent = CausalLM(Arch().build(), Optim(steps=args.steps))
    trainer(args.steps).fit(parent, data.train_loader("pretrain"))
    results = {"parent": parent}

    dense = copy.deepcopy(parent)
    dense.optim = Optim(steps=k)
    trainer(k).fit(dense, data.train_loader("finetune"))
    results["dense fine-tune"] = dense

    pruned = copy.deepcopy(parent)
    pruned.optim = Optim(steps=k)
    callbacks = presets.finetuning_callbacks(args.ratio)  # HalfPrune and the LR re-warm-up after its cut
    trainer(k, callbacks).fit(pruned, data.train_loader("finetune"))
    results[f"HalfPrune {args.ratio} fine-tune"] = pruned

    macs = MacCounter()
    print("\n| model | val bits/byte | params | MACs/token |\n|---|---|---|---|")
    for name, module in results.items():
        per_token = macs(module, module.example_input_array) / module.example_input_array.shape[1]
        bpb, params = evaluate(module, data.val), count_params(module.model)
        print(f"| {name} | {bpb:.3f} | {params:,} | {per_token / 1e3:.0f}k |")


if __name__ == "__main__":
    main()
