"""Running a few batches through the model for data-driven scoring without disturbing the fit.

The fit's data order, RNG state, gradients, train/eval mode and BatchNorm statistics are the same after
calibration as before it.
"""

from __future__ import annotations

import contextlib
import inspect
import random
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from lightning_halfprune.core.graph import graph_safe


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


class _Captured(Exception):
    """Raised by the forward pre-hook to stop ``training_step`` right where it calls the model."""


def model_input(module: Any, batch: Any, input_fn: Callable[[Any], Any] | None = None) -> Any:
    """The input ``module``'s ``forward`` gets from ``batch``, in ``run_model``'s convention.

    ``input_fn(batch)`` if given. Otherwise ``training_step(batch, 0)`` runs until it calls the module and the
    arguments of that call are taken (no loss, no optimizer step, logging muted). If ``training_step`` never calls
    the module itself, the batch's first element, or the dict entries ``forward`` accepts.
    """
    if input_fn is not None:
        return input_fn(batch)
    captured = _capture_forward_args(module, batch)
    if captured is not None:
        args, kwargs = captured
        if not kwargs:
            return args[0] if len(args) == 1 else tuple(args)
        if not args:
            return dict(kwargs)
    return _guess_input(module, batch)


def _capture_forward_args(module: Any, batch: Any) -> tuple[tuple, dict] | None:
    if not isinstance(module, nn.Module) or not hasattr(module, "training_step"):
        return None
    seen: list[tuple[tuple, dict]] = []

    def hook(_: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((args, kwargs))
        raise _Captured

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with logging_redirected(module, lambda *a, **k: None), torch.no_grad():
            module.training_step(batch, 0)
    except _Captured:
        pass
    except Exception:  # training_step needs more than a batch here (e.g. the trainer): fall back to guessing
        return None
    finally:
        handle.remove()
    return seen[0] if seen else None


def _guess_input(module: Any, batch: Any) -> Any:
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, dict):
        accepted = _forward_parameters(module)
        return {k: v for k, v in batch.items() if accepted is None or k in accepted}
    return batch


def _forward_parameters(module: Any) -> set[str] | None:
    """Names ``forward`` accepts as keywords, or None if it takes ``**kwargs``."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def describe(batch: Any) -> str:
    """A short description of a batch for error messages: its type, keys and tensor shapes."""
    if isinstance(batch, dict):
        return "a dict with keys " + ", ".join(f"{k!r}{_shape(v)}" for k, v in batch.items())
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)}: " + ", ".join(_shape(v) or type(v).__name__ for v in batch)
    return f"a {type(batch).__name__}{_shape(batch)}"


def _shape(value: Any) -> str:
    return f" {tuple(value.shape)}" if torch.is_tensor(value) else ""


def fed_input(module: Any, batch: Any, input_fn: Callable[[Any], Any] | None = None) -> Any:
    """``model_input(module, batch, input_fn)``, checked by one forward pass (eval mode, no grad, RNG kept).

    Raises ``ValueError`` describing the batch (its keys and shapes) if the model cannot run on it, so a batch that
    cannot be fed fails when training starts, not at the first cut.
    """
    from lightning_halfprune.core.graph import run_model

    try:
        x = model_input(module, batch, input_fn)
        with undisturbed(module), torch.no_grad():
            run_model(module, x)
    except Exception as err:
        how = "`input_fn`" if input_fn is not None else "the input `training_step` passes to the model"
        raise ValueError(
            f"HalfPrune cannot feed a training batch to {type(module).__name__}: the batch is {describe(batch)}; "
            f"{how} failed with {type(err).__name__}: {err}. Pass `input_fn=` to HalfPrune (batch -> model input, "
            "e.g. `lambda batch: batch['image']`)."
        ) from err
    return x
