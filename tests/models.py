"""Small versions of the architecture families HalfPrune must keep consistent, and a tiny LightningModule."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class PlainCNN(nn.Module):
    def __init__(self, width: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width * 2, 3, padding=1),
            nn.BatchNorm2d(width * 2),
            nn.ReLU(),
        )
        self.head = nn.Linear(width * 2, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNetish(nn.Module):
    def __init__(self, width: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(Block(width), Block(width))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class DenseNetish(nn.Module):
    def __init__(self, width: int = 8, growth: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.l1 = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, growth, 3, padding=1))
        self.l2 = nn.Sequential(
            nn.BatchNorm2d(width + growth), nn.ReLU(), nn.Conv2d(width + growth, growth, 3, padding=1)
        )
        self.head = nn.Linear(width + 2 * growth, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.l1(x)], 1)
        x = torch.cat([x, self.l2(x)], 1)
        return self.head(x.mean((2, 3)))


class MobileNetish(nn.Module):
    def __init__(self, width: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=width), nn.BatchNorm2d(width), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(width, width * 2, 1), nn.BatchNorm2d(width * 2), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(width * 2, width * 2, 3, padding=1, groups=4), nn.ReLU())
        self.head = nn.Linear(width * 2, classes)

    def forward(self, x):
        return self.head(self.grouped(self.pw(self.dw(self.stem(x)))).mean((2, 3)))


class MLP(nn.Module):
    def __init__(self, width: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(3 * 8 * 8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.net(x))


class Conv1dNet(nn.Module):
    def __init__(self, width: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(3, width, 5, padding=2),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Conv1d(width, width, 3, padding=1),
            nn.BatchNorm1d(width),
            nn.ReLU(),
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.net(x.flatten(2)).mean(2))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(3, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        h = self.embed(x.flatten(2).transpose(1, 2))  # (batch, 64 tokens, 3) -> (batch, 64, dim)
        h = self.norm1(h + self.attn(h, h, h, need_weights=False)[0])
        h = self.norm2(h + self.ff(h))
        return self.head(h.mean(1))


FAMILIES = {
    "plain_cnn": PlainCNN,
    "resnet": ResNetish,
    "densenet": DenseNetish,
    "mobilenet": MobileNetish,
    "mlp": MLP,
    "conv1d": Conv1dNet,
    "transformer": TransformerBlock,
}


class Classifier(pl.LightningModule):
    """Cross-entropy classifier around any of the nets above, on 3x8x8 inputs."""

    def __init__(
        self, net: nn.Module | str = "plain_cnn", lr: float = 0.05, optimizer: str = "sgd", scheduler: bool = False
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["net"] if isinstance(net, nn.Module) else None)
        self.net = FAMILIES[net]() if isinstance(net, str) else net
        self.example_input_array = torch.zeros(2, 3, 8, 8)
        self.losses: list[float] = []
        self.lrs: list[float] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        if self._current_fx_name == "training_step":  # not when a scorer calls it from a callback hook
            self.losses.append(loss.item())
            self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=hp.lr)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.9)
        if not hp.scheduler:
            return opt
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)}


def loaders(n: int = 64, batch_size: int = 16, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """A learnable random task: the class is which colour channel is brightest."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = x.mean((2, 3))[:, :3].argmax(1) % 4
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=batch_size, shuffle=True, generator=g), DataLoader(data, batch_size=batch_size)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**(defaults | kwargs))
