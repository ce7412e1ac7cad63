"""Side-by-side latency: how much faster one architecture runs than another, measured in one interleaved run.

Two latencies taken at different moments on a shared machine are not comparable: the load changes between them.
So a speed-up is measured as a ratio, on the same model object, by swapping the old and the new architecture's
tensors in and out (copy-free: torch-pruning never edits a tensor in place, so the old ones are still there) and
timing them alternately, A/B/B/A..., until a time budget is spent. Each sample is the fastest of ``REPEATS``
short blocks of forward passes. On one CPU thread (the default) the clock is the thread's CPU time, which does not
run while other processes have the core: a loaded machine then neither inflates nor biases the ratio (wall-clock
minima would: the longer the block, the likelier it is interrupted). The speed-up is the
median of the per-pair ratios ``t_old / t_new``, with their interquartile range and a distribution-free 95%
confidence interval of the median; when that interval straddles 1 or is wide compared with the median, the result
is "not measurable here" rather than a number.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_halfprune.core import log
from lightning_halfprune.core.graph import graph_safe, output_tensors, run_model
from lightning_halfprune.core.measure import repeat_batch
from lightning_halfprune.core.snapshot import ModuleSnapshot

MIN_PAIRS = 6
MAX_PAIRS = 400
MAX_SPREAD = 0.5  # width of the median's 95% CI / median above which a speed-up is not reported
MIN_EFFECT = 0.02  # a CI that does not clear 1 by this much: the same model timed twice can be 0.3% apart
REPEATS = 5  # blocks per sample; the fastest counts
BLOCK_S = 0.002  # seconds of forward passes per block
HARD_STOP = 10.0  # wall-clock seconds per budget second after which a comparison ends, measurable or not


@dataclass
class SpeedUp:
    """One side-by-side comparison of an old and a new architecture.

    ``ratio`` is the median of per-pair ``t_old / t_new`` (above 1: the new one is faster), or None when the
    noise is larger than the effect (``reason`` says why; ``median`` keeps the raw value). ``q1``/``q3``:
    interquartile range of the per-pair ratios; ``low``/``high``: 95% confidence interval of their median.
    ``old_ms``/``new_ms``: median milliseconds per forward pass at ``batch_size`` in this run, for display.
    """

    ratio: float | None
    median: float
    q1: float
    q3: float
    low: float
    high: float
    old_ms: float | None
    new_ms: float | None
    pairs: int
    threads: int
    batch_size: int
    device: str
    seconds: float
    reason: str | None = None

    def label(self) -> str:
        """E.g. ``1.93x faster side by side (95% CI 1.88-1.97, IQR 1.81-2.04, 40 A/B pairs, 1 thread)``."""
        where = "1 thread, CPU time" if self.threads == 1 else f"{self.threads} threads, wall clock"
        where = where if self.device == "cpu" else self.device
        how = f"{self.pairs} A/B pairs, {where}"
        if self.ratio is None:
            return f"speed-up not measurable here: {self.reason} ({how})"
        word = "faster" if self.ratio >= 1 else "slower"
        return (
            f"{self.ratio:.2f}x {word} side by side (95% CI {self.low:.2f}-{self.high:.2f}, "
            f"IQR {self.q1:.2f}-{self.q3:.2f}, {how})"
        )

    def scalars(self, name: str) -> dict[str, float]:
        """``name`` and its CI (only when measurable), and a 0/1 flag ``{name}_measurable``; never NaN."""
        out = {f"{name}_measurable": float(self.ratio is not None)}
        if self.ratio is not None:
            out |= {name: self.ratio, f"{name}_ci_low": self.low, f"{name}_ci_high": self.high}
        return out


def compare(
    model: nn.Module,
    old: ModuleSnapshot,
    example_input: Any,
    batch_size: int,
    budget_s: float = 1.0,
    threads: int | None = 1,
) -> SpeedUp:
    """Time ``model`` as it is now against the architecture ``old`` (a snapshot of the same model), interleaved.

    The model is left exactly as it was (its current tensors and train/eval mode). ``threads`` fixes
    ``torch.set_num_threads`` during timing (restored afterwards; None: the current setting). The comparison
    stops once ``budget_s`` of timing is spent (on one CPU thread: its CPU time, so a loaded machine still gets
    its pairs) and ``MIN_PAIRS`` pairs are timed, and after ``HARD_STOP * budget_s`` wall-clock seconds anyway.
    """
    new = ModuleSnapshot(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    old = old.on(device)
    batch_size = affordable_batch(model, example_input, batch_size)
    x = repeat_batch(example_input, batch_size)
    threads_before = torch.get_num_threads()
    threads = threads or threads_before
    gc_was_enabled = gc.isenabled()
    times: list[tuple[float, float]] = []
    start = time.perf_counter()
    clock = time.thread_time if device.type == "cpu" and threads == 1 else time.perf_counter
    spent = clock()
    try:
        torch.set_num_threads(threads)
        gc.disable()
        with graph_safe(model), torch.no_grad():
            model.eval()
            timer = _cuda_timer if device.type == "cuda" else _thread_timer if threads == 1 else _cpu_timer

            def run(state: ModuleSnapshot, calls: int, repeats: int = REPEATS) -> float:
                state.restore()  # also restores the train/eval flags of that moment: eval again
                model.eval()
                return min(timer(lambda: run_model(model, x), calls) for _ in range(repeats))

            for state in (old, new):  # warm-up: allocator, caches, lazy kernels
                run(state, 1, 2)
            calls = _calls_per_block(min(run(old, 1, 1), run(new, 1, 1)) / 1000)
            while len(times) < MAX_PAIRS and _time_left(
                len(times), clock() - spent, time.perf_counter() - start, budget_s
            ):
                if len(times) % 2 == 0:  # A/B then B/A: a drift in load hits both sides alike
                    a = run(old, calls)
                    b = run(new, calls)
                else:
                    b = run(new, calls)
                    a = run(old, calls)
                times.append((a, b))
    finally:
        new.restore()
        torch.set_num_threads(threads_before)
        if gc_was_enabled:
            gc.enable()
    return verdict(times, threads, batch_size, device.type, time.perf_counter() - start)


def verdict(times: list[tuple[float, float]], threads: int, batch_size: int, device: str, seconds: float) -> SpeedUp:
    """The speed-up from ``(t_old, t_new)`` pairs, or "not measurable" when the noise is larger than the effect."""
    ratios = sorted(a / b for a, b in times if b > 0)
    if len(ratios) >= 2:
        q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    else:
        q1 = median = q3 = ratios[0] if ratios else float("nan")
    low, high = _median_interval(ratios)
    reason = None
    if len(ratios) < MIN_PAIRS:
        reason = (
            f"only {len(ratios)} pairs fit in the time budget (a larger `Timing(budget_s=...)` or a smaller "
            "`Timing(batch_size=...)` gives more)"
        )
    elif low <= 1.0 <= high:
        reason = f"the median's 95% CI {low:.2f}-{high:.2f} straddles 1"
    elif low <= 1.0 + MIN_EFFECT and high >= 1.0 - MIN_EFFECT:
        reason = f"the median's 95% CI {low:.3f}-{high:.3f} is within {MIN_EFFECT:.0%} of 1 (below timing resolution)"
    elif (high - low) / median > MAX_SPREAD:
        reason = f"the median's 95% CI {low:.2f}-{high:.2f} is too wide"
    return SpeedUp(
        ratio=None if reason else median,
        median=median,
        q1=q1,
        q3=q3,
        low=low,
        high=high,
        old_ms=statistics.median(a for a, _ in times) if times else None,
        new_ms=statistics.median(b for _, b in times) if times else None,
        pairs=len(ratios),
        threads=threads,
        batch_size=batch_size,
        device=device,
        seconds=seconds,
        reason=reason,
    )


def _time_left(pairs: int, spent: float, wall: float, budget_s: float) -> bool:
    return wall < HARD_STOP * budget_s and (spent < budget_s or pairs < MIN_PAIRS)


def _median_interval(ratios: list[float]) -> tuple[float, float]:
    """A distribution-free 95% confidence interval of the median of sorted ``ratios`` (binomial order statistics)."""
    n = len(ratios)
    if n == 0:
        return float("nan"), float("nan")
    half = 0.98 * math.sqrt(n)  # 1.96 * sqrt(n) / 2
    return ratios[max(0, math.floor(n / 2 - half))], ratios[min(n - 1, math.ceil(n / 2 + half) - 1)]


def affordable_batch(model: nn.Module, example_input: Any, wanted: int, share: float = 0.25) -> int:
    """``wanted``, or fewer samples where the outputs would take more than ``share`` of the weights' bytes.

    A language model's logits grow with batch x tokens x vocabulary: 64 sequences of 128 tokens over a 32k vocabulary
    are 1 GiB of logits, more than a 125M model's weights. Timing must not be what makes a fit run out of memory.
    """
    first = next(iter(example_input.values())) if isinstance(example_input, dict) else example_input
    first = first[0] if isinstance(first, tuple) else first
    have = first.shape[0] if torch.is_tensor(first) and first.dim() else 1
    with graph_safe(model), torch.no_grad():
        model.eval()
        out = run_model(model, example_input)
    out_bytes = sum(t.numel() * t.element_size() for t in output_tensors(out)) / max(have, 1)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    fits = int(share * weights // max(out_bytes, 1))
    return max(1, min(wanted, max(fits, have)))


def _calls_per_block(seconds_per_call: float) -> int:
    """Forward passes per timed block: about ``BLOCK_S`` long, short enough to often run undisturbed."""
    return max(1, min(1000, round(BLOCK_S / max(seconds_per_call, 1e-7))))


def _cpu_timer(fn: Callable[[], Any], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1000 / calls


def _thread_timer(fn: Callable[[], Any], calls: int) -> float:
    t0 = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - t0) * 1000 / calls


def _cuda_timer(fn: Callable[[], Any], calls: int) -> float:  # pragma: no cover - needs a GPU
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


class SideBySide:
    """The callback's latency policy: what to keep before a cut, and the comparisons it reports.

    Args:
        batch_size: batch size of the timed forward passes; 0 turns every comparison off.
        budget_s: seconds each comparison may take (at least ``MIN_PAIRS`` pairs are timed).
        threads: ``torch.set_num_threads`` during timing; None: the setting when fit started.
    """

    def __init__(self, batch_size: int, budget_s: float = 1.0, threads: int | None = 1) -> None:
        self.batch_size, self.budget_s, self.threads = batch_size, budget_s, threads
        self.original: ModuleSnapshot | None = None

    @property
    def enabled(self) -> bool:
        return self.batch_size > 0

    def keep_original(self, model: nn.Module) -> None:
        """At fit start: fix the thread count and keep the architecture (shapes, no weights) for the final timing."""
        if self.enabled:
            self.threads = self.threads or torch.get_num_threads()
            self.original = ModuleSnapshot(model, keep="shapes")

    def before_cut(self, model: nn.Module) -> ModuleSnapshot | None:
        """What is needed to run the architecture about to be cut: references to its tensors, no copy."""
        return ModuleSnapshot(model) if self.enabled else None

    def compare(self, model: nn.Module, old: ModuleSnapshot | None, example_input: Any) -> SpeedUp | None:
        """``model`` as it is now against ``old``, side by side; None when timing is off or there is no ``old``."""
        if not self.enabled or old is None:
            return None
        return compare(model, old, example_input, self.batch_size, self.budget_s, self.threads)

    def against_original(self, model: nn.Module, example_input: Any) -> SpeedUp | None:
        """``model`` against the architecture it had when fit started (None after a resume: it was not kept).

        The original gets random weights on the model's device for the timing; on a GPU without room for them the
        comparison is skipped with a warning rather than risking an out-of-memory error at the end of a fit.
        """
        if self.original is None or not self.enabled:
            return None
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        need = self.original.shape_bytes
        if device.type == "cuda" and torch.cuda.mem_get_info(device)[0] < 1.5 * need:
            log.warn(
                f"HalfPrune skips timing the original architecture against the pruned one: its weights "
                f"({need / 2**20:.0f} MiB) do not fit in the free memory of {device}."
            )
            return None
        return self.compare(model, self.original, example_input)
