"""lightning-halfprune: structured pruning inside a PyTorch Lightning fit.

``from lightning_halfprune import HalfPrune`` and add it to your Trainer's callbacks.
"""

from lightning_halfprune import plain_load
from lightning_halfprune.callback import HalfPrune
from lightning_halfprune.checkpoint import CheckpointError, export, load_pruned
from lightning_halfprune.core.minitron import MinitronScorer
from lightning_halfprune.core.scoring import (
    SCORERS,
    ActivationScorer,
    CalibratedScorer,
    RandomScorer,
    RedundancyScorer,
    Scorer,
    TaylorScorer,
)
from lightning_halfprune.options import Calibration, Distill, Guard, Sparsity, Timing
from lightning_halfprune.report import ModelStats, PruneReport
from lightning_halfprune.schedule import Cubic, Linear, OneShot, Schedule

__version__ = "0.1.0"

plain_load.install()  # a pruned checkpoint also loads through a Trainer or load_from_checkpoint without HalfPrune

__all__ = [
    "SCORERS",
    "ActivationScorer",
    "Calibration",
    "CalibratedScorer",
    "CheckpointError",
    "Cubic",
    "Distill",
    "Guard",
    "HalfPrune",
    "Linear",
    "export",
    "load_pruned",
    "MinitronScorer",
    "ModelStats",
    "OneShot",
    "PruneReport",
    "RandomScorer",
    "RedundancyScorer",
    "Schedule",
    "Scorer",
    "Sparsity",
    "Timing",
    "TaylorScorer",
]
