"""The language-model task of ``benchmarks/lm.py`` and ``examples/lm_stdlib.py``: real text, no download.

* Corpus: the Python standard library's own top-level source files (``sysconfig.get_paths()["stdlib"]/*.py``,
  about 4.7 MB on CPython 3.11), read as bytes (vocabulary 256) and split by file: every 10th file (sorted by name)
  is validation, the next one test, the two after that the fine-tuning data ("new data" for issue 27), the rest
  pre-training data.
* Model: a byte-level Hugging Face Qwen3 built from a config (hidden 128, 4 layers, 4 query / 2 key-value heads of
  32, intermediate 512, untied embeddings: about 1.05M parameters).
* ``CausalLM``: a LightningModule training it with AdamW, linear warm-up then cosine decay per optimizer step, and
  logging validation bits per byte (``val_bpb``: mean cross-entropy in bits).
* ``Windows``: training batches are random 129-byte windows whose offsets are fixed by (seed, epoch, index), so
  every row of a benchmark sees the same data in the same order.
"""

from __future__ import annotations

import glob
import math
import os
import sysconfig
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

SEQ = 128
BATCH = 16
STEPS_PER_EPOCH = 50  # Lightning epochs of 50 steps: epoch-based schedules and `distill_epochs` work unchanged


# ------------------------------------------------------------------ corpus
def corpus(root: str | None = None) -> dict[str, torch.Tensor]:
    """The stdlib's top-level ``*.py`` files as byte tensors per split: pretrain, finetune, val, test."""
    root = root or sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    if len(files) < 20:
        raise RuntimeError(f"expected the Python standard library's sources under {root!r}, found {len(files)} files.")
    parts: dict[str, list[bytes]] = {"pretrain": [], "finetune": [], "val": [], "test": []}
    for i, path in enumerate(files):
        kind = {0: "val", 1: "test", 2: "finetune", 3: "finetune"}.get(i % 10, "pretrain")
        with open(path, "rb") as f:
            parts[kind].append(f.read())
    return {k: torch.frombuffer(bytearray(b"\n".join(v)), dtype=torch.uint8).long() for k, v in parts.items()}


class Windows(Dataset):
    """``length`` random windows of ``SEQ + 1`` bytes per epoch; offsets depend on (seed, epoch, index) only.

    ``then``: ``(epoch, text)``: from that epoch on the windows come from ``text`` (pre-training then new data
    in one fit, for the models trained from scratch for N + K steps).
    """

    def __init__(self, text: torch.Tensor, length: int, seed: int, then: tuple[int, torch.Tensor] | None = None):
        self.text, self.length, self.seed, self.epoch, self.then = text, length, seed, 0, then

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        text, epoch = self.text, self.epoch
        if self.then is not None and epoch >= self.then[0]:
            text, epoch = self.then[1], epoch - self.then[0]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 10_007 + i)
        start = int(torch.randint(0, len(text) - SEQ - 1, (1,), generator=g))
        return text[start : start + SEQ + 1]


