"""Pruned checkpoints that load.

The history inside the checkpoint, the pruned shape rebuilt before the weights load, ``load_pruned`` for
inference without a Trainer, and ``export`` to TorchScript or ONNX.

A checkpoint written by a Trainer with ``HalfPrune`` holds, under ``checkpoint["halfprune"]``, the history of
cuts that produced its exact shape, the widths the model started from, and one example input for tracing.
"""

from __future__ import annotations

import inspect
import os
import pickle
from collections.abc import Mapping
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from lightning_halfprune._compat import lightning as lc
from lightning_halfprune.core import mamba, mla, moe
from lightning_halfprune.core.errors import SurgeryError
from lightning_halfprune.core.layers import out_width
from lightning_halfprune.core.plan import Cut
from lightning_halfprune.core.surgeon import Surgeon
from lightning_halfprune.fit import averaging

KEY = "halfprune"
_LIGHTNING_KEYS = ("_instantiator", "_class_path")  # what LightningCLI adds to saved hyperparameters


class CheckpointError(ValueError):
    """A checkpoint's pruning history does not fit the model, or is malformed."""


def pack(history: list[dict], original_widths: dict[str, int], example_input: Any) -> dict[str, Any]:
    """What goes under ``checkpoint["halfprune"]``: plain types only, which a safe load (``weights_only``) reads."""
    return {
        "version": 1,
        "history": [dict(event) for event in history],
        "original_widths": dict(original_widths),
        "example_input": _plain(move_data_to_device(example_input, "cpu")),
    }


