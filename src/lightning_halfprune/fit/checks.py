"""What can be checked when training starts, said then rather than found epochs later.

The schedule against the trainer's limits once the steps per epoch are known, a metric (``monitor``, the
accuracy guard) that no validation will ever produce, and a SIGTERM that arrives while HalfPrune itself works.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_halfprune.core.group_search import Stopped, stopping


@contextlib.contextmanager
def stop_on_sigterm(trainer: pl.Trainer) -> Iterator[None]:
    """Within the block, a SIGTERM stops HalfPrune's own work (group search, pre-flight, a cut) promptly.

    Lightning's SIGTERM handler only records the signal (``trainer.received_sigterm``); the fit loop acts on it
    between batches, so a search running for minutes at train start ignored it. Here HalfPrune's searches look at
    it between layers and stop; a cut in progress is undone (the model is as before), and Lightning's own
    ``SIGTERMException`` is raised, exactly as if the signal had come between two batches.
    """
    try:
        with stopping(lambda: bool(getattr(trainer, "received_sigterm", False))):
            yield
    except Stopped as err:
        rank_zero_info("HalfPrune stopped on SIGTERM; the model is as it was before.")
        raise SIGTERMException from err


def steps_per_epoch(trainer: pl.Trainer) -> int | None:
    """Optimizer steps in one training epoch; None when the number of batches is unknown (iterable data)."""
    batches = trainer.num_training_batches
    if not isinstance(batches, int) and not (isinstance(batches, float) and math.isfinite(batches)):
        return None
    return max(1, math.ceil(int(batches) / max(trainer.accumulate_grad_batches, 1)))


def warn_if_nothing_validates(
    trainer: pl.Trainer, pl_module: pl.LightningModule, monitor: str | None, guard: bool
) -> None:
    """A ``monitor`` (and the guard judging it) with no validation in the fit: nothing will ever be measured."""
    if not monitor:
        return
    why = None
    if not is_overridden("validation_step", pl_module):
        why = "the LightningModule has no `validation_step`"
    elif trainer.limit_val_batches == 0:
        why = "`limit_val_batches=0`"
    elif not trainer.enable_validation:
        why = "the fit has no validation data"
    if why is None:
        return
    what = (
        f"the accuracy guard (`max_drop`) cannot judge any cut and is inactive, and `{monitor}`"
        if guard
        else (f"`{monitor}`")
    )
    rank_zero_warn(
        f"HalfPrune monitors `{monitor}`, but no validation runs in this fit ({why}): {what} is never "
        "reported around the cuts."
    )


def automatic_optimization(pl_module: pl.LightningModule) -> None:
    """Distillation adds to the loss ``training_step`` returns: manual optimization cannot take it."""
    if not pl_module.automatic_optimization:
        raise ValueError(
            "HalfPrune's `distill` adds a term to the loss `training_step` returns, which needs automatic "
            "optimization; this module sets `automatic_optimization=False`. Set `distill=None` or add the "
            "distillation term in your own training_step."
        )
