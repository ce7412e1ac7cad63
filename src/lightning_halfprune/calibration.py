"""Running a few batches through the model for data-driven scoring without disturbing the fit.

The fit's data order, RNG state, gradients, train/eval mode and BatchNorm statistics are the same after
calibration as before it.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from lightning_halfprune.surgery import graph_safe


@contextlib.contextmanager
def undisturbed(model: nn.Module) -> Iterator[None]:
    """Run calibration in eval mode with grad enabled; put RNG states, gradients and modes back afterwards."""
    grads = {p: p.grad for p in model.parameters()}
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices), graph_safe(model):
            model.eval()
            yield
    finally:
        for p, g in grads.items():
            p.grad = g
        random.setstate(py_state)
        np.random.set_state(np_state)


def take_batches(dataloader: Any, n: int, device: torch.device) -> list[Any]:
    """The first ``n`` batches of a fresh iterator over ``dataloader``, moved to ``device``."""
    if dataloader is None or not hasattr(dataloader, "__iter__"):
        raise ValueError(
            "a data-driven scorer needs batches, but there is no training dataloader to draw them from: "
            "pass `calibration_dataloader=` to HalfPrune."
        )
    generators = _generators_of(dataloader)
    states = [g.get_state() for g in generators]
    try:
        return [move_data_to_device(batch, device) for batch in islice(iter(dataloader), n)]
    finally:  # a fresh iterator draws a new shuffle from the loader's own generator: give the fit its draw back
        for g, state in zip(generators, states, strict=True):
            g.set_state(state)


def _generators_of(dataloader: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a DataLoader's shuffling draws from (beyond the global RNG)."""
    found = []
    for owner in (
        dataloader,
        getattr(dataloader, "sampler", None),
        getattr(dataloader, "batch_sampler", None),
        getattr(getattr(dataloader, "batch_sampler", None), "sampler", None),
    ):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


@contextlib.contextmanager
def logging_redirected(
    module: Any, log: Callable[..., None], log_dict: Callable[..., None] | None = None
) -> Iterator[None]:
    """Send a LightningModule's ``self.log`` / ``self.log_dict`` calls to other functions, outside the Trainer's loops.

    ``log_dict`` defaults to calling ``log`` once per item.
    """

    def each(dictionary: dict, *args: Any, **kwargs: Any) -> None:
        for name, value in dictionary.items():
            log(name, value, **kwargs)

    saved = module.log, module.log_dict
    module.log, module.log_dict = log, log_dict or each
    try:
        yield
    finally:
        module.log, module.log_dict = saved


def training_loss(module: Any) -> Callable[[Any], torch.Tensor]:
    """The loss of the LightningModule's own ``training_step`` on a batch, with its ``self.log`` calls muted."""

    def loss(batch: Any) -> torch.Tensor:
        if not getattr(module, "automatic_optimization", True):
            raise ValueError(
                "the `taylor` scorer needs a loss from `training_step`, which is unavailable with manual "
                "optimization; choose another `scorer`."
            )
        with logging_redirected(module, lambda *args, **kwargs: None):
            out = module.training_step(batch, 0)
        out = out["loss"] if isinstance(out, dict) else out
        if not torch.is_tensor(out):
            raise ValueError("the `taylor` scorer needs `training_step` to return a loss tensor (or {'loss': ...}).")
        return out

    return loss