def read(path: str | os.PathLike, weights_only: bool = True) -> dict[str, Any]:
    """A checkpoint file's contents, loaded safely: ``weights_only=True`` never runs code stored in the file.

    A file that cannot be read, or that a safe load refuses, is a ``CheckpointError`` naming the file and why.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{os.fspath(path)!r} holds objects a safe load refuses (`weights_only=True` never runs code stored in a "
            f"checkpoint): {str(err).splitlines()[0]}. If you trust the file's source, pass `weights_only=False`."
        ) from err
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(
            f"{os.fspath(path)!r} cannot be read as a torch checkpoint (truncated, still being written, or another "
            f"format): {type(err).__name__}: {err}"
        ) from err
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{os.fspath(path)!r} is not a Lightning checkpoint: it has no `state_dict`.")
    return checkpoint


def cuts_of(state: Mapping[str, Any]) -> list[Cut]:
    """Every cut of a packed history, in order; a malformed history raises ``CheckpointError``."""
    try:
        history = state["history"]
        cuts = [Cut(str(layer), [int(i) for i in channels]) for event in history for layer, channels in event["cuts"]]
        widths = {str(k): int(v) for k, v in state["original_widths"].items()}
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"the HalfPrune history in this checkpoint is corrupted or hand-edited: {err!r}") from err
    if cuts and not widths:
        raise CheckpointError("the HalfPrune history in this checkpoint has cuts but no `original_widths`.")
    return cuts


def restore_shape(model: nn.Module, checkpoint: Mapping[str, Any]) -> bool:
    """Cut ``model`` to the shape the checkpoint's weights have; True if anything was cut.

    Nothing happens if the checkpoint has no history or the model already has the checkpoint's shape. A history
    that does not fit the model (another architecture) raises ``CheckpointError`` naming the first layer that
    does not match, and leaves the model as it was.
    """
    state = checkpoint.get(KEY)
    weights = checkpoint.get("state_dict", {})
    if not state or _shapes_match(model, weights):
        return False
    cuts = cuts_of(state)
    if not cuts:
        return False
    _check_original_widths(model, state["original_widths"])
    example = _cast_floats(move_data_to_device(state.get("example_input"), _device_of(model)), _dtype_of(model))
    if example is None:
        raise CheckpointError("the HalfPrune state in this checkpoint has no example input to trace the model with.")
    surgeon = Surgeon(model, example, original_widths=state["original_widths"])
    try:
        surgeon.cut(cuts, then=lambda remap: _check_weights_fit(model, weights))
    except SurgeryError as err:
        raise CheckpointError(f"the checkpoint's pruning history does not fit {type(model).__name__}: {err}") from err
    return True


def load_pruned(
    model_class: type[nn.Module], path: str | os.PathLike, weights_only: bool = True, **init_kwargs: Any
) -> nn.Module:
    """The pruned LightningModule of a checkpoint, with its weights, in eval mode, without any Trainer.

    The class is built from the checkpoint's saved hyperparameters (``save_hyperparameters``), overridden by
    ``init_kwargs``; then the recorded cuts are replayed and the weights loaded. The file is loaded with
    ``torch.load(weights_only=True)``, which never runs code stored in it; ``weights_only=False`` only for files
    you trust (e.g. hyperparameters that are objects of your own classes).
    """
    checkpoint = read(path, weights_only)
    kwargs = _init_kwargs(model_class, {**checkpoint.get("hyper_parameters", {}), **init_kwargs})
    model = model_class(**kwargs)
    restore_shape(model, checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def export(
    model: nn.Module,
    path: str | os.PathLike,
    format: Literal["torchscript", "onnx"] = "torchscript",
    example_input: Any = None,
) -> str:
    """Write the (pruned) model to ``path`` as TorchScript or ONNX; returns the path.

    ``example_input`` defaults to the model's ``example_input_array``. ONNX needs the ``onnx`` extra.
    """
    example = example_input if example_input is not None else getattr(model, "example_input_array", None)
    if example is None:
        raise ValueError("`example_input` is needed to export (or set `example_input_array` on the model).")
    example = move_data_to_device(example, _device_of(model))
    args = example if isinstance(example, tuple) else (example,)
    model = model.eval()
    path = os.fspath(path)
    with torch.no_grad(), lc.jit_is_scripting():
        if format == "torchscript":
            torch.jit.save(torch.jit.trace(model, args), path)
        elif format == "onnx":
            torch.onnx.export(model, args, path, input_names=["input"], output_names=["output"], dynamo=False)
        else:
            raise ValueError(f"`format` must be 'torchscript' or 'onnx', got {format!r}.")
    return path


# -------------------------------------------------------------------- helpers
def _shapes_match(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return all(k in own and tuple(own[k].shape) == tuple(v.shape) for k, v in weights.items() if torch.is_tensor(v))


def _check_weights_fit(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    own = model.state_dict()
    for key, value in weights.items():
        if torch.is_tensor(value) and key in own and tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"after replaying the checkpoint's pruning history, {key!r} has shape {tuple(own[key].shape)} but the "
                f"checkpoint holds {tuple(value.shape)}: the history does not fit {type(model).__name__}."
            )


def _check_original_widths(model: nn.Module, widths: Mapping[str, int]) -> None:
    for name, width in widths.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"the checkpoint was pruned from a model with a layer {name!r}, which {type(model).__name__} does not "
                "have: it is another architecture."
            ) from None
        actual = getattr(layer, "out_channels", getattr(layer, "out_features", None)) or out_width(layer)
        actual = actual or moe.width(layer) or mamba.width(layer) or mla.width(layer)  # sums, inner widths, heads
        if actual != width:
            raise CheckpointError(
                f"layer {name!r} of {type(model).__name__} has {actual} output channels, but the checkpoint was pruned "
                f"from a model where it had {width}: it is another architecture or width."
            )


def _init_kwargs(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = {k: v for k, v in kwargs.items() if k not in _LIGHTNING_KEYS}
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _dtype_of(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's floating parameters (None if it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _cast_floats(x: Any, dtype: torch.dtype | None) -> Any:
    """Floating tensors in ``x`` cast to ``dtype``: an example stored by a float64 or bf16 fit traces any model."""
    if dtype is None:
        return x
    if torch.is_tensor(x):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, Mapping):
        return {k: _cast_floats(v, dtype) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_cast_floats(v, dtype) for v in x)
    return x


def _plain(x: Any) -> Any:
    """Tensors in plain dicts, tuples and lists (a ``BatchEncoding`` or other mapping becomes a ``dict``)."""
    if torch.is_tensor(x):
        return x.detach()
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_plain(v) for v in x)
    if isinstance(x, list):
        return [_plain(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise CheckpointError(
        f"HalfPrune's example input holds a {type(x).__name__}, which a safe checkpoint load cannot read: pass an "
        "`example_input` of tensors (in tuples, lists or dicts)."
    )


def restore_shape_before_weights_load(pl_module: Any) -> None:
    """Replay the recorded cuts right before Lightning loads a checkpoint's weights into ``pl_module``.

    Lightning calls the module's ``on_load_checkpoint`` just before loading weights (callback hooks come later),
    so it is wrapped, for this module instance only, until :func:`stop_restoring_shape`.
    """
    if "on_load_checkpoint" in pl_module.__dict__:
        return
    original = pl_module.on_load_checkpoint

    def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
        restore_shape(pl_module, checkpoint)
        for copy in averaging.averaged_copies(lc.trainer_of(pl_module)):  # EMA/SWA copies load their state after this
            restore_shape(copy, checkpoint)
        original(checkpoint)

    pl_module.on_load_checkpoint = on_load_checkpoint


def stop_restoring_shape(pl_module: Any) -> None:
    """Undo :func:`restore_shape_before_weights_load`."""
    pl_module.__dict__.pop("on_load_checkpoint", None)


def adopt_unkeyed_state(checkpoint: dict[str, Any], key: str, alone: bool) -> None:
    """0.1 wrote its state under the bare class name: the Trainer's only HalfPrune reads it under its own key."""
    states = checkpoint.get("callbacks") or {}
    if alone and "HalfPrune" in states and key not in states:
        states[key] = states.pop("HalfPrune")
