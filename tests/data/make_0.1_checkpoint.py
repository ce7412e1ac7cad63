"""Writes ``halfprune_0.1.ckpt``: a fit of 0.1.0 (before the redesign) stopped after its first cut.

Run with the 0.1.0 sources on the path (``git worktree add /tmp/old 1254dcc``), from the repository root:
    PYTHONPATH=/tmp/old/src:tests python tests/data/make_0.1_checkpoint.py
"""

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_halfprune import HalfPrune
from models import Classifier, loaders, trainer

if __name__ == "__main__":
    pl.seed_everything(0)
    train, val = loaders()
    prune = HalfPrune({0: 0.25, 2: 0.5}, monitor="val_acc", max_drop=0.5, latency_batch_size=0, verbose=False)
    save = ModelCheckpoint(dirpath="tests/data", filename="halfprune_0.1", save_last=False, every_n_epochs=1)
    trainer("/tmp/halfprune_old", max_epochs=2, callbacks=[prune, save], enable_checkpointing=True).fit(
        Classifier("resnet"), train, val
    )
