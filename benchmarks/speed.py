"""Side-by-side speed-ups and pruning to a target, on MNIST-1D and on a 2-D CNN for Fashion-MNIST.

    python benchmarks/speed.py            # all rows (~20 min on a loaded 2-core machine)
    python benchmarks/speed.py --quick    # MNIST-1D rows only
    python benchmarks/speed.py --fashion  # Fashion-MNIST rows only
    python benchmarks/speed.py --fashion --short   # one Fashion-MNIST row (macs 0.5), 4 epochs on 6k images
    python benchmarks/speed.py --quick --macs   # one MNIST-1D row (also --channels, --latency)

Every speed-up is HalfPrune's own end-of-fit figure: the original architecture timed against the final one in one
interleaved A/B run (1 thread, CPU time, batch 64), median of per-pair ratios with its 95% CI. Fashion-MNIST is
read from /usr/share/datasets/fashion-mnist (the idx gz files); a 12k-image training subset keeps it short.
"""

from __future__ import annotations

import sys
import time
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from common import fashion_mnist, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_halfprune import Cubic, HalfPrune, Schedule
from lightning_halfprune.core.measure import MacCounter, count_params
from lightning_halfprune.demo import CNN1D, MNIST1DDataModule


class FashionData(pl.LightningDataModule):
    TRAIN = 12000

    def __init__(self, test: int = 2000) -> None:
        super().__init__()
        train = self.TRAIN
        images, labels = fashion_mnist("train")
        test_images, test_labels = fashion_mnist("t10k")
        x = torch.tensor(images[:train], dtype=torch.float32) / 255
        y = torch.tensor(labels[:train], dtype=torch.long)
        xt = torch.tensor(test_images[:test], dtype=torch.float32) / 255
        yt = torch.tensor(test_labels[:test], dtype=torch.long)
        mean, std = x.mean(), x.std()
        self.train_set = TensorDataset((x - mean) / std, y)
        self.test_set = TensorDataset((xt - mean) / std, yt)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=128, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.test_set, batch_size=512)

    def test_dataloader(self):
        return DataLoader(self.test_set, batch_size=512)


class CNN2D(pl.LightningModule):
    """Three conv blocks (16, 32, 64 channels; BatchNorm, ReLU, max-pool after the first two), global average pool."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), lr: float = 0.01) -> None:
        super().__init__()
        layers, c = [], 1
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
            layers += [nn.MaxPool2d(2)] if i < len(widths) - 1 else []
            c = w
        self.features, self.head = nn.Sequential(*layers), nn.Linear(c, 10)
        self.example_input_array = torch.zeros(1, 1, 28, 28)
        self.val_acc, self.test_acc = MulticlassAccuracy(10, average="micro"), MulticlassAccuracy(10, average="micro")
        self.lr = lr

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.val_acc(self(batch[0]), batch[1])
        self.log("val_acc", self.val_acc)

    def test_step(self, batch, batch_idx):
        self.test_acc(self(batch[0]), batch[1])
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-4)
        total = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=max(int(total), 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def run(task: str, target: str, epochs: int, schedule: Schedule) -> str:
    pl.seed_everything(0, verbose=False)
    if task == "mnist1d":
        model, data = CNN1D(channels=64), MNIST1DDataModule()
    else:
        model, data = CNN2D(), FashionData()
    example = model.example_input_array
    params0, macs0 = count_params(model), MacCounter()(model, example)
    prune = HalfPrune(schedule, target=target, monitor="val_acc", verbose=False)
    start = time.perf_counter()
    trainer = quiet_trainer(epochs, [prune])
    trainer.fit(model, data)
    wall = time.perf_counter() - start
    acc = trainer.test(model, data, verbose=False)[0]["test_acc"]
    aim = prune.reports[-1].aim
    if aim is None:
        aimed = "-"
    elif target == "latency":
        reached = "not measurable" if aim.reached is None else f"{1 / aim.reached:.2f}x"
        aimed = f"{1 / aim.goal:.2f}x faster -> {reached}"
    else:
        aimed = f"{aim.goal:.1%} -> {aim.reached:.1%}"
    speed = prune.final_speed
    shown = "-" if speed is None else speed.label().replace(" side by side", "")
    ms = "-" if speed is None or speed.old_ms is None else f"{speed.old_ms:.3f} -> {speed.new_ms:.3f}"
    return (
        f"| {task} | `{target}` 0.5 | {aimed} | {count_params(model) / params0:.1%} "
        f"| {MacCounter()(model, example) / macs0:.1%} | {ms} | {shown} | {acc:.4f} | {wall:.0f} |"
    )


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # training too: on a busy shared machine two threads mostly wait for each other
    print(
        "| task | target | aimed -> reached | params | MACs | latency ms @64 (same run) "
        "| final speed-up, side by side | test acc | wall s |"
    )
    print("|---|---|---|---:|---:|---:|---|---:|---:|")
    mnist1d = Cubic(start=4, end=10, ratio=0.5, every=2)
    only = [t for t in ("channels", "macs", "latency") if f"--{t}" in sys.argv]  # e.g. --macs: that row only
    for target in (only or ("channels", "macs", "latency")) if "--fashion" not in sys.argv else ():
        print(run("mnist1d", target, 20, mnist1d), flush=True)
    if "--quick" in sys.argv:
        return
    if "--short" in sys.argv:  # one row, 4 epochs on 6k images: when the machine is very busy
        FashionData.TRAIN = 6000
        print(run("fashion", "macs", 4, Schedule({0: 0.25, 1: 0.5})), flush=True)
        return
    fashion = Cubic(start=1, end=3, ratio=0.5, every=1)
    for target in ("channels", "macs", "latency"):
        print(run("fashion", target, 5, fashion), flush=True)


if __name__ == "__main__":
    main()
