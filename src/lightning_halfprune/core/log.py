"""Messages from the core, printed once per job: on rank 0 only when ``torch.distributed`` is running."""

from __future__ import annotations

import logging
import warnings

import torch.distributed as dist

log = logging.getLogger("lightning_halfprune")
if not log.handlers:  # printed like Lightning's own rank-zero messages, unless the user configured logging
    log.addHandler(logging.StreamHandler())
    log.setLevel(logging.INFO)


def _rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def info(message: str) -> None:
    """Log ``message`` at INFO level on rank 0."""
    if _rank_zero():
        log.info(message)


def warn(message: str, category: type[Warning] = UserWarning, stacklevel: int = 3) -> None:
    """Issue ``warnings.warn(message)`` on rank 0."""
    if _rank_zero():
        warnings.warn(message, category, stacklevel=stacklevel)
