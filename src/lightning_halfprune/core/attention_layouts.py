"""Where each head's rows sit in a fused q/k/v projection, and which attention modules cannot be cut head-wise.

``attention.py`` reasons about a fused projection in one *logical* order, blocked: all query rows (head by head),
then all key rows, then all value rows. The real (*physical*) order depends on the model:

* ``"blocked"``: q | k | v (timm/ViT ``qkv``, GPT-2 ``c_attn``, Phi-3 ``qkv_proj``, ModernBERT ``Wqkv``, Falcon
  multi-query: all query heads, then the one key head, then the one value head).
* ``"grouped"``: per key/value group, its query heads, then its key head, then its value head (Falcon's
  ``new_decoder_architecture``). With one query head per key/value head this is the per-head interleaved layout of
  GPT-NeoX, Bloom, the older Falcon and timm's MaxViT/CoAtNet with ``head_first=True``
  (``[head][q, k, v][head_dim]``).
* ``"sharded"``: CodeGen's ``qkv_proj``, ``mp_num`` equal shards (the model-parallel blocks it was trained in), each
  ``[q | v | k]`` of its own consecutive heads (note v before k). Its forward views the output as ``mp_num`` shards of
  ``3 * embed_dim / mp_num`` rows, so every shard must keep the same number of heads: a cut removes whole *units*,
  either one head of every shard (the same position in each) or, with fewer heads per shard than shards, whole
  shards (then ``mp_num`` shrinks); the module's ``embed_dim`` (read as the query width) and ``mp_num`` follow the
  cut, its output projection keeps its output (the hidden size). A module whose heads do not split evenly over its
  shards (or that has no ``mp_num``, or fewer key/value heads) is left uncut with a warning.

A layout maps logical channels to physical rows, so scores, plans and cuts stay in one place (``attention.py``)
whatever the layout. A fused projection of an attention class whose layout is not known to be one of these
(DeBERTa v1's ``in_proj``) is *ambiguous*: it is left uncut with a warning, since a wrong guess would mix heads
silently while the forward still runs.

Heads *tied* across layers: a per-head position bias computed once by the first layer of a stack and passed on to
the others (T5's ``relative_attention_bias`` and ``position_bias``; its cross-attention passes a zero bias the same
way) must keep matching every layer that adds it. The attention modules at the same place of every repeated block
(the same name but for the block indices: ``encoder.block.*.layer.0.SelfAttention``) form a *tie*: they lose the
same heads, planned from their summed scores, and the bias table's column of each removed head goes with it. A tie
whose modules differ in head structure, or use rotary embeddings, is *locked*: every head stays and it is cut by
head dims instead (the bias is per head, not per offset).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from lightning_halfprune.core.attention import AttentionSpec

BLOCKED, GROUPED, SHARDED = "blocked", "grouped", "sharded"

# attention classes whose fused projection interleaves q, k and v per head: [head][q, k, v][head_dim]
_INTERLEAVED = frozenset({"GPTNeoXAttention", "GPTNeoXJapaneseAttention", "BloomAttention", "PersimmonAttention"})
# attention classes whose fused projection is sharded in `mp_num` blocks of [q, v, k]
_SHARDED = frozenset({"CodeGenAttention"})
# attention classes with a fused projection in a layout none of the above describes
_AMBIGUOUS = {
    "DisentangledSelfAttention": "DeBERTa (v1)'s fused `in_proj` interleaves q, k and v per head in its own way",
}
_GUESS = "; cutting its rows with a guessed layout would mix heads"
# per-head projections besides q/k/v: DeBERTa-v2's relative position projections (out: all heads x head_dim)
EXTRA_QUERY = ("pos_query_proj",)
EXTRA_KEY = ("pos_key_proj",)


def fused_layout(module: nn.Module, heads: int, kv: int) -> tuple[str | None, str | None]:
    """(layout, None), or (None, why) when the fused projection's layout is ambiguous."""
    cls = type(module).__name__
    if cls in _AMBIGUOUS:
        return None, _AMBIGUOUS[cls] + _GUESS
    if cls in _SHARDED:
        return SHARDED, None
    if hasattr(module, "new_decoder_architecture") and hasattr(module, "multi_query"):  # Falcon
        if module.new_decoder_architecture:
            return GROUPED, None
        return (BLOCKED, None) if module.multi_query else (GROUPED, None)
    if cls in _INTERLEAVED or getattr(module, "head_first", None) is True:  # timm MaxViT: [head][q, k, v][dim]
        return (GROUPED, None) if kv == heads else (None, f"{cls} interleaves q, k and v per head but has GQA{_GUESS}")
    return BLOCKED, None


