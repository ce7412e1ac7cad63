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

from lightning_halfprune.core.snapshot import ModuleSnapshot
from lightning_halfprune.fit import retry
from lightning_halfprune.options import Guard
from lightning_halfprune.state import PruneState

Verdict = Literal["wait", "keep", "undo"]


class ModelSnapshot:
    """The guard's rollback point: the model (and its EMA/SWA copies) as CPU copies, and its optimizers' state.

    ``also``: more models to put back with it (the averaged copies of EMA/SWA), each on the device it is on now.
    Costs one copy of the model and of the optimizer state in host memory (``nbytes``), from a cut to its verdict.
    """

    def __init__(
        self, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], also: Sequence[nn.Module] = ()
    ) -> None:
        self.roots = []
        where: dict[int, tuple[nn.Module, str]] = {}
        for root in (model, *also):
            device = None if root is model else next((p.device for p in root.parameters()), None)
            self.roots.append((ModuleSnapshot(root, keep="cpu"), device))
            for m in root.modules():
                where.update({id(p): (m, k) for k, p in m._parameters.items() if p is not None})
        self.optimizers = [
            (opt, _cpu_state(opt.state_dict()), [[where[id(p)] for p in g["params"]] for g in opt.param_groups])
            for opt in optimizers
        ]

    @property
    def nbytes(self) -> int:
        state = sum(state_bytes(s) for _, s, _ in self.optimizers)
        return sum(snapshot.nbytes for snapshot, _ in self.roots) + state

    def restore(self, live_device: torch.device) -> None:
        """Put the model and optimizers back exactly as they were when the snapshot was taken."""
        for snapshot, own_device in self.roots:
            snapshot.on(own_device or live_device).restore()
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
    """Owns the guard's policy: arm on a cut, judge it at validations, roll it back and plan the retry.

    Its progress (``skipped``, ``retries``, ``stopped``, ``cap``, the history it truncates) lives in the shared
    :class:`~lightning_halfprune.state.PruneState`, so it travels in checkpoints; the watched cut's snapshot does not
    (a resumed run keeps the cut it resumed with).

    Args:
        options: the user's :class:`~lightning_halfprune.options.Guard`.
        monitor: the metric guarded; ``mode``: ``"max"`` if higher is better, ``"min"`` if lower is.
        state: the callback's state, updated on rollbacks and retries.
        interval: the schedule's interval (``"epoch"``/``"step"``), for messages and the retry point.
    """

    def __init__(
        self, options: Guard, monitor: str, mode: Literal["max", "min"], state: PruneState, interval: str
    ) -> None:
        self.options, self.monitor, self.mode, self.state, self.interval = options, monitor, mode, state, interval
        self.watch: Watch | None = None

    def arm(self, snapshot: ModelSnapshot | None, metric_before: float | None, report_index: int) -> None:
        """Watch the cut just made; a cut nothing can judge (no metric yet) holds, and lifts the retry cap."""
        history = self.state.history
        ratio = history[-1]["ratio"]
        if snapshot is None or metric_before is None:
            self.state.cap = retry.lifted(self.state.cap, ratio)
            return
        previous = history[-2]["ratio"] if len(history) > 1 else 0.0
        self.watch = Watch(snapshot, metric_before, len(history) - 1, report_index, previous, ratio)

    def judge(self, value: float | None, final: bool = False) -> Verdict:
        """Count one validation; "keep" or "undo" once ``patience`` validations were seen (at once if ``final``).

        ``final`` (the next cut is due, or the fit ends): without a value nothing shows the cut hurt, it is kept.
        """
        if self.watch is None:
            return "wait"
        verdict: Verdict = "wait"
        if value is not None:
            self.watch.seen += 1
            if self.watch.seen >= self.options.patience or final:
                verdict = "undo" if self.worse_by(value) > self.options.max_drop else "keep"
        return "keep" if final and verdict == "wait" else verdict

    def worse_by(self, value: float) -> float:
        return self.watch.before - value if self.mode == "max" else value - self.watch.before

    def settle(self, verdict: Verdict, value: float | None, now: int, live_device: torch.device) -> str | None:
        """Act on a verdict: "undo" restores the snapshot and plans the retry; returns the rollback's message."""
        watch, message = self.watch, None
        if verdict == "undo":
            watch.snapshot.restore(live_device)
            message = self._roll_back(watch, value, now)
        elif verdict == "keep":
            self.state.cap = retry.lifted(self.state.cap, watch.ratio)
        if verdict != "wait":
            self.watch = None
        return message

    def _roll_back(self, watch: Watch, value: float | None, now: int) -> str:
        state = self.state
        undone = state.history[watch.history_len]
        del state.history[watch.history_len :]
        state.skipped.append(undone["point"])
        if self.options.on_violation == "halve":
            state.cap = retry.halfway(watch.ratio_before, watch.ratio)
            state.retries[now + 1] = state.cap
            then = f"retrying at ratio {state.cap:.3g}; later prune points cut to at most that until a cut there holds."
        else:
            state.stopped = True
            then = "no more cuts."
        return (
            f"HalfPrune rolled back the cut to ratio {watch.ratio:.3g} at {self.interval} {undone['point']}: "
            f"{self.monitor} {watch.before:.4f} -> {value:.4f} is worse by more than "
            f"max_drop={self.options.max_drop}; {then}"
        )


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


def state_bytes(state: Any) -> int:
    """Bytes of the tensors in ``state`` (an optimizer's state or state dict, nested dicts and lists)."""
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0
