"""torch-pruning pruners for layer families it does not know: frozen batch norms and weight-standardised convs.

- **Frozen batch norm** (torchvision's ``ops.misc.FrozenBatchNorm2d``, timm's and detectron2's alike): a batch norm
  whose affine weight and statistics are *buffers*. torch-pruning sees no parameters in it and lets channels flow
  through it untouched, so every group of a ResNet+FPN backbone broke the forward and was left out. It is cut like
  ``nn.BatchNorm2d``: the four buffers lose the same channels.
- **Scaled weight-standardised conv** (timm's ``ScaledStdConv2d``, NF-Nets): a ``Conv2d`` with a per-output-channel
  ``gain`` parameter shaped ``(out, 1, 1, 1)``. It is cut like a Conv2d, ``gain`` with its output channels. The
  standardisation itself (mean and std over each filter's inputs) is recomputed in every forward, so it follows
  any cut; the fixed ``scale`` (``gamma / sqrt(fan_in)``, set at construction) is kept, as a plain conv keeps its
  weights: removing inputs removes their terms. timm's plain ``StdConv2d`` has no extra parameter and needs
  nothing beyond torch-pruning's own Conv pruner.

Both are found by their shape (duck typing), not their import path, so no optional package is imported here.

torch-pruning's importances (and ``MagnitudeScorer``) read a layer only when its handler is one of torch-pruning's
own functions: a group of scaled weight-standardised convs alone (an NF-Net bottleneck, which has no BatchNorm)
got no scores and was silently never cut (timm's ``nf_resnet26`` lost 19% of its params at ratio 0.5). Scorers
read such a group through ``plain_view``: the same items, the convs with torch-pruning's Conv handlers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function as tp_function

from lightning_halfprune._compat import torch_pruning as tpc

FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def is_frozen_norm(module: nn.Module) -> bool:
    """A batch norm whose affine weight and statistics are buffers (``FrozenBatchNorm2d`` and its lookalikes)."""
    if isinstance(module, nn.modules.batchnorm._NormBase) or module._parameters or module._modules:
        return False
    buffers = [module._buffers.get(name) for name in FROZEN_BUFFERS]
    return all(b is not None and b.dim() == 1 for b in buffers) and len({b.numel() for b in buffers}) == 1


def is_scaled_std_conv(module: nn.Module) -> bool:
    """A ``Conv2d`` subclass with a per-output-channel ``gain`` parameter (timm's ``ScaledStdConv2d``)."""
    gain = module._parameters.get("gain") if isinstance(module, nn.Conv2d) else None
    return (
        type(module) is not nn.Conv2d
        and gain is not None
        and gain.dim() >= 1
        and gain.shape[0] == module.out_channels
        and gain[0].numel() == 1
    )


def _keep(width: int, idxs: Sequence[int]) -> list[int]:
    return sorted(set(range(width)) - {int(i) for i in idxs})


class FrozenNormPruner(tp_function.BasePruningFunc):
    """Cuts a frozen batch norm's four buffers; channels in and out are the same channels (like BatchNorm)."""

    is_root = False  # a norm never roots a group: the layer before it does

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = _keep(self.get_out_channels(layer), idxs)
        for name in FROZEN_BUFFERS:
            buffer = layer._buffers[name]
            layer._buffers[name] = torch.index_select(buffer, 0, torch.as_tensor(keep, device=buffer.device))
        if isinstance(getattr(layer, "num_features", None), int):
            layer.num_features = len(keep)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer._buffers["weight"].numel()

    get_in_channels = get_out_channels


class ScaledStdConvPruner(tp_function.ConvPruner):
    """torch-pruning's Conv pruner, with the per-output-channel ``gain`` cut along the output channels."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = _keep(layer.out_channels, idxs)
        super().prune_out_channels(layer, idxs)
        layer.gain = self._prune_parameter_and_grad(layer.gain, keep, 0)
        return layer


FROZEN_NORM = FrozenNormPruner()
SCALED_STD_CONV = ScaledStdConvPruner()


def customized_pruners(model: nn.Module) -> dict[type, Any]:
    """The pruner of every frozen batch norm and scaled weight-standardised conv class found in ``model``."""
    found: dict[type, Any] = {}
    for module in model.modules():
        if is_frozen_norm(module):
            found[type(module)] = FROZEN_NORM
        elif is_scaled_std_conv(module):
            found[type(module)] = SCALED_STD_CONV
    return found


def plain_view(group: Any) -> Any:
    """``group`` as scorers read it: a scaled std conv's items with torch-pruning's Conv handlers (same indices).

    Only for scoring: cutting goes through the group itself, whose handlers also cut ``gain``.
    """
    if not any(isinstance(getattr(item.dep.handler, "__self__", None), ScaledStdConvPruner) for item in group):
        return group
    view = tp.dependency.Group()
    for item in group:
        dep = item.dep
        if isinstance(getattr(dep.handler, "__self__", None), ScaledStdConvPruner):
            out = dep.handler.__name__ == "prune_out_channels"
            plain = tp_function.prune_conv_out_channels if out else tp_function.prune_conv_in_channels
            dep = tp.dependency.Dependency(dep.trigger, plain, dep.source, dep.target)
            dep.index_mapping = item.dep.index_mapping
        view.add_dep(dep, item.idxs)
        view[len(view) - 1].root_idxs = item.root_idxs
    graph = tpc.graph_of(group)
    if graph is not None:
        tpc.set_graph(view, graph)
    return view
