"""How a module was sharded with FSDP2's ``fully_shard``, taking it off in place, and putting it back the same way.

Everything here is read from FSDP's own per-call state (``FSDPModule._get_fsdp_state()``): the modules of each
``fully_shard`` call, its device mesh, ``reshard_after_forward``, the mixed-precision and offload policies, and
which parameters it left unsharded (``ignored_params``). Taking FSDP off undoes exactly what ``fully_shard``
did to a module: its forward hooks, its entry in the composable-API state and registry, and its class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

try:  # FSDP2 in torch >= 2.6
    from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor, Shard

    FSDP2_MISSING = ""
except ImportError as err:  # pragma: no cover - torch without FSDP2
    FSDP2_MISSING = f"HalfPrune needs torch >= 2.6 for cuts under FSDP2 (fully_shard): {err}"
    FSDPModule = ()  # type: ignore[assignment,misc]


class ShardingError(ValueError):
    """The module is sharded in a way HalfPrune cannot take apart and put back exactly."""


@dataclass
class Call:
    """One ``fully_shard`` call: its modules and the arguments that reproduce it."""

    modules: tuple[nn.Module, ...]
    names: tuple[str, ...]
    kwargs: dict[str, Any]
    state: Any = field(repr=False, default=None)


@dataclass
class Layout:
    """Every ``fully_shard`` call on a model, outermost first, and the names of the parameters left unsharded."""

    calls: list[Call]
    unsharded: set[str]


def fsdp_modules(module: nn.Module) -> list[nn.Module]:
    """``module``'s submodules (itself included) that ``fully_shard`` was applied to."""
    if FSDP2_MISSING:
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def record_layout(model: nn.Module) -> Layout:
    """Read how ``model`` was sharded; raises ``ShardingError`` for what cannot be reproduced."""
    names = {id(m): name for name, m in model.named_modules()}
    calls: list[Call] = []
    seen: set[int] = set()
    for module in fsdp_modules(model):
        state = module._get_fsdp_state()
        if id(state) in seen:
            continue
        seen.add(id(state))
        modules = tuple(state._modules)
        calls.append(Call(modules, tuple(names.get(id(m), "?") for m in modules), _arguments(state), state))
    unsharded = {name for name, p in model.named_parameters() if not isinstance(p, DTensor)}
    return Layout(calls, unsharded)


def _groups(state: Any) -> list[Any]:
    """The parameter groups of one ``fully_shard`` call (one list in newer torch, one group or none before)."""
    groups = list(getattr(state, "_fsdp_param_groups", None) or [])
    if not groups and getattr(state, "_fsdp_param_group", None) is not None:
        groups = [state._fsdp_param_group]
    return groups


def _arguments(state: Any) -> dict[str, Any]:
    groups = _groups(state)
    kwargs: dict[str, Any] = {"mp_policy": state._mp_policy}
    if not groups:  # a call over modules without parameters of their own: only the mesh matters, set later
        return kwargs
    if len(groups) > 1:
        raise ShardingError(_unsupported("a `shard_placement_fn` that puts parameters on several meshes"))
    group = groups[0]
    for param in group.fsdp_params:
        if param.fsdp_placement != Shard(0):
            raise ShardingError(_unsupported(f"a `shard_placement_fn` ({param.fsdp_placement} for {param._param_fqn})"))
    info, post = group.mesh_info, group.post_forward_mesh_info
    if getattr(info, "is_spmd_mesh", False):
        raise ShardingError(_unsupported("`dp_mesh_dims` (FSDP combined with tensor parallelism)"))
    kwargs["mesh"] = info.mesh
    kwargs["offload_policy"] = group.offload_policy
    if state._auto_reshard_after_forward:
        kwargs["reshard_after_forward"] = None
    elif post is None:
        kwargs["reshard_after_forward"] = False
    elif post.shard_mesh_size == info.shard_mesh_size:
        kwargs["reshard_after_forward"] = True
    else:
        kwargs["reshard_after_forward"] = post.shard_mesh_size
    return kwargs


def _unsupported(what: str) -> str:
    return (
        f"HalfPrune cannot cut a model sharded with {what}: it could not shard the pruned model again the same way. "
        "Supported: `fully_shard(module, mesh=..., reshard_after_forward=..., mp_policy=..., offload_policy=...)` "
        "per layer and on the root (see the README, 'Sharded training')."
    )


def strip_fsdp(layout: Layout) -> None:
    """Take every recorded ``fully_shard`` off its modules: hooks, composable state and registry, class."""
    for call in layout.calls:
        state = call.state
        for handle in {id(h): h for h in (state._pre_forward_hook_handle, state._post_forward_hook_handle)}.values():
            handle.remove()
        for group in _groups(state):  # the state-dict hooks: they would put the old shards back on a save or load
            for param in group.fsdp_params:
                param._post_load_hook_handle.remove()
            for handles in (
                group._module_to_pre_save_state_dict_hook_handle,
                group._module_to_pre_load_state_dict_hook_handle,
            ):
                for handle in handles.values():
                    handle.remove()
                handles.clear()
        for module in call.modules:
            states = module.__dict__.get(STATE_KEY, {})
            for key in [k for k, v in states.items() if v is state]:
                del states[key]
            module.__dict__.get(REGISTRY_KEY, {}).pop("fully_shard", None)
            _module_state_mapping.pop(module, None)
            module.__class__ = _plain_class(type(module))
        call.state = None
    for module in {id(m): m for call in layout.calls for m in call.modules}.values():
        for sub in module.modules():
            sub.__dict__.pop("_is_fsdp_managed_module", None)
            sub.__dict__.pop("_fsdp_use_orig_params", None)


def _plain_class(cls: type) -> type:
    """The class ``fully_shard`` derived ``cls`` from (``FSDPLinear`` -> ``Linear``)."""
    if not issubclass(cls, FSDPModule):
        return cls
    bases = [b for b in cls.__bases__ if b is not FSDPModule]
    if len(bases) != 1:
        raise ShardingError(f"HalfPrune cannot take FSDP off a module of class {cls.__name__} (bases {cls.__bases__}).")
    return bases[0]


def reshard_layout(layout: Layout) -> None:
    """Make the recorded ``fully_shard`` calls again, innermost first (the order ``fully_shard`` needs)."""
    meshes = [call.kwargs["mesh"] for call in layout.calls if "mesh" in call.kwargs]
    for call in reversed(layout.calls):
        kwargs = dict(call.kwargs)
        kwargs.setdefault("mesh", meshes[0] if meshes else None)
        target = call.modules[0] if len(call.modules) == 1 else list(call.modules)
        ignored = {p for m in call.modules for name, p in _named(m, call, layout)}
        fully_shard(target, ignored_params=ignored or None, **kwargs)
        call.state = call.modules[0]._get_fsdp_state()


def _named(module: nn.Module, call: Call, layout: Layout) -> list[tuple[str, nn.Parameter]]:
    """Parameters under ``module`` that were left unsharded when the layout was recorded."""
    prefix = call.names[call.modules.index(module)]
    out = []
    for name, param in module.named_parameters():
        full = f"{prefix}.{name}" if prefix else name
        if full in layout.unsharded:
            out.append((name, param))
    return out
