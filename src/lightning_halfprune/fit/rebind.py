"""Point a running fit at the pruned parameters: optimizer param groups and state, and the DDP wrapper.

torch-pruning replaces every pruned tensor with a new ``nn.Parameter``. An optimizer left alone keeps updating
the dead tensors and the pruned layers silently stop learning. Here every optimizer is moved to the new
parameters with its state sliced to the kept channels; the param-group settings and every LR scheduler stay
exactly as they were.

State of any shape is carried: tensors shaped like the parameter (momentum, Adam moments) and tensors that
broadcast against it (Adafactor's factored ``row_var``/``col_var``) are sliced along the pruned dimensions;
scalars (step counts) are kept. State that cannot be sliced (a flat vector over all parameters) is reset for that
parameter, with a warning, and the optimizer re-initialises it at its next step. LBFGS keeps a private list of its
parameters and a curvature history over their concatenation: the list is rebuilt and the history starts over.
Any other optimizer that keeps the model's parameters outside ``param_groups`` and ``state`` is refused before
training (``check_optimizers``), and after every rebind no optimizer may still hold a parameter of the old model.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_halfprune._compat import lightning as lc
from lightning_halfprune.core.cut import ParamRemap

# attributes every torch optimizer has; anything else holding parameters is a private cache
_OWN = ("state", "param_groups", "defaults")
# optimizers known to cache their parameters, and how the cache is rebuilt after a cut
_REBUILT = {"LBFGS": "its parameter list is rebuilt and its curvature history starts over"}


class CarryError(ValueError):
    """An optimizer keeps the model's parameters somewhere HalfPrune cannot move to the pruned model."""


def check_optimizers(optimizers: Sequence[torch.optim.Optimizer], params: Sequence[torch.Tensor]) -> None:
    """Refuse, before training, an optimizer that holds ``params`` outside its param groups and state."""
    ids = {id(p) for p in params}
    for optimizer in optimizers:
        name = type(optimizer).__name__
        if name in _REBUILT:
            continue
        for attribute, value in vars(optimizer).items():
            if attribute not in _OWN and any(id(t) in ids for t in _tensors_in(value)):
                raise CarryError(
                    f"HalfPrune cannot carry optimizer {name} across a cut: it keeps the model's parameters in "
                    f"`{attribute}`, which a cut would leave pointing at the old tensors. Use an optimizer that keeps "
                    "them only in `param_groups` and `state` (every torch.optim optimizer does; LBFGS is handled)."
                )


def rebind_optimizers(optimizers: Sequence[torch.optim.Optimizer], remap: ParamRemap) -> None:
    """Move ``optimizers`` onto the parameters that replaced the old ones, slicing their state alike.

    One parameter at a time: its sliced state is made and its old state let go before the next, so the move needs
    the memory of one parameter's state, not a second copy of all of it (AdamW's state is twice the model).
    What could refuse the move is checked before anything moves. If the move fails anyway (out of memory,
    Ctrl-C), every optimizer is pointed back at the old parameters; the state already sliced cannot be put back
    and starts over for those parameters, with a warning. Raises ``CarryError`` if an optimizer would hold a
    parameter of the old model outside its param groups and state.
    """
    if not len(remap):
        return
    _check_nothing_old(optimizers, remap, moved=False)
    undos: list[Callable[[], None]] = []
    try:
        for optimizer in optimizers:
            undos.append(_move(optimizer, remap))
    except BaseException:
        for undo in undos:
            undo()
        raise


