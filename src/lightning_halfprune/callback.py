"""``HalfPrune``: the Lightning callback that removes channels in the middle of ``Trainer.fit``.

The hooks only decide *when*; scoring, surgery, optimizer rebinding, measuring and reporting live in their own
modules. State that must survive a checkpoint is in ``state_dict``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_halfprune import checkpoint as ckpt
from lightning_halfprune import publish
from lightning_halfprune.calibration import take_batches, training_loss, undisturbed
from lightning_halfprune.distributed import agreed, check_strategy, from_rank_zero, mean_over_ranks
from lightning_halfprune.guard import AccuracyGuard, ModelSnapshot, Watch
from lightning_halfprune.measure import (
    MacCounter,
    architecture,
    count_params,
    evaluate_metric,
    layer_widths,
    measure_latency,
)
from lightning_halfprune.preflight import cut_safely, preflight
from lightning_halfprune.rebind import rebind_optimizers, rewrap_ddp
from lightning_halfprune.regularize import add_bn_l1_grad, add_group_lasso_grad
from lightning_halfprune.report import ModelStats, PruneReport
from lightning_halfprune.schedule import Schedule
from lightning_halfprune.scoring import Scorer, _inputs_of, get_scorer, needs_data
from lightning_halfprune.surgery import Cut, Surgeon, resolve_ignored


class HalfPrune(Callback):
    """Structured pruning during training, inside the fit.

    At the scheduled epochs (or steps) it scores every channel, removes the least useful ones with torch-pruning's
    dependency graph, moves the optimizers to the smaller model, and training goes on.

    Args:
        schedule: ``{epoch: cumulative_ratio}`` or a :class:`Schedule` (``Schedule.cubic(...)``, step intervals).
            Ratios are fractions of the channels the model had when fit started.
        scorer: a name from ``lightning_halfprune.SCORERS`` (``"l1"``, ``"l2"``, ``"taylor"``, ``"redundancy"``,
            ...) or a scorer object (any ``torch_pruning`` importance works).
        ignored_layers: layers never pruned: module names, regular expressions over names, or modules. The
            layers that produce the model's output are never pruned in any case.
        round_to: keep every channel count a multiple of this (e.g. 8 for tensor cores).
        max_layer_ratio: no group of coupled channels loses more than this fraction of its original width.
        global_pruning: rank channels across all layers instead of cutting every layer by the same ratio.
        example_input: an input for tracing the model; default ``pl_module.example_input_array``, else the first
            training batch's input.
        scoring_batches: how many batches data-driven scorers look at.
        calibration_dataloader: where those batches come from; default a fresh iterator over the training data.
        regularization: strength of a sparsity penalty added to the gradients before each optimizer step, from
            epoch ``regularize_from`` until the last prune point (group lasso; L1 on BatchNorm scales with
            ``scorer="bn_scale"``). 0 turns it off.
        regularize_from: the epoch the penalty starts.
        latency_batch_size: batch size at which inference latency is measured before and after each event;
            0 turns latency measurement off.
        monitor: a metric your ``validation_step`` logs (e.g. ``"val_acc"``): reported before the cut, right after
            it (evaluated on the validation data outside the fit's loops) and after recovery (next validation).
        mode: ``"max"`` if a higher ``monitor`` is better, ``"min"`` if lower is.
        max_drop: turns the accuracy guard on: if ``patience`` validations after a cut ``monitor`` is still worse
            than before it by more than this, the model, optimizers and history are restored exactly.
        patience: validations to wait after a cut before the guard judges it.
        on_violation: after a rollback, ``"stop"`` skips all later cuts; ``"halve"`` retries at the next prune
            opportunity (next epoch, or next step) with half the step from the last kept ratio.
        verbose: print a summary line per event (rank 0 only).
    """

    def __init__(
        self,
        schedule: Union[dict[int, float], Schedule],
        scorer: Union[str, Scorer] = "l2",
        ignored_layers: Optional[list[Union[str, nn.Module]]] = None,
        round_to: Optional[int] = None,
        max_layer_ratio: float = 0.9,
        global_pruning: bool = False,
        example_input: Any = None,
        scoring_batches: int = 8,
        calibration_dataloader: Any = None,
        regularization: float = 0.0,
        regularize_from: int = 0,
        latency_batch_size: int = 64,
        monitor: Optional[str] = None,
        mode: Literal["max", "min"] = "max",
        max_drop: Optional[float] = None,
        patience: int = 1,
        on_violation: Literal["stop", "halve"] = "stop",
        verbose: bool = True,
    ) -> None:
        self.schedule = schedule if isinstance(schedule, Schedule) else Schedule(_as_mapping(schedule))
        self.scorer = get_scorer(scorer)
        self.scorer_name = scorer if isinstance(scorer, str) else type(scorer).__name__
        self.ignored_layers = list(ignored_layers or [])
        _check_int("round_to", round_to, minimum=1, optional=True)
        _check_int("scoring_batches", scoring_batches, minimum=1)
        _check_int("latency_batch_size", latency_batch_size, minimum=0)
        if isinstance(max_layer_ratio, bool) or not 0.0 < max_layer_ratio < 1.0:
            raise ValueError(f"`max_layer_ratio` must be in (0, 1), got {max_layer_ratio!r}.")
        self.round_to = round_to
        self.max_layer_ratio = float(max_layer_ratio)
        self.global_pruning = bool(global_pruning)
        self.example_input = example_input
        self.scoring_batches = scoring_batches
        self.calibration_dataloader = calibration_dataloader
        if isinstance(regularization, bool) or not isinstance(regularization, (int, float)) or regularization < 0:
            raise ValueError(f"`regularization` must be a number >= 0, got {regularization!r}.")
        _check_int("regularize_from", regularize_from, minimum=0)
        self.regularization, self.regularize_from = float(regularization), regularize_from
        self.latency_batch_size = latency_batch_size
        self.monitor = monitor
        self.verbose = verbose
        _check_guard(monitor, mode, max_drop, patience, on_violation)
        self.mode, self.max_drop, self.patience, self.on_violation = mode, max_drop, patience, on_violation
        self.guard = AccuracyGuard(mode, max_drop, patience) if monitor and max_drop is not None else None
        self.skipped: list[int] = []  # prune points undone by the guard: never redone, also not after a resume
        self.retries: dict[int, float] = {}  # point -> ratio, added by on_violation="halve"
        self.stopped = False
        self.left_out: dict[str, str] = {}  # coupled groups that cannot be cut safely -> why (see preflight.py)
        self.history: list[dict[str, Any]] = []
        self.original_widths: dict[str, int] = {}
        self.reports: list[PruneReport] = []
        self._surgeon: Surgeon | None = None
        self._macs = MacCounter()
        self._latency: dict[tuple, float] = {}

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy)
        if stage == "fit":
            self.schedule.check_fits(trainer.max_epochs, trainer.max_steps)
            resolve_ignored(pl_module, self.ignored_layers)
        _restore_shape_before_weights_load(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.__dict__.pop("on_load_checkpoint", None)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        publish.hyperparams(trainer, self.config())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._surgeon = self._build_surgeon(trainer, pl_module)
        if not self.stopped:  # what cannot be cut safely is reported now, not after epochs of training
            self.left_out = preflight(self._surgeon, list(self.schedule.points.values()), self.left_out)
        self._catch_up(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule.interval == "epoch":
            self._prune_if_scheduled(trainer, pl_module, trainer.current_epoch)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.regularization and self._regularizing(trainer):
            if self.scorer_name == "bn_scale":
                add_bn_l1_grad(pl_module, self.regularization)
            else:
                add_group_lasso_grad(self._surgeon.groups(), self.regularization)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.schedule.interval == "step":
            self._prune_if_scheduled(trainer, pl_module, trainer.global_step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._record_recovery(trainer)
            self._judge_watched_cut(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        publish.fit_summary(trainer, self.reports, self._last_metric(trainer), self.verbose)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self._surgeon is not None:
            checkpoint[ckpt.KEY] = ckpt.pack(self.history, self.original_widths, self._surgeon.example_input)

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "original_widths": self.original_widths,
            "schedule": self.schedule.to_dict(),
            "skipped": self.skipped,
            "retries": self.retries,
            "stopped": self.stopped,
            "left_out": self.left_out,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.original_widths = dict(state_dict.get("original_widths", {}))
        self.skipped = list(state_dict.get("skipped", []))
        self.retries = {int(k): float(v) for k, v in state_dict.get("retries", {}).items()}
        self.stopped = bool(state_dict.get("stopped", False))
        self.left_out = dict(state_dict.get("left_out", {}))

    # ------------------------------------------------------------------ one event
    def _catch_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a resume, run a prune point the restored run passed without cutting.

        That happens when the checkpoint was written at validation end, just before that epoch's cut.
        """
        now = trainer.current_epoch if self.schedule.interval == "epoch" else trainer.global_step + 1
        done = {event["point"] for event in self.history} | set(self.skipped)
        missed = [p for p in self.schedule.points if p < now and p not in done]
        if missed:
            self._prune_if_scheduled(trainer, pl_module, max(missed))

    def _prune_if_scheduled(self, trainer: pl.Trainer, pl_module: pl.LightningModule, point: int) -> None:
        ratio = self.retries.get(point, self.schedule.ratio_at(point))
        if ratio is None or self.stopped or any(event["point"] == point for event in self.history):
            return
        if (
            self.guard is not None
            and self.guard.watch is not None
            and self._judge_watched_cut(trainer, pl_module, True)
        ):
            self.skipped.append(point)  # just rolled back: this point's cut is not made on top of the undone one
            return
        self.prune(trainer, pl_module, ratio, point)

    def prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ratio: float, point: int) -> PruneReport:
        """Cut the model to cumulative ``ratio`` now, carry the optimizers over, and return the report."""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        snapshot = ModelSnapshot(pl_module, trainer.optimizers) if self.guard is not None else None
        with _timed(timings, "measure"):
            before = self._stats(pl_module)
            metric_before = self._last_metric(trainer)
        with _timed(timings, "score"):
            cuts = self._plan(trainer, pl_module, ratio)
        with _timed(timings, "cut"):
            rebind = lambda remap: rebind_optimizers(trainer.optimizers, remap)  # noqa: E731
            cuts = cut_safely(self._surgeon, cuts, rebind, self.left_out)
            rewrap_ddp(trainer.strategy)
        with _timed(timings, "measure"):
            after = self._stats(pl_module)
            metric_after_cut = mean_over_ranks(trainer.strategy, self._evaluate(trainer, pl_module))
        self.history.append(
            {
                "point": point,
                "interval": self.schedule.interval,
                "ratio": ratio,
                "epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
                "cuts": [c.to_list() for c in cuts],
            }
        )
        report = PruneReport(
            epoch=trainer.current_epoch,
            global_step=trainer.global_step,
            ratio=ratio,
            before=before,
            after=after,
            timings=timings,
            latency_batch_size=self.latency_batch_size or None,
            monitor=self.monitor,
            metric_before=metric_before,
            metric_after_cut=metric_after_cut,
        )
        with _timed(timings, "log"):
            publish.event(trainer, report, len(self.reports), self.verbose)
        report.seconds = time.perf_counter() - start
        report = from_rank_zero(trainer.strategy, report)
        self.reports.append(report)
        if snapshot is not None and metric_before is not None and cuts:
            previous = self.history[-2]["ratio"] if len(self.history) > 1 else 0.0
            self.guard.arm(
                Watch(snapshot, metric_before, len(self.history) - 1, len(self.reports) - 1, previous, ratio)
            )
        return report

    def _judge_watched_cut(self, trainer: pl.Trainer, pl_module: pl.LightningModule, final: bool = False) -> bool:
        """Count a validation against the cut under watch; undo the cut if the metric stayed too far down.

        ``final`` judges now, whatever the patience (the next cut is due). Returns True if the cut was undone.
        """
        if self.guard is None or self.guard.watch is None:
            return False
        value = self._last_metric(trainer)
        verdict = self.guard.judge(value)
        if final and verdict == "wait":  # without a value nothing shows the cut hurt: it is kept
            verdict = "undo" if value is not None and self.guard.worse_by(value) > self.max_drop else "keep"
        verdict = trainer.strategy.broadcast(verdict, src=0)  # every rank acts on rank 0's metric
        if verdict == "undo":
            self._roll_back(trainer, pl_module, value)
        if verdict != "wait":
            self.guard.watch = None
        return verdict == "undo"

    def _roll_back(self, trainer: pl.Trainer, pl_module: pl.LightningModule, value: float) -> None:
        watch = self.guard.watch
        watch.snapshot.restore(pl_module.device)
        rewrap_ddp(trainer.strategy)
        undone = self.history[watch.history_len]
        del self.history[watch.history_len :]
        self.skipped.append(undone["point"])
        report = self.reports[watch.report_index]
        report.rolled_back = True
        if self.on_violation == "halve":
            retry = watch.ratio_before + (watch.ratio - watch.ratio_before) / 2
            now = trainer.current_epoch if self.schedule.interval == "epoch" else trainer.global_step
            self.retries[now + 1] = retry
        else:
            self.stopped = True
        message = (
            f"HalfPrune rolled back the cut to ratio {watch.ratio:.3g} at {self.schedule.interval} {undone['point']}: "
            f"{self.monitor} {watch.before:.4f} -> {value:.4f} is worse by more than max_drop={self.max_drop}; "
            + (
                f"retrying at ratio {self.retries[max(self.retries)]:.3g}."
                if self.on_violation == "halve"
                else "no more cuts."
            )
        )
        if self.verbose:
            rank_zero_info(message)
        publish.scalars(
            trainer, {"halfprune/rollback": float(watch.report_index), "halfprune/ratio": watch.ratio_before}
        )

    # ------------------------------------------------------------------ helpers
    def config(self) -> dict[str, Any]:
        """The callback's arguments, as logged to every logger's hyperparameters."""
        return {
            "schedule": self.schedule.to_dict(),
            "scorer": self.scorer_name,
            "ignored_layers": [str(x) for x in self.ignored_layers],
            "round_to": self.round_to,
            "max_layer_ratio": self.max_layer_ratio,
            "global_pruning": self.global_pruning,
            "scoring_batches": self.scoring_batches,
            "regularization": self.regularization,
            "latency_batch_size": self.latency_batch_size,
            "monitor": self.monitor,
            "mode": self.mode,
            "max_drop": self.max_drop,
            "patience": self.patience,
            "on_violation": self.on_violation,
        }

    def _regularizing(self, trainer: pl.Trainer) -> bool:
        now = trainer.current_epoch if self.schedule.interval == "epoch" else trainer.global_step
        return trainer.current_epoch >= self.regularize_from and any(p >= now for p in self.schedule.points)

    def _last_metric(self, trainer: pl.Trainer) -> float | None:
        """The monitored metric's last logged value, averaged over ranks."""
        value = trainer.callback_metrics.get(self.monitor) if self.monitor else None
        return mean_over_ranks(trainer.strategy, None if value is None else float(value))

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        if not self.monitor or loader is None:
            return None
        with undisturbed(pl_module):
            return evaluate_metric(pl_module, loader, self.monitor)

    def _record_recovery(self, trainer: pl.Trainer) -> None:
        waiting = [r for r in self.reports if r.monitor and r.metric_recovered is None]
        value = self._last_metric(trainer)
        if not waiting or value is None or waiting[-1].global_step == trainer.global_step:
            return
        waiting[-1].metric_recovered = value
        publish.scalars(trainer, {"halfprune/metric_recovered": value})

    def _build_surgeon(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Surgeon:
        example = self._example_input(trainer, pl_module)
        surgeon = Surgeon(
            pl_module,
            example,
            resolve_ignored(pl_module, self.ignored_layers),
            round_to=self.round_to,
            max_layer_ratio=self.max_layer_ratio,
            global_pruning=self.global_pruning,
            original_widths=self.original_widths or None,
        )
        self.original_widths = surgeon.original_widths
        return surgeon

    def _example_input(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        example = self.example_input if self.example_input is not None else pl_module.example_input_array
        if example is None:
            loader = trainer.train_dataloader
            if loader is None:
                raise ValueError("HalfPrune needs `example_input` (or `example_input_array` on the LightningModule).")
            example = _inputs_of(next(iter(loader)))
        if isinstance(example, list):
            example = tuple(example)
        example = move_data_to_device(example, pl_module.device)
        return trainer.precision_plugin.convert_input(example)

    def _plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ratio: float) -> list[Cut]:
        with undisturbed(pl_module):
            if needs_data(self.scorer):
                loader = self.calibration_dataloader or trainer.train_dataloader
                batches = take_batches(loader, self.scoring_batches, pl_module.device)
                self.scorer.calibrate(pl_module, batches, training_loss(pl_module))
            try:
                return self._surgeon.plan(ratio, agreed(trainer.strategy, self.scorer))
            finally:
                getattr(self.scorer, "release", lambda: None)()

    def _stats(self, pl_module: pl.LightningModule) -> ModelStats:
        example = self._surgeon.example_input
        latency = None
        if self.latency_batch_size:  # timed once per architecture: the next cut's "before" is this cut's "after"
            key = architecture(pl_module)
            if key not in self._latency:
                self._latency = {key: measure_latency(pl_module, example, self.latency_batch_size)}
            latency = self._latency[key]
        return ModelStats(
            params=count_params(pl_module),
            macs=self._macs(pl_module, example),
            widths=layer_widths(pl_module),
            latency_ms=latency,
        )


def _restore_shape_before_weights_load(pl_module: pl.LightningModule) -> None:
    """Replay the recorded cuts right before Lightning loads a checkpoint's weights into ``pl_module``.

    Lightning calls the module's ``on_load_checkpoint`` just before loading weights (callback hooks come later),
    so it is wrapped, for this module instance only, until teardown.
    """
    if "on_load_checkpoint" in pl_module.__dict__:
        return
    original = pl_module.on_load_checkpoint

    def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
        ckpt.restore_shape(pl_module, checkpoint)
        original(checkpoint)

    pl_module.on_load_checkpoint = on_load_checkpoint


def _as_mapping(schedule: Any) -> Mapping:
    if not isinstance(schedule, Mapping):
        raise TypeError(f"`schedule` must be a mapping {{epoch: ratio}} or a Schedule, got {schedule!r}.")
    return schedule


def _check_guard(monitor: Any, mode: Any, max_drop: Any, patience: Any, on_violation: Any) -> None:
    if mode not in ("max", "min"):
        raise ValueError(f"`mode` must be 'max' or 'min', got {mode!r}.")
    if on_violation not in ("stop", "halve"):
        raise ValueError(f"`on_violation` must be 'stop' or 'halve', got {on_violation!r}.")
    _check_int("patience", patience, minimum=1)
    if max_drop is not None:
        if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or max_drop < 0:
            raise ValueError(f"`max_drop` must be a number >= 0, got {max_drop!r}.")
        if not monitor:
            raise ValueError(f"`max_drop={max_drop}` guards a metric: also pass `monitor=` (e.g. 'val_acc').")


def _check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
