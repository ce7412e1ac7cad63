"""Lightning's private names HalfPrune relies on."""

from __future__ import annotations

from typing import Any

from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.core import saving
from lightning.pytorch.core.module import _jit_is_scripting

jit_is_scripting = _jit_is_scripting  # what LightningModule.to_torchscript wraps its export in


def trainer_of(module: Any) -> Any:
    """The Trainer a LightningModule is attached to, or None (``module.trainer`` raises when there is none)."""
    return getattr(module, "_trainer", None)


def grads_spent(trainer: Any) -> bool:
    """True if the optimizers just stepped on the gradients the model holds, which the next step sets to zero.

    So with automatic optimization, on a batch that ends an accumulation (Lightning's ``_should_accumulate``).
    False where that cannot be told (manual optimization, a Lightning without that method): keep them then.
    """
    module = trainer.lightning_module
    should_accumulate = getattr(trainer.fit_loop.epoch_loop, "_should_accumulate", None)
    return bool(module.automatic_optimization) and should_accumulate is not None and not should_accumulate()


def no_save_before(checkpoint_callback: Any, step: int) -> None:
    """Tell a ``ModelCheckpoint`` it already saved at ``step`` (so it does not save right after a cut)."""
    checkpoint_callback._last_global_step_saved = step


def rewrap_ddp(strategy: Any) -> None:
    """A fresh DDP wrapper around the strategy's LightningModule, with Lightning's communication hooks."""
    strategy.model = strategy._setup_model(strategy.lightning_module)
    strategy._register_ddp_hooks()


def load_state() -> Any:
    """``lightning.pytorch.core.saving._load_state``, which ``load_from_checkpoint`` calls."""
    return saving._load_state


def set_load_state(fn: Any) -> None:
    saving._load_state = fn


def instantiate_trainer(cli_class: type, cli: Any, config: dict, callbacks: list) -> Any:
    """``LightningCLI._instantiate_trainer`` of the parent class ``cli_class``."""
    return super(cli_class, cli)._instantiate_trainer(config, callbacks)


DISTRIBUTED_CHECKPOINT_METADATA = _METADATA_FILENAME  # the file in a distributed checkpoint folder with the rest


def wrap_fsdp(strategy: Any, module: Any) -> Any:
    """``FSDPStrategy._setup_model``: the LightningModule wrapped as at setup (auto-wrap policy and all)."""
    return strategy._setup_model(module)


def tensor_parallel_size(strategy: Any) -> Any:
    """A ``ModelParallelStrategy``'s tensor-parallel degree: from its device mesh once built, else as configured."""
    mesh = strategy._device_mesh
    if mesh is not None and "tensor_parallel" in (mesh.mesh_dim_names or ()):
        return mesh["tensor_parallel"].size()
    return strategy._tensor_parallel_size
