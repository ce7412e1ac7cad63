"""Learning-rate re-warm-up after a cut: the pruned model's first steps take a linearly rising fraction of the LR.

Right after a cut the surviving weights no longer fit each other, and the gradients are large; a full learning
rate on them (AdamW's moments were carried from the dense model) undoes much of what the parent knew. Ramping the
LR from ``1 / (steps + 1)`` to its scheduled value over ``steps`` optimizer steps, as a fresh fine-tune's warm-up
does, keeps that knowledge (measured on a causal LM: ``benchmarks/lm.md``).

The LR schedulers are never touched: before each of those optimizer steps every param group's ``lr`` is scaled
and, right after the step, put back (a step post-hook), so any scheduler (LambdaLR, chained, plateau) continues
from exactly the value it set.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


class Rewarmer:
    """Scales the LR of the next ``steps`` optimizer steps (per optimizer) after each :meth:`start`.

    Args:
        steps: optimizer steps the re-warm-up lasts; 0 turns it off.
    """

    def __init__(self, steps: int) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"`rewarm_steps` must be an int >= 0, got {steps!r}.")
        self.steps = steps
        self._started = False  # no cut yet: no ramp
        self._done: dict[int, int] = {}  # id(optimizer) -> steps taken since the last start
        self._pending: dict[int, tuple[Any, list[float]]] = {}  # id(optimizer) -> (hook handle, saved LRs)

    def start(self) -> None:
        """A cut was made: the next ``steps`` steps of every optimizer ramp up again."""
        self._started, self._done = True, {}

    def factor(self, optimizer: torch.optim.Optimizer) -> float:
        """The LR factor for ``optimizer``'s next step (1.0 once the ramp is over)."""
        done = self._done.get(id(optimizer), 0 if self._started else self.steps)
        return 1.0 if done >= self.steps else (done + 1) / (self.steps + 1)

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Call right before ``optimizer.step()``: scales the LRs for this step only."""
        self._restore(optimizer)  # a step that never ran (skipped by a grad scaler) leaves nothing scaled
        factor = self.factor(optimizer)
        if factor >= 1.0:
            return
        self._done[id(optimizer)] = self._done.get(id(optimizer), 0) + 1
        saved = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * factor
        handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self._restore(opt))
        self._pending[id(optimizer)] = (handle, saved)

    def _restore(self, optimizer: torch.optim.Optimizer) -> None:
        pending = self._pending.pop(id(optimizer), None)
        if pending is None:
            return
        handle, saved = pending
        handle.remove()
        for group, lr in zip(optimizer.param_groups, saved, strict=False):
            group["lr"] = lr


class RewarmAfterCut(Callback):
    """Re-warm the LR for ``steps`` optimizer steps after every cut of the given ``HalfPrune`` callback.

    Put it in the Trainer's callbacks after ``prune``. (``HalfPrune`` may take this over as an argument; this
    callback works with any version, since it only watches ``prune.history``.)
    """

    def __init__(self, prune: Any, steps: int) -> None:
        self.prune, self.rewarmer, self._seen = prune, Rewarmer(steps), 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen = len(self.prune.history)  # cuts made before a resume are no new cuts

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        events = len(self.prune.history)
        if events > self._seen:
            self.rewarmer.start()
        self._seen = events
        self.rewarmer.before_step(optimizer)
