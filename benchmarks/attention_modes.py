"""Which ``attention=`` keeps accuracy best: a small ViT on Fashion-MNIST, cut to half during training.

    python benchmarks/attention_modes.py [SEEDS] [EPOCHS] [TRAIN_IMAGES] [MODES,...]

A 2-block ViT (dim 64, 4 heads, fused ``qkv``, patch 7 on 28x28: 16 tokens + cls) trains on the first TRAIN_IMAGES
Fashion-MNIST images with AdamW; ``HalfPrune(schedule={0: 0.25, 1: 0.5})`` cuts heads / head dims / both (MLP widths
always; ``heads+hidden``: the residual stream too, ``prune_hidden_size=True``), then training goes on; test
accuracy on the 10k test images after the last epoch. Same seeds for every mode
("unpruned" is the reference without HalfPrune).
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from common import fashion_mnist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_halfprune import HalfPrune


def read(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = fashion_mnist(kind)
    return torch.tensor(x, dtype=torch.float32) / 255 - 0.5, torch.tensor(y, dtype=torch.long)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(pl.LightningModule):
    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 7, 7)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(Block(dim, heads), Block(dim, heads))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)
        self.example_input_array = torch.zeros(2, 1, 28, 28)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], 1) + self.pos
        return self.head(self.norm(self.blocks(h))[:, 0])

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=2e-3)


def run(mode: str | None, seed: int, epochs: int, train: TensorDataset, test: tuple) -> tuple[float, int]:
    pl.seed_everything(seed, verbose=False)
    model = ViT()
    attention, _, hidden = (mode or "none").partition("+")  # "heads+hidden": also cut the residual stream
    prune = HalfPrune(
        schedule={0: 0.25, 1: 0.5},
        attention=attention,
        prune_hidden_size=hidden == "hidden",
        latency_batch_size=0,
        verbose=False,
    )
    callbacks = [prune] if mode else []
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(model, DataLoader(train, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(seed)))
    with torch.no_grad():
        acc = (model.eval()(test[0]).argmax(1) == test[1]).float().mean().item()
    return acc, sum(p.numel() for p in model.parameters())


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 12000
    modes = sys.argv[4].split(",") if len(sys.argv) > 4 else ["unpruned", "heads", "head_dim", "both", "none"]
    x, y = read("train")
    train = TensorDataset(x[:n], y[:n])
    test = read("t10k")
    print(f"{seeds} seeds, {epochs} epochs on {n} images, cuts after epochs 0 (0.25) and 1 (0.5); test acc on 10k\n")
    print("| attention | test acc (mean ± std) | per seed | params |")
    print("|---|---:|---|---:|")
    start = time.perf_counter()
    for mode in [None if m == "unpruned" else m for m in modes]:
        results = [run(mode, seed, epochs, train, test) for seed in range(seeds)]
        accs = [a for a, _ in results]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        label = f"`{mode}`" if mode else "unpruned"
        print(f"| {label} | {statistics.mean(accs):.4f} ± {std:.4f} | {', '.join(f'{a:.4f}' for a in accs)} "
              f"| {results[0][1]:,} |", flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
