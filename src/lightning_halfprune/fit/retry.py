"""What the accuracy guard's ``on_violation="halve"`` does after a rollback, in three small rules.

1. The retry ratio is half way between the last kept ratio and the undone one.
2. Until a cut at the retry ratio holds (the guard keeps it, or nothing can judge it), every prune point cuts to at
   most that ratio (the *cap*); the retry is made at the next prune opportunity: the next epoch (step), or an
   earlier scheduled point.
3. A point that would not go past the current ratio cuts nothing and is no event: it is skipped with a message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

EPS = 1e-9


def halfway(kept: float, undone: float) -> float:
    """The ratio a rolled-back cut is retried at."""
    return kept + (undone - kept) / 2


def capped(ratio: float, cap: float | None, history: Sequence[dict[str, Any]]) -> tuple[float, str | None]:
    """The ratio a prune point cuts to, and why it cuts nothing (None if it cuts)."""
    if cap is not None and ratio > cap + EPS:
        ratio = cap
    current = history[-1]["ratio"] if history else 0.0
    if ratio <= current + EPS:
        why = f"ratio {ratio:.3g} is not above the current {current:.3g}"
        return ratio, why + (f" (capped at the retried ratio {cap:.3g})" if cap is not None else "")
    return ratio, None


def lifted(cap: float | None, held_ratio: float) -> float | None:
    """The cap after a cut at ``held_ratio`` held: gone once the retried ratio is reached."""
    return None if cap is not None and held_ratio >= cap - EPS else cap
