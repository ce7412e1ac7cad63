"""``HalfPrune``'s option groups, small frozen dataclasses that check themselves, and the argument checks.

Bad input fails at construction, naming the argument and the value: ``LightningCLI`` builds the callback (and these
groups, from their type hints) from YAML, so the checks run before the Trainer starts, not at the first cut.
``None`` for a group turns the feature off, so no argument depends on another.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, Optional

import torch


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


# --------------------------------------------------------------------------------------------- option groups
@dataclass(frozen=True)
class Guard:
    """The accuracy guard: undo a cut that hurt ``monitor`` too much, exactly (model, optimizers, history).

    Args:
        max_drop: how much worse than before the cut ``monitor`` may stay after ``patience`` validations.
        patience: validations to wait after a cut before it is judged. A cut is judged earlier when the next cut
            is due or the fit ends (a cut in the last epoch is judged then, on the metric right after it).
        on_violation: after a rollback, ``"stop"`` skips all later cuts; ``"halve"`` retries at the next prune
            opportunity with half the step from the last kept ratio, and caps every later point at that ratio
            until a cut there holds.

    The snapshot the guard restores from is a CPU copy of the model and its optimizer state, held from a cut
    until its verdict.
    """

    max_drop: float
    patience: int = 1
    on_violation: Literal["stop", "halve"] = "stop"

    def __post_init__(self) -> None:
        check_number("guard.max_drop", self.max_drop, 0)
        check_int("guard.patience", self.patience, minimum=1)
        check_choice("guard.on_violation", self.on_violation, ("stop", "halve"))


@dataclass(frozen=True)
class Distill:
    """Distillation from the model as it was before a cut: a frozen teacher adds a KL term to the training loss.

    The term is ``alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))`` on the model's outputs; no change
    to the LightningModule is needed (automatic optimization only).

    Args:
        alpha: weight of the distillation term.
        temperature: the softening temperature ``T``.
        teacher: ``"first"``: the model before the first cut teaches all the way; ``"each"``: the model before each
            cut replaces the teacher. After a resume the model before the next cut becomes the teacher.
        epochs: the teacher is dropped this many epochs after the last cut; None keeps it until fit ends.
        output_fn: maps the model's output to logits (default: the tensor, ``.logits``, or its first item).
        loss_fn: ``(student_output, teacher_output) -> Tensor`` replacing the KL term (still times alpha).
    """

    alpha: float = 1.0
    temperature: float = 2.0
    teacher: Literal["first", "each"] = "first"
    epochs: Optional[int] = None
    output_fn: Optional[Callable[[Any], torch.Tensor]] = None
    loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None

    def __post_init__(self) -> None:
        check_number("distill.alpha", self.alpha, 0, inclusive=False)
        check_number("distill.temperature", self.temperature, 0, inclusive=False)
        check_choice("distill.teacher", self.teacher, ("first", "each"))
        check_int("distill.epochs", self.epochs, minimum=0, optional=True)
        for name in ("output_fn", "loss_fn"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise TypeError(f"`distill.{name}` must be callable, got {getattr(self, name)!r}.")


@dataclass(frozen=True)
class Timing:
    """Side-by-side latency timing of each cut (old and new architecture interleaved) and of the final model.

    Args:
        batch_size: batch size the model is timed at.
        budget_s: seconds each comparison may take (at least 6 A/B pairs, but at most 10x this in wall time: a
            model too slow for that reads "not measurable here").
        threads: ``torch.set_num_threads`` while timing (restored after); None: the setting at fit start. One
            thread by default: on a shared machine multi-threaded timings mostly measure the scheduler.
    """

    batch_size: int = 64
    budget_s: float = 1.0
    threads: Optional[int] = 1

    def __post_init__(self) -> None:
        check_int("timing.batch_size", self.batch_size, minimum=1)
        check_number("timing.budget_s", self.budget_s, 0, inclusive=False)
        check_int("timing.threads", self.threads, minimum=1, optional=True)


@dataclass(frozen=True)
class Calibration:
    """Where data-driven scorers (``taylor``, ``activation``, ``redundancy``, ...) get their batches.

    Args:
        batches: how many batches they look at per cut.
        dataloader: where those batches come from; default a fresh iterator over the training data.
        input_fn: ``batch -> model input`` for these scorers and the example input, e.g.
            ``lambda batch: batch["image"]`` (a dotted path from the CLI). Default: the arguments your
            ``training_step`` passes to ``forward`` (found by running it up to that call), else the batch's first
            element or the dict entries ``forward`` accepts.
    """

    batches: int = 8
    dataloader: Any = None
    input_fn: Optional[Callable[[Any], Any]] = None

    def __post_init__(self) -> None:
        check_int("calibration.batches", self.batches, minimum=1)
        if self.input_fn is not None and not callable(self.input_fn):
            raise TypeError(f"`calibration.input_fn` must be a callable batch -> model input, got {self.input_fn!r}.")


@dataclass(frozen=True)
class Sparsity:
    """A sparsity penalty added to the gradients before each optimizer step, until the last prune point.

    Group lasso over every coupled group; L1 on BatchNorm scales with ``scorer="bn_scale"``.

    Args:
        strength: the penalty's weight.
        start: the epoch it starts.
    """

    strength: float
    start: int = 0

    def __post_init__(self) -> None:
        check_number("sparsity.strength", self.strength, 0, inclusive=False)
        check_int("sparsity.start", self.start, minimum=0)


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")


def as_dict(options: Any) -> dict[str, Any] | None:
    """An option group as logged in the hyperparameters (callables by name); None if it is off."""
    if options is None:
        return None
    return {f.name: _loggable(getattr(options, f.name)) for f in fields(options)}


def _loggable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return getattr(value, "__qualname__", type(value).__name__)


# ------------------------------------------------------------------------------------ the flat names of 0.1
_FLAT: dict[str, tuple[str, str]] = {
    "max_drop": ("guard", "max_drop"),
    "patience": ("guard", "patience"),
    "on_violation": ("guard", "on_violation"),
    "distill_alpha": ("distill", "alpha"),
    "distill_temperature": ("distill", "temperature"),
    "distill_teacher": ("distill", "teacher"),
    "distill_epochs": ("distill", "epochs"),
    "distill_output_fn": ("distill", "output_fn"),
    "distill_loss_fn": ("distill", "loss_fn"),
    "latency_batch_size": ("timing", "batch_size"),
    "latency_budget_s": ("timing", "budget_s"),
    "latency_threads": ("timing", "threads"),
    "scoring_batches": ("calibration", "batches"),
    "calibration_dataloader": ("calibration", "dataloader"),
    "input_fn": ("calibration", "input_fn"),
    "regularization": ("sparsity", "strength"),
    "regularize_from": ("sparsity", "start"),
}
_GROUPS = {"guard": Guard, "distill": Distill, "timing": Timing, "calibration": Calibration, "sparsity": Sparsity}
# a flat value that turned the whole feature off in 0.1
_OFF = {("distill", "alpha"): 0, ("timing", "batch_size"): 0, ("sparsity", "strength"): 0, ("guard", "max_drop"): None}


def from_flat(groups: dict[str, Any], flat: dict[str, Any]) -> dict[str, Any]:
    """The option groups with 0.1's flat arguments (``distill_alpha=1.0``, ...) folded in, with a deprecation warning.

    A flat value that turned a feature off in 0.1 (``distill_alpha=0``, ``latency_batch_size=0``,
    ``regularization=0``, ``max_drop=None``) turns its group off. Unknown names raise ``TypeError``.
    """
    unknown = sorted(set(flat) - set(_FLAT))
    if unknown:
        raise TypeError(f"HalfPrune got unexpected keyword argument(s) {unknown}.")
    if not flat:
        return groups
    fields_of: dict[str, dict[str, Any]] = {}
    for name, value in flat.items():
        group, field = _FLAT[name]
        fields_of.setdefault(group, {})[field] = value
    new = dict(groups)
    spelled = []
    for group, values in fields_of.items():
        off = [f for f, v in values.items() if (group, f) in _OFF and v == _OFF[(group, f)] and not isinstance(v, bool)]
        if off:
            new[group] = None
        elif group == "guard" and "max_drop" not in values:
            continue  # patience / on_violation without max_drop configured nothing in 0.1 either
        else:
            base = groups.get(group)
            current = {f.name: getattr(base, f.name) for f in fields(base)} if base is not None else {}
            new[group] = _GROUPS[group](**{**current, **values})
        spelled.append(f"{group}={_GROUPS[group].__name__}({', '.join(f'{k}=...' for k in values)})")
    warnings.warn(
        f"HalfPrune's flat arguments {sorted(flat)} are deprecated and will be removed in the next release: pass "
        f"{', '.join(spelled)} instead (None turns a feature off).",
        DeprecationWarning,
        stacklevel=3,
    )
    return new


def check_ratio(name: str, value: Any) -> None:
    """``value`` must be a number in (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"`{name}` must be in (0, 1), got {value!r}.")


