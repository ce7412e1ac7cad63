"""Per-head parameters travel with their head: bias tables, q/k biases and norms, extra projections, ALiBi.

torch-pruning's graph never sees these (they live behind the reshape into heads), so ``attention.prune`` slices
them here, with the same heads and head-dim offsets it removes from the projections:

* the attention module's own parameters: a table with one column per head (Swin/BEiT relative position bias), a
  vector or tensor with one entry per head (per-head gates, temperatures), per-channel q/k/v biases (BEiT's
  ``q_bias``/``v_bias`` parameters and its zero ``k_bias`` buffer, one entry per query or key/value channel); the
  same in a leaf child without a ``weight`` (Hugging Face Swin 5.x keeps its table in a ``relative_position_bias``
  child, with a shape attribute ending in the head count, as timm's ``RelPosBias.bias_shape``); an embedding with one
  column per head (T5's ``relative_attention_bias``, cut with its tie's heads); a small MLP whose last linear layer
  gives one value per head (Swin-v2's continuous position bias, ``cpb_mlp``);
* its normalisation children (q/k norms): per-head-dim norms are sliced only when head dims go; per-channel norms
  over all heads (OLMo-2) and ``(heads, head_dim)`` norms (Cohere) lose the removed heads;
* extra per-head projections (DeBERTa-v2's ``pos_query_proj``/``pos_key_proj``);
* ALiBi: the slopes depend on the head count (Bloom builds them from ``n_head`` in the model, Falcon adds them to
  the attention mask). The model keeps building them for its original heads, and a forward pre-hook on each cut
  attention module hands it the slopes of the heads it kept, so every kept head keeps its own slope.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_halfprune._compat import torch_pruning as tpc
from lightning_halfprune.core import layers

if TYPE_CHECKING:
    from lightning_halfprune.core.attention import AttentionSpec

KEPT = "_halfprune_kept_heads"  # original indices of the heads a module still has (ALiBi); a fresh list per cut
ALL = "_halfprune_all_heads"  # the head count the model builds its ALiBi slopes for


def follow(spec: AttentionSpec, heads: Sequence[int], dims: Sequence[int], q_removed: Sequence[int],
           kv_removed: Sequence[int]) -> None:
    """Slice every per-head parameter of ``spec.module`` like the projections (before ``attention.sync``)."""
    d, h, kv = spec.head_dim, spec.num_heads, spec.num_kv_heads
    q_keep = _kept(h * d, q_removed)
    kv_keep = _kept(kv * d, kv_removed)
    head_keep = _kept(h, heads)
    dim_keep = _kept(d, dims)
    for layer, side in spec.extras:
        removed = q_removed if side == "q" or kv == h else None
        if removed is None:
            raise ValueError(f"{spec.name!r}: a per-head projection follows key/value heads under GQA.")
        if removed:
            layers.pruner(layer).prune_out_channels(layer, list(removed))
    if q_removed:
        _own_params(spec.module, h, (h * d, kv * d), head_keep, q_keep, kv_keep, bool(heads))
    skip = {id(m) for m in (spec.q, spec.k, spec.v, spec.qkv, spec.o, *(e for e, _ in spec.extras)) if m is not None}
    for cname, child in spec.module.named_children():
        if heads and isinstance(child, nn.Embedding) and child.embedding_dim == h != d:  # T5's relative_attention_bias
            # (not BERT's `distance_embedding`, one column per head-dim offset)
            child.weight = _slice(child.weight, head_keep, 1)
            child.embedding_dim = len(head_keep)
        elif heads and (last := _bias_mlp_output(child, h, d)) is not None:  # Swin-v2's continuous position bias
            layers.pruner(last).prune_out_channels(last, list(heads))
        elif id(child) not in skip and not any(True for _ in child.children()):
            qk = cname.lower().startswith(("q", "k"))  # q_norm/k_norm, not ALBERT's LayerNorm after the output
            _norm(child, h, d, kv, head_keep, dim_keep, q_keep, kv_keep, bool(heads), bool(dims), qk)
            if q_removed and "weight" not in child._parameters:  # a bias table in a child (HF Swin 5.x)
                _own_params(child, h, (h * d, kv * d), head_keep, q_keep, kv_keep, bool(heads))
    if heads and _uses_alibi(spec.module):
        _follow_alibi(spec.module, h, head_keep)


def _bias_mlp_output(child: nn.Module, heads: int, head_dim: int) -> nn.Linear | None:
    """The last layer of a small MLP child that outputs one value per head (Swin-v2's ``cpb_mlp``), else None."""
    if not isinstance(child, nn.Sequential) or heads == head_dim:
        return None
    last = next((m for m in reversed(child) if isinstance(m, nn.Linear)), None)
    return last if last is not None and last.out_features == heads and last is child[-1] else None


def _kept(width: int, removed: Sequence[int]) -> list[int]:
    gone = {int(c) for c in removed}
    return [i for i in range(width) if i not in gone]


def _slice(param: torch.Tensor, keep: list[int], dim: int) -> torch.Tensor:
    return tpc.prune_parameter(param, keep, dim)


def _own_params(module: nn.Module, heads: int, widths: tuple[int, int], head_keep: list[int], q_keep: list[int],
                kv_keep: list[int], heads_cut: bool) -> None:
    q_width, kv_width = widths
    for pname, param in list(module._parameters.items()):
        if param is None or param.dim() == 0 or pname == "weight":
            continue
        if heads_cut and param.shape[-1] == heads:  # a table with one column per head (relative position bias)
            setattr(module, pname, _slice(param, head_keep, param.dim() - 1))
        elif heads_cut and param.shape[0] == heads:  # one entry (or row) per head: gates, temperatures, slopes
            setattr(module, pname, _slice(param, head_keep, 0))
        elif param.dim() == 1 and pname.startswith("q_") and param.shape[0] == q_width:  # BEiT's q_bias
            setattr(module, pname, _slice(param, q_keep, 0))
        elif param.dim() == 1 and pname.startswith(("k_", "v_")) and param.shape[0] == kv_width:  # BEiT's v_bias
            setattr(module, pname, _slice(param, kv_keep, 0))
    for aname, value in list(vars(module).items()):  # timm's RelPosBias views its table as `bias_shape`
        if heads_cut and aname.endswith("shape") and isinstance(value, tuple) and value and value[-1] == heads:
            setattr(module, aname, (*value[:-1], len(head_keep)))
    for bname, buf in list(module._buffers.items()):  # BEiT's k_bias: a zero buffer concatenated with the biases
        if buf is None or buf.dim() != 1:
            continue
        if bname.startswith("q_") and buf.shape[0] == q_width:
            module._buffers[bname] = buf.index_select(0, torch.as_tensor(q_keep, device=buf.device))
        elif bname.startswith(("k_", "v_")) and buf.shape[0] == kv_width:
            module._buffers[bname] = buf.index_select(0, torch.as_tensor(kv_keep, device=buf.device))


def _norm(child: nn.Module, heads: int, d: int, kv: int, head_keep: list[int], dim_keep: list[int],
          q_keep: list[int], kv_keep: list[int], heads_cut: bool, dims_cut: bool, qk: bool = True) -> None:
    """A q/k norm (or any leaf holding a per-channel weight) sliced like its heads / head dims.

    A norm over all query (or key/value) channels is sliced only when named like a q/k norm (``qk``): a norm of the
    same width named otherwise (ALBERT's ``LayerNorm``, inside the attention module) normalises the residual stream.
    """
    weight = child._parameters.get("weight")
    if weight is None or isinstance(child, (nn.Linear, nn.Embedding)) or weight.dim() > 2:
        return
    changed = False
    for pname in ("weight", "bias"):
        p = child._parameters.get(pname)
        if p is None:
            continue
        new = p
        if p.dim() == 2 and p.shape == (heads, d):  # a norm per head over its head dim (Cohere)
            new = _slice(_slice(p, head_keep, 0), dim_keep, 1) if heads_cut or dims_cut else p
        elif p.dim() == 1 and p.shape[0] == d and dims_cut and d not in (heads * d, kv * d):
            new = _slice(p, dim_keep, 0)  # a norm over the head dim, shared by every head (Qwen3, OLMo)
        elif qk and p.dim() == 1 and p.shape[0] == heads * d and p.shape[0] != d and len(q_keep) < p.shape[0]:
            new = _slice(p, q_keep, 0)  # over all query channels (OLMo-2's q_norm)
        elif qk and p.dim() == 1 and p.shape[0] == kv * d and p.shape[0] != d and len(kv_keep) < p.shape[0]:
            new = _slice(p, kv_keep, 0)
        if new is not p:
            setattr(child, pname, new)
            changed = True
    if changed and hasattr(child, "normalized_shape"):
        shape = child._parameters["weight"].shape
        child.normalized_shape = tuple(shape) if isinstance(child.normalized_shape, tuple) else int(shape[0])


# ------------------------------------------------------------------ ALiBi
def _uses_alibi(module: nn.Module) -> bool:
    config = getattr(module, "config", None)
    return "alibi" in _forward_params(module) or bool(getattr(config, "alibi", False))


def _forward_params(module: nn.Module) -> list[str]:
    try:
        return list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return []


def _follow_alibi(module: nn.Module, heads: int, head_keep: list[int]) -> None:
    """Record which original heads stay and make sure the slicing pre-hook is on the module (once)."""
    previous = getattr(module, KEPT, None)
    if previous is None:
        setattr(module, ALL, heads)
        previous = list(range(heads))
    setattr(module, KEPT, [previous[i] for i in head_keep])  # a new list: a failed cut's undo restores the old one
    if not any(hook is alibi_pre_hook for hook in module._forward_pre_hooks.values()):
        module.register_forward_pre_hook(alibi_pre_hook, with_kwargs=True)


def alibi_pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    """Hand an attention module the ALiBi slopes (Bloom's ``alibi``, Falcon's ALiBi mask) of its kept heads only."""
    kept, total = getattr(module, KEPT, None), getattr(module, ALL, None)
    if kept is None or total is None or len(kept) == total:
        return None
    names = _forward_params(module)
    args = list(args)
    for name in ("alibi", "attention_mask"):
        if name in kwargs:
            kwargs[name] = _select_heads(kwargs[name], kept, total)
        elif name in names and names.index(name) < len(args):
            i = names.index(name)
            args[i] = _select_heads(args[i], kept, total)
    return tuple(args), kwargs


def _select_heads(t: Any, kept: list[int], total: int) -> Any:
    if not torch.is_tensor(t) or t.dtype == torch.bool:
        return t
    index = torch.as_tensor(kept, device=t.device)
    if t.dim() == 4 and t.shape[1] == total:  # (batch, heads, q, k)
        return t.index_select(1, index)
    if t.dim() == 3 and t.shape[0] % total == 0:  # Bloom: (batch * heads, 1, k)
        batch = t.shape[0] // total
        return t.view(batch, total, *t.shape[1:]).index_select(1, index).reshape(batch * len(kept), *t.shape[1:])
    return t
