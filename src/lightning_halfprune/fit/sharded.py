"""Cuts under FSDP2 (``fully_shard``, e.g. in ``configure_model`` with Lightning's ``ModelParallelStrategy``).

A channel cut needs whole weights: scores compare every channel of a layer, and torch-pruning slices full
tensors along their output and input dimensions. Under FSDP2 every rank holds only a shard (a ``DTensor``) of
each parameter, so HalfPrune works on a full view for the length of a prune event:

1. ``full_model`` records how the module was sharded: every ``fully_shard`` call (which submodules, their
   device mesh, ``reshard_after_forward``, mixed-precision and offload policies), read from FSDP's own state.
2. Every parameter is gathered to its full tensor on every rank (``DTensor.full_tensor``), FSDP is taken off
   the module in place (its hooks, its state, its class), and the full tensors become plain parameters; every
   optimizer is moved onto them with its state gathered too.
3. Inside the block the module is an ordinary module, identical on every rank: the Surgeon traces, scores
   (averaged across ranks like under DDP) and cuts it, and the optimizers are sliced exactly as on one device.
4. On leaving, the same ``fully_shard`` calls are made again on the same submodules, deepest first, with the
   same mesh and policies; every optimizer is moved onto the new sharded parameters with its state sharded
   the same way (``distribute_tensor`` with each parameter's own placements, no communication).

Memory: this first version holds the whole model (and the optimizer state) unsharded on every rank during an
event, on top of nothing else (the sharded tensors are released as the full ones replace them). See the
README's "Sharded training" section for the measured peak per rank.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_halfprune._compat.lightning import DISTRIBUTED_CHECKPOINT_METADATA, trainer_of
from lightning_halfprune.fit import sharded_fsdp1
from lightning_halfprune.fit.shard_state import (
    FSDP2_MISSING,
    Layout,
    fsdp_modules,
    record_layout,
    reshard_layout,
    strip_fsdp,
)

_ACTIVE = "_halfprune_full_view"  # set on the module while a full view is open: nested blocks do nothing


@dataclass
class _Holder:
    """Where one parameter lives: every (module, attribute) holding it (tied weights are held twice)."""

    places: list[tuple[nn.Module, str]]
    name: str


def is_sharded(module: nn.Module) -> bool:
    """True if ``module`` (or any submodule) is sharded with FSDP2's ``fully_shard``."""
    return bool(fsdp_modules(module))


@contextmanager
def full_model(
    trainer: pl.Trainer | None, module: nn.Module, surgeon: Callable[[], Any] | None = None, when: bool = True
) -> Iterator[nn.Module]:
    """The module with full, plain parameters on every rank for the length of the block, sharded again after.

    FSDP2 (``fully_shard``) as described above; under ``FSDPStrategy`` (FSDP1) see ``sharded_fsdp1``. Does nothing
    for a module that is not sharded (single device, DDP), and inside another such block. ``trainer``'s optimizers
    (if any) follow the parameters both ways, state included. ``surgeon`` returns the Surgeon (or None) whose graph
    is dropped on leaving: it holds the full tensors otherwise. On an error inside the block the module is sharded
    again all the same, as it then is. ``when=False``: nothing happens (for a caller whose block may have nothing
    to do, e.g. latency timing turned off).
    """
    if not when or getattr(module, _ACTIVE, False):
        yield module
        return
    if sharded_fsdp1.uses_fsdp1(getattr(trainer, "strategy", None)):
        setattr(module, _ACTIVE, True)
        try:
            with sharded_fsdp1.full_model(trainer, module):
                yield module
        finally:
            module.__dict__.pop(_ACTIVE, None)
            _forget(surgeon)
        return
    if not is_sharded(module):
        yield module
        return
    if FSDP2_MISSING:
        raise RuntimeError(FSDP2_MISSING)
    optimizers = list(trainer.optimizers) if trainer is not None else []
    for fsdp_module in fsdp_modules(module):
        fsdp_module.reshard()  # parameters at rest: the sharded ones registered, none left gathered by a forward
    layout = record_layout(module)
    _gather(module, layout, optimizers)
    setattr(module, _ACTIVE, True)
    try:
        yield module
    finally:
        module.__dict__.pop(_ACTIVE, None)
        _forget(surgeon)
        _shard(module, layout, optimizers)
        gc.collect()