def _shards(spec: AttentionSpec) -> tuple[int, str | None]:
    """(shards, None) for a sharded module whose heads split evenly over its shards, or (1, why it stays uncut)."""
    m, h = spec.module, spec.num_heads
    mp, width = getattr(m, "mp_num", None), getattr(m, "embed_dim", None)
    prefix = f"its fused `{spec.root_name.rpartition('.')[2]}` is sharded in `mp_num` blocks"
    if not isinstance(mp, int) or isinstance(mp, bool) or mp < 1 or width != spec.q_width:
        return 1, f"{prefix}, but the module has no integer `mp_num` or no `embed_dim` equal to its query width{_GUESS}"
    if spec.num_kv_heads != h:
        return 1, f"{prefix} and has {spec.num_kv_heads} key/value heads for {h} query heads{_GUESS}"
    if h % mp:
        return 1, (f"{prefix}: its {h} heads do not split evenly over its {mp} shards, and every shard must keep the "
                   "same number of heads, so no head can be removed without breaking its forward")
    return mp, None


def _whole_shards(spec: AttentionSpec) -> bool:
    """A sharded module's cut unit: whole shards (fewer heads per shard than shards), else one head of every shard."""
    return spec.num_heads // spec.shards < spec.shards


def unit_heads(spec: AttentionSpec) -> int:
    """Query heads one cut unit of a sharded module holds."""
    return spec.num_heads // spec.shards if _whole_shards(spec) else spec.shards


