"""Checks of ``HalfPrune``'s arguments: bad input fails at construction, naming the argument and the value.

``LightningCLI`` builds the callback from YAML, so these run before the Trainer starts, not at the first cut.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    """``value`` must be an int >= ``minimum`` (or None when ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")


def check_number(name: str, value: Any, minimum: float, inclusive: bool = True) -> None:
    """``value`` must be a real number >= ``minimum`` (> ``minimum`` when not ``inclusive``)."""
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if not number or value < minimum or (not inclusive and value == minimum):
        raise ValueError(f"`{name}` must be a number {'>=' if inclusive else '>'} {minimum}, got {value!r}.")


def as_mapping(schedule: Any) -> Mapping:
    """A plain ``schedule`` must be a mapping ``{point: ratio}``."""
    if not isinstance(schedule, Mapping):
        raise TypeError(f"`schedule` must be a mapping {{epoch: ratio}} or a Schedule, got {schedule!r}.")
    return schedule


def check_guard(monitor: Any, mode: Any, max_drop: Any, patience: Any, on_violation: Any) -> None:
    """The accuracy guard's arguments; ``max_drop`` needs a ``monitor``."""
    if mode not in ("max", "min"):
        raise ValueError(f"`mode` must be 'max' or 'min', got {mode!r}.")
    if on_violation not in ("stop", "halve"):
        raise ValueError(f"`on_violation` must be 'stop' or 'halve', got {on_violation!r}.")
    check_int("patience", patience, minimum=1)
    if max_drop is not None:
        check_number("max_drop", max_drop, 0)
        if not monitor:
            raise ValueError(f"`max_drop={max_drop}` guards a metric: also pass `monitor=` (e.g. 'val_acc').")


def check_distill(alpha: Any, temperature: Any, teacher: Any, epochs: Any) -> None:
    """The distillation arguments."""
    check_number("distill_alpha", alpha, 0)
    check_number("distill_temperature", temperature, 0, inclusive=False)
    if teacher not in ("first", "each"):
        raise ValueError(f"`distill_teacher` must be 'first' or 'each', got {teacher!r}.")
    check_int("distill_epochs", epochs, minimum=0, optional=True)


def check_automatic_optimization(pl_module: Any) -> None:
    """Distillation adds to the loss ``training_step`` returns: manual optimization cannot take it."""
    if not pl_module.automatic_optimization:
        raise ValueError(
            "HalfPrune `distill_alpha` adds a term to the loss `training_step` returns, which needs automatic "
            "optimization; this module sets `automatic_optimization=False`. Set `distill_alpha=0` or add the "
            "distillation term in your own training_step."
        )