def _forget(surgeon: Callable[[], Any] | None) -> None:
    """Drop the Surgeon's torch-pruning graph: it keeps the full parameters alive otherwise."""
    found = surgeon() if surgeon is not None else None
    if found is not None:
        found.forget_graph()


def _holders(module: nn.Module) -> dict[int, _Holder]:
    """Every parameter of ``module`` by identity, with all the places that hold it, in a stable order."""
    holders: dict[int, _Holder] = {}
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for attr, param in owner._parameters.items():
            if param is None:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            holder = holders.setdefault(id(param), _Holder([], name))
            if (owner, attr) not in holder.places:
                holder.places.append((owner, attr))
    return holders


def _param_of(holder: _Holder) -> nn.Parameter:
    owner, attr = holder.places[0]
    return owner._parameters[attr]


def _full(value: Any) -> Any:
    """A DTensor gathered to its full tensor on every rank; anything else as it is."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def _gather(module: nn.Module, layout: Layout, optimizers: list[torch.optim.Optimizer]) -> None:
    """Full tensors in place of the shards: parameters (ties kept), optimizer state; FSDP taken off."""
    holders = _holders(module)
    new: dict[int, nn.Parameter] = {}
    for key, holder in holders.items():  # the same order on every rank: the collectives match
        old = _param_of(holder)
        new[key] = nn.Parameter(_full(old.detach()), requires_grad=old.requires_grad)
    strip_fsdp(layout)
    for key, holder in holders.items():
        for owner, attr in holder.places:
            owner._parameters[attr] = new[key]
    _move_optimizers(optimizers, new, lambda p, value: _full(value))


def _shard(module: nn.Module, layout: Layout, optimizers: list[torch.optim.Optimizer]) -> None:
    """The recorded ``fully_shard`` calls made again; the optimizers moved to the new shards, state sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    holders = _holders(module)
    reshard_layout(layout)
    new = {key: _param_of(holder) for key, holder in holders.items()}

    def shard(param: nn.Parameter, value: Any) -> Any:
        if isinstance(param, DTensor) and torch.is_tensor(value) and tuple(value.shape) == tuple(param.shape):
            return distribute_tensor(value.detach(), param.device_mesh, param.placements, src_data_rank=None)
        return value

    _move_optimizers(optimizers, new, shard)


def _move_optimizers(
    optimizers: list[torch.optim.Optimizer], new: dict[int, nn.Parameter], convert: Callable[[Any, Any], Any]
) -> None:
    """Point every optimizer at ``new[id(old)]`` with each state value passed through ``convert(new, value)``.

    Parameters are visited in param-group order, the same on every rank, so collectives inside ``convert``
    match across ranks. A parameter the model does not hold is an error naming the optimizer.
    """
    for optimizer in optimizers:
        state: dict[nn.Parameter, dict[str, Any]] = {}
        groups = []
        for group in optimizer.param_groups:
            params = []
            for old in group["params"]:
                if id(old) not in new:
                    raise ValueError(
                        f"{type(optimizer).__name__} holds a parameter (shape {tuple(old.shape)}) that the sharded "
                        "module does not: HalfPrune can only carry optimizers over the LightningModule's parameters."
                    )
                param = new[id(old)]
                params.append(param)
                if old in optimizer.state:
                    state[param] = {k: convert(param, v) for k, v in optimizer.state[old].items()}
            groups.append(params)
        for group, params in zip(optimizer.param_groups, groups, strict=True):
            group["params"] = params
        optimizer.state.clear()
        optimizer.state.update(state)


