"""What a cut needs from the fit: the example input, the surgeon, and the plan scored on the fit's batches.

The Lightning-aware half of planning: batches come from the calibration loader (or the training data), scores are
averaged over DDP ranks, and a target search (params, MACs, latency) agrees on rank 0's answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_warn

from lightning_halfprune.core import scoring
from lightning_halfprune.core.graph import resolve_ignored
from lightning_halfprune.core.latency import SideBySide
from lightning_halfprune.core.measure import MacCounter, count_params
from lightning_halfprune.core.plan import Cut
from lightning_halfprune.core.preflight import drop_failed, guarded
from lightning_halfprune.core.surgeon import Surgeon
from lightning_halfprune.core.target import Aim, Targeter
from lightning_halfprune.fit.batches import fed_input, model_input, take_batches, training_loss, undisturbed
from lightning_halfprune.fit.distributed import agreed
from lightning_halfprune.options import Calibration


def example_input(trainer: pl.Trainer, pl_module: pl.LightningModule, given: Any, calibration: Calibration) -> Any:
    """The input the graph is traced with: ``given``, ``example_input_array``, or the first training batch's."""
    example = given if given is not None else pl_module.example_input_array
    if example is None:
        loader = trainer.train_dataloader
        if loader is None:
            raise ValueError("HalfPrune needs `example_input` (or `example_input_array` on the LightningModule).")
        example = fed_input(pl_module, take_batches(loader, 1, pl_module.device)[0], calibration.input_fn)
    if isinstance(example, list):
        example = tuple(example)
    example = move_data_to_device(example, pl_module.device)
    return trainer.precision_plugin.convert_input(example)


def calibration_batches(trainer: pl.Trainer, pl_module: pl.LightningModule, calibration: Calibration, n: int) -> list:
    """``n`` batches from the calibration loader (default: a fresh iterator over the training data)."""
    return take_batches(calibration.dataloader or trainer.train_dataloader, n, pl_module.device)


def build_surgeon(trainer: pl.Trainer, pl_module: pl.LightningModule, owner: Any) -> Surgeon:
    """The surgeon of ``pl_module`` with the callback's (``owner``) settings; a bad input fails now, not at a cut."""
    example = example_input(trainer, pl_module, owner.example_input, owner.calibration)
    surgeon = Surgeon(
        pl_module,
        example,
        resolve_ignored(pl_module, owner.ignored_layers),
        round_to=owner.round_to,
        max_layer_ratio=owner.max_layer_ratio,
        global_pruning=owner.global_pruning or owner.target != "channels",
        original_widths=owner.state.original_widths or None,
        attention=owner.attention,
        prune_hidden_size=owner.prune_hidden_size,
        moe_mode=getattr(owner, "moe", "width"),
    )
    if scoring.needs_data(owner.scorer):  # a batch the model cannot run fails now, not at the first cut
        batch = calibration_batches(trainer, pl_module, owner.calibration, 1)[0]
        fed_input(pl_module, batch, owner.calibration.input_fn)
    return surgeon


def plan(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    owner: Any,
    ratio: float,
    batches: int | None = None,
) -> tuple[list[Cut], Aim | None]:
    """Score every group (data-driven scorers on calibration batches) and plan the cuts to ``ratio``.

    Groups the scorer fails on are left out (recorded in ``owner.state.left_out``) rather than ending the fit.
    """
    scorer, surgeon = owner.scorer, owner.surgeon
    allocating = surgeon.attention == "heads_last"
    with undisturbed(pl_module):
        if scoring.needs_data(scorer) or allocating:
            data = calibration_batches(trainer, pl_module, owner.calibration, batches or owner.calibration.batches)
        if scoring.needs_data(scorer):
            if isinstance(scorer, scoring.CalibratedScorer):
                scorer.inputs_of = lambda batch: model_input(pl_module, batch, owner.calibration.input_fn)
            scorer.calibrate(pl_module, data, training_loss(pl_module))
        failed: dict[str, str] = {}  # groups the scorer fails on (widths it never saw before the fit)
        try:
            score = guarded(agreed(trainer.strategy, scorer), surgeon, failed)
            if owner.targeter is None:
                judge = calibration_loss(trainer, pl_module, data) if allocating else None
                cuts, aim = surgeon.plan(ratio, score, judge), None
            else:
                cuts, aim = owner.targeter.plan(ratio, score, lambda r: trainer.strategy.broadcast(r, src=0))
            return drop_failed(surgeon, cuts, failed, owner.state.left_out), aim
        finally:
            scoring.release(scorer)


def calibration_loss(trainer: pl.Trainer, pl_module: pl.LightningModule, data: list) -> Callable[[], float]:
    """The mean ``training_step`` loss over ``data`` in eval mode, averaged over ranks (all ranks choose alike)."""
    loss = training_loss(pl_module)

    def judge() -> float:
        was = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                mean = torch.stack([loss(batch).detach().float() for batch in data]).mean()
        finally:
            pl_module.train(was)
        return float(trainer.strategy.reduce(mean, reduce_op="mean"))

    return judge


def build_targeter(
    pl_module: pl.LightningModule,
    surgeon: Surgeon,
    target: str,
    speed: SideBySide,
    macs: MacCounter,
    original_counts: dict[str, float],
) -> Targeter | None:
    """The search that turns a params/MACs/latency target into a channel count; None for ``target="channels"``."""
    if target == "channels":
        return None
    example = surgeon.example_input

    def count(kind: str) -> float:
        return count_params(pl_module) if kind == "params" else macs(pl_module, example)

    if target == "latency" and speed.original is None:
        rank_zero_warn(
            "HalfPrune resumed without the original architecture to time against: `target='latency'` "
            "falls back to the same reduction of MACs for the remaining cuts."
        )
        target = "macs"
    speedup: Callable[[], Any] = lambda: speed.against_original(pl_module, example)  # noqa: E731
    return Targeter(target, surgeon, count, speedup, original_counts or None)
