"""``HalfPrune``: the Lightning callback that removes channels in the middle of ``Trainer.fit``.

The hooks only decide *when*; scoring, surgery, optimizer rebinding, measuring and reporting live in their own
modules. State that must survive a checkpoint is in ``state_dict``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_halfprune import checkpoint as ckpt
from lightning_halfprune import options as arguments
from lightning_halfprune import publish
from lightning_halfprune.core import scoring
from lightning_halfprune.core.attention import AttentionMode
from lightning_halfprune.core.attention import check_mode as check_attention_mode
from lightning_halfprune.core.graph import resolve_ignored
from lightning_halfprune.core.latency import SideBySide, SpeedUp
from lightning_halfprune.core.measure import MacCounter, count_params, layer_widths
from lightning_halfprune.core.plan import Cut
from lightning_halfprune.core.preflight import cut_safely, drop_failed, guarded, note_kept_embeddings, preflight
from lightning_halfprune.core.scoring import Scorer, get_scorer, needs_data
from lightning_halfprune.core.surgeon import Surgeon
from lightning_halfprune.core.target import Aim, Target, Targeter, check_target
from lightning_halfprune.fit import averaging, best, compiled, monitor, retry
from lightning_halfprune.fit import checks as start_checks
from lightning_halfprune.fit.batches import fed_input, model_input, take_batches, training_loss, undisturbed
from lightning_halfprune.fit.distill import Distiller
from lightning_halfprune.fit.distributed import agreed, check_strategy, from_rank_zero, mean_over_ranks
from lightning_halfprune.fit.guard import AccuracyGuard, ModelSnapshot, Watch
from lightning_halfprune.fit.rebind import check_optimizers, rebind_optimizers, rewrap_ddp
from lightning_halfprune.fit.regularize import add_bn_l1_grad, add_group_lasso_grad
from lightning_halfprune.fit.rewind import LRRewinder
from lightning_halfprune.report import ModelStats, PruneReport
from lightning_halfprune.schedule import Schedule


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
        input_fn: ``batch -> model input`` for data-driven scorers and the example input, e.g.
            ``lambda batch: batch["image"]`` (a dotted path from the CLI). Default: the arguments your
            ``training_step`` passes to the LightningModule's ``forward`` (found by running it up to that call),
            else the batch's first element or the dict entries ``forward`` accepts.
        scoring_batches: how many batches data-driven scorers look at.
        calibration_dataloader: where those batches come from; default a fresh iterator over the training data.
        regularization: strength of a sparsity penalty added to the gradients before each optimizer step, from
            epoch ``regularize_from`` until the last prune point (group lasso; L1 on BatchNorm scales with
            ``scorer="bn_scale"``). 0 turns it off.
        regularize_from: the epoch the penalty starts.
        latency_batch_size: batch size at which each cut's speed-up is measured, old and new architecture timed
            side by side (interleaved); also the original against the final one after fit. 0 turns timing off.
        latency_budget_s: seconds each side-by-side comparison may take (it goes on to at least 6 A/B pairs, but
            stops at 10x this in wall time: a model too slow for that reads "not measurable here").
        latency_threads: ``torch.set_num_threads`` while timing (restored after); None: the setting at fit start.
            One thread by default: on a shared machine multi-threaded timings mostly measure the scheduler.
        target: what a schedule value reduces: ``"channels"`` (fraction of channels removed), ``"params"``,
            ``"macs"`` (0.5: half the original parameters / MACs per sample) or ``"latency"`` (0.5: half the
            original inference time, i.e. 2x faster, timed side by side). Other than ``"channels"``, channels are
            ranked globally (scores normalised per group) and the channel count is searched to meet the target.
        monitor: a metric your ``validation_step`` logs (e.g. ``"val_acc"``): reported before the cut, right after
            it (evaluated on the validation data outside the fit's loops) and after recovery (next validation).
            With several validation dataloaders: Lightning's name (``"val_acc/dataloader_idx_1"``), or the plain
            name if only one loader logs it. A name not logged is a warning at the first validation.
        mode: ``"max"`` if a higher ``monitor`` is better, ``"min"`` if lower is.
        max_drop: turns the accuracy guard on: if ``patience`` validations after a cut ``monitor`` is still worse
            than before it by more than this, the model, optimizers and history are restored exactly.
        patience: validations to wait after a cut before the guard judges it. A cut is judged earlier when the next
            cut is due or the fit ends (a cut in the last epoch is judged then, on the metric right after it).
        on_violation: after a rollback, ``"stop"`` skips all later cuts; ``"halve"`` retries at the next prune
            opportunity (next epoch or step, or an earlier scheduled point) with half the step from the last kept
            ratio, and caps every later point at that ratio until a cut there holds. A point that would cut nothing
            is skipped, never logged as an event.
        verbose: print a summary line per event (rank 0 only).
        reset_best_on_cut: after every cut (and rollback) each ``ModelCheckpoint`` that monitors a metric starts
            its ranking over, so ``ckpt_path="best"`` is the best checkpoint of the final architecture, not the
            dense model from before the cut. Files already written are kept. False keeps Lightning's ranking.
        distill_alpha: turns distillation on: from the first cut, the model as it was before it is a frozen
            teacher and the training loss gets ``distill_alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))``
            on the model's outputs. No change to the LightningModule is needed (automatic optimization only).
        distill_temperature: the softening temperature ``T``.
        distill_teacher: ``"first"``: the model before the first cut teaches all the way; ``"each"``: the model
            before each cut replaces the teacher. After a resume the teacher is not in the checkpoint: the model
            before the next cut becomes the teacher (none if the run resumed after the last cut).
        distill_epochs: the teacher is dropped this many epochs after the last cut; None keeps it until fit ends.
        distill_output_fn: maps the model's output to logits (default: the tensor, ``.logits``, or its first item).
        distill_loss_fn: ``(student_output, teacher_output) -> Tensor`` replacing the KL term (still times alpha).
        lr_rewind: after each cut, rewind the trainer's LR schedulers to where they were this many epochs before
            the next epoch (Renda et al., 2020). 0 turns it off.
        attention: how attention modules (timm, torchvision, Hugging Face, lookalikes) are cut: ``"heads"``
            removes whole heads (with GQA, a key/value head with all its query heads), ``"head_dim"`` the same
            offsets of the head dimension in every head, ``"both"`` some of each, ``"none"`` leaves them alone.
        prune_hidden_size: also cut the residual stream (embedding width) of models with attention, together
            with everything that reads it; by default only heads and MLP widths are cut.
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
        input_fn: Optional[Callable[[Any], Any]] = None,
        scoring_batches: int = 8,
        calibration_dataloader: Any = None,
        regularization: float = 0.0,
        regularize_from: int = 0,
        latency_batch_size: int = 64,
        latency_budget_s: float = 1.0,
        latency_threads: Optional[int] = 1,
        target: Target = "channels",
        monitor: Optional[str] = None,
        mode: Literal["max", "min"] = "max",
        max_drop: Optional[float] = None,
        patience: int = 1,
        on_violation: Literal["stop", "halve"] = "stop",
        verbose: bool = True,
        reset_best_on_cut: bool = True,
        distill_alpha: float = 0.0,
        distill_temperature: float = 2.0,
        distill_teacher: Literal["first", "each"] = "first",
        distill_epochs: Optional[int] = None,
        distill_output_fn: Optional[Callable[[Any], torch.Tensor]] = None,
        distill_loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
        lr_rewind: int = 0,
        attention: AttentionMode = "heads",
        prune_hidden_size: bool = False,
    ) -> None:
        self.schedule = schedule if isinstance(schedule, Schedule) else Schedule(arguments.as_mapping(schedule))
        check_attention_mode(attention)
        self.attention, self.prune_hidden_size = attention, bool(prune_hidden_size)
        self.scorer = get_scorer(scorer)
        self.scorer_name = scorer if isinstance(scorer, str) else type(scorer).__name__
        self.ignored_layers = list(ignored_layers or [])
        arguments.check_int("round_to", round_to, minimum=1, optional=True)
        arguments.check_int("scoring_batches", scoring_batches, minimum=1)
        arguments.check_int("latency_batch_size", latency_batch_size, minimum=0)
        if isinstance(max_layer_ratio, bool) or not 0.0 < max_layer_ratio < 1.0:
            raise ValueError(f"`max_layer_ratio` must be in (0, 1), got {max_layer_ratio!r}.")
        self.round_to = round_to
        self.max_layer_ratio = float(max_layer_ratio)
        self.global_pruning = bool(global_pruning)
        self.example_input = example_input
        if input_fn is not None and not callable(input_fn):
            raise TypeError(f"`input_fn` must be a callable batch -> model input, got {input_fn!r}.")
        self.input_fn = input_fn
        self.scoring_batches = scoring_batches
        self.calibration_dataloader = calibration_dataloader
        arguments.check_number("regularization", regularization, 0)
        arguments.check_int("regularize_from", regularize_from, minimum=0)
        self.regularization, self.regularize_from = float(regularization), regularize_from
        self.latency_batch_size = latency_batch_size
        arguments.check_int("latency_threads", latency_threads, minimum=1, optional=True)
        arguments.check_number("latency_budget_s", latency_budget_s, 0, inclusive=False)
        check_target(target)
        if target == "latency" and not latency_batch_size:
            raise ValueError("`target='latency'` times the model: `latency_batch_size` must be > 0, got 0.")
        self.target, self.latency_budget_s, self.latency_threads = target, float(latency_budget_s), latency_threads
        self._speed = SideBySide(latency_batch_size, self.latency_budget_s, latency_threads)
        self._targeter: Targeter | None = None
        self.final_speed: SpeedUp | None = None
        self._original_counts: dict[str, float] = {}  # params and MACs at fit start, kept across a resume
        self.monitor = monitor
        self.verbose = verbose
        self.reset_best_on_cut = bool(reset_best_on_cut)
        arguments.check_guard(monitor, mode, max_drop, patience, on_violation)
        self.mode, self.max_drop, self.patience, self.on_violation = mode, max_drop, patience, on_violation
        self.guard = AccuracyGuard(mode, max_drop, patience) if monitor and max_drop is not None else None
        self.skipped: list[int] = []  # prune points undone by the guard: never redone, also not after a resume
        self.retries: dict[int, float] = {}  # point -> ratio, added by on_violation="halve"
        self.stopped = False
        self.cap: float | None = None  # after a rollback with "halve": no cut goes further until one at this holds
        self.left_out: dict[str, str] = {}  # coupled groups that cannot be cut safely -> why (see preflight.py)
        self.history: list[dict[str, Any]] = []
        self.original_widths: dict[str, int] = {}
        self.reports: list[PruneReport] = []
        self._surgeon: Surgeon | None = None
        self._macs = MacCounter()
        self._monitor_checked = False
        self._averages = averaging.AveragedCopies()
        self.compiles = compiled.CompileCounter()  # torch.compile: compilations before the first cut, after each cut
        arguments.check_distill(distill_alpha, distill_temperature, distill_teacher, distill_epochs)
        arguments.check_int("lr_rewind", lr_rewind, minimum=0)
        self.distill_teacher, self.distill_epochs, self.lr_rewind = distill_teacher, distill_epochs, lr_rewind
        self._distiller = (
            Distiller(distill_alpha, distill_temperature, distill_output_fn, distill_loss_fn) if distill_alpha else None
        )
        self._rewinder = LRRewinder()

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy)
        if stage == "fit":
            resolve_ignored(pl_module, self.ignored_layers)
        _restore_shape_before_weights_load(pl_module)
        if self._distiller is not None and stage == "fit":
            arguments.check_automatic_optimization(pl_module)
            self._distiller.attach(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.__dict__.pop("on_load_checkpoint", None)
        if self._distiller is not None:
            self._distiller.drop_teacher()
            self._distiller.detach(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        averaging.refuse_unknown_copies(trainer, pl_module, self)
        self.compiles.start()
        publish.hyperparams(trainer, self.config())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_fit(trainer, pl_module)
        with compiled.eager():  # HalfPrune's own forward passes never compile
            self._surgeon = self._build_surgeon(trainer, pl_module)
            if not self.stopped:  # what cannot be cut safely is reported now, not after epochs of training
                self.left_out = preflight(self._surgeon, list(self.schedule.points.values()), self.left_out)
                self._dry_run_scorer(trainer, pl_module)
            if not self.history:  # the original architecture: after a resume it is gone
                self._speed.keep_original(pl_module)
                note_kept_embeddings(self._surgeon, max(self.schedule.points.values(), default=0.0))
            self._targeter = self._build_targeter(pl_module)
        self._catch_up(trainer, pl_module)
        if self._distiller is not None and self.history and self._last_point_passed(trainer):
            rank_zero_warn("HalfPrune resumed after the last cut: the teacher is not in checkpoints, no distillation.")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.lr_rewind:
            self._rewinder.record(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule.interval == "epoch":
            self._prune_if_scheduled(trainer, pl_module, trainer.current_epoch)
        if self._distiller is not None and self._distillation_over(trainer):
            self._distiller.drop_teacher()

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
            self._warn_if_monitor_unreadable(trainer)
            self._record_recovery(trainer)
            self._judge_watched_cut(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with compiled.eager():
            self._judge_watched_cut(trainer, pl_module, final=True)  # a cut in the last epoch is judged too

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.reports:  # the original architecture against the final one, side by side, both uncompiled
            with compiled.eager():
                self.final_speed = self._speed.against_original(pl_module, self._surgeon.example_input)
        publish.fit_summary(trainer, self.reports, self._last_metric(trainer), self.verbose, self.final_speed)
        self.compiles.stop()
        if compiled.is_compiled(pl_module):
            publish.compiles(trainer, self.compiles.counts, self.verbose)
        if self._distiller is not None:
            publish.scalars(trainer, {"halfprune/distill_seconds": self._distiller.seconds})
            self._distiller.drop_teacher()

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
            "cap": self.cap,
            "original_counts": self._targeter.original if self._targeter is not None else {},
            "left_out": self.left_out,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.original_widths = dict(state_dict.get("original_widths", {}))
        self.skipped = list(state_dict.get("skipped", []))
        self.retries = {int(k): float(v) for k, v in state_dict.get("retries", {}).items()}
        self.stopped = bool(state_dict.get("stopped", False))
        self.cap = state_dict.get("cap")
        self._original_counts = dict(state_dict.get("original_counts", {}))
        self.left_out = dict(state_dict.get("left_out", {}))

    def _check_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """What the trainer's settings make impossible, said before the first step."""
        self.schedule.check_fits(trainer.max_epochs, trainer.max_steps, start_checks.steps_per_epoch(trainer))
        start_checks.warn_if_nothing_validates(trainer, pl_module, self.monitor, self.guard is not None)
        check_optimizers(trainer.optimizers, list(pl_module.parameters()))

    def _dry_run_scorer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Score every group once (data-driven scorers on one batch): bad scores fail now, not at the first cut."""
        if self._last_point_passed(trainer):
            return
        with scoring.state_kept(self.scorer):
            self._plan(trainer, pl_module, max(self.schedule.points.values()), batches=1)

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
        with compiled.eager():  # a compiled model runs uncompiled here: hooks fire, nothing compiles
            self._prune_point(trainer, pl_module, point)

    def _prune_point(self, trainer: pl.Trainer, pl_module: pl.LightningModule, point: int) -> None:
        ratio = self.schedule.ratio_at(point)
        ratio = self.retries.get(point) if ratio is None else ratio  # a scheduled point subsumes a retry
        if ratio is None or self.stopped or any(event["point"] == point for event in self.history):
            return
        if (
            self.guard is not None
            and self.guard.watch is not None
            and self._judge_watched_cut(trainer, pl_module, True)
        ):
            self.skipped.append(point)  # just rolled back: this point's cut is not made on top of the undone one
            return
        ratio, reason = retry.capped(ratio, self.cap, self.history)
        if reason is None and self.prune(trainer, pl_module, ratio, point) is not None:
            return
        self.skipped.append(point)
        if reason is not None and self.verbose:
            rank_zero_info(f"HalfPrune skips {self.schedule.interval} {point}: {reason}")

    def prune(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, ratio: float, point: int
    ) -> Optional[PruneReport]:
        """Cut the model to cumulative ``ratio`` now, carry the optimizers over, and return the report.

        Returns None, with a warning and no event logged, if no channel can be removed at ``ratio``.
        """
        timings: dict[str, float] = {}
        start = time.perf_counter()
        copies = averaging.averaged_copies(trainer)
        snapshot = ModelSnapshot(pl_module, trainer.optimizers, copies) if self.guard is not None else None
        with _timed(timings, "measure"):
            before = self._stats(pl_module)
            metric_before = self._last_metric(trainer)
        old = self._speed.before_cut(pl_module)
        with _timed(timings, "score"):
            cuts, aim = self._plan(trainer, pl_module, ratio)
        if not cuts:
            rank_zero_warn(
                f"HalfPrune removes no channel at ratio {ratio:.3g} (every layer is already at that width, at its "
                "`max_layer_ratio` floor, or rounded by `round_to`): no prune event."
            )
            return None
        if self._teacher_due():
            with _timed(timings, "teacher"):
                self._distiller.take_teacher(pl_module)
        with _timed(timings, "cut"):
            cuts = self._cut(trainer, cuts, copies)
            rewrap_ddp(trainer.strategy)
        self._restart_after_cut(trainer)
        with _timed(timings, "measure"):
            after = self._stats(pl_module)
            metric_after_cut = mean_over_ranks(trainer.strategy, self._evaluate(trainer, pl_module))
        with _timed(timings, "latency"):
            speed = self._speed.compare(pl_module, old, self._surgeon.example_input)
            del old  # the old architecture's tensors can go now
            aim = self._reached(pl_module, aim, speed)
        if speed is not None:
            before.latency_ms, after.latency_ms = speed.old_ms, speed.new_ms
        self._remember(trainer, point, ratio, cuts)
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
            teacher_bytes=self._distiller.teacher_bytes if self._distiller is not None else None,
            speed=speed,
            aim=aim,
        )
        with _timed(timings, "log"):
            publish.event(trainer, report, len(self.reports), self.verbose)
        report.seconds = time.perf_counter() - start
        self.reports.append(from_rank_zero(trainer.strategy, report))
        self._watch(snapshot, metric_before, ratio)
        return self.reports[-1]

    def _teacher_due(self) -> bool:
        """The model before this cut becomes the teacher: at the first cut, or at each one (``"each"``)."""
        return self._distiller is not None and (self.distill_teacher == "each" or not self._distiller.active)

    def _restart_after_cut(self, trainer: pl.Trainer) -> None:
        """What starts over with the smaller model: the best-checkpoint ranking, the LR schedule (rewound)."""
        if self.reset_best_on_cut:
            best.start_over(trainer)
        if self.lr_rewind:
            self._rewinder.rewind(trainer, self.lr_rewind)

    def _remember(self, trainer: pl.Trainer, point: int, ratio: float, cuts: list[Cut]) -> None:
        """The event in the history that checkpoints carry and ``load_pruned`` replays."""
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

    def _watch(self, snapshot: ModelSnapshot | None, metric_before: float | None, ratio: float) -> None:
        """Arm the accuracy guard on this cut; a cut nothing can judge holds (the retry cap is lifted)."""
        if snapshot is not None and metric_before is not None:
            previous = self.history[-2]["ratio"] if len(self.history) > 1 else 0.0
            self.guard.arm(
                Watch(snapshot, metric_before, len(self.history) - 1, len(self.reports) - 1, previous, ratio)
            )
        else:
            self.cap = retry.lifted(self.cap, ratio)

    def _cut(self, trainer: pl.Trainer, cuts: list[Cut], copies: list[nn.Module]) -> list[Cut]:
        """Cut the model and the EMA/SWA copies alike, and move the optimizers over: all or nothing.

        Groups whose cut would break the model are left out (``cut_safely``); returns the cuts made.
        """

        def then(remap: Any, made: list[Cut]) -> None:
            example, widths = self._surgeon.example_input, self.original_widths
            self._averages.cut(copies, made, example, widths, then=lambda: rebind_optimizers(trainer.optimizers, remap))

        made = cut_safely(self._surgeon, cuts, then, self.left_out)
        self.compiles.cut_made(self._surgeon.model)
        return made

    def _judge_watched_cut(self, trainer: pl.Trainer, pl_module: pl.LightningModule, final: bool = False) -> bool:
        """Count a validation against the cut under watch; undo the cut if the metric stayed too far down.

        ``final`` judges now, whatever the patience (the next cut is due, or the fit ends); if no validation ran
        since the cut, the model is evaluated as it is now. Returns True if the cut was undone.
        """
        if self.guard is None or self.guard.watch is None:
            return False
        if final and self.guard.watch.seen == 0:
            value = mean_over_ranks(trainer.strategy, self._evaluate(trainer, pl_module))
        else:
            value = self._last_metric(trainer)
        verdict = self.guard.judge(value)
        if final and verdict == "wait":  # without a value nothing shows the cut hurt: it is kept
            verdict = "undo" if value is not None and self.guard.worse_by(value) > self.max_drop else "keep"
        verdict = trainer.strategy.broadcast(verdict, src=0)  # every rank acts on rank 0's metric
        if verdict == "undo":
            self._roll_back(trainer, pl_module, value)
        if verdict == "keep":
            self.cap = retry.lifted(self.cap, self.guard.watch.ratio)
        if verdict != "wait":
            self.guard.watch = None
        return verdict == "undo"

    def _roll_back(self, trainer: pl.Trainer, pl_module: pl.LightningModule, value: float) -> None:
        watch = self.guard.watch
        watch.snapshot.restore(pl_module.device)
        rewrap_ddp(trainer.strategy)
        self.compiles.cut_made(pl_module)
        if self.reset_best_on_cut:
            best.start_over(trainer)
        undone = self.history[watch.history_len]
        del self.history[watch.history_len :]
        self.skipped.append(undone["point"])
        report = self.reports[watch.report_index]
        report.rolled_back = True
        if self.on_violation == "halve":
            self.cap = retry.halfway(watch.ratio_before, watch.ratio)
            now = trainer.current_epoch if self.schedule.interval == "epoch" else trainer.global_step
            self.retries[now + 1] = self.cap
        else:
            self.stopped = True
        message = (
            f"HalfPrune rolled back the cut to ratio {watch.ratio:.3g} at {self.schedule.interval} {undone['point']}: "
            f"{self.monitor} {watch.before:.4f} -> {value:.4f} is worse by more than max_drop={self.max_drop}; "
            + (
                f"retrying at ratio {self.cap:.3g}; later prune points cut to at most that until a cut there holds."
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
            "attention": self.attention,
            "prune_hidden_size": self.prune_hidden_size,
            "scoring_batches": self.scoring_batches,
            "regularization": self.regularization,
            "latency_batch_size": self.latency_batch_size,
            "latency_budget_s": self.latency_budget_s,
            "latency_threads": self.latency_threads,
            "target": self.target,
            "monitor": self.monitor,
            "mode": self.mode,
            "max_drop": self.max_drop,
            "patience": self.patience,
            "on_violation": self.on_violation,
            "reset_best_on_cut": self.reset_best_on_cut,
            "distill_alpha": self._distiller.alpha if self._distiller is not None else 0.0,
            "distill_temperature": self._distiller.temperature if self._distiller is not None else None,
            "distill_teacher": self.distill_teacher,
            "distill_epochs": self.distill_epochs,
            "lr_rewind": self.lr_rewind,
        }

    def _last_point_passed(self, trainer: pl.Trainer) -> bool:
        now = trainer.current_epoch if self.schedule.interval == "epoch" else trainer.global_step
        return all(p < now or p in self.skipped for p in self.schedule.points) or self.stopped

    def _distillation_over(self, trainer: pl.Trainer) -> bool:
        """True once ``distill_epochs`` epochs have trained since the last cut and no cut is left."""
        if self.distill_epochs is None or not self.history:
            return False
        now = trainer.current_epoch if self.schedule.interval == "epoch" else trainer.global_step
        if not self.stopped and any(p > now for p in self.schedule.points):
            return False
        return trainer.current_epoch >= self.history[-1]["epoch"] + self.distill_epochs

    def _regularizing(self, trainer: pl.Trainer) -> bool:
        now = trainer.current_epoch if self.schedule.interval == "epoch" else trainer.global_step
        return trainer.current_epoch >= self.regularize_from and any(p >= now for p in self.schedule.points)

    def _last_metric(self, trainer: pl.Trainer) -> float | None:
        """The monitored metric's last logged value, averaged over ranks."""
        name = monitor.resolve(self.monitor, trainer.callback_metrics)
        value = trainer.callback_metrics.get(name) if name else None
        return mean_over_ranks(trainer.strategy, None if value is None else float(value))

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
        if not self.monitor:
            return None
        name = monitor.resolve(self.monitor, trainer.callback_metrics) or self.monitor
        with undisturbed(pl_module):
            return monitor.evaluate(pl_module, trainer.val_dataloaders, name)

    def _warn_if_monitor_unreadable(self, trainer: pl.Trainer) -> None:
        """Once, at the first validation: a ``monitor`` that names no logged metric (or several) is a warning."""
        if self.monitor and not self._monitor_checked:
            self._monitor_checked = True
            message = monitor.problem(self.monitor, trainer.callback_metrics)
            if message:
                rank_zero_warn(message)

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
            global_pruning=self.global_pruning or self.target != "channels",
            original_widths=self.original_widths or None,
            attention=self.attention,
            prune_hidden_size=self.prune_hidden_size,
        )
        self.original_widths = surgeon.original_widths
        ckpt.pack([], {}, example)  # an example input a safe load could not read fails now, not at the first save
        if needs_data(self.scorer):  # a batch the model cannot run fails now, not at the first cut
            loader = self.calibration_dataloader or trainer.train_dataloader
            fed_input(pl_module, take_batches(loader, 1, pl_module.device)[0], self.input_fn)
        return surgeon

    def _example_input(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        example = self.example_input if self.example_input is not None else pl_module.example_input_array
        if example is None:
            loader = trainer.train_dataloader
            if loader is None:
                raise ValueError("HalfPrune needs `example_input` (or `example_input_array` on the LightningModule).")
            example = fed_input(pl_module, take_batches(loader, 1, pl_module.device)[0], self.input_fn)
        if isinstance(example, list):
            example = tuple(example)
        example = move_data_to_device(example, pl_module.device)
        return trainer.precision_plugin.convert_input(example)

    def _plan(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, ratio: float, batches: int | None = None
    ) -> tuple[list[Cut], Aim | None]:
        with undisturbed(pl_module):
            if needs_data(self.scorer):
                loader = self.calibration_dataloader or trainer.train_dataloader
                batches = take_batches(loader, batches or self.scoring_batches, pl_module.device)
                if hasattr(self.scorer, "inputs_of"):
                    self.scorer.inputs_of = lambda batch: model_input(pl_module, batch, self.input_fn)
                self.scorer.calibrate(pl_module, batches, training_loss(pl_module))
            failed: dict[str, str] = {}  # groups the scorer fails on (widths it never saw before the fit)
            try:
                score = guarded(agreed(trainer.strategy, self.scorer), self._surgeon, failed)
                if self._targeter is None:
                    cuts, aim = self._surgeon.plan(ratio, score), None
                else:
                    cuts, aim = self._targeter.plan(ratio, score, lambda r: trainer.strategy.broadcast(r, src=0))
                return drop_failed(self._surgeon, cuts, failed, self.left_out), aim
            finally:
                getattr(self.scorer, "release", lambda: None)()

    def _build_targeter(self, pl_module: pl.LightningModule) -> Targeter | None:
        if self.target == "channels":
            return None
        example = self._surgeon.example_input

        def count(kind: str) -> float:
            return count_params(pl_module) if kind == "params" else self._macs(pl_module, example)

        target = self.target
        if target == "latency" and self._speed.original is None:
            rank_zero_warn(
                "HalfPrune resumed without the original architecture to time against: `target='latency'` "
                "falls back to the same reduction of MACs for the remaining cuts."
            )
            target = "macs"
        speedup = lambda: self._speed.against_original(pl_module, example)  # noqa: E731
        return Targeter(target, self._surgeon, count, speedup, self._original_counts or None)

    def _reached(self, pl_module: pl.LightningModule, aim: Aim | None, speed: Any) -> Aim | None:
        """What the cut reached against its target; for latency timed side by side against the original."""
        if aim is None:
            return None
        if aim.target == "latency":
            speed = self._speed.against_original(pl_module, self._surgeon.example_input)
        return self._targeter.reached(aim, speed)

    def _stats(self, pl_module: pl.LightningModule) -> ModelStats:
        example = self._surgeon.example_input
        return ModelStats(
            params=count_params(pl_module),
            macs=self._macs(pl_module, example),
            widths=layer_widths(pl_module),
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
        for copy in averaging.averaged_copies(pl_module._trainer):  # EMA/SWA copies load their state after this
            ckpt.restore_shape(copy, checkpoint)
        original(checkpoint)

    pl_module.on_load_checkpoint = on_load_checkpoint


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
