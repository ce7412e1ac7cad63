"""On-demand GPU check (not a test): families only a GPU image has (timm, torchvision), CUDA latency, bf16-mixed.

Run on a machine with a GPU, torch, lightning, transformers, timm and torchvision (torch-pruning on the path):

    PYTHONPATH=src python benchmarks/gpu_check.py OUT.json

1. Real timm/torchvision/HF models of issue 22's list: the Surgeon is built (group search bounded), half the channels
   are cut, the model runs in train and eval mode; what was left out and why, or the error, is recorded.
2. A Lightning fit of a small HF Llama in ``bf16-mixed`` on CUDA with ``HalfPrune`` (timing on, distillation on):
   the cut's side-by-side CUDA speed-up, the params, and that the loss stays finite.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
import warnings

import torch


def _cut_half(name: str, build, example) -> dict:
    from lightning_halfprune.core.preflight import preflight
    from lightning_halfprune.core.scoring import get_scorer
    from lightning_halfprune.core.surgeon import Surgeon

    start = time.perf_counter()
    row: dict = {"model": name}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            net = build().cuda().eval()
            x = example.cuda()
            before = sum(p.numel() for p in net.parameters())
            surgeon = Surgeon(net, x)
            row["build_s"] = round(time.perf_counter() - start, 2)
            row["left_out"] = list(preflight(surgeon, [0.5], {}))[:6]  # as HalfPrune does at train start
            row["preflight_s"] = round(time.perf_counter() - start - row["build_s"], 2)
            surgeon.cut(surgeon.plan(0.5, get_scorer("l2")))
            with torch.no_grad():
                net.train()
                net(x)
                net.eval()
                net(x)
            row |= {"ok": True, "params_before": before, "params_after": sum(p.numel() for p in net.parameters())}
        row["warnings"] = sorted({str(w.message)[:240] for w in caught if "HalfPrune" in str(w.message)})[:4]
    except Exception as err:  # noqa: BLE001 - recorded, the next model runs
        text = traceback.format_exc()
        row |= {"ok": False, "error": f"{type(err).__name__}: {err}"[:400]}
        row["raw_torch_pruning"] = "torch_pruning" in text
    row["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(row), flush=True)
    return row


FAMILIES = (
    "mobilevitv2_050", "efficientvit_m0", "hiera_tiny_224", "beit_base_patch16_224", "eva02_tiny_patch14_224",
    "nf_regnet_b0", "shufflenet", "googlenet", "mamba",
)


def one(which: str) -> dict:
    """One family, in its own process: a CUDA device-side assert would poison every later model."""
    import timm
    import torchvision
    import transformers as tf

    image = torch.randn(2, 3, 224, 224)
    if which == "shufflenet":
        return _cut_half("tv shufflenet_v2_x0_5", lambda: torchvision.models.shufflenet_v2_x0_5(), image)
    if which == "googlenet":
        build = lambda: torchvision.models.googlenet(aux_logits=True, init_weights=False)  # noqa: E731
        return _cut_half("tv googlenet aux", build, image)
    if which == "mamba":
        mamba = tf.MambaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=100, state_size=8)
        return _cut_half("hf mamba", lambda: tf.MambaForCausalLM(mamba), torch.randint(0, 100, (2, 16)))
    return _cut_half(f"timm {which}", lambda: timm.create_model(which, pretrained=False), image)


def families() -> list[dict]:
    import subprocess

    rows = []
    for which in FAMILIES:
        out = subprocess.run([sys.executable, __file__, "--one", which], capture_output=True, text=True, timeout=240)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        rows.append(json.loads(lines[-1]) if lines else {"model": which, "ok": False, "error": out.stderr[-600:]})
    return rows


def bf16_llama_fit() -> dict:
    import lightning.pytorch as pl
    import transformers as tf

    from lightning_halfprune import Distill, HalfPrune, Timing

    config = tf.LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=4, vocab_size=8000)

    class LM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = tf.LlamaForCausalLM(config)
            self.example_input_array = torch.randint(0, 8000, (4, 256))
            self.losses: list[float] = []

        def forward(self, ids):
            return self.net(input_ids=ids).logits

        def training_step(self, batch, _):
            (ids,) = batch
            loss = torch.nn.functional.cross_entropy(self(ids)[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-4)

    ids = torch.randint(0, 8000, (64, 256))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=4)
    model = LM()
    before = sum(p.numel() for p in model.parameters())
    prune = HalfPrune({0: 0.5}, distill=Distill(), timing=Timing(batch_size=32, budget_s=2.0), verbose=True)
    trainer = pl.Trainer(max_epochs=2, accelerator="gpu", devices=1, precision="bf16-mixed", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[prune])  # Lightning's FLOP summary fails on GQA sdpa on CUDA
    start = time.perf_counter()
    trainer.fit(model, loader)
    report = prune.reports[0]
    row = {
        "fit_s": round(time.perf_counter() - start, 1),
        "params": [before, sum(p.numel() for p in model.parameters())],
        "speed": report.speed.label() if report.speed else None,
        "final_speed": prune.final_speed.label() if prune.final_speed else None,
        "timing_batch": report.latency_batch_size,
        "event_s": {k: round(v, 3) for k, v in report.timings.items()},
        "loss_first_last": [model.losses[0], model.losses[-1]],
        "finite": all(map(lambda v: v == v, model.losses)),
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20,
    }
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__" and sys.argv[1] == "--one":
    one(sys.argv[2])
elif __name__ == "__main__":
    out: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
    try:
        out["bf16_llama_fit"] = bf16_llama_fit()
    except Exception:  # noqa: BLE001
        out["bf16_llama_fit"] = traceback.format_exc()[-2000:]
    out["families"] = families()
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)
