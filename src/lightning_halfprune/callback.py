"""``HalfPrune``: the Lightning callback that removes channels in the middle of ``Trainer.fit``.

The hooks only decide *when*; scoring, surgery, optimizer rebinding, measuring and reporting live in ``core/`` and
``fit/``. What must survive a checkpoint is one :class:`~lightning_halfprune.state.PruneState`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_halfprune import checkpoint as ckpt
from lightning_halfprune import options, publish
from lightning_halfprune.core import scoring
from lightning_halfprune.core.attention import AttentionMode
from lightning_halfprune.core.attention import check_mode as check_attention_mode
from lightning_halfprune.core.graph import resolve_ignored
from lightning_halfprune.core.latency import SideBySide, SpeedUp
from lightning_halfprune.core.measure import MacCounter, count_params, layer_widths
from lightning_halfprune.core.plan import Cut
from lightning_halfprune.core.preflight import cut_safely, note_kept_embeddings, preflight
from lightning_halfprune.core.scoring import Scorer, get_scorer
from lightning_halfprune.core.surgeon import Surgeon
from lightning_halfprune.core.target import Aim, Target, Targeter, check_target
from lightning_halfprune.fit import averaging, best, checks, compiled, copies, planning, retry, sharded
from lightning_halfprune.fit import monitor as monitor_
from lightning_halfprune.fit.distill import Distiller
from lightning_halfprune.fit.distributed import check_strategy, from_rank_zero
from lightning_halfprune.fit.guard import AccuracyGuard, ModelSnapshot
from lightning_halfprune.fit.rebind import check_optimizers, drop_spent_grads, rebind_optimizers, rewrap_ddp
from lightning_halfprune.fit.regularize import add_bn_l1_grad, add_group_lasso_grad
from lightning_halfprune.fit.rewind import LRRewinder
from lightning_halfprune.options import Calibration, Distill, Guard, Sparsity, Timing
from lightning_halfprune.report import ModelStats, PruneReport, timed
from lightning_halfprune.schedule import Schedule
from lightning_halfprune.state import PruneState


class HalfPrune(Callback):
    """Structured pruning during training, inside the fit.

    At the scheduled epochs (or steps) it scores every channel, removes the least useful ones with torch-pruning's
    dependency graph, moves the optimizers to the smaller model, and training goes on.

    Args:
        schedule: ``{epoch: cumulative_ratio}`` or a :class:`Schedule` (``Cubic(...)``, step intervals). Ratios
            are fractions of the channels the model had when fit started.
        scorer: a name from ``lightning_halfprune.SCORERS`` (``"l1"``, ``"l2"``, ``"taylor"``, ``"redundancy"``,
            ...) or a scorer object (any ``torch_pruning`` importance works).
        target: what a schedule value reduces: ``"channels"`` (fraction removed), ``"params"``, ``"macs"`` (0.5:
            half the original params / MACs per sample) or ``"latency"`` (0.5: half the original inference time);
            other than ``"channels"``, channels are ranked globally and their count searched to meet the target.
        ignored_layers: layers never pruned: module names, regular expressions over names, or modules. The
            layers that produce the model's output are never pruned in any case.
        round_to: keep every channel count a multiple of this (e.g. 8 for tensor cores).
        max_layer_ratio: no group of coupled channels loses more than this fraction of its original width.
        global_pruning: rank channels across all layers instead of cutting every layer by the same ratio.
        attention: how attention modules (timm, torchvision, Hugging Face, lookalikes) are cut: ``"heads"``
            removes whole heads (with GQA, a key/value head with all its query heads), ``"head_dim"`` the same
            offsets of the head dimension in every head, ``"both"`` some of each, ``"none"`` leaves them alone,
            ``"heads_last"`` keeps the params of ``"heads"``, split between heads and MLPs by calibration loss.
        prune_hidden_size: also cut the residual stream (embedding width) of models with attention, together
            with everything that reads it; by default only heads and MLP widths are cut.
        monitor: a metric your ``validation_step`` logs (e.g. ``"val_acc"``): reported before the cut, right after
            it (evaluated outside the fit's loops) and after recovery; with several validation dataloaders,
            Lightning's name (``"val_acc/dataloader_idx_1"``) or the plain one if only one loader logs it.
        mode: ``"max"`` if a higher ``monitor`` is better, ``"min"`` if lower is.
        guard: a :class:`Guard` turns the accuracy guard on: a cut that leaves ``monitor`` worse than before by
            more than ``max_drop`` is undone exactly. Needs ``monitor``.
        distill: a :class:`Distill` turns distillation on: the model before a cut teaches the pruned one.
        timing: a :class:`Timing`: each cut's speed-up, old and new architecture timed side by side (interleaved),
            and the original against the final one after fit. None turns timing off.
        calibration: a :class:`Calibration`: the batches data-driven scorers look at.
        sparsity: a :class:`Sparsity` adds a sparsity penalty to the gradients until the last prune point.
        lr_rewind: after each cut, rewind the trainer's LR schedulers to where they were this many epochs before
            the next epoch (Renda et al., 2020). 0 turns it off.
        example_input: an input for tracing the model; default ``pl_module.example_input_array``, else the first
            training batch's input.
        reset_best_on_cut: after every cut (and rollback) each ``ModelCheckpoint`` that monitors a metric starts
            its ranking over, so ``ckpt_path="best"`` is the best checkpoint of the final architecture.
        verbose: print a summary line per event (rank 0 only).
        **flat: the flat arguments of 0.1 (``distill_alpha=``, ``max_drop=``, ``latency_batch_size=``, ...), folded
            into the groups above with a deprecation warning; removed in the next release.
    """

    def __init__(
        self,
        schedule: Union[dict[int, float], Schedule],
        scorer: Union[str, Scorer] = "l2",
        target: Target = "channels",
        ignored_layers: Optional[list[Union[str, nn.Module]]] = None,
        round_to: Optional[int] = None,
        max_layer_ratio: float = 0.9,
        global_pruning: bool = False,
        attention: AttentionMode = "heads",
        prune_hidden_size: bool = False,
        monitor: Optional[str] = None,
        mode: Literal["max", "min"] = "max",
        guard: Optional[Guard] = None,
        distill: Optional[Distill] = None,
        timing: Optional[Timing] = Timing(),  # noqa: B008 - frozen, shared safely
        calibration: Calibration = Calibration(),  # noqa: B008 - frozen, shared safely
        sparsity: Optional[Sparsity] = None,
        lr_rewind: int = 0,
        example_input: Any = None,
        reset_best_on_cut: bool = True,
        verbose: bool = True,
        **flat: Any,
    ) -> None:
        groups = options.from_flat(
            {"guard": guard, "distill": distill, "timing": timing, "calibration": calibration, "sparsity": sparsity},
            flat,
        )
        self.schedule = schedule if isinstance(schedule, Schedule) else Schedule(options.as_mapping(schedule))
        self.scorer = get_scorer(scorer)
        self.scorer_name = scorer if isinstance(scorer, str) else type(scorer).__name__
        check_target(target)
        check_attention_mode(attention)
        options.check_int("round_to", round_to, minimum=1, optional=True)
        options.check_ratio("max_layer_ratio", max_layer_ratio)
        options.check_choice("mode", mode, ("max", "min"))
        options.check_int("lr_rewind", lr_rewind, minimum=0)
        self.target, self.attention, self.prune_hidden_size = target, attention, bool(prune_hidden_size)
        self.ignored_layers = list(ignored_layers or [])
        self.round_to, self.max_layer_ratio = round_to, float(max_layer_ratio)
        self.global_pruning = bool(global_pruning)
        self.monitor, self.mode, self.lr_rewind, self.example_input = monitor, mode, lr_rewind, example_input
        self.metric = monitor_.Monitor(monitor)
        self.reset_best_on_cut, self.verbose = bool(reset_best_on_cut), verbose
        self.options = options.Options(**groups)
        self.options.check(monitor, target)
        self.calibration: Calibration = self.options.calibration
        self.state = PruneState()
        guard = self.options.guard
        self.guard = AccuracyGuard(guard, monitor, mode, self.state, self.schedule.interval) if guard else None
        self._distiller = Distiller(self.options.distill) if self.options.distill else None
        t = self.options.timing
        self._speed = SideBySide(t.batch_size, t.budget_s, t.threads) if t else SideBySide(0)
        self.targeter: Targeter | None = None
        self.final_speed: SpeedUp | None = None
        self.reports: list[PruneReport] = []
        self.surgeon: Surgeon | None = None
        self._macs = MacCounter()
        self._averages = averaging.AveragedCopies()
        self.compiles = compiled.CompileCounter()  # torch.compile: compilations before the first cut, after each cut
        self._rewinder = LRRewinder()

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(schedule=self.schedule.to_dict(), scorer=self.scorer_name, target=self.target)

    def state_dict(self) -> dict[str, Any]:
        if self.targeter is not None:
            self.state.original_counts = dict(self.targeter.original)
        return self.state.to_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        loaded = PruneState.from_dict(state_dict)
        for name, value in vars(loaded).items():  # in place: the guard shares this object
            setattr(self.state, name, value)

    history = property(lambda self: self.state.history, doc="The prune events kept, as checkpoints carry them.")
    skipped = property(lambda self: self.state.skipped, doc="Prune points skipped or undone.")
    left_out = property(lambda self: self.state.left_out, doc="Coupled groups left alone -> why.")
    original_widths = property(lambda self: self.state.original_widths, doc="Group widths when pruning started.")
    stopped = property(lambda self: self.state.stopped, doc="True once the guard stopped all later cuts.")
    retries = property(lambda self: self.state.retries, doc="Retry points added by the guard -> ratio.")

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy)
        sharded.setup(trainer, pl_module, self)
        if stage == "fit":
            resolve_ignored(pl_module, self.ignored_layers)
        ckpt.restore_shape_before_weights_load(pl_module)
        if self._distiller is not None and stage == "fit":
            checks.automatic_optimization(pl_module)
            self._distiller.attach(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        ckpt.stop_restoring_shape(pl_module)
        if self._distiller is not None:
            self._distiller.drop_teacher()
            self._distiller.detach(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        averaging.refuse_unknown_copies(trainer, pl_module, self)
        self.compiles.start()
        publish.hyperparams(trainer, self.config())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_fit(trainer, pl_module)
        with self._own_work(trainer, pl_module):
            self._prepare(trainer, pl_module)
        self._catch_up(trainer, pl_module)
        if self._distiller is not None and self.history and self._last_point_passed(trainer):
            rank_zero_warn("HalfPrune resumed after the last cut: the teacher is not in checkpoints, no distillation.")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.lr_rewind:
            self._rewinder.record(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule.interval == "epoch":
            self._prune_if_scheduled(trainer, pl_module, trainer.current_epoch)
        if self._distiller is not None and self._distiller.over(trainer.current_epoch, *self._last_cut(trainer)):
            self._distiller.drop_teacher()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        sparsity = self.options.sparsity
        if sparsity is not None and trainer.current_epoch >= sparsity.start and self._cuts_left(trainer, True):
            if self.scorer_name == "bn_scale":
                add_bn_l1_grad(pl_module, sparsity.strength)
            else:
                add_group_lasso_grad(self.surgeon.groups(), sparsity.strength)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.schedule.interval == "step":
            self._prune_if_scheduled(trainer, pl_module, trainer.global_step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.metric.warn_if_unreadable(trainer)
            recovered = self.metric.recovered(trainer, self.reports)
            if recovered is not None:
                publish.scalars(trainer, {"halfprune/metric_recovered": recovered})
            self._review_watched_cut(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with compiled.eager():
            self._review_watched_cut(trainer, pl_module, final=True)  # a cut in the last epoch is judged too

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.reports:  # the original architecture against the final one, side by side, both uncompiled
            with self._own_work(trainer, pl_module, self._speed.enabled):
                self.final_speed = self._speed.against_original(pl_module, self.surgeon.example_input)
        publish.fit_summary(trainer, self.reports, self.metric.last(trainer), self.verbose, self.final_speed)
        self.compiles.stop()
        if compiled.is_compiled(pl_module):
            publish.compiles(trainer, self.compiles.counts, self.verbose)
        if self._distiller is not None:
            publish.scalars(trainer, {"halfprune/distill_seconds": self._distiller.seconds})
            self._distiller.drop_teacher()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        alone = sum(isinstance(c, HalfPrune) for c in trainer.callbacks) == 1
        ckpt.adopt_unkeyed_state(checkpoint, self.state_key, alone)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self.surgeon is not None:
            checkpoint[ckpt.KEY] = ckpt.pack(self.history, self.original_widths, self.surgeon.example_input)

    # ------------------------------------------------------------------ train start
    def _check_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """What the trainer's settings make impossible, said before the first step."""
        self.schedule.check_fits(trainer.max_epochs, trainer.max_steps, checks.steps_per_epoch(trainer))
        checks.warn_if_nothing_validates(trainer, pl_module, self.monitor, self.guard is not None)
        check_optimizers(trainer.optimizers, list(pl_module.parameters()))

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Graph and groups, pre-flight of every scheduled ratio, a dry run of the scorer, the original kept."""
        self.surgeon = planning.build_surgeon(trainer, pl_module, self)
        self.state.original_widths = self.surgeon.original_widths
        ckpt.pack([], {}, self.surgeon.example_input)  # an input a safe load could not read fails now
        if not self.stopped:  # what cannot be cut safely is reported now, not after epochs of training
            self.state.left_out = preflight(self.surgeon, list(self.schedule.points.values()), self.left_out)
            self._dry_run_scorer(trainer, pl_module)
        if not self.history:  # the original architecture: after a resume it is gone
            self._speed.keep_original(pl_module)
            note_kept_embeddings(self.surgeon, max(self.schedule.points.values(), default=0.0))
        self.held = copies.held(pl_module, trainer.optimizers, self._speed.original, self.guard, self._distiller)
        if self.verbose:  # every copy HalfPrune keeps, bounded and said before the first step
            rank_zero_info(copies.message(self.held))
        self.targeter = planning.build_targeter(
            pl_module, self.surgeon, self.target, self._speed, self._macs, self.state.original_counts
        )

    def _dry_run_scorer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Score every group once (data-driven scorers on one batch): bad scores fail now, not at the first cut."""
        if self._last_point_passed(trainer):
            return
        with scoring.state_kept(self.scorer):
            planning.plan(trainer, pl_module, self, max(self.schedule.points.values()), batches=1)

    # ------------------------------------------------------------------ one event
    def _catch_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After a resume, run a prune point the restored run passed without cutting.

        That happens when the checkpoint was written at validation end, just before that epoch's cut.
        """
        now = self._now(trainer) + (self.schedule.interval == "step")
        missed = [p for p in self.schedule.points if p < now and not self.state.done(p)]
        if missed:
            self._prune_if_scheduled(trainer, pl_module, max(missed))

    def _prune_if_scheduled(self, trainer: pl.Trainer, pl_module: pl.LightningModule, point: int) -> None:
        with self._own_work(trainer, pl_module):
            self._prune_point(trainer, pl_module, point)

    def _prune_point(self, trainer: pl.Trainer, pl_module: pl.LightningModule, point: int) -> None:
        ratio = self.schedule.ratio_at(point)
        ratio = self.retries.get(point) if ratio is None else ratio  # a scheduled point subsumes a retry
        if ratio is None or self.stopped or any(event["point"] == point for event in self.history):
            return
        if self._review_watched_cut(trainer, pl_module, final=True):
            self.skipped.append(point)  # just rolled back: this point's cut is not made on top of the undone one
            return
        ratio, reason = retry.capped(ratio, self.state.cap, self.history)
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
        drop_spent_grads(trainer, pl_module)  # a cut would keep them alive beside the pruned copies it makes
        averaged = averaging.averaged_copies(trainer)  # EMA/SWA copies, cut alike
        snapshot = ModelSnapshot(pl_module, trainer.optimizers, averaged) if self.guard is not None else None
        with timed(timings, "measure"):
            before, metric_before = self._stats(pl_module), self.metric.last(trainer)
        old = self._speed.before_cut(pl_module)
        with timed(timings, "score"):
            cuts, aim = planning.plan(trainer, pl_module, self, ratio)
        if not cuts:
            rank_zero_warn(
                f"HalfPrune removes no channel at ratio {ratio:.3g} (every layer is already at that width, at its "
                "`max_layer_ratio` floor, or rounded by `round_to`): no prune event."
            )
            return None
        teacher_due = self._distiller is not None and self._distiller.due()
        if teacher_due:  # the pre-cut tensors the cut frees become the teacher: no copy of the model
            with timed(timings, "teacher"):
                self._distiller.take_teacher(pl_module)
        with timed(timings, "cut"):
            try:
                cuts = self._cut(trainer, cuts, averaged)
            finally:
                if teacher_due:
                    self._distiller.seal(pl_module)
            rewrap_ddp(trainer.strategy)
        self._restart_after_cut(trainer)
        with timed(timings, "measure"):
            after = self._stats(pl_module)
            metric_after_cut = self.metric.evaluate(trainer, pl_module)
        with timed(timings, "latency"):
            speed = self._speed.compare(pl_module, old, self.surgeon.example_input)
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
            latency_batch_size=speed.batch_size if speed is not None else None,
            monitor=self.monitor,
            metric_before=metric_before,
            metric_after_cut=metric_after_cut,
            teacher_bytes=self._distiller.teacher_bytes if self._distiller is not None else None,
            speed=speed,
            aim=aim,
        )
        with timed(timings, "log"):
            publish.event(trainer, report, len(self.reports), self.verbose)
        report.seconds = time.perf_counter() - start
        self.reports.append(from_rank_zero(trainer.strategy, report))
        if self.guard is not None:
            self.guard.arm(snapshot, metric_before, len(self.reports) - 1)
        return self.reports[-1]

    def _cut(self, trainer: pl.Trainer, cuts: list[Cut], copies: list[nn.Module]) -> list[Cut]:
        """Cut the model and the EMA/SWA copies alike, and move the optimizers over: all or nothing.

        Groups whose cut would break the model are left out (``cut_safely``); returns the cuts made.
        """

        def then(remap: Any, made: list[Cut]) -> None:
            example, widths = self.surgeon.example_input, self.original_widths
            self._averages.cut(copies, made, example, widths, then=lambda: rebind_optimizers(trainer.optimizers, remap))

        made = cut_safely(self.surgeon, cuts, then, self.left_out)
        self.compiles.cut_made(self.surgeon.model)
        return made

    def _restart_after_cut(self, trainer: pl.Trainer) -> None:
        """What starts over with the smaller model: the best-checkpoint ranking, the LR schedule (rewound)."""
        if self.reset_best_on_cut:
            best.start_over(trainer)
        if self.lr_rewind:
            self._rewinder.rewind(trainer, self.lr_rewind)

    def _remember(self, trainer: pl.Trainer, point: int, ratio: float, cuts: list[Cut]) -> None:
        """The event in the history that checkpoints carry and ``load_pruned`` replays."""
        event = {"point": point, "interval": self.schedule.interval, "ratio": ratio, "epoch": trainer.current_epoch}
        self.history.append(event | {"global_step": trainer.global_step, "cuts": [c.to_list() for c in cuts]})

    def _review_watched_cut(self, trainer: pl.Trainer, pl_module: pl.LightningModule, final: bool = False) -> bool:
        """Let the guard judge the cut it watches (at once if ``final``); True if it was rolled back."""
        if self.guard is None or self.guard.watch is None:
            return False
        evaluate = final and self.guard.watch.seen == 0  # no validation since the cut: evaluate the model now
        value = self.metric.evaluate(trainer, pl_module) if evaluate else self.metric.last(trainer)
        verdict = trainer.strategy.broadcast(self.guard.judge(value, final), src=0)  # every rank acts on rank 0's
        report_index = self.guard.watch.report_index
        message = self.guard.settle(verdict, value, self._now(trainer), pl_module.device)
        if message is None:
            return False
        rewrap_ddp(trainer.strategy)
        self.compiles.cut_made(pl_module)
        if self.reset_best_on_cut:
            best.start_over(trainer)
        self.reports[report_index].rolled_back = True
        if self.verbose:
            rank_zero_info(message)
        ratio = self.history[-1]["ratio"] if self.history else 0.0
        publish.scalars(trainer, {"halfprune/rollback": float(report_index), "halfprune/ratio": ratio})
        return True

    # ------------------------------------------------------------------ helpers
    @contextmanager
    def _own_work(self, trainer: pl.Trainer, pl_module: pl.LightningModule, full: bool = True) -> Iterator[None]:
        """HalfPrune's own passes: uncompiled, stopped by SIGTERM, on the full model (if ``full``, when sharded)."""
        surgeon = lambda: self.surgeon  # noqa: E731 - built inside the block at train start
        with compiled.eager(), checks.stop_on_sigterm(trainer), sharded.full_model(trainer, pl_module, surgeon, full):
            yield

    def config(self) -> dict[str, Any]:
        """The callback's arguments, as logged to every logger's hyperparameters."""
        return {
            "schedule": self.schedule.to_dict(),
            "scorer": self.scorer_name,
            "target": self.target,
            "ignored_layers": [str(x) for x in self.ignored_layers],
            "round_to": self.round_to,
            "max_layer_ratio": self.max_layer_ratio,
            "global_pruning": self.global_pruning,
            "attention": self.attention,
            "prune_hidden_size": self.prune_hidden_size,
            "monitor": self.monitor,
            "mode": self.mode,
            **self.options.config(),
            "lr_rewind": self.lr_rewind,
            "reset_best_on_cut": self.reset_best_on_cut,
        }

    def _now(self, trainer: pl.Trainer) -> int:
        """Where the fit is on the schedule's axis: the epoch or the global step."""
        return trainer.current_epoch if self.schedule.interval == "epoch" else trainer.global_step

    def _cuts_left(self, trainer: pl.Trainer, including_now: bool = False) -> bool:
        now = self._now(trainer)
        return not self.stopped and any(p > now or (including_now and p == now) for p in self.schedule.points)

    def _last_point_passed(self, trainer: pl.Trainer) -> bool:
        now = self._now(trainer)
        return all(p < now or p in self.skipped for p in self.schedule.points) or self.stopped

    def _last_cut(self, trainer: pl.Trainer) -> tuple[int | None, bool]:
        """The epoch of the last cut kept (None before any) and whether a cut is still to come."""
        return (self.history[-1]["epoch"] if self.history else None), self._cuts_left(trainer)

    def _reached(self, pl_module: pl.LightningModule, aim: Aim | None, speed: Any) -> Aim | None:
        """What the cut reached against its target; for latency timed side by side against the original."""
        if aim is None:
            return None
        if aim.target == "latency":
            speed = self._speed.against_original(pl_module, self.surgeon.example_input)
        return self.targeter.reached(aim, speed)

    def _stats(self, pl_module: pl.LightningModule) -> ModelStats:
        example = self.surgeon.example_input
        return ModelStats(count_params(pl_module), self._macs(pl_module, example), layer_widths(pl_module))

