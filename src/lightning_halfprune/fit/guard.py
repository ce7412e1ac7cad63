"""The accuracy guard: undo a cut that hurt the monitored metric too much, exactly.

Before each cut a snapshot of the model (architecture, weights, buffers) and the optimizers' state is copied to
CPU memory. If, ``patience`` validations after the cut, the metric is still worse than before it by more than
``max_drop``, the model and optimizers are put back bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

Verdict = Literal["wait", "keep", "undo"]


class ModelSnapshot:
    """A CPU copy of a model's shape-defining attributes, parameters and buffers, and of its optimizers' state.

    ``also``: more models to put back with it (the averaged copies of EMA/SWA), each on the device it is on now.
    """

    def __init__(
        self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], also: Sequence[nn.Module] = ()
    ) -> None:
        self.modules = []
        where: dict[int, tuple[nn.Module, str]] = {}
        for root in (model, *also):
            device = None if root is model else next((p.device for p in root.parameters()), None)
            for name, m in root.named_modules():
                attrs = {k: copy.copy(v) for k, v in vars(m).items() if k != "training" and _plain(v)} if name else {}
                params = {k: None if p is None else (_cpu(p), p.requires_grad) for k, p in m._parameters.items()}
                buffers = {k: None if b is None else _cpu(b) for k, b in m._buffers.items()}
                self.modules.append((m, attrs, params, buffers, device))
                where.update({id(p): (m, k) for k, p in m._parameters.items() if p is not None})
        self.optimizers = [
            (opt, _cpu_state(opt.state_dict()), [[where[id(p)] for p in g["params"]] for g in opt.param_groups])
            for opt in optimizers
        ]

    def restore(self, live_device: torch.device) -> None:
        """Put the model and optimizers back exactly as they were when the snapshot was taken."""
        for m, attrs, params, buffers, own_device in self.modules:
            device = own_device or live_device
            vars(m).update(copy.deepcopy(attrs))
            m._parameters.clear()
            for k, p in params.items():
                m._parameters[k] = None if p is None else nn.Parameter(p[0].to(device), requires_grad=p[1])
            m._buffers.clear()
            m._buffers.update({k: None if b is None else b.to(device) for k, b in buffers.items()})
        for opt, state, groups in self.optimizers:
            for group, keys in zip(opt.param_groups, groups, strict=True):
                group["params"] = [m._parameters[k] for m, k in keys]
            opt.load_state_dict(copy.deepcopy(state))


@dataclass
class Watch:
    """One cut under watch: its snapshot, the metric before it, and the validations seen since."""

    snapshot: ModelSnapshot
    before: float
    history_len: int
    report_index: int
    ratio_before: float
    ratio: float
    seen: int = 0


class AccuracyGuard:
    """Decides whether a watched cut is kept or undone.

    Args:
        mode: ``"max"`` if higher is better (accuracy), ``"min"`` if lower is (loss).
        max_drop: how much worse than before the cut the metric may stay.
        patience: validations after the cut before judging.
    """

    def __init__(self, mode: Literal["max", "min"], max_drop: float, patience: int) -> None:
        self.mode, self.max_drop, self.patience = mode, max_drop, patience
        self.watch: Watch | None = None

    def arm(self, watch: Watch) -> None:
        self.watch = watch

    def judge(self, value: float | None) -> Verdict:
        """Count one validation; "keep" or "undo" once ``patience`` validations were seen."""
        if self.watch is None or value is None:
            return "wait"
        self.watch.seen += 1
        if self.watch.seen < self.patience:
            return "wait"
        return "undo" if self.worse_by(value) > self.max_drop else "keep"

    def worse_by(self, value: float) -> float:
        return self.watch.before - value if self.mode == "max" else value - self.watch.before


def _plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, (int, float, bool, str, type(None)))


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def _cpu_state(state: Any) -> Any:
    if torch.is_tensor(state):
        return _cpu(state)
    if isinstance(state, dict):
        return {k: _cpu_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_cpu_state(v) for v in state]
    return copy.deepcopy(state)
