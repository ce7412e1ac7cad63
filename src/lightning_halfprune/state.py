"""``PruneState``: everything a checkpoint carries of HalfPrune's progress, versioned and read strictly.

A corrupt or foreign state fails loudly naming the key, instead of resuming with defaults that silently redo or skip
cuts. Checkpoints written before the state was versioned (version 1: the same keys plus ``schedule``) still load.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

VERSION = 2


class StateError(ValueError):
    """The HalfPrune state in a checkpoint is not one this version can resume from."""


@dataclass
class PruneState:
    """HalfPrune's progress through a fit.

    Attributes:
        history: one entry per prune event kept: point, interval, ratio, epoch, global_step and the cuts made.
        original_widths: every coupled group's width when pruning started (ratios are fractions of these).
        skipped: prune points undone by the guard or that cut nothing: never redone, also not after a resume.
        retries: point -> ratio, added by the guard's ``on_violation="halve"``.
        stopped: no more cuts (the guard rolled back with ``on_violation="stop"``).
        cap: after a rollback with ``"halve"``, no cut goes further until one at this ratio holds.
        original_counts: params and MACs at fit start, for ``target="params"``/``"macs"`` across a resume.
        left_out: coupled groups that cannot be cut safely -> why (see ``core/preflight.py``).
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    original_widths: dict[str, int] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)
    retries: dict[int, float] = field(default_factory=dict)
    stopped: bool = False
    cap: float | None = None
    original_counts: dict[str, float] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """The cumulative ratio of the last kept cut (0 before any)."""
        return self.history[-1]["ratio"] if self.history else 0.0

    def done(self, point: int) -> bool:
        """True if ``point`` was cut, skipped or undone: it is never run again."""
        return point in self.skipped or any(event["point"] == point for event in self.history)

    def to_dict(self) -> dict[str, Any]:
        return {"version": VERSION, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> PruneState:
        """Read a state written by ``to_dict`` (or by version 1); unknown keys or wrong types raise ``StateError``."""
        if not isinstance(state, dict):
            raise StateError(f"HalfPrune's checkpoint state must be a dict, got {type(state).__name__}.")
        state = dict(state)
        version = state.pop("version", 1)
        if version not in (1, VERSION):
            raise StateError(
                f"HalfPrune's checkpoint state has version {version!r}; this release reads 1 and {VERSION}."
            )
        if version == 1:
            state.pop("schedule", None)  # written but never read before version 2: the Trainer's callback has it
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(state) - names)
        if unknown:
            raise StateError(f"HalfPrune's checkpoint state has unknown keys {unknown}: not written by HalfPrune.")
        try:
            return cls(
                history=[dict(e) for e in state.get("history", [])],
                original_widths={str(k): int(v) for k, v in state.get("original_widths", {}).items()},
                skipped=[int(p) for p in state.get("skipped", [])],
                retries={int(k): float(v) for k, v in state.get("retries", {}).items()},
                stopped=_bool(state.get("stopped", False)),
                cap=None if state.get("cap") is None else float(state["cap"]),
                original_counts={str(k): float(v) for k, v in state.get("original_counts", {}).items()},
                left_out={str(k): str(v) for k, v in state.get("left_out", {}).items()},
            )
        except (TypeError, ValueError, AttributeError) as err:
            raise StateError(f"HalfPrune's checkpoint state is malformed: {err}") from err


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"`stopped` must be a bool, got {value!r}")
    return value
