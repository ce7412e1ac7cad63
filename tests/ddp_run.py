"""One DDP fit on CPU (gloo, 2 processes, each rank its own shard of data) that dumps every rank's parameters
and buffers after each cut and at the end; run by test_ddp.py as ``python tests/ddp_run.py SCORER OUT [CKPT]``."""

import os
import sys

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(__file__))
from lightning_halfprune import HalfPrune  # noqa: E402
from models import Classifier, loaders  # noqa: E402


class Dump(pl.Callback):
    """Listed after HalfPrune: saves this rank's weights and buffers right after each epoch end (after the cut)."""

    def __init__(self, out):
        self.out = out

    def on_train_epoch_end(self, trainer, pl_module):
        self._save(trainer, pl_module, f"epoch{trainer.current_epoch}")

    def on_fit_end(self, trainer, pl_module):
        self._save(trainer, pl_module, "end")

    def _save(self, trainer, pl_module, tag):
        torch.save(
            {
                "state": {k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
                "reports": [r.to_dict() for r in trainer.callbacks[0].reports],
            },
            os.path.join(self.out, f"{tag}-rank{trainer.global_rank}.pt"),
        )


if __name__ == "__main__":
    scorer, out = sys.argv[1], sys.argv[2]
    ckpt = sys.argv[3] if len(sys.argv) > 3 else None
    devices = int(os.environ.get("HALFPRUNE_DEVICES", "2"))
    epochs = int(os.environ.get("HALFPRUNE_EPOCHS", "3"))
    os.makedirs(out, exist_ok=True)
    pl.seed_everything(0)
    train, val = loaders(n=128)
    train = torch.utils.data.DataLoader(train.dataset, batch_size=16, shuffle=False)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=out, save_last=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=epochs,
        callbacks=[
            HalfPrune(
                {0: 0.25, 1: 0.5},
                scorer=scorer,
                scoring_batches=2,
                monitor="val_acc",
                distill_alpha=float(os.environ.get("HALFPRUNE_DISTILL", "0")),
            ),
            Dump(out),
            checkpoints,
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(Classifier("resnet"), train, val, ckpt_path=ckpt)
    if torch.distributed.is_initialized():
        # without this, gloo's process group is torn down at interpreter exit and, after collectives, the process
        # aborts now and then ("terminate called without an active exception"): a PyTorch exit-order issue
        torch.distributed.destroy_process_group()