def fixed_windows(text: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` evenly spaced, non-overlapping windows: the validation / test set (same for every row)."""
    stride = max(SEQ + 1, (len(text) - SEQ - 1) // count)
    starts = list(range(0, len(text) - SEQ - 1, stride))[:count]
    return torch.stack([text[s : s + SEQ + 1] for s in starts])


# ------------------------------------------------------------------ model
@dataclass
class Arch:
    """Widths of the Qwen3 model; ``Arch()`` is the dense one of issues 23 and 27."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    intermediate: int = 512

    def build(self) -> torch.nn.Module:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        config = Qwen3Config(
            vocab_size=256,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate,
            max_position_embeddings=SEQ,
            tie_word_embeddings=False,
            use_cache=False,
        )
        config._attn_implementation = "sdpa"
        return Qwen3ForCausalLM(config)

    @classmethod
    def of(cls, model: torch.nn.Module) -> Arch:
        """The widths a (pruned) model has now, read from its config (HalfPrune keeps it in sync)."""
        c = model.config
        return cls(c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                   c.intermediate_size)


@dataclass
class Optim:
    """AdamW with a linear warm-up then cosine decay to ``min_ratio`` of ``lr``, over ``steps`` optimizer steps."""

    lr: float = 1e-3
    steps: int = 600
    warmup: int = 30
    min_ratio: float = 0.1
    weight_decay: float = 0.1

    def factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------ LightningModule
class CausalLM(pl.LightningModule):
    """Next-byte prediction; ``forward(ids) -> logits``; logs ``val_bpb`` (bits per byte).

    ``teacher``: an optional frozen model whose logits the student also matches (``kd_alpha * T^2 * KL``): the
    "small model distilled from the dense one" baseline, outside HalfPrune.
    """

    def __init__(self, model: torch.nn.Module, optim: Optim, teacher: torch.nn.Module | None = None,
                 kd_alpha: float = 1.0, kd_temperature: float = 2.0) -> None:
        super().__init__()
        self.model, self.optim = model, optim
        self.teacher = [teacher.eval().requires_grad_(False)] if teacher is not None else None  # not a submodule
        self.kd_alpha, self.kd_temperature = kd_alpha, kd_temperature
        self.example_input_array = torch.zeros(1, SEQ, dtype=torch.long)
        self.val_losses: list[float] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits = self(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        self.log("train_loss", loss, prog_bar=True)
        if self.teacher is not None:
            from lightning_halfprune.fit.distill import kd_loss

            with torch.no_grad():
                target = self.teacher[0](input_ids=batch[:, :-1]).logits
            loss = loss + self.kd_alpha * kd_loss(logits, target, self.kd_temperature)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_bpb", bits_per_byte(self, batch), prog_bar=True, batch_size=len(batch))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.optim.lr, betas=(0.9, 0.95),
                                weight_decay=self.optim.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.optim.factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_epoch_start(self) -> None:
        loader = self.trainer.train_dataloader
        if isinstance(getattr(loader, "dataset", None), Windows):
            loader.dataset.epoch = self.trainer.current_epoch


def bits_per_byte(module: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy of ``windows`` in bits."""
    logits = module(windows[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)) / math.log(2)


@torch.no_grad()
def evaluate(module: torch.nn.Module, windows: torch.Tensor, batch: int = 64) -> float:
    """Bits per byte over fixed ``windows`` (eval mode, restored after)."""
    was = module.training
    module.eval()
    total = sum(float(bits_per_byte(module, w)) * len(w) for w in windows.split(batch))
    module.train(was)
    return total / len(windows)


@dataclass
class Data:
    """Loaders over the corpus for one seed: pre-training windows, fine-tuning windows, fixed val / test sets."""

    seed: int
    val_windows: int = 256
    text: dict[str, torch.Tensor] = field(default_factory=corpus)

    def __post_init__(self) -> None:
        self.val = fixed_windows(self.text["val"], self.val_windows)
        self.test = fixed_windows(self.text["test"], self.val_windows)

    def train_loader(self, split: str, then_after: int | None = None, then: str = "finetune") -> DataLoader:
        """Windows of ``split``; with ``then_after`` steps, windows of ``then`` after that many steps."""
        switch = None if then_after is None else (then_after // STEPS_PER_EPOCH, self.text[then])
        return DataLoader(Windows(self.text[split], STEPS_PER_EPOCH * BATCH, self.seed, switch), batch_size=BATCH)

    def val_loader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=64)


def trainer(steps: int, callbacks: list | None = None, validate: bool = False) -> pl.Trainer:
    """A quiet CPU trainer for ``steps`` optimizer steps (validation only at the end of fit when ``validate``)."""
    epochs = math.ceil(steps / STEPS_PER_EPOCH)
    return pl.Trainer(
        max_steps=steps, max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks or [],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, check_val_every_n_epoch=epochs if validate else 10**6,
    )
