"""A "best" checkpoint that has the architecture being trained: ``ModelCheckpoint`` forgets its ranking at a cut.

A cut usually costs some accuracy that training then wins back, so a ``ModelCheckpoint`` monitoring accuracy
would keep calling the dense model from before the first cut its best. After every cut (and every rollback) each
``ModelCheckpoint`` that monitors a metric starts its ranking over: ``best_model_path``, ``best_model_score``,
``best_k_models`` and ``kth_value`` are reset, so after the last cut "best" is the best checkpoint of the final
architecture. The files already written stay on disk; ``save_top_k`` counts only the checkpoints ranked since.

The checkpoint such a ``ModelCheckpoint`` would write right after the cut, at the same epoch (step) end, is
skipped: its score would be the validation of the model before the cut. (Also its ``last.ckpt`` at that moment.)
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_halfprune._compat import lightning as lc


def start_over(trainer: pl.Trainer) -> list[ModelCheckpoint]:
    """Reset the ranking of every metric-monitoring ``ModelCheckpoint`` of ``trainer``; returns those reset."""
    reset = []
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint) or callback.monitor is None:
            continue
        callback.best_k_models = {}
        callback.kth_best_model_path = ""
        callback.best_model_score = None
        callback.best_model_path = ""
        callback.kth_value = torch.tensor(torch.inf if callback.mode == "min" else -torch.inf)
        lc.no_save_before(callback, trainer.global_step)  # no save now: it would be scored by the model before the cut
        reset.append(callback)
    return reset
