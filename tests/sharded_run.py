"""One FSDP2 fit on CPU (``ModelParallelStrategy``, gloo, 2 processes, ``fully_shard`` per layer in
``configure_model``) that dumps every rank's full parameters after each cut and at the end; run by
test_sharded.py as ``python tests/sharded_run.py KIND OUT [CKPT]`` with KIND ``cnn`` or ``llama``."""

import os
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(__file__))
from lightning_halfprune import HalfPrune  # noqa: E402
from lightning_halfprune.options import Calibration  # noqa: E402
from models import Classifier, loaders  # noqa: E402
from transformer_models import Wrapper, loader  # noqa: E402


class ShardedCNN(Classifier):
    """The residual CNN, each block sharded on its own and the whole net as the root."""

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for block in self.net.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


class ShardedLlama(Wrapper):
    """A tiny Llama (GQA: 4 query heads, 2 key/value heads), each decoder layer sharded, the model as the root."""

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", -self.loss(batch))  # higher is better, like the CNN's accuracy


class CPUFSDP(FSDPStrategy):
    """FSDP1 on CPU (Lightning refuses ``strategy="fsdp"`` without a GPU): each residual block wrapped on its own."""

    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        from models import Block

        return FullyShardedDataParallel(
            model, device_id=torch.device("cpu"), use_orig_params=True, auto_wrap_policy=ModuleWrapPolicy({Block})
        )


def full_state(trainer, pl_module):
    """Every parameter and buffer as a full tensor (gathered from the shards; a collective on every rank)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if isinstance(trainer.strategy, FSDPStrategy):
        with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
            return {
                k.replace("_fsdp_wrapped_module.", ""): v.detach().clone() for k, v in pl_module.state_dict().items()
            }
    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in pl_module.state_dict().items()
    }


def is_sharded(trainer, pl_module):
    """Parameters and optimizer state sharded again: DTensors (FSDP2) or flat shards under an FSDP wrapper (FSDP1)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if isinstance(trainer.strategy, FSDPStrategy):
        wrapped = isinstance(trainer.strategy.model, FullyShardedDataParallel)
        local = sum(p.numel() for p in pl_module.parameters())
        state = trainer.optimizers[0].state
        local_params = [p for p in pl_module.parameters() if p.numel()]  # a rank holds no piece of some parameters
        carried = bool(local_params) and all(len(state.get(p, {})) for p in local_params)
        return wrapped and local < sum(p.numel() for p in full_state(trainer, pl_module).values()), carried
    states = [v for s in trainer.optimizers[0].state.values() for k, v in s.items() if k != "step"]
    return all(isinstance(p, DTensor) for p in pl_module.parameters()), all(isinstance(v, DTensor) for v in states)


class Dump(pl.Callback):
    """Listed after HalfPrune: saves this rank's full weights right after each epoch end (after the cut)."""

    def __init__(self, out):
        self.out = out

    def on_train_epoch_end(self, trainer, pl_module):
        self._save(trainer, pl_module, f"epoch{trainer.current_epoch}")

    def on_fit_end(self, trainer, pl_module):
        self._save(trainer, pl_module, "end")

    def _save(self, trainer, pl_module, tag):
        params, optimizer = is_sharded(trainer, pl_module)
        torch.save(
            {
                "state": full_state(trainer, pl_module),
                "reports": [r.to_dict() for r in getattr(trainer.callbacks[0], "reports", [])],
                "losses": list(pl_module.losses),
                "sharded": params,
                "optimizer_sharded": optimizer,
            },
            os.path.join(self.out, f"{tag}-rank{trainer.global_rank}.pt"),
        )


if __name__ == "__main__":
    kind, out = sys.argv[1], sys.argv[2]
    ckpt = sys.argv[3] if len(sys.argv) > 3 else None
    epochs = int(os.environ.get("HALFPRUNE_EPOCHS", "3"))
    os.makedirs(out, exist_ok=True)
    pl.seed_everything(0)
    devices = int(os.environ.get("HALFPRUNE_DEVICES", "2"))  # 1 with HALFPRUNE_ACCELERATOR=gpu: one GPU, nccl
    strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    if kind == "cnn-fsdp1":
        model = Classifier("resnet", optimizer="adamw", lr=0.01)
        strategy = CPUFSDP()
        train, val = loaders(n=128)
        train = torch.utils.data.DataLoader(train.dataset, batch_size=16, shuffle=False)
    elif kind == "cnn":
        model = ShardedCNN("resnet", optimizer="adamw", lr=0.01)
        train, val = loaders(n=128)
        train = torch.utils.data.DataLoader(train.dataset, batch_size=16, shuffle=False)
    else:
        model = ShardedLlama("llama", optimizer="adamw", lr=0.003)
        train = val = loader("llama", n=64, batch_size=8)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=out, save_last=True)
    trainer = pl.Trainer(
        accelerator=os.environ.get("HALFPRUNE_ACCELERATOR", "cpu"),
        devices=devices,
        strategy=strategy,
        max_epochs=epochs,
        callbacks=[
            pl.Callback()
            if os.environ.get("HALFPRUNE_OFF")
            else HalfPrune(
                {0: 0.25, 1: 0.5},
                scorer=os.environ.get("HALFPRUNE_SCORER", "taylor"),
                calibration=Calibration(batches=2),
                timing=None,
                monitor="val_acc",
            ),
            Dump(out),
        ]
        + ([] if kind == "cnn-fsdp1" else [checkpoints]),  # FSDP1 on CPU segfaults saving a full state dict
        enable_checkpointing=kind != "cnn-fsdp1",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, train, val, ckpt_path=ckpt)
    if os.environ.get("HALFPRUNE_CONSOLIDATED"):  # one file with full tensors, as `load_pruned` reads
        trainer.strategy._save_distributed_checkpoint = False
        trainer.save_checkpoint(os.path.join(out, "consolidated.ckpt"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
