"""What a cut costs in memory per rank under FSDP2: peak RSS of each of 2 CPU processes (gloo) fitting a ~30M Llama.

    python benchmarks/sharded_memory.py [halfprune|plain] [OUT_JSON]

``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``, ``fully_shard`` per decoder layer and on
the model, AdamW, 2 epochs of 4 steps (batch 4, 64 tokens). ``halfprune`` cuts to ratio 0.25 at the end of epoch 0
(``l2`` scorer, no timing); ``plain`` is the same fit without HalfPrune. Each rank reports its peak RSS
(``ru_maxrss``) before HalfPrune's first full view (train start), right before the cut, right after it, and at the
end of the fit, and the RSS at fit start.
Run both modes and compare ("peak during the cut" is the after-cut peak minus the before-cut peak).
"""

from __future__ import annotations

import json
import resource
import sys

import lightning.pytorch as pl
import psutil
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from lightning_halfprune import HalfPrune

VOCAB, SEQ = 8000, 64


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def now_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


class Llama(pl.LightningModule):
    """~30M parameters: hidden 512, 8 layers, 8 query / 4 key-value heads, MLP 1536, tied 8k vocabulary."""

    def __init__(self) -> None:
        super().__init__()
        import transformers as tf

        torch.manual_seed(0)
        config = tf.LlamaConfig(
            hidden_size=512,
            intermediate_size=1536,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=SEQ,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        self.net = tf.LlamaForCausalLM(config)
        self.example_input_array = torch.ones(1, SEQ, dtype=torch.long)

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x):
        return self.net(input_ids=x, use_cache=False).logits

    def training_step(self, batch, batch_idx):
        (x,) = batch
        logits = self(x)
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class Probe(pl.Callback):
    """Peak RSS of this rank at a few points; ``first`` runs before HalfPrune's epoch-end cut, else after it."""

    def __init__(self, key: str, marks: dict) -> None:
        self.key, self.marks = key, marks

    def on_train_start(self, trainer, pl_module):
        self.marks.setdefault("peak_before_train_start_mib", peak_mib())  # before HalfPrune's first full view

    def on_fit_start(self, trainer, pl_module):
        self.marks.setdefault("rss_at_fit_start_mib", now_mib())
        self.marks.setdefault("params", sum(p.numel() for p in pl_module.parameters()))

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            self.marks[self.key] = peak_mib()

    def on_fit_end(self, trainer, pl_module):
        self.marks["peak_at_end_mib"] = peak_mib()
        self.marks["params_at_end"] = sum(p.numel() for p in pl_module.parameters())


def main(mode: str, out: str | None) -> None:
    torch.set_num_threads(1)
    marks: dict = {"mode": mode}
    callbacks = [Probe("peak_before_cut_mib", marks)]
    if mode == "halfprune":
        callbacks.append(HalfPrune({0: 0.25}, scorer="l2", timing=None, verbose=False))
    callbacks.append(Probe("peak_after_cut_mib", marks))
    data = TensorDataset(torch.randint(1, VOCAB, (32, SEQ), generator=torch.Generator().manual_seed(0)))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=2,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Llama(), DataLoader(data, batch_size=4))
    marks["rank"] = trainer.global_rank
    print(json.dumps(marks), flush=True)
    if out:
        with open(f"{out}.rank{trainer.global_rank}.json", "w") as f:
            json.dump(marks, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "halfprune", sys.argv[2] if len(sys.argv) > 2 else None)
