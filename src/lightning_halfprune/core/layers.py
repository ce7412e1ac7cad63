"""Linear-like layers beyond ``nn.Linear``: their widths, weights as ``(out, in)``, and torch-pruning pruners.

Hugging Face's ``Conv1D`` (GPT-2) is a Linear with a transposed ``(in, out)`` weight; peft's ``lora.Linear`` wraps
a Linear (or a ``Conv1D``) with an adapter (``lora.py``). Both are single layers to torch-pruning, through the
customized pruners here, and every room that reads a layer's width or weight asks this one.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch_pruning import ops
from torch_pruning.pruner import function as tp_function

from lightning_halfprune._compat import torch_pruning as tpc
from lightning_halfprune.core import lora, pruners, rnn


def conv1d_class() -> type | None:
    """Hugging Face's ``Conv1D`` (a Linear with a transposed weight), if transformers is already imported."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_conv1d(layer: nn.Module) -> bool:
    cls = conv1d_class()
    return cls is not None and isinstance(layer, cls)


class Conv1DPruner(tp_function.BasePruningFunc):
    """torch-pruning pruner for Hugging Face ``Conv1D`` (GPT-2): weight is ``(in, out)``."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.weight.shape[1])) - set(idxs))
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
        if layer.bias is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        layer.nf = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.weight.shape[0])) - set(idxs))
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        if hasattr(layer, "nx"):
            layer.nx = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[1]

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[0]


# torch-pruning's own registered instances: its importances recognise their methods as Linear / Conv handlers
LINEAR = tp_function.PrunerBox[ops.OPTYPE.LINEAR]
CONV = tp_function.PrunerBox[ops.OPTYPE.CONV]
CONV1D = Conv1DPruner()
LORA_LINEAR = lora.LoraLinearPruner(lambda base: pruner(base))


def customized_pruners(model: nn.Module | None = None) -> dict[type, Any]:
    """Pruners torch-pruning needs beyond its own: ``Conv1D``, peft's adapters, ``pruners``, ``rnn``."""
    cls = conv1d_class()
    found: dict[type, Any] = {cls: CONV1D} if cls is not None else {}
    if model is not None:
        found |= lora.customized_pruners(model, LORA_LINEAR) | pruners.customized_pruners(model)
        found |= rnn.customized_pruners(model)
    return found


def pruner(layer: nn.Module) -> Any:
    """The pruner of a linear-like layer (a 1x1 convolution too: CoAtNet's attention projections)."""
    if isinstance(layer, nn.Linear):
        return LINEAR
    if isinstance(layer, nn.Conv2d):
        return CONV
    if lora.is_lora_linear(layer):
        return LORA_LINEAR
    return CONV1D


def out_width(layer: nn.Module) -> int | None:
    """Output features of a linear-like (or recurrent: hidden units x directions) layer; None for anything else."""
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if isinstance(layer, nn.RNNBase):
        return rnn.RECURRENT.get_out_channels(layer)
    if is_conv1d(layer):
        return layer.weight.shape[1]
    if lora.is_lora_linear(layer):
        return out_width(layer.get_base_layer())
    return None


def in_width(layer: nn.Module) -> int | None:
    """Input features of a linear-like layer; None for anything else."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    if is_conv1d(layer):
        return layer.weight.shape[0]
    if lora.is_lora_linear(layer):
        return in_width(layer.get_base_layer())
    return None


def weight_matrix(layer: nn.Module) -> torch.Tensor | None:
    """The effective weight of a linear-like layer as ``(out, in)``, detached (LoRA: base plus active adapters)."""
    if isinstance(layer, nn.Linear):
        return layer.weight.detach()
    if is_conv1d(layer):
        return layer.weight.detach().t()
    if lora.is_lora_linear(layer):
        weight = weight_matrix(layer.get_base_layer())
        return weight + lora.delta(layer).to(weight.dtype) if not layer.merged else weight
    return None


def magnitude(group: Any, width: int) -> torch.Tensor | None:
    """L2 norm of each root channel's weights over a group's linear-like layers.

    The fallback when a scorer cannot read a layer type: torch-pruning's importances skip ``Conv1D`` (GPT-2) and
    peft's adapters. None if the group has no such layer.
    """
    total, found = torch.zeros(width), False
    for item in group:
        layer, fn = item.dep.target.module, item.dep.handler
        w = weight_matrix(layer) if isinstance(layer, nn.Module) else None
        if w is None:
            continue
        out = tpc.graph_of(group).is_out_channel_pruning_fn(fn) if tpc.graph_of(group) else True
        w = w if out else w.t()
        if max(item.idxs, default=-1) >= w.shape[0] or item.root_idxs is None or None in item.root_idxs:
            continue
        total.index_add_(0, torch.as_tensor(item.root_idxs), w[torch.as_tensor(item.idxs)].float().pow(2).sum(1).cpu())
        found = True
    return total.sqrt() if found else None


def needs_fallback(layer: Any) -> bool:
    """A linear-like layer torch-pruning's importances cannot read (``Conv1D``, peft adapters)."""
    return isinstance(layer, nn.Module) and not isinstance(layer, nn.Linear) and weight_matrix(layer) is not None