# ---------------------------------------------------------------------------- setup: checks and resuming
def setup(trainer: pl.Trainer, pl_module: pl.LightningModule, callback: Any) -> None:
    """Sharded (``ModelParallelStrategy``, ``FSDPStrategy``): refuse what does not work yet, rebuild shapes on resume.

    Called from ``HalfPrune.setup`` (before ``configure_model`` shards the module). Lightning loads a sharded
    checkpoint straight into the sharded module and optimizers, before any hook could cut the module to the
    checkpoint's shape; so the strategy's ``load_checkpoint`` is wrapped (on this strategy instance only) to
    replay the recorded cuts on a full view first.
    """
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from lightning_halfprune.fit import averaging

    strategy = trainer.strategy
    if not isinstance(strategy, (ModelParallelStrategy, FSDPStrategy)):
        return
    chosen = callback.options
    unsupported = {
        "`guard` (the accuracy guard's rollback)": chosen.guard is not None,
        "`sparsity` (regularization)": chosen.sparsity is not None,
        "`distill` (distillation)": chosen.distill is not None,
        "EMA/SWA weight averaging": bool(averaging.averaged_copies(trainer)),
    }
    refused = [name for name, used in unsupported.items() if used]
    if refused:
        raise ValueError(
            f"HalfPrune under {type(strategy).__name__} (sharded) does not support {', '.join(refused)} yet: turn "
            f"{'it' if len(refused) == 1 else 'them'} off, or train with DDP or on one device. "
            "See the README, 'Sharded training'."
        )
    if "load_checkpoint" not in strategy.__dict__:
        strategy.load_checkpoint = _restoring_shape_first(strategy, strategy.load_checkpoint)


def _restoring_shape_first(strategy: Any, original: Callable[..., Any]) -> Callable[..., Any]:
    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        from lightning_halfprune import checkpoint as ckpt

        module = strategy.lightning_module
        source = shape_source(strategy.broadcast(checkpoint_path), kwargs.get("weights_only"))
        if source is not None and source.get(ckpt.KEY):
            trainer = trainer_of(module)
            with full_model(trainer, module):
                names = {id(p): name for name, p in module.named_parameters()}
                if ckpt.restore_shape(module, source):
                    _follow_names(trainer.optimizers, module, names)
        return original(checkpoint_path, *args, **kwargs)

    return load_checkpoint


def _follow_names(optimizers: list[torch.optim.Optimizer], module: nn.Module, names: dict[int, str]) -> None:
    """Point the (fresh) optimizers at the parameters now under the names they had; the checkpoint fills their state."""
    params = dict(module.named_parameters())
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["params"] = [params[names[id(p)]] for p in group["params"]]
        optimizer.state.clear()


def shape_source(path: Any, weights_only: bool | None = None) -> dict[str, Any] | None:
    """What ``restore_shape`` needs from a checkpoint, without loading its tensors.

    A distributed checkpoint (a folder): the HalfPrune history from its ``meta.pt`` and every tensor's shape
    from the folder's metadata, as meta tensors. A consolidated file: loaded memory-mapped.
    """
    from pathlib import Path

    path = Path(path)
    safe = weights_only is not False
    if not path.is_dir():
        return torch.load(path, map_location="cpu", mmap=True, weights_only=safe)
    from torch.distributed.checkpoint import FileSystemReader

    meta = torch.load(path / DISTRIBUTED_CHECKPOINT_METADATA, map_location="cpu", weights_only=safe)
    shapes = {}
    for key, item in FileSystemReader(str(path)).read_metadata().state_dict_metadata.items():
        if key.startswith("state_dict.") and hasattr(item, "size"):
            shapes[key[len("state_dict.") :]] = torch.empty(tuple(item.size), device="meta")
    return {**meta, "state_dict": shapes}
