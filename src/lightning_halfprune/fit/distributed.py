"""The same cut on every rank: scores agreed across processes, one report for all, unsupported strategies refused.

Under DDP each rank scores on its own shard of data, so raw data-driven (or random) scores differ per rank.
Averaging every group's scores across ranks before channels are chosen makes every rank choose the same
channels; the DDP wrapper rebuilt after the cut then broadcasts rank 0's weights and buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy, Strategy

from lightning_halfprune._compat.lightning import tensor_parallel_size

_SUPPORTED = (
    "HalfPrune supports a single device, DDP (ddp, ddp_spawn, ddp_fork; across nodes too) and FSDP2 through "
    "`ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)` with `fully_shard` in `configure_model` "
    "(or FSDP1 via `FSDPStrategy(use_orig_params=True)`; see the README, 'Sharded training')"
)


def check_strategy(strategy: Strategy) -> None:
    """Refuse, before training, strategies whose parameters HalfPrune cannot cut consistently."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    name = type(strategy).__name__
    if isinstance(strategy, ModelParallelStrategy):
        tensor_parallel = tensor_parallel_size(strategy)
        if tensor_parallel != 1:
            raise ValueError(
                f"{_SUPPORTED}, not {name} with tensor_parallel_size={tensor_parallel}: tensor-parallel layers "
                "hold column/row slices that a channel cut would silently corrupt. Set `tensor_parallel_size=1` "
                "and `data_parallel_size` to the number of processes (the default 'auto' is tensor parallel)."
            )
        return
    if isinstance(strategy, FSDPStrategy) and strategy.kwargs.get("use_orig_params", True):
        return  # FSDP1 with the module's own parameters (Lightning's default): see fit/sharded_fsdp1.py
    if "FSDP" in name or "FullyShardedDataParallel" in name:
        raise ValueError(
            f"{_SUPPORTED}, not {name} with `use_orig_params=False` (flat parameters a cut cannot follow): "
            "switch to `ModelParallelStrategy` and call `torch.distributed.fsdp.fully_shard` on each layer in "
            "`configure_model` (or keep FSDPStrategy with `use_orig_params=True`)."
        )
    if "DeepSpeed" in name or not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise ValueError(
            f"{_SUPPORTED}, not strategy {name} (DeepSpeed, pipeline parallelism and other sharded or wrapped "
            "strategies): its parameters are sharded or wrapped in ways a channel cut would silently corrupt."
        )


def agreed(strategy: Strategy, scorer: Callable[[Any], torch.Tensor | None]) -> Callable[[Any], torch.Tensor | None]:
    """``scorer`` with every group's scores averaged across ranks (unchanged on a single process)."""
    if strategy.world_size <= 1:
        return scorer

    def score(group: Any) -> torch.Tensor | None:
        scores = scorer(group)
        if scores is None:
            return None
        mean = strategy.reduce(scores.detach().float().to(strategy.root_device), reduce_op="mean")
        return mean.cpu()

    return score


def mean_over_ranks(strategy: Strategy, value: float | None) -> float | None:
    """A metric measured on each rank's shard, averaged over ranks."""
    if value is None or strategy.world_size <= 1:
        return value
    return float(strategy.reduce(torch.tensor(float(value), device=strategy.root_device), reduce_op="mean"))


def from_rank_zero(strategy: Strategy, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. a report whose latency was timed on each rank)."""
    return obj if strategy.world_size <= 1 else strategy.broadcast(obj, src=0)
