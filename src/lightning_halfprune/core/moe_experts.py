"""Whole experts removed from a fused experts block, with their router rows (Minitron's expert pruning).

``moe="experts"`` (or ``"both"``) removes the least used experts of every fused experts block: their slices of the
3-D expert tensors and their rows of the router (``gate``: a ``Linear`` or a module with an ``[E, H]`` weight), and
``num_experts`` follows in the modules and the Hugging Face config. Experts are ranked by the routing probability
mass they get on the example input (the router's softmax averaged over its tokens). A removal is recorded as
``Cut(router_name, expert_indices)``, so checkpoints replay it through the same path as any other cut.

Lists of expert modules are not removed from: a ``ModuleList`` edit cannot be undone copy-free, and their own
forwards often loop over ``range(num_experts)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_halfprune._compat import torch_pruning as tpc
from lightning_halfprune.core.errors import SurgeryError

_ROUTERS = ("gate", "router")
_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts")
_TOP_K = ("top_k", "num_experts_per_tok")


def router_of(model: nn.Module, experts_name: str, num_experts: int) -> tuple[str, nn.Module] | None:
    """The router next to an experts module: a sibling ``gate``/``router`` with ``num_experts`` output rows."""
    parent_name = experts_name.rpartition(".")[0]
    parent = model.get_submodule(parent_name)
    for n in _ROUTERS:
        child = parent._modules.get(n)
        if child is not None and router_width(child) == num_experts:
            return (f"{parent_name}.{n}" if parent_name else n), child
    return None


def router_width(module: nn.Module) -> int | None:
    """The number of experts a router scores: rows of its ``[E, H]`` weight; None for anything else."""
    weight = module._parameters.get("weight")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    if isinstance(module, nn.Linear) or isinstance(getattr(module, "num_experts", None), int):
        return weight.shape[0]
    return None


def top_k(router: nn.Module) -> int:
    return next((v for n in _TOP_K if isinstance(v := getattr(router, n, None), int)), 1)


def routing_mass(run: Any, routers: Sequence[nn.Module]) -> dict[nn.Module, torch.Tensor]:
    """Each router's mean softmax probability per expert while ``run()`` (a forward of the example input) runs."""
    mass: dict[nn.Module, torch.Tensor] = {}

    def hook(module: nn.Module, args: Any, out: Any) -> None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
        if torch.is_tensor(logits) and logits.shape[-1] == router_width(module):
            probs = logits.detach().float().reshape(-1, logits.shape[-1]).softmax(-1).mean(0).cpu()
            mass[module] = mass.get(module, 0) + probs

    handles = [r.register_forward_hook(hook) for r in routers]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return mass


def plan(router: nn.Module, scores: torch.Tensor | None, keep: int) -> list[int]:
    """The experts to remove so ``keep`` remain (at least ``top_k``), least routed first (else smallest router row)."""
    width = router_width(router)
    keep = min(width, max(keep, top_k(router)))
    if scores is None:
        scores = router.weight.detach().float().norm(dim=1).cpu()
    return sorted(int(e) for e in torch.argsort(scores, stable=True)[: width - keep])


def remove(model: nn.Module, router_name: str, drop: Sequence[int], experts: nn.Module) -> None:
    """Remove experts ``drop`` from ``experts`` and their rows from the router; the slices are recorded."""
    router = model.get_submodule(router_name)
    width = router_width(router)
    drop = sorted({int(e) for e in drop})
    if not drop or drop[0] < 0 or drop[-1] >= width:
        raise SurgeryError(f"cannot remove experts {drop[:8]} from the router {router_name!r} of {width} experts.")
    keep = [e for e in range(width) if e not in drop]
    if len(keep) < top_k(router):
        raise SurgeryError(
            f"removing {len(drop)} experts would leave {router_name!r} fewer experts ({len(keep)}) than each token is "
            f"routed to ({top_k(router)})."
        )
    for module in (experts, router):
        for pname, p in list(module._parameters.items()):
            if p is not None and p.dim() >= 1 and p.shape[0] == width:  # expert tensors, router rows and biases
                setattr(module, pname, tpc.prune_parameter(p, keep, 0))
        for bname, b in list(module._buffers.items()):
            if b is not None and b.dim() >= 1 and b.shape[0] == width:  # e.g. a per-expert score correction bias
                module._buffers[bname] = b.index_select(0, torch.tensor(keep, device=b.device))
    parent = model.get_submodule(router_name.rpartition(".")[0])
    for module in (experts, router, parent):
        if isinstance(module, nn.Linear):
            module.out_features = len(keep)
        for attr in _COUNT_ATTRS:
            if getattr(module, attr, None) == width:
                setattr(module, attr, len(keep))


def sync_config(config: Any, counts: set[int]) -> None:
    """The number of experts into a Hugging Face config, where every block has the same."""
    if len(counts) != 1:
        return
    count = counts.pop()
    for attr in ("num_local_experts", "num_experts", "n_routed_experts"):
        if isinstance(getattr(config, attr, None), int) and not isinstance(getattr(config, attr), bool):
            setattr(config, attr, count)
            return
