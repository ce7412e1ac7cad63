"""The README's main job through the Python API instead of the CLI: train the MNIST-1D CNN, prune half its
channels on a gradual schedule, log to W&B (offline without an API key) and print the before -> after table.

    python examples/mnist1d_api.py
"""

import os

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger

from lightning_halfprune import Cubic, Distill, HalfPrune, load_pruned
from lightning_halfprune.demo import CNN1D, MNIST1DDataModule

if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    pl.seed_everything(0)
    model, data = CNN1D(channels=64), MNIST1DDataModule()
    prune = HalfPrune(
        schedule=Cubic(start=4, end=10, ratio=0.5, every=2),
        scorer="l2",
        monitor="val_acc",
        # the recovery recipe: the model before each cut teaches the pruned one until 2 epochs after the last cut
        distill=Distill(alpha=1.0, temperature=2.0, teacher="each", epochs=2),
    )
    trainer = pl.Trainer(
        max_epochs=20,
        accelerator="cpu",
        callbacks=[prune],
        logger=WandbLogger(project="lightning-halfprune", name="mnist1d-api", save_dir="runs"),
        enable_progress_bar=False,
    )
    trainer.fit(model, data)
    trainer.test(model, data)
    print(prune.reports[-1].to_markdown())

    # the checkpoint Lightning wrote loads into the pruned shape without any Trainer
    pruned = load_pruned(CNN1D, trainer.checkpoint_callback.best_model_path)
    print("reloaded:", sum(p.numel() for p in pruned.parameters()), "parameters")
