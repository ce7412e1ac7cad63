"""Learning-rate rewinding (Renda et al., 2020): after a cut, the LR schedules go back to an earlier epoch.

At the start of every training epoch the position (``last_epoch``) of each of the trainer's LR schedulers and the
hyperparameters it drives (``lr``, ``momentum``, ``betas``) are recorded. ``rewind(trainer, epochs)`` sets each
scheduler so that the next epoch trains with the learning rates of ``epochs`` epochs earlier: the recovering model
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

    def rewind(self, trainer: Any, epochs: int) -> None:
        """Make the coming epoch train with the LR schedulers where they were ``epochs`` epochs ago.

        Called at the end of an epoch (Lightning has already stepped per-epoch schedulers): every scheduler goes
        back to its mark at the start of epoch ``next - epochs``, clamped to the first recorded mark. A cut in
        the middle of an epoch (``interval="step"``) counts that epoch as the one just finished.
        """
        target = trainer.current_epoch + 1 - epochs
        for index, config in enumerate(trainer.lr_scheduler_configs):
            recorded = [e for e, marks in self.marks.items() if len(marks) > index]
            if not recorded:
                continue
            epoch = max([e for e in recorded if e <= target], default=min(recorded))
            last_epoch, groups = self.marks[epoch][index]
            scheduler = config.scheduler
            scheduler.last_epoch = last_epoch
            for group, values in zip(scheduler.optimizer.param_groups, groups, strict=True):
                group.update(values)
            scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


def _driven(group: dict[str, Any]) -> dict[str, Any]:
    return {k: group[k] for k in _DRIVEN if k in group}
