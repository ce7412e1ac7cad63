"""LoRA adapters (peft) follow their base layer: its widths are cut, the adapter rank is kept.

peft wraps a targeted ``nn.Linear`` in a ``lora.Linear`` whose forward adds ``lora_B(lora_A(x)) * scaling`` to the
base layer's output. Traced as it is, torch-pruning sees the rank (``lora_A``'s output) as channels and halves it,
and the wrapper's own ``in_features``/``out_features`` go stale. Here the wrapper is one layer to torch-pruning (a
customized pruner): cutting its output channels cuts the base layer's rows, ``lora_B``'s rows and DoRA's magnitude
vector alike; cutting its input channels cuts the base layer's and ``lora_A``'s columns. The rank, and so peft's
config, never changes, and a pruned peft model saves and reloads through peft (``save_pretrained`` of the adapter
on a base model of the pruned widths).

Other peft tuner layers (LoRA on convolutions or embeddings, other methods) are one layer to torch-pruning too, but
refuse every cut: the groups that touch them are left out at train start, with the reason.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch_pruning.pruner import function as tp_function

_LINEAR = tp_function.LinearPruner()


def linear_class() -> type | None:
    """The ``lora.Linear`` class of peft, if peft is already imported."""
    return getattr(sys.modules.get("peft.tuners.lora.layer"), "Linear", None)


def tuner_class() -> type | None:
    """The base class of every peft adapter layer, if peft is already imported."""
    return getattr(sys.modules.get("peft.tuners.tuners_utils"), "BaseTunerLayer", None)


def is_lora_linear(layer: nn.Module) -> bool:
    cls = linear_class()
    return cls is not None and isinstance(layer, cls)


def delta(layer: nn.Module) -> torch.Tensor:
    """What the active adapters add to the base layer's weight, as ``(out, in)``."""
    deltas = [layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A]
    total = sum(deltas) if deltas else torch.zeros(())
    return total.t() if getattr(layer, "fan_in_fan_out", False) else total


class LoraLinearPruner(tp_function.BasePruningFunc):
    """torch-pruning pruner for peft's ``lora.Linear``: the base layer and every adapter cut alike, rank kept.

    ``base_pruner(layer)`` gives the pruner of the wrapped layer (a Linear, or GPT-2's ``Conv1D``).
    """

    def __init__(self, base_pruner: Callable[[nn.Module], Any] | None = None) -> None:
        super().__init__()
        self.base_pruner = base_pruner or (lambda layer: _LINEAR)

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        base = layer.get_base_layer()
        self.base_pruner(base).prune_out_channels(base, idxs)
        for b in layer.lora_B.values():
            _LINEAR.prune_out_channels(b, idxs)
        for name, magnitude in layer.lora_magnitude_vector.items():  # DoRA: one magnitude per output channel
            keep = sorted(set(range(magnitude.weight.shape[0])) - set(idxs))
            magnitude.weight = self._prune_parameter_and_grad(magnitude.weight, keep, 0)
            layer.lora_magnitude_vector[name] = magnitude
        layer.out_features = self.base_pruner(base).get_out_channels(base)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        base = layer.get_base_layer()
        self.base_pruner(base).prune_in_channels(base, idxs)
        for a in layer.lora_A.values():
            _LINEAR.prune_in_channels(a, idxs)
        layer.in_features = self.base_pruner(base).get_in_channels(base)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        base = layer.get_base_layer()
        return self.base_pruner(base).get_out_channels(base)

    def get_in_channels(self, layer: nn.Module) -> int:
        base = layer.get_base_layer()
        return self.base_pruner(base).get_in_channels(base)


class RefusingPruner(tp_function.BasePruningFunc):
    """For adapter layers HalfPrune cannot cut consistently: any cut through them fails, naming the layer type."""

    def _refuse(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise NotImplementedError(
            f"HalfPrune cannot cut the peft adapter layer {type(layer).__name__} (only LoRA on nn.Linear is cut, "
            "with its rank kept)"
        )

    prune_out_channels = prune_in_channels = _refuse

    def get_out_channels(self, layer: nn.Module) -> int | None:
        return getattr(layer, "out_features", None)

    def get_in_channels(self, layer: nn.Module) -> int | None:
        return getattr(layer, "in_features", None)


_REFUSING = RefusingPruner()


def customized_pruners(model: nn.Module, linear: LoraLinearPruner) -> dict[type, tp_function.BasePruningFunc]:
    """A pruner for every peft adapter layer type in ``model``: ``linear`` for LoRA on linear layers, others refuse."""
    tuner = tuner_class()
    if tuner is None:
        return {}
    found = {type(m) for m in model.modules() if isinstance(m, tuner)}
    lora = linear_class()
    return {cls: linear if lora is not None and issubclass(cls, lora) else _REFUSING for cls in found}
