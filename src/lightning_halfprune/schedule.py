"""When to prune and how much: prune points mapped to cumulative pruning ratios."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Literal

Interval = Literal["epoch", "step"]


class Schedule:
    """Prune points (epochs or optimizer steps) mapped to the cumulative fraction of channels removed.

    A ratio is always relative to the width the model had when fit started: ``{3: 0.25, 6: 0.5}`` ends at half
    the channels, never at ``0.75 * 0.75``. With ``interval="epoch"`` a point ``e`` cuts at the end of training
    epoch ``e`` (0-based, as ``trainer.current_epoch`` counts); with ``interval="step"`` a point ``s`` cuts right
    after the optimizer step that makes ``trainer.global_step == s``.

    Args:
        points: prune point -> cumulative ratio in ``[0, 1)``; ratios may not decrease over time.
        interval: ``"epoch"`` or ``"step"``.

    Example:
        >>> Schedule({3: 0.25, 6: 0.5}).ratio_at(6)
        0.5
    """

    def __init__(self, points: Mapping[int, float], interval: Interval = "epoch") -> None:
        if interval not in ("epoch", "step"):
            raise ValueError(f"`interval` must be 'epoch' or 'step', got {interval!r}.")
        if not isinstance(points, Mapping) or not points:
            raise ValueError(f"`schedule` needs at least one prune point -> ratio, got {points!r}.")
        self.interval: Interval = interval
        self.points: dict[int, float] = dict(sorted(_check_point(p, r, interval) for p, r in points.items()))
        previous = 0.0
        for point, ratio in self.points.items():
            if ratio < previous:
                raise ValueError(
                    f"`schedule` ratios are cumulative and may not decrease: {interval} {point} asks for {ratio} "
                    f"after an earlier {previous}."
                )
            previous = ratio

    def ratio_at(self, point: int) -> float | None:
        """The cumulative target ratio if ``point`` is a prune point, else None."""
        return self.points.get(point)

    def check_fits(self, max_epochs: int | None, max_steps: int | None, steps_per_epoch: int | None = None) -> None:
        """Warn about prune points the trainer will never reach, or that leave nothing to recover on.

        ``steps_per_epoch`` (optimizer steps, known once the training data is set up) lets one limit speak for the
        other: epoch points past ``max_steps``, step points past ``max_epochs``.
        """
        limits = self._limits(max_epochs, max_steps, steps_per_epoch)
        if not limits:
            return
        name, limit = min(limits, key=lambda item: item[1])
        unit = self.interval + "s"
        unreachable = (
            [p for p in self.points if p >= limit]
            if self.interval == "epoch"
            else [p for p in self.points if p > limit]
        )
        if unreachable:
            warnings.warn(
                f"`schedule` has prune points {unreachable} ({unit}) past the trainer's {name}: they will never run.",
                UserWarning,
                stacklevel=2,
            )
        last = limit - 1 if self.interval == "epoch" else limit
        if last in self.points:
            warnings.warn(
                f"`schedule` cuts at {self.interval} {last}, the last one ({name}): the pruned model gets "
                "no training to recover.",
                UserWarning,
                stacklevel=2,
            )

    def _limits(self, max_epochs: int | None, max_steps: int | None, steps_per_epoch: int | None) -> list:
        """(what the limit is called, the first epoch / the last step it allows) for each limit that applies."""
        epochs = max_epochs if max_epochs is not None and max_epochs >= 0 else None
        steps = max_steps if max_steps is not None and max_steps >= 0 else None
        per_epoch = steps_per_epoch if steps_per_epoch and steps_per_epoch > 0 else None
        if self.interval == "epoch":
            limits = [(f"max_epochs={epochs}", epochs)] if epochs is not None else []
            if steps is not None and per_epoch:
                limits.append((f"max_steps={steps} ({per_epoch} steps per epoch)", math.ceil(steps / per_epoch)))
            return limits
        limits = [(f"max_steps={steps}", steps)] if steps is not None else []
        if epochs is not None and per_epoch:
            limits.append((f"max_epochs={epochs} ({per_epoch} steps per epoch)", epochs * per_epoch))
        return limits

    def to_dict(self) -> dict:
        return {"interval": self.interval, "points": dict(self.points)}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Schedule({self.points}, interval={self.interval!r})"


class OneShot(Schedule):
    """One cut to ``ratio`` at ``at``; a class of its own so YAML can name it (``class_path``)."""

    def __init__(self, at: int, ratio: float, interval: Interval = "epoch") -> None:
        super().__init__({at: ratio}, interval)


class Linear(Schedule):
    """Equal steps from ``start`` to ``end`` (inclusive, every ``every``) that reach ``ratio`` at ``end``."""

    def __init__(self, start: int, end: int, ratio: float, every: int = 1, interval: Interval = "epoch") -> None:
        points = _span(start, end, every)
        n = len(points)
        super().__init__({p: ratio * (i + 1) / n for i, p in enumerate(points)}, interval)


class Cubic(Schedule):
    """Zhu & Gupta (2017): ``r_t = r * (1 - (1 - (t - start) / (end - start)) ** 3)`` at each point ``t``.

    The first point is ``start + every`` so that no cut is empty; the last is ``end`` at the full ``ratio``.
    """

    def __init__(self, start: int, end: int, ratio: float, every: int = 1, interval: Interval = "epoch") -> None:
        points = _span(start, end, every)
        if len(points) > 1:
            points = points[1:]
        span = max(end - start, 1)
        super().__init__(
            {p: round(ratio * (1 - (1 - (p - start) / span) ** 3), 6) for p in points} | {points[-1]: ratio},
            interval,
        )


def _span(start: int, end: int, every: int) -> list[int]:
    for name, value in (("start", start), ("end", end), ("every", every)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"`{name}` must be an int, got {value!r}.")
    if start < 0 or end < start:
        raise ValueError(f"`start` and `end` need 0 <= start <= end, got start={start}, end={end}.")
    if every < 1:
        raise ValueError(f"`every` must be >= 1, got {every}.")
    points = list(range(start, end + 1, every))
    if points[-1] != end:
        points.append(end)
    return points


def _check_point(point: object, ratio: object, interval: str) -> tuple[int, float]:
    if isinstance(point, str) and point.strip().lstrip("-").isdigit():
        point = int(point)  # YAML/JSON mappings may carry keys as strings
    if not isinstance(point, int) or isinstance(point, bool) or point < 0:
        raise ValueError(f"`schedule` prune points must be integers >= 0 ({interval}s), got {point!r}.")
    if interval == "step" and point < 1:
        raise ValueError(f"`schedule` step points count optimizer steps taken and must be >= 1, got {point!r}.")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or math.isnan(ratio):
        raise ValueError(f"`schedule` ratio at {interval} {point} must be a number in [0, 1), got {ratio!r}.")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"`schedule` ratio at {interval} {point} must be in [0, 1), got {ratio!r}.")
    return point, float(ratio)