@dataclass(frozen=True)
class Options:
    """The option groups of one ``HalfPrune``, checked together (the only rules that span groups live here)."""

    guard: Optional[Guard] = None
    distill: Optional[Distill] = None
    timing: Optional[Timing] = Timing()  # noqa: RUF009 - frozen
    calibration: Calibration = Calibration()  # noqa: RUF009 - frozen
    sparsity: Optional[Sparsity] = None

    def __post_init__(self) -> None:
        for name, kind in _GROUPS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):  # a plain dict from Python code: build the group from it
                object.__setattr__(self, name, kind(**value))
            elif value is None and name == "calibration":
                object.__setattr__(self, name, Calibration())
            elif value is not None and not isinstance(value, kind):
                raise TypeError(f"`{name}` must be a {kind.__name__}(...) or None, got {value!r}.")

    def check(self, monitor: str | None, target: str) -> None:
        """What one group needs of the rest of the arguments, said at construction."""
        if self.guard is not None and not monitor:
            raise ValueError(
                f"`guard=Guard(max_drop={self.guard.max_drop})` guards a metric: also pass `monitor=` (e.g. 'val_acc')."
            )
        if target == "latency" and self.timing is None:
            raise ValueError("`target='latency'` times the model: `timing` must be a Timing(...), got None.")

    def config(self) -> dict[str, Any]:
        """Every group as logged in the hyperparameters (None where off)."""
        return {name: as_dict(getattr(self, name)) for name in _GROUPS}
