"""Optional sparsity regularisation before a cut, so the scorer sees a clear separation between channels.

Group lasso (as in DepGraph, Fang et al. 2023): every channel of a coupled group is penalised by
``lambda * ||w_c||_2`` over all the weights the group would remove with it; its gradient ``lambda * w / ||w_c||``
is added to the parameters' gradients before each optimizer step. With ``bn_scale`` scoring, the penalty is L1 on
the BatchNorm scales instead (Network Slimming, Liu et al. 2017).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch_pruning.pruner import function as tp_function

OUT_FNS = (tp_function.prune_conv_out_channels, tp_function.prune_linear_out_channels)
IN_FNS = (tp_function.prune_conv_in_channels, tp_function.prune_linear_in_channels)


@torch.no_grad()
def add_group_lasso_grad(groups: list[Any], strength: float) -> None:
    """Add the group-lasso gradient of ``strength * sum_c ||group channel c||`` to the weights' ``.grad``."""
    for g in groups:
        terms = []  # (weight, dim, idxs) slices making up each channel of the group
        for item in g.group:
            layer, fn, idxs = item.dep.target.module, item.dep.handler, item.idxs
            if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) or layer.weight.grad is None:
                continue
            if fn in OUT_FNS:
                terms.append((layer.weight, 0, idxs, item.root_idxs))
            elif fn in IN_FNS and getattr(layer, "groups", 1) == 1:
                terms.append((layer.weight, 1, idxs, item.root_idxs))
        if not terms:
            continue
        norms = torch.zeros(g.width, device=terms[0][0].device)
        for weight, dim, idxs, roots in terms:
            part = weight.index_select(dim, torch.as_tensor(idxs, device=weight.device)).transpose(0, dim)
            norms.index_add_(0, torch.as_tensor(roots, device=weight.device), part.flatten(1).pow(2).sum(1))
        norms = norms.sqrt().clamp_min(1e-8)
        for weight, dim, idxs, roots in terms:
            idx = torch.as_tensor(idxs, device=weight.device)
            scale = (strength / norms[torch.as_tensor(roots, device=weight.device)]).view(
                [-1 if d == dim else 1 for d in range(weight.dim())]
            )
            weight.grad.index_add_(dim, idx, weight.index_select(dim, idx) * scale)


@torch.no_grad()
def add_bn_l1_grad(model: nn.Module, strength: float) -> None:
    """Add the gradient of ``strength * sum |gamma|`` over every BatchNorm scale."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m.weight.grad is not None:
            m.weight.grad.add_(strength * torch.sign(m.weight))
