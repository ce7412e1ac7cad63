"""Where a ``PruneReport`` goes: the console (rank 0), every Lightning logger, and W&B's tables and charts.

Logging never costs the user their training: any logger error becomes a warning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_halfprune.core.latency import SpeedUp
from lightning_halfprune.report import PruneReport, final_summary, summary_table


def hyperparams(trainer: pl.Trainer, config: dict[str, Any]) -> None:
    """The callback's arguments, in every logger's hyperparameters (W&B: the run config)."""
    for logger in trainer.loggers:
        _safely(logger, logger.log_hyperparams, {"halfprune": config})


def event(trainer: pl.Trainer, report: PruneReport, index: int, verbose: bool) -> None:
    """One prune event: console table, scalars to every logger, and for W&B a widths table and bar chart."""
    if verbose:
        rank_zero_info(report.to_console())
    scalars(trainer, report.scalars())
    if not trainer.is_global_zero:
        return
    for logger in _wandb(trainer):
        _safely(logger, _wandb_widths, logger, report, index, trainer.global_step)


def scalars(trainer: pl.Trainer, values: dict[str, float]) -> None:
    for logger in trainer.loggers:
        _safely(logger, logger.log_metrics, values, step=trainer.global_step)


def fit_summary(
    trainer: pl.Trainer,
    reports: Sequence[PruneReport],
    final_metric: float | None,
    verbose: bool,
    speed: SpeedUp | None = None,
) -> None:
    """After fit: the summary table on the console and the final figures in the W&B run summary.

    ``speed``: the final architecture timed side by side against the original one.
    """
    if not reports:
        return
    if verbose:
        rank_zero_info(summary_table(list(reports), final_metric, speed))
    if trainer.is_global_zero:
        for logger in _wandb(trainer):
            _safely(logger, _wandb_summary, logger, final_summary(list(reports), final_metric, speed))


def compiles(trainer: pl.Trainer, counts: Sequence[int], verbose: bool) -> None:
    """How often ``torch.compile`` compiled during the fit: before the first cut and after each cut."""
    values = {"halfprune/compiles": float(sum(counts))}
    values |= {f"halfprune/compiles_after_cut_{i}": float(n) for i, n in enumerate(counts[1:])}
    scalars(trainer, values)
    if verbose:
        after = ", ".join(str(n) for n in counts[1:]) or "-"
        rank_zero_info(
            f"HalfPrune torch.compile: {sum(counts)} compilation(s) during fit; {counts[0] if counts else 0} before "
            f"the first cut, after each cut: {after}"
        )


def _wandb_widths(logger: WandbLogger, report: PruneReport, index: int, step: int) -> None:
    import wandb

    rows = [[index, name, width, report.after.widths.get(name, 0)] for name, width in report.before.widths.items()]
    table = wandb.Table(columns=["event", "layer", "width_before", "width_after"], data=rows)
    chart = wandb.plot.bar(table, "layer", "width_after", title=f"HalfPrune event {index}: layer widths after the cut")
    logger.experiment.log(
        {
            f"halfprune/widths_event_{index}": table,
            f"halfprune/widths_chart_event_{index}": chart,
            "trainer/global_step": step,
        }
    )


def _wandb_summary(logger: WandbLogger, values: dict[str, float]) -> None:
    logger.experiment.summary.update(values)


def _wandb(trainer: pl.Trainer) -> list[WandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def _safely(logger: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except Exception as err:  # a logger's failure must never stop training
        rank_zero_warn(f"HalfPrune could not log to {type(logger).__name__}: {type(err).__name__}: {err}")
