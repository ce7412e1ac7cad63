"""``PruneReport``: the before/after figures of one prune event, and its renderings."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_halfprune.core.latency import SpeedUp
    from lightning_halfprune.core.target import Aim


@dataclass
class ModelStats:
    """What a model costs at one moment."""

    params: int
    macs: int
    widths: dict[str, int] = field(default_factory=dict)
    latency_ms: float | None = None


@dataclass
class PruneReport:
    """The before/after figures of one prune event.

    ``metric_*`` hold the monitored task metric: its last validation value before the event, its value right
    after surgery, and after recovery (the next validation). ``timings`` splits the event's wall time in seconds.
    """

    epoch: int
    global_step: int
    ratio: float
    before: ModelStats
    after: ModelStats
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    monitor: str | None = None
    metric_before: float | None = None
    metric_after_cut: float | None = None
    metric_recovered: float | None = None
    latency_batch_size: int | None = None
    rolled_back: bool = False
    teacher_bytes: int | None = None  # memory of the distillation teacher held after this event
    speed: SpeedUp | None = None  # the new architecture timed side by side against the old one
    aim: Aim | None = None  # target (params, MACs, latency) aimed at and reached, when not pruning by channels

    @property
    def params_ratio(self) -> float:
        return self.after.params / self.before.params if self.before.params else float("nan")

    @property
    def macs_ratio(self) -> float:
        return self.after.macs / self.before.macs if self.before.macs else float("nan")

    @property
    def speedup(self) -> float | None:
        """The side-by-side speed-up of this cut; None when not timed or not measurable."""
        return self.speed.ratio if self.speed is not None else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def scalars(self, prefix: str = "halfprune/") -> dict[str, float]:
        """Flat numbers for any Lightning logger."""
        values = {
            "ratio": self.ratio,
            "params_before": self.before.params,
            "params_after": self.after.params,
            "params_ratio": self.params_ratio,
            "macs_before": self.before.macs,
            "macs_after": self.after.macs,
            "macs_ratio": self.macs_ratio,
            "latency_ms_before": self.before.latency_ms,
            "latency_ms_after": self.after.latency_ms,
            "event_seconds": self.seconds,
            "metric_before": self.metric_before,
            "metric_after_cut": self.metric_after_cut,
            "metric_recovered": self.metric_recovered,
            "teacher_bytes": self.teacher_bytes,
        }
        values |= {f"time_{k}_s": v for k, v in self.timings.items()}
        values |= self.speed.scalars("speedup") if self.speed is not None else {}
        if self.aim is not None:
            values |= {"target_goal": self.aim.goal, "target_reached": self.aim.reached}
        return {prefix + k: float(v) for k, v in values.items() if v is not None and not math.isnan(float(v))}

    def summary_line(self) -> str:
        return (
            f"HalfPrune epoch {self.epoch} step {self.global_step}: ratio {self.ratio:.3g}, "
            f"params {_si(self.before.params)} -> {_si(self.after.params)}, "
            f"MACs {_si(self.before.macs)} -> {_si(self.after.macs)}"
        )

    def rows(self) -> list[tuple[str, str, str]]:
        """(what, before, after) rows of the before -> after table."""
        rows = [
            ("params", _si(self.before.params), _si(self.after.params)),
            ("MACs / sample", _si(self.before.macs), _si(self.after.macs)),
        ]
        if self.speed is not None:
            rows += _speed_rows(self.speed)
        if self.aim is not None:
            rows.append(_aim_row(self.aim))
        if self.monitor:
            rows.append(
                (f"{self.monitor} (right after the cut)", _num(self.metric_before), _num(self.metric_after_cut))
            )
            if self.metric_recovered is not None:
                rows.append((f"{self.monitor} (after recovery)", _num(self.metric_before), _num(self.metric_recovered)))
        return rows

    def to_markdown(self) -> str:
        lines = [
            f"### Prune event: epoch {self.epoch}, step {self.global_step}, ratio {self.ratio:.3g}",
            "",
            "| | before | after |",
            "|---|---:|---:|",
            *[f"| {a} | {b} | {c} |" for a, b, c in self.rows()],
            "",
            "| layer | width before | width after |",
            "|---|---:|---:|",
            *[f"| {n} | {w} | {self.after.widths.get(n, '-')} |" for n, w in self.before.widths.items()],
        ]
        return "\n".join(lines)

    def to_console(self) -> str:
        width = max(len(r[0]) for r in self.rows())
        body = [f"  {a:<{width}}  {b:>12} -> {c}" for a, b, c in self.rows()]
        return "\n".join([self.summary_line(), *body])


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _percent(part: float, whole: float) -> str:
    """``part`` as a percentage of ``whole``; "n/a" when ``whole`` is 0 (e.g. MACs that could not be counted)."""
    return f"{part / whole:.1%}" if whole else "n/a"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _speed_rows(speed: SpeedUp) -> list[tuple[str, str, str]]:
    return [
        (f"latency ms (batch {speed.batch_size})", _ms(speed.old_ms), _ms(speed.new_ms)),
        ("speed-up", "", speed.label()),
    ]


def _aim_row(aim: Aim) -> tuple[str, str, str]:
    if aim.target == "latency":
        reached = "not measurable" if aim.reached is None else f"{1 / aim.reached:.2f}x faster"
        return ("target: latency", f"{1 / aim.goal:.2f}x faster", reached)
    return (f"target: {aim.target} of original", f"{aim.goal:.1%}", f"{aim.reached:.1%}")


def summary_table(
    reports: list[PruneReport], final_metric: float | None = None, speed: SpeedUp | None = None
) -> str:
    """The console table after fit: the model before the first cut against the model after fit, then each event.

    ``speed``: the final architecture timed side by side against the original one.
    """
    first, last = reports[0], reports[-1]
    metric = final_metric if final_metric is not None else last.metric_recovered
    rows = [
        ("params", _si(first.before.params), _si(last.after.params), _percent(last.after.params, first.before.params)),
        ("MACs / sample", _si(first.before.macs), _si(last.after.macs), _percent(last.after.macs, first.before.macs)),
    ]
    if speed is not None:
        latency = f"latency ms (batch {speed.batch_size})"
        rows.append((latency, _ms(speed.old_ms), _ms(speed.new_ms), speed.label()))
    if last.aim is not None:
        name, goal, reached = _aim_row(last.aim)
        rows.append((name, goal, reached, "aimed -> reached"))
    if first.monitor and first.metric_before is not None and metric is not None:
        rows.append((first.monitor, _num(first.metric_before), _num(metric), f"{metric - first.metric_before:+.4f}"))
    width = max(len(r[0]) for r in rows)
    lines = [
        f"HalfPrune summary: {len(reports)} prune event(s); before the first cut -> after fit",
        f"  {'':<{width}}  {'before':>10}  {'after':>10}",
        *[f"  {a:<{width}}  {b:>10}  {c:>10}   ({d})" for a, b, c, d in rows],
        f"  {'event':>5} {'epoch':>5} {'step':>6} {'ratio':>6} {'params':>9} {'MACs':>9} {'speed-up':>11}  "
        + (f"{first.monitor}: before -> after cut -> recovered" if first.monitor else ""),
    ]
    for i, r in enumerate(reports):
        latency = "-" if r.speed is None else "n/m" if r.speed.ratio is None else f"{r.speed.ratio:.2f}x"
        trail = (
            f"{_num(r.metric_before)} -> {_num(r.metric_after_cut)} -> {_num(r.metric_recovered)}" if r.monitor else ""
        )
        trail += "  (rolled back)" if r.rolled_back else ""
        lines.append(
            f"  {i:>5} {r.epoch:>5} {r.global_step:>6} {r.ratio:>6.3f} {_si(r.after.params):>9} "
            f"{_si(r.after.macs):>9} {latency:>11}  {trail}"
        )
    return "\n".join(lines)


def final_summary(
    reports: list[PruneReport], final_metric: float | None = None, speed: SpeedUp | None = None
) -> dict[str, float]:
    """Whole-fit figures for a run summary: final/original params and MACs, side-by-side speed-up, metric delta."""
    first, last = reports[0], reports[-1]
    out = {
        "halfprune/final_params_ratio": last.after.params / first.before.params if first.before.params else math.nan,
        "halfprune/final_macs_ratio": last.after.macs / first.before.macs if first.before.macs else float("nan"),
        "halfprune/events": float(len(reports)),
    }
    if speed is not None:
        out |= speed.scalars("halfprune/final_speedup")
    end = final_metric if final_metric is not None else last.metric_recovered
    if first.metric_before is not None and end is not None:
        out["halfprune/final_metric_delta"] = end - first.metric_before
    return {k: v for k, v in out.items() if not math.isnan(v)}


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds the block takes to ``timings[key]`` (a phase of a prune event, as ``PruneReport.timings``)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
