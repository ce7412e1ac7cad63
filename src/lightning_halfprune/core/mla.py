"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2: Hugging Face ``DeepseekV3Attention`` and look-alikes).

MLA compresses keys and values into a latent (``kv_a_proj_with_mqa``: the hidden size -> ``kv_lora_rank`` plus one
rotary key shared by every head) and expands it per head (``kv_b_proj``: ``kv_lora_rank -> heads * (qk_nope +
v_head_dim)``); queries come per head from ``q_b_proj`` (after the low-rank ``q_a_proj``) or ``q_proj``
(``heads * (qk_nope + qk_rope)``), and ``o_proj`` reads ``heads * v_head_dim``. A head's query, key and value
widths differ, which ``attention.py`` (one head dim for q, k, v) does not describe, and its forward views them with
``-1`` heads, so whole heads go here: head ``h`` takes its rows of the query projection and of ``kv_b_proj`` and its
columns of ``o_proj``. The latent and the shared rotary key stay (``q_a_proj``, the LoRA rank, is an ordinary group
of the graph). ``num_heads`` follows on the module and ``num_attention_heads``/``num_key_value_heads`` in the
config. Heads are ranked by the L2 norm of those rows and columns; each module keeps ``1 - ratio`` of its original
heads (floors as for any group), also with ``global_pruning``. A module whose key/value heads are grouped
(``num_key_value_groups`` > 1) is not recognised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_halfprune.core import log
from lightning_halfprune.core.errors import SurgeryError
from lightning_halfprune.core.graph import ChannelGroup, left_alone, removable

_DIMS = ("num_heads", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def _query(module: nn.Module) -> nn.Linear | None:
    q = module._modules.get("q_b_proj") or module._modules.get("q_proj")
    return q if type(q) is nn.Linear else None


def width(module: nn.Module) -> int | None:
    """The number of heads of an MLA module, None for any other module."""
    if not isinstance(module, nn.Module):
        return None
    dims = [getattr(module, n, None) for n in _DIMS]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in dims):
        return None
    h, nope, rope, v = dims
    q, kv_b, o = _query(module), module._modules.get("kv_b_proj"), module._modules.get("o_proj")
    if q is None or type(kv_b) is not nn.Linear or type(o) is not nn.Linear:
        return None
    if getattr(module, "num_key_value_groups", 1) != 1 or "kv_a_proj_with_mqa" not in module._modules:
        return None
    if q.out_features != h * (nope + rope) or kv_b.out_features != h * (nope + v) or o.in_features != h * v:
        return None
    return h


@dataclass(eq=False)
class Latent:
    """One MLA module and its name; stands in a ``ChannelGroup`` for torch-pruning's group (no graph items)."""

    name: str
    module: nn.Module

    def __iter__(self):
        return iter(())

    @property
    def layers(self) -> list[nn.Module]:
        return [_query(self.module), self.module.kv_b_proj, self.module.o_proj]


def find(model: nn.Module) -> list[Latent]:
    return [Latent(name, m) for name, m in model.named_modules() if width(m)]


def not_roots(found: Sequence[Latent]) -> list[nn.Module]:
    """The per-head projections: torch-pruning's groups must not cut them as plain channels."""
    return [layer for m in found for layer in m.layers[:2]]


def channel_groups(found: Sequence[Latent], ignored: Sequence[nn.Module]) -> list[ChannelGroup]:
    return [ChannelGroup(m.name, m, width(m.module)) for m in found if not left_alone(m.module, m.layers, ignored)]


def _rows(module: nn.Module, heads: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query rows, ``kv_b_proj`` rows and ``o_proj`` columns of ``heads``."""
    q_dim = module.qk_nope_head_dim + module.qk_rope_head_dim
    kv_dim, v = module.qk_nope_head_dim + module.v_head_dim, module.v_head_dim
    idx = torch.as_tensor(list(heads), dtype=torch.long)[:, None]
    return ((idx * q_dim + torch.arange(q_dim)).flatten(), (idx * kv_dim + torch.arange(kv_dim)).flatten(),
            (idx * v + torch.arange(v)).flatten())


def magnitudes(module: nn.Module) -> torch.Tensor:
    """One score per head: the L2 norm of its query and ``kv_b_proj`` rows and its ``o_proj`` columns."""
    h = width(module)
    with torch.no_grad():
        q = _query(module).weight.detach().float().pow(2).sum(1).view(h, -1).sum(1)
        kv = module.kv_b_proj.weight.detach().float().pow(2).sum(1).view(h, -1).sum(1)
        o = module.o_proj.weight.detach().float().pow(2).sum(0).view(h, -1).sum(1)
        return (q + kv + o).sqrt().cpu()


def plan_cuts(g: ChannelGroup, keep: int) -> list[tuple[str, list[int]]]:
    """(module, heads) to cut so that ``keep`` heads stay."""
    module = g.group.module
    drop = torch.argsort(magnitudes(module), stable=True)[: width(module) - keep].tolist()
    return [(g.name, sorted(int(h) for h in drop))] if drop else []


def owns(module: nn.Module) -> bool:
    return width(module) is not None


def prune(module: nn.Module, removed: Sequence[int], name: str, replace: Callable) -> None:
    """Remove heads ``removed`` from the query projection, ``kv_b_proj`` and ``o_proj``; ``replace`` slices, records."""
    h = width(module)
    drop = {int(c) for c in removed}
    if not removable(removed, h):
        raise SurgeryError(f"cannot remove heads {list(removed)[:8]} from the MLA module {name!r} of {h} heads.")
    q_rows, kv_rows, o_cols = _rows(module, [c for c in range(h) if c not in drop])
    q = _query(module)
    for layer, dim, keep in ((q, 0, q_rows), (module.kv_b_proj, 0, kv_rows), (module.o_proj, 1, o_cols)):
        replace(layer, "weight", dim, keep)
        if dim == 0:
            replace(layer, "bias", 0, keep)
            layer.out_features = len(keep)
        else:
            layer.in_features = len(keep)
    module.num_heads = h - len(drop)


def sync_config(config: Any, owner: nn.Module) -> None:
    """``num_attention_heads`` (and ``num_key_value_heads``) into a config its MLA modules agree on."""
    counts = sorted({width(m.module) for m in find(owner)})
    if len(counts) > 1:  # the same text after every cut: Python shows it once
        log.warn(
            f"the MLA modules ended with different head counts ({counts}): `config.num_attention_heads` cannot say "
            "them and keeps its value; reload the pruned model with `load_pruned`, not `from_pretrained`.",
            stacklevel=4,
        )
    elif counts:
        for field in ("num_attention_heads", "num_key_value_heads"):
            if isinstance(getattr(config, field, None), int):
                setattr(config, field, counts[0])