def unit_of(spec: AttentionSpec, head: int) -> int:
    """The unit (the heads a cut removes together) of query ``head``.

    A block of consecutive heads, or for a sharded module cut one head per shard, the heads at one position.
    """
    if spec.qkv is not None and spec.layout == SHARDED and not _whole_shards(spec):
        return head % (spec.num_heads // spec.shards)
    return head // spec.unit_heads


def follow(spec: AttentionSpec, kept_heads: Sequence[int], head_dim: int) -> None:
    """A sharded module's ``embed_dim`` (its query width) and ``mp_num`` (its non-empty shards) after a cut."""
    if spec.qkv is None or spec.layout != SHARDED:
        return
    per = spec.num_heads // spec.shards
    shards = len({h // per for h in kept_heads})
    spec.module.embed_dim, spec.module.mp_num, spec.shards = len(kept_heads) * head_dim, shards, shards


def rows(layout: str, heads: int, kv: int, head_dim: int, shards: int = 1) -> list[int]:
    """``rows[logical] = physical``: the row of the fused weight that holds each blocked (q | k | v) channel."""
    d = head_dim
    if layout == BLOCKED:
        return list(range((heads + 2 * kv) * d))
    if layout == SHARDED:  # shard s: [q | v | k] of its heads s * p .. (s + 1) * p - 1
        p = heads // shards

        def at(h: int, part: int) -> list[int]:
            return [(h // p) * 3 * p * d + (part * p + h % p) * d + j for j in range(d)]

        return [r for part in (0, 2, 1) for h in range(heads) for r in at(h, part)]
    g = heads // kv
    unit = (g + 2) * d
    q = [(h // g) * unit + (h % g) * d + j for h in range(heads) for j in range(d)]
    k = [i * unit + g * d + j for i in range(kv) for j in range(d)]
    v = [i * unit + (g + 1) * d + j for i in range(kv) for j in range(d)]
    return q + k + v


def _rows(spec: AttentionSpec) -> list[int]:
    return rows(spec.layout, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.shards)


def q_rows(spec: AttentionSpec) -> list[int]:
    """The physical rows of the query channels, in head order (the output projection's input columns)."""
    if spec.qkv is None or spec.layout == BLOCKED:
        return list(range(spec.q_width))
    return _rows(spec)[: spec.q_width]


def to_logical(spec: AttentionSpec, scores: torch.Tensor) -> torch.Tensor:
    """A fused projection's per-row scores in blocked (q | k | v) order."""
    if spec.qkv is None or spec.layout == BLOCKED:
        return scores
    return scores[torch.as_tensor(_rows(spec), device=scores.device)]


def to_physical(spec: AttentionSpec, logical: Sequence[int]) -> list[int]:
    """Blocked channels of the fused projection -> its rows (sorted)."""
    if spec.qkv is None or spec.layout == BLOCKED:
        return [int(c) for c in logical]
    table = _rows(spec)
    return sorted(table[int(c)] for c in logical)


def from_physical(spec: AttentionSpec, physical: Sequence[int]) -> list[int]:
    """Rows of the fused projection -> blocked channels (sorted); a row out of range is an ``IndexError``."""
    if spec.qkv is None or spec.layout == BLOCKED:
        return sorted(int(c) for c in physical)
    inverse = {p: logical for logical, p in enumerate(_rows(spec))}
    return sorted(inverse[int(c)] for c in physical)


def extras(module: nn.Module, q_width: int) -> tuple[tuple[nn.Module, str], ...]:
    """Per-head projections of ``module`` besides q/k/v, with the side they follow (``"q"`` or ``"kv"``)."""
    found = []
    for names, side in ((EXTRA_QUERY, "q"), (EXTRA_KEY, "kv")):
        for n in names:
            child = module._modules.get(n)
            if isinstance(child, nn.Linear) and child.out_features == q_width:
                found.append((child, side))
    return tuple(found)


def shares_bias(forward_params: Sequence[str], module: nn.Module) -> bool:
    """Whether ``module`` adds a per-head position bias passed in from another layer (T5-style)."""
    return "position_bias" in forward_params or hasattr(module, "has_relative_attention_bias")


def tie_key(name: str) -> str:
    """The place of an attention module in its repeated blocks: its name with the block indices starred."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def bind_ties(specs: Sequence[AttentionSpec]) -> None:
    """Give every bias-sharing module its tie and the tie's size; lock a tie of rotary modules (head dims only).

    That the members still agree in head structure is checked when they are planned (a cut changes one at a time).
    """
    ties: dict[str, list[AttentionSpec]] = {}
    for spec in specs:
        if spec.tie is not None:
            ties.setdefault(spec.tie, []).append(spec)
    for members in ties.values():
        rope = any(s.rope for s in members)
        for spec in members:
            spec.tie_size = len(members)
            if rope:
                spec.locked = "its per-head position bias is shared across rotary layers, so every head stays"


def same_heads(specs: Sequence[AttentionSpec]) -> bool:
    """Whether the modules of a tie have one head structure (they can lose the same heads)."""
    return len({(s.num_heads, s.num_kv_heads, s.head_dim, s.layout, s.shards) for s in specs}) == 1


def refine(spec: AttentionSpec, forward_params: Sequence[str]) -> AttentionSpec:
    """Fill a found spec's layout, extra per-head projections and head lock, or mark it ambiguous (uncut)."""
    if spec.qkv is not None:
        layout, why = fused_layout(spec.module, spec.num_heads, spec.num_kv_heads)
        spec.layout = layout or BLOCKED
        if layout == SHARDED:
            spec.shards, why = _shards(spec)
        spec.uncut = why
    spec.extras = extras(spec.module, spec.q_width)
    spec.tie = tie_key(spec.name) if shares_bias(forward_params, spec.module) else None
    return spec


def ambiguous_message(spec: AttentionSpec) -> str:
    return (
        f"HalfPrune leaves the attention heads of {spec.name!r} ({type(spec.module).__name__}) uncut: {spec.uncut}. "
        f"Its projections are not cut at all (put {spec.name!r} in `ignored_layers` to silence this)."
    )


def untraced_message(spec: AttentionSpec) -> str:
    return (
        f"HalfPrune leaves the attention heads of {spec.name!r} uncut: neither its q/k/v projection nor its output "
        "projection is called as a module in the traced forward (both through `F.linear` with their weights?), so "
        "their use cannot be followed. Call at least one of them as a module to have its heads cut."
    )


def describe(spec: AttentionSpec) -> dict[str, Any]:
    """The head structure of one attention module, for reports and tests."""
    return {
        "name": spec.name, "heads": spec.num_heads, "kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
        "layout": spec.layout if spec.qkv is not None else "separate", "uncut": spec.uncut, "locked": spec.locked,
        "tie": spec.tie,
    }
