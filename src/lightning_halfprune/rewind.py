"""Learning-rate rewinding (Renda et al., 2020): after a cut, the LR schedules go back to an earlier epoch.

At the start of every training epoch the position (``last_epoch``) of each of the trainer's LR schedulers and the
hyperparameters it drives (``lr``, ``momentum``, ``betas``) are recorded. ``rewind(trainer, epochs)`` puts each
scheduler back where it was at the start of the epoch ``epochs`` before the next one, so the recovering model
trains again at the higher learning rates the schedule had then. Position and values move together, so closed-form
schedules (``OneCycleLR``) and recursive ones (``StepLR``, ``CosineAnnealingLR``) continue consistently; the
schedule then ends that many epochs short of its end (a one-cycle schedule does not fully anneal).
"""

from __future__ import annotations

from typing import Any

_DRIVEN = ("lr", "momentum", "betas")


class LRRewinder:
    """Records the trainer's LR schedulers each epoch and rewinds them on demand."""

    def __init__(self) -> None:
        self.marks: dict[int, list[tuple[int, list[dict[str, Any]]]]] = {}  # epoch -> per scheduler

    def record(self, trainer: Any) -> None:
        """Remember where every scheduler stands at the start of ``trainer.current_epoch``."""
        self.marks[trainer.current_epoch] = [
            (config.scheduler.last_epoch, [_driven(g) for g in config.scheduler.optimizer.param_groups])
            for config in trainer.lr_scheduler_configs
        ]

    def rewind(self, trainer: Any, epochs: int) -> int | None:
        """Put the schedulers back ``epochs`` epochs before the coming one; returns the epoch rewound to."""
        target = trainer.current_epoch + 1 - epochs
        recorded = [e for e in self.marks if e >= target]
        if not recorded or not trainer.lr_scheduler_configs:
            return None
        epoch = min(recorded)
        for config, (last_epoch, groups) in zip(trainer.lr_scheduler_configs, self.marks[epoch], strict=True):
            scheduler = config.scheduler
            scheduler.last_epoch = last_epoch
            for group, values in zip(scheduler.optimizer.param_groups, groups, strict=True):
                group.update(values)
            scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
        return epoch


def _driven(group: dict[str, Any]) -> dict[str, Any]:
    return {k: group[k] for k in _DRIVEN if k in group}
