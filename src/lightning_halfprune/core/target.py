"""Prune to a target: how many channels to cut so that params, MACs or latency reach a given reduction.

With ``target="channels"`` a schedule value is the fraction of channels removed (per layer, or over the global
ranking). With ``"params"`` or ``"macs"`` it is the cumulative reduction of that count: 0.5 means the model ends
with half the original parameters or MACs per sample. With ``"latency"`` it is the reduction of inference time
measured side by side against the original architecture: 0.5 means twice as fast.

The search runs over the scorer's global ranking (scores normalised by each group's mean, so that layers with more
redundancy give more; ``max_layer_ratio`` caps every layer): it bisects the number of channels removed, counting
each candidate exactly by making the cut and undoing it (``Surgeon.trial``). For latency it first aims at the
same MACs reduction, times that candidate against the original, and corrects the MACs goal by what it measured,
for a few timed candidates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lightning_halfprune.core.latency import SpeedUp
from lightning_halfprune.core.plan import Cut
from lightning_halfprune.core.surgeon import Surgeon

Target = Literal["channels", "params", "macs", "latency"]
TARGETS = ("channels", "params", "macs", "latency")
LATENCY_TRIES = 4
LATENCY_TOLERANCE = 0.05


@dataclass
class Aim:
    """What one event aimed at and reached, as fractions of the original model that remain.

    ``goal``: e.g. 0.5 for half the MACs (for latency: the time fraction, 0.5 = 2x faster); ``reached``: counted
    (or timed) after the cut, None if the timing was not measurable; ``channel_ratio``: the global channel
    ratio the search chose.
    """

    target: str
    goal: float
    reached: float | None
    channel_ratio: float
    tries: int = 0


def check_target(target: Any) -> None:
    if target not in TARGETS:
        raise ValueError(f"`target` must be one of {list(TARGETS)}, got {target!r}.")


def cuts_for_fraction(
    surgeon: Surgeon, score: Callable[[Any], torch.Tensor | None], quantity: Callable[[], float], goal: float
) -> tuple[list[Cut], float, int]:
    """The cuts whose result has ``quantity()`` closest to ``goal``, by bisection over the global channel ratio.

    ``quantity`` measures the model as it is (e.g. MACs / original MACs). Returns the cuts, their channel ratio
    and how many candidates were counted.
    """
    score = _memoized(score)
    total = sum(surgeon.original_widths.values())

    def measure(ratio: float) -> tuple[list[Cut], float]:
        cuts = surgeon.plan(ratio, score)
        if not cuts:
            return cuts, quantity()
        with surgeon.trial(cuts):
            return cuts, quantity()

    lo, (cuts_lo, q_lo) = 0.0, measure(0.0)
    hi, (cuts_hi, q_hi) = 1.0, measure(1.0)
    tries = 2
    if q_lo <= goal:
        return cuts_lo, lo, tries
    if q_hi >= goal:
        return cuts_hi, hi, tries
    while hi - lo > 0.5 / total:
        mid = (lo + hi) / 2
        cuts, q = measure(mid)
        tries += 1
        if q > goal:
            lo, cuts_lo, q_lo = mid, cuts, q
        else:
            hi, cuts_hi, q_hi = mid, cuts, q
    if abs(q_lo - goal) <= abs(q_hi - goal):
        return cuts_lo, lo, tries
    return cuts_hi, hi, tries


def ratio_for_speedup(
    surgeon: Surgeon,
    score: Callable[[Any], torch.Tensor | None],
    macs_fraction: Callable[[], float],
    speedup: Callable[[], SpeedUp],
    goal_speedup: float,
) -> tuple[float, SpeedUp | None, int]:
    """The channel ratio whose cut runs ``goal_speedup`` times faster than the original, or the closest found.

    Starts from the same MACs reduction, times that candidate (``speedup()`` times the model as it is against the
    original), and rescales the MACs goal by the shortfall, for at most ``LATENCY_TRIES`` timed candidates.
    Returns the chosen ratio, its timing and the number of candidates counted.
    """
    macs_goal, tried, counted = 1.0 / goal_speedup, [], 0
    for _ in range(LATENCY_TRIES):
        cuts, ratio, n = cuts_for_fraction(surgeon, score, macs_fraction, macs_goal)
        counted += n
        if cuts:
            with surgeon.trial(cuts):
                timed = speedup()
        else:
            timed = None
        value = timed.median if timed is not None else 1.0
        tried.append((ratio, timed, value))
        if abs(value / goal_speedup - 1) <= LATENCY_TOLERANCE or ratio >= 1.0:
            break
        macs_goal = min(1.0, max(0.01, macs_goal * value / goal_speedup))
    reaching = [t for t in tried if t[2] >= goal_speedup * (1 - LATENCY_TOLERANCE)]
    ratio, timed, _ = min(reaching, key=lambda t: t[0]) if reaching else max(tried, key=lambda t: t[2])
    return ratio, timed, counted


def _memoized(score: Callable[[Any], torch.Tensor | None]) -> Callable[[Any], torch.Tensor | None]:
    """Score each group once per search: the groups are rebuilt after every trial, their root layers stay."""
    cache: dict[int, torch.Tensor | None] = {}

    def cached(group: Any) -> torch.Tensor | None:
        key = id(group[0].dep.target.module)
        if key not in cache:
            cache[key] = score(group)
        return cache[key]

    return cached


class Targeter:
    """Turns a schedule value into cuts for one target, measured against the model at fit start.

    Args:
        target: ``"params"``, ``"macs"`` or ``"latency"``.
        surgeon: the model's surgeon (built with global ranking).
        count: ``count(kind)`` -> the model's current params or MACs per sample.
        speedup: times the model as it is against the original architecture (for ``"latency"``).
        original: params and MACs of the original model (restored after a resume); default: counted now.
    """

    def __init__(
        self,
        target: str,
        surgeon: Surgeon,
        count: Callable[[str], float],
        speedup: Callable[[], SpeedUp | None],
        original: dict[str, float] | None = None,
    ) -> None:
        self.target, self.surgeon, self.count, self.speedup = target, surgeon, count, speedup
        self.original = dict(original) if original else {kind: float(count(kind)) for kind in ("params", "macs")}

    def fraction(self, kind: str) -> float:
        """What remains of the original ``kind`` (params or MACs) in the model as it is."""
        return self.count(kind) / self.original[kind] if self.original[kind] else 1.0

    def plan(
        self, value: float, score: Callable[[Any], torch.Tensor | None], agree: Callable[[float], float]
    ) -> tuple[list[Cut], Aim]:
        """The cuts that bring the target down by ``value`` (cumulative); ``agree`` broadcasts a timed choice."""
        goal = 1.0 - value
        if self.target in ("params", "macs"):
            cuts, ratio, tries = cuts_for_fraction(self.surgeon, score, lambda: self.fraction(self.target), goal)
            return cuts, Aim(self.target, goal, None, ratio, tries)
        ratio, _, tries = ratio_for_speedup(
            self.surgeon, score, lambda: self.fraction("macs"), self.speedup, 1.0 / max(goal, 1e-6)
        )
        ratio = agree(ratio)  # timings differ between ranks: every rank cuts what rank 0 chose
        return self.surgeon.plan(ratio, _memoized(score)), Aim(self.target, goal, None, ratio, tries)

    def reached(self, aim: Aim, speed: SpeedUp | None) -> Aim:
        """``aim`` with what the cut model reached: counted, or for latency timed against the original."""
        if aim.target == "latency":
            aim.reached = 1.0 / speed.ratio if speed is not None and speed.ratio else None
        else:
            aim.reached = self.fraction(aim.target)
        return aim