def _move(optimizer: torch.optim.Optimizer, remap: ParamRemap) -> Callable[[], None]:
    """Move one optimizer, parameter by parameter; returns how to point it back (undoing itself if it fails)."""
    groups = [group["params"] for group in optimizer.param_groups]
    moved: list[torch.Tensor] = []
    reset: list[str] = []

    def undo() -> None:
        for group, params in zip(optimizer.param_groups, groups, strict=True):
            group["params"] = params
        for p in moved:
            optimizer.state.pop(remap.new(p), None)
        if moved:
            rank_zero_warn(
                f"HalfPrune could not finish moving {type(optimizer).__name__} to the pruned model; it is back on the "
                f"old parameters, and the state of the {len(moved)} parameter(s) already moved starts over."
            )

    try:
        for group in optimizer.param_groups:
            group["params"] = [remap.new(p) for p in group["params"]]
        for p in [p for p in optimizer.state if p in remap.steps]:
            state = optimizer.state.pop(p)
            try:
                optimizer.state[remap.new(p)] = {key: remap.slice_like(p, value) for key, value in state.items()}
            except ValueError as err:  # state that does not follow the parameter's shape: started over
                reset.append(str(err))
            except BaseException:
                optimizer.state[p] = state
                raise
            moved.append(p)
            del state  # this parameter's old state goes before the next one is sliced
        _rebuild_caches(optimizer)
        _check_nothing_old([optimizer], remap, moved=True)
    except BaseException:
        undo()
        raise
    if reset and type(optimizer).__name__ not in _REBUILT:
        rank_zero_warn(
            f"HalfPrune reset the {type(optimizer).__name__} state of {len(reset)} pruned parameter(s), which it "
            f"cannot slice ({reset[0]}); the optimizer initialises it again at its next step."
        )
    return undo


def _rebuild_caches(optimizer: torch.optim.Optimizer) -> None:
    """LBFGS: its own parameter list follows the param group; its history over the old ones starts over."""
    if type(optimizer).__name__ != "LBFGS":
        return
    optimizer._params = optimizer.param_groups[0]["params"]
    optimizer._numel_cache = None
    optimizer.state.clear()
    rank_zero_info(f"HalfPrune: LBFGS after the cut: {_REBUILT['LBFGS']}.")


def _check_nothing_old(optimizers: Sequence[torch.optim.Optimizer], remap: ParamRemap, moved: bool) -> None:
    """Before the move: no attribute the move does not rewrite holds an old parameter; after it: none at all."""
    old = {id(p) for p in remap.steps}
    unchecked = ("defaults",) if moved else ("defaults", "state", "param_groups")
    for optimizer in optimizers:
        rebuilt = ("_params",) if type(optimizer).__name__ in _REBUILT and not moved else ()
        for attribute, value in vars(optimizer).items():
            if attribute not in (*unchecked, *rebuilt) and any(id(t) in old for t in _tensors_in(value)):
                raise CarryError(
                    f"{type(optimizer).__name__} keeps a parameter of the old model in `{attribute}`, where moving it "
                    "to the pruned model cannot reach; the cut was undone."
                )


def _tensors_in(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors in ``value`` and the containers inside it (a few levels deep; dict keys too: ``state`` is keyed so)."""
    if torch.is_tensor(value):
        yield value
    elif depth < 4 and isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors_in(k, depth + 1)
            yield from _tensors_in(v, depth + 1)
    elif depth < 4 and isinstance(value, (list, tuple, set)):
        for v in value:
            yield from _tensors_in(v, depth + 1)


def drop_spent_grads(trainer: Any, module: nn.Module) -> None:
    """Let go of the gradients the optimizers have already used, before a cut.

    Lightning sets them to zero before the next step anyway, but a cut would keep them alive beside the pruned
    copies it makes (torch-pruning slices ``.grad`` along with each parameter): on a model that fills the device,
    the largest extra cost of a prune event. Gradients still being accumulated, or under manual optimization, stay.
    """
    if lc.grads_spent(trainer):
        for p in module.parameters():
            p.grad = None


def rewrap_ddp(strategy: Any) -> bool:
    """Rebuild the DDP wrapper of a Lightning strategy around the pruned module; True if it was DDP.

    DDP's reducer holds the old parameters; a new wrapper registers the new ones (and broadcasts rank 0's
    weights, which are identical on every rank after a synchronised cut).
    """
    old = getattr(strategy, "model", None)
    if not isinstance(old, DistributedDataParallel):
        return False
    lc.rewrap_ddp(strategy)
    del old
    gc.collect()  # free the old wrapper's reducer and its buckets now, not whenever a later cycle collection runs
    return True
