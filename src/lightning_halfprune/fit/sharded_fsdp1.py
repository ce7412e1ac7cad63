"""Cuts under FSDP1 (Lightning's ``FSDPStrategy``, ``use_orig_params=True``): full view per event, wrapped again after.

FSDP1 flattens every wrapped module's parameters into one flat shard per rank; with ``use_orig_params=True`` the
module's own parameters are views into it. For a prune event the full parameters are gathered
(``summon_full_params``), every ``FullyShardedDataParallel`` wrapper inside the LightningModule is replaced by the
module it wraps, holding plain full parameters, and the optimizers are moved onto them with their full state
(``get_optimizer_state_dict(full_state_dict=True)``). On leaving, the strategy wraps the module again exactly as at
setup (its ``_setup_model``: the same auto-wrap policy, sharding strategy, mixed precision, CPU offload), and the
optimizers are moved onto the new parameters with ``set_optimizer_state_dict``, which shards their state again.

Like the FSDP2 path, this version holds the whole unsharded model and optimizer state on every rank during an event.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_halfprune._compat.lightning import wrap_fsdp

_PREFIX = "_fsdp_wrapped_module."


def clean(name: str) -> str:
    """A parameter name without FSDP1's wrapper prefixes (what the user's module calls it)."""
    return name.replace(_PREFIX, "")


def uses_fsdp1(strategy: Any) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(getattr(strategy, "model", None), FullyShardedDataParallel)


def check_orig_params(strategy: Any) -> None:
    """Refuse FSDP1 without ``use_orig_params=True``: flat parameters hide the layers' shapes from the optimizer."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    flat = [m for m in strategy.model.modules() if isinstance(m, FullyShardedDataParallel) and not m._use_orig_params]
    if flat:
        raise ValueError(
            "HalfPrune under FSDPStrategy needs `FSDPStrategy(use_orig_params=True)`: without it the optimizer holds "
            "flat parameter shards a channel cut cannot follow. Better: FSDP2 via `ModelParallelStrategy` "
            "(see the README, 'Sharded training')."
        )


@contextmanager
def full_model(trainer: Any, module: nn.Module) -> Iterator[nn.Module]:
    """The LightningModule unwrapped, with full plain parameters, for the block; wrapped again by the strategy after."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    strategy = trainer.strategy
    check_orig_params(strategy)
    root = strategy.model
    optimizers = list(trainer.optimizers)
    options = StateDictOptions(full_state_dict=True)
    states = [get_optimizer_state_dict(root, optimizer, options=options) for optimizer in optimizers]
    with FSDP.summon_full_params(root, writeback=False, rank0_only=False):
        full = {clean(name): p.detach().clone() for name, p in module.named_parameters()}
        trainable = {clean(name): p.requires_grad for name, p in module.named_parameters()}
    _unwrap(module)
    for name, tensor in full.items():
        owner, attr = _owner(module, name)
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=trainable[name])
    params = dict(module.named_parameters())
    for optimizer, state in zip(optimizers, states, strict=True):
        _load(optimizer, params, state)
    strategy.model = module
    try:
        yield module
    finally:
        _wrap_again(trainer, module, optimizers)


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (module.get_submodule(path) if path else module), attr


def _unwrap(module: nn.Module) -> None:
    """Replace every ``FullyShardedDataParallel`` inside ``module`` by the module it wraps."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            while isinstance(child, FSDP):
                child = child.module
            parent._modules[name] = child


def _load(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter], state: dict[str, Any]) -> None:
    """``optimizer`` on ``params`` (by name) with the full state ``state`` keyed by the same names."""
    optimizer.state.clear()
    for group, saved in zip(optimizer.param_groups, state["param_groups"], strict=True):
        names = [clean(n) for n in saved["params"]]
        group["params"] = [params[n] for n in names]
        for name in names:
            if name in state["state"] or _PREFIX + name in state["state"]:
                value = state["state"].get(name, state["state"].get(_PREFIX + name))
                optimizer.state[params[name]] = {k: v.clone() if torch.is_tensor(v) else v for k, v in value.items()}


def _wrap_again(trainer: Any, module: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    strategy = trainer.strategy
    plain = {id(p): name for name, p in module.named_parameters()}
    saved = []
    for optimizer in optimizers:
        groups = [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [plain[id(p)] for p in g["params"]]}
            for g in optimizer.param_groups
        ]
        state = {plain[id(p)]: dict(s) for p, s in optimizer.state.items()}
        saved.append({"state": state, "param_groups": groups})
    strategy.model = wrap_fsdp(strategy, module)
    params = {clean(name): p for name, p in module.named_parameters()}
    for optimizer, osd in zip(optimizers, saved, strict=True):
        for group, g in zip(optimizer.param_groups, osd["param_groups"], strict=True):
            group["params"] = [params[n] for n in g["params"]]
        optimizer.state.clear()
        set_optimizer_state_dict(strategy.model, optimizer, osd, options=StateDictOptions(full_state_dict=True))
