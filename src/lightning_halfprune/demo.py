"""The embedded default task: MNIST-1D (generated locally, never downloaded) and a small 1-D CNN.

``halfprune fit --config examples/mnist1d.yaml`` trains it and prunes half its channels.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy


class MNIST1DDataModule(pl.LightningDataModule):
    """MNIST-1D (Greydanus 2020) from the ``mnist1d`` package's ``make_dataset``: 40-long signals, 10 classes.

    Args:
        num_samples: samples generated in total; ``train_split`` of them for training, the rest for testing.
        val_fraction: fraction of the training samples held out for validation.
        batch_size: batch size of every dataloader.
        seed: the generator's seed (the same seed gives the same data).
    """

    def __init__(
        self, num_samples: int = 5000, val_fraction: float = 0.1, batch_size: int = 128, seed: int = 42
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples, args.seed = self.hparams.num_samples, self.hparams.seed
        data = make_dataset(args)
        x = torch.as_tensor(data["x"], dtype=torch.float32).unsqueeze(1)
        y = torch.as_tensor(data["y"], dtype=torch.long)
        n_val = int(len(x) * self.hparams.val_fraction)
        self.train_set = TensorDataset(x[n_val:], y[n_val:])
        self.val_set = TensorDataset(x[:n_val], y[:n_val])
        x_test = torch.as_tensor(data["x_test"], dtype=torch.float32).unsqueeze(1)
        self.test_set = TensorDataset(x_test, torch.as_tensor(data["y_test"], dtype=torch.long))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=512)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=512)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.test_set.tensors[0]), batch_size=512)


class CNN1D(pl.LightningModule):
    """A 1-D CNN for MNIST-1D.

    ``layers`` conv blocks (Conv1d, BatchNorm, ReLU) of ``channels`` each, every other one strided, then a linear
    classifier over the flattened features.

    Args:
        channels: channels of every conv layer (64 in the benchmarks; 32 is the "smaller net" baseline).
        layers: number of conv blocks.
        lr: peak learning rate of AdamW (one-cycle schedule over the fit).
        weight_decay: AdamW weight decay.
    """

    def __init__(self, channels: int = 64, layers: int = 3, lr: float = 0.01, weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        blocks, width, length = [], 1, 40
        for i in range(layers):
            stride = 2 if i % 2 == 1 else 1
            blocks += [nn.Conv1d(width, channels, 3, stride=stride, padding=1), nn.BatchNorm1d(channels), nn.ReLU()]
            width, length = channels, (length + 2 - 3) // stride + 1
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(channels * length, 10)
        self.example_input_array = torch.zeros(1, 1, 40)
        self.train_acc, self.val_acc, self.test_acc = (MulticlassAccuracy(10, average="micro") for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test_loss", F.cross_entropy(logits, y))
        self.log("test_acc", self.test_acc)

    def predict_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(1)

    def configure_optimizers(self) -> dict:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.hparams.lr, total_steps=max(int(total), 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
