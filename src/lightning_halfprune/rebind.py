"""Point a running fit at the pruned parameters: optimizer param groups and state, and the DDP wrapper.

torch-pruning replaces every pruned tensor with a new ``nn.Parameter``. An optimizer left alone keeps updating
the dead tensors and the pruned layers silently stop learning. Here every optimizer is moved to the new
parameters with its state (momentum buffers, Adam moments, step counts) sliced to the kept channels; the
param-group settings and every LR scheduler stay exactly as they were.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from lightning_halfprune.surgery import ParamRemap


def rebind_optimizers(optimizers: Sequence[torch.optim.Optimizer], remap: ParamRemap) -> None:
    """Move ``optimizers`` onto the parameters that replaced the old ones, slicing their state alike.

    Everything new is computed first and swapped in at the end, so an error leaves the optimizers untouched.
    Each state tensor is copied once at its new (smaller) size: at most one extra copy of the state in flight.
    """
    if not len(remap):
        return
    staged = []
    for optimizer in optimizers:
        params = [[remap.new(p) for p in group["params"]] for group in optimizer.param_groups]
        state = {
            remap.new(p): {key: remap.slice_like(p, value) for key, value in s.items()}
            for p, s in optimizer.state.items()
        }
        staged.append((optimizer, params, state))
    for optimizer, params, state in staged:
        for group, new_params in zip(optimizer.param_groups, params, strict=True):
            group["params"] = new_params
        optimizer.state.clear()
        optimizer.state.update(state)


def rewrap_ddp(strategy: Any) -> bool:
    """Rebuild the DDP wrapper of a Lightning strategy around the pruned module; True if it was DDP.

    DDP's reducer holds the old parameters; a new wrapper registers the new ones (and broadcasts rank 0's
    weights, which are identical on every rank after a synchronised cut).
    """
    old = getattr(strategy, "model", None)
    if not isinstance(old, DistributedDataParallel):
        return False
    strategy.model = strategy._setup_model(strategy.lightning_module)
    strategy._register_ddp_hooks()
    del old
    gc.collect()  # free the old wrapper's reducer and its buckets now, not whenever a later cycle collection runs
    return True
