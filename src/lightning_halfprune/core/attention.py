"""Attention modules: find them, score and cut them head-wise, and keep their own attributes in sync.

torch-pruning's graph sees a query projection's output channels as plain channels: the reshape into heads, the
rotary embedding and the grouped key/value heads of GQA are invisible to it, so a plain cut mixes heads (and the
rotary concatenations make its group search explode: the Llama hang). Here an attention module is recognised by
its structure (a fused ``qkv``/``c_attn`` layer or ``q/k/v`` projections, an output projection, a head count),
its projections are kept out of the graph's own groups, and it is cut as one unit:

* ``"heads"``: whole heads go, with their q/k/v rows and the output projection's columns; with GQA a key/value
  head goes together with all the query heads that read it, so ``num_key_value_groups`` never changes.
* ``"head_dim"``: the same offsets of the head dimension go in every head (not with rotary embeddings, whose
  pairs of offsets and frequencies would break; those fall back to whole heads).
* ``"both"``: heads and head dims, each by about the square root of the kept fraction (heads rounded up).
* ``"heads_last"``: whole heads, but a ratio's parameters come from the other groups (the MLPs) first; heads
  are cut only for what those cannot give (``allocation.py``).

The scale of the dot product is left as it was: with whole heads it is unchanged anyway, and with head dims the
dropped offsets are the least important, so dividing the remaining dot product by the original ``sqrt(head_dim)``
keeps the logits closest to the unpruned ones.

A cut is recorded like any other: the root projection's name and its removed output channels, so checkpoints
replay it through the same path (``Surgeon.cut``), which also syncs the attributes.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn

from lightning_halfprune._compat import torch_pruning as tpc
from lightning_halfprune.core import attention_layouts as layouts
from lightning_halfprune.core import head_params, layers

AttentionMode = Literal["heads", "head_dim", "both", "none", "heads_last"]
ATTENTION_MODES = ("heads", "head_dim", "both", "none", "heads_last")

_FUSED = ("qkv", "c_attn", "in_proj", "Wqkv", "qkv_proj", "query_key_value")  # layouts: attention_layouts.py
_SEPARATE = (
    ("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"), ("q", "k", "v"),
    ("query_proj", "key_proj", "value_proj"),
)
_OUTPUT = ("o_proj", "out_proj", "out_lin", "c_proj", "proj", "o", "dense", "Wo")
_HEADS = ("num_heads", "num_attention_heads", "n_head", "n_heads", "heads")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads")
_HEAD_DIM = ("head_dim", "attention_head_size", "d_head", "head_size", "key_value_proj_dim")


def _pointwise(layer: nn.Module) -> bool:
    """A 1x1 convolution over channels (timm CoAtNet's ``Attention2d`` projections): a linear layer per pixel."""
    return type(layer) is nn.Conv2d and layer.kernel_size == (1, 1) and layer.groups == 1


def out_width(layer: nn.Module) -> int | None:
    """Output features of a projection: linear-like layers and 1x1 convolutions."""
    return layer.out_channels if _pointwise(layer) else layers.out_width(layer)


def in_width(layer: nn.Module) -> int | None:
    """Input features of a projection: linear-like layers and 1x1 convolutions."""
    return layer.in_channels if _pointwise(layer) else layers.in_width(layer)


class AttentionError(RuntimeError):
    """An attention cut that would mix heads or break the key/value grouping."""


def check_mode(attention: Any) -> None:
    if attention not in ATTENTION_MODES:
        raise ValueError(f"`attention` must be one of {ATTENTION_MODES}, got {attention!r}.")


@contextlib.contextmanager
def without_kv_cache(model: nn.Module) -> Iterator[None]:
    """Hugging Face models with ``config.use_cache`` off for the block: their key/value cache is not traced.

    The cache concatenates past and new keys (``torch.cat``), which torch-pruning's concat index mapping cannot
    follow (GPT-2 called without ``use_cache=False`` failed to trace). Nothing is cached during tracing anyway.
    """
    configs = {id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "use_cache")}
    saved = {key: config.use_cache for key, config in configs.items()}
    try:
        for config in configs.values():
            config.use_cache = False
        yield
    finally:
        for key, config in configs.items():
            config.use_cache = saved[key]


# ------------------------------------------------------------------ finding
@dataclass
class AttentionSpec:
    """One attention module: its projections and head structure (read from the module, never cached long)."""

    name: str
    module: nn.Module
    q: nn.Module | None
    k: nn.Module | None
    v: nn.Module | None
    qkv: nn.Module | None
    o: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: bool
    root_name: str
    layout: str = layouts.BLOCKED  # rows of a fused q/k/v projection (attention_layouts.py)
    extras: tuple = ()  # (layer, "q" | "kv"): more per-head projections (DeBERTa-v2's position projections)
    locked: str | None = None  # why heads cannot be removed (cut by head dims instead)
    tie: str | None = None  # modules sharing one per-head position bias lose the same heads (attention_layouts.py)
    tie_size: int = 1  # how many modules the tie has
    uncut: str | None = None  # why the module is left uncut (an ambiguous fused layout)
    shards: int = 1  # blocks of a sharded fused projection (CodeGen's `mp_num`), each holding as many heads

    @property
    def root(self) -> nn.Module:
        return self.qkv if self.qkv is not None else self.q

    @property
    def inputs(self) -> list[nn.Module]:
        own = [self.qkv] if self.qkv is not None else [self.q, self.k, self.v]
        return own + [layer for layer, _ in self.extras]

    @property
    def unit_heads(self) -> int:
        """Query heads a head cut removes together: a key/value group, or one head with a single shared KV (MQA).

        A sharded fused projection: one head of every shard, or a whole shard (``attention_layouts.py``).
        """
        if self.qkv is not None and self.layout == layouts.SHARDED:
            return layouts.unit_heads(self)
        return 1 if self.num_kv_heads == 1 else self.group_size

    def unit_of(self, head: int) -> int:
        """The unit of query ``head``: ``head // unit_heads``, except for a sharded module cut one head per shard."""
        return layouts.unit_of(self, head)

    def unit_scores(self, q_scores: torch.Tensor) -> torch.Tensor:
        """(heads, head_dim) scores -> one mean score per unit."""
        order = sorted(range(self.num_heads), key=self.unit_of)  # stable: the identity for consecutive units
        return q_scores[order].reshape(self.units, -1).mean(1)

    @property
    def units(self) -> int:
        return self.num_heads // self.unit_heads

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without GQA): the unit a head cut removes."""
        return self.num_heads // self.num_kv_heads

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim


def find_attention(model: nn.Module) -> list[AttentionSpec]:
    """Every attention module of ``model`` that can be cut head-wise.

    ``nn.MultiheadAttention`` is left to torch-pruning's own pruner (head-dim offsets of its embedding).
    """
    modules = dict(model.named_modules())
    specs = []
    for name, module in modules.items():
        if isinstance(module, nn.MultiheadAttention):
            continue
        spec = _spec(name, module, modules)
        if spec is not None:
            specs.append(spec)
    layouts.bind_ties(specs)
    return specs


def _child(module: nn.Module, names: Sequence[str]) -> tuple[str, nn.Module] | None:
    for n in names:
        child = module._modules.get(n)
        if child is not None and out_width(child) is not None:
            return n, child
    return None


def _int_attr(objs: Sequence[Any], names: Sequence[str]) -> int | None:
    for obj in objs:
        for n in names:
            value = getattr(obj, n, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _spec(name: str, module: nn.Module, modules: dict[str, nn.Module]) -> AttentionSpec | None:
    fused = _child(module, _FUSED)
    separate = next(
        (trio for trio in _SEPARATE if all(_child(module, (n,)) is not None for n in trio)), None
    )
    if fused is None and separate is None:
        return None
    output = _child(module, _OUTPUT)
    if output is None:  # BERT/ViT: the output projection lives in the parent's `output.dense`
        parent = modules.get(name.rpartition(".")[0])
        holder = parent._modules.get("output") if parent is not None else None
        if holder is not None and holder is not module:
            found = _child(holder, ("dense",))
            output = found
    if output is None:
        return None
    config = getattr(module, "config", None)
    objs = [module] + ([config] if config is not None and not isinstance(config, nn.Module) else [])
    heads = _int_attr(objs, _HEADS)
    if heads is None:
        return None
    if fused is not None:
        qkv, q = fused[1], None
        root_name = _join(name, fused[0])
        total = out_width(qkv)
        kv = _int_attr(objs, _KV_HEADS) or heads  # a fused q|k|v with fewer key/value heads (Phi-3): GQA too
        if total % (heads + 2 * kv):
            return None
        head_dim, k, v = total // (heads + 2 * kv), None, None
    else:
        q, k, v = (module._modules[n] for n in separate)
        qkv, root_name = None, _join(name, separate[0])
        head_dim = _int_attr([module], _HEAD_DIM) or out_width(q) // heads
        kv = _int_attr(objs, _KV_HEADS) or out_width(k) // head_dim
        if out_width(k) != kv * head_dim or out_width(v) != kv * head_dim:
            return None
    if out_width(q if q is not None else qkv) != (heads if q is not None else heads + 2 * kv) * head_dim:
        return None
    if heads % kv or in_width(output[1]) != heads * head_dim:
        return None
    params = _forward_params(module)
    rope = "position_embeddings" in params or hasattr(module, "rotary_emb")
    spec = AttentionSpec(name, module, q, k, v, qkv, output[1], heads, kv, head_dim, rope, root_name)
    return layouts.refine(spec, params)


def _forward_params(module: nn.Module) -> Sequence[str]:
    try:
        return list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return []


_RESHAPE = re.compile(r"shape '\[([-\d, ]+)\]' is invalid for input")


def input_width_hint(module: nn.Module, err: BaseException) -> str:
    """Why cutting ``module``'s heads broke its forward, if it shapes its heads from its input width.

    timm's BEiT, EVA and PVT-v2 attentions end with ``x.reshape(B, N, C)``, ``C`` read from the input; CaiT and XCiT
    split ``qkv`` into heads of ``C // num_heads``: either way the heads' width must stay the input width, so no head
    (nor head dim) can go without changing their code.
    """
    match = _RESHAPE.search(str(err))
    names = {*_FUSED, *(trio[0] for trio in _SEPARATE)}
    widths = {in_width(child) for name, child in module.named_children() if name in names} - {None}
    if match is None or not widths:
        return ""
    dims = [int(d) for d in match.group(1).split(",")]
    heads = _int_attr([module], _HEADS)
    per_head = {w // heads: w for w in widths if heads and w % heads == 0}
    if dims[-1] in widths:
        how = f"reshapes the attention output to its input width, {dims[-1]}, not to heads x head dim"
    elif dims[-1] in per_head:
        how = f"derives its head dim from its input width ({per_head[dims[-1]]} // num_heads)"
    else:
        return ""
    return f" (its forward {how}: its heads cannot be cut without changing its code; the rest of the model is)"


# ------------------------------------------------------------------ scoring
def scoring_group(spec: AttentionSpec, graph: tp.DependencyGraph) -> Any:
    """A torch-pruning ``Group`` over the root's output channels, so every scorer scores attention channels.

    q/k/v rows and the output projection's columns are mapped to the root channel they belong to (a key/value
    channel to the first query head that reads it).
    """
    group = tp.dependency.Group()
    width = out_width(spec.root)
    root_idxs = list(range(width))

    def add(layer: nn.Module, out: bool, idxs: list[int], roots: list[int]) -> None:
        pruner = layers.pruner(layer)
        fn = pruner.prune_out_channels if out else pruner.prune_in_channels
        node = graph.module2node.get(layer)
        if node is None:  # called functionally (BEiT's `F.linear(x, qkv.weight, bias)`): a node of its own
            node = tp.dependency.Node(layer, None, tpc.module_names(graph).get(layer, type(layer).__name__))
        group.add_dep(tp.dependency.Dependency(fn, fn, node, node), idxs)
        group[len(group) - 1].root_idxs = roots

    add(spec.root, True, root_idxs, root_idxs)
    if spec.qkv is None:
        kv_roots = [_kv_to_q(spec, c) for c in range(spec.num_kv_heads * spec.head_dim)]
        add(spec.k, True, list(range(len(kv_roots))), kv_roots)
        add(spec.v, True, list(range(len(kv_roots))), kv_roots)
    add(spec.o, False, list(range(spec.q_width)), layouts.q_rows(spec))  # a column to its head's query row
    tpc.set_graph(group, graph)
    return group


def _kv_to_q(spec: AttentionSpec, channel: int) -> int:
    head, offset = divmod(channel, spec.head_dim)
    return head * spec.group_size * spec.head_dim + offset


# ------------------------------------------------------------------ planning
def plan(
    spec: AttentionSpec, scores: torch.Tensor, keep_fraction: float, floor_fraction: float, mode: str
) -> list[int]:
    """Root output channels to remove so that about ``keep_fraction`` of the original q width stays.

    ``keep_fraction`` is relative to the current width; ``floor_fraction`` is the least the current width may
    shrink to (from ``max_layer_ratio``). Whole key/value groups (heads) or uniform head-dim offsets only.
    """
    q_scores = q_space(spec, scores)  # (heads, head_dim)
    if mode in ("head_dim", "both") and spec.rope:
        mode = "heads"
    if spec.locked is not None and mode in ("heads", "both"):
        if spec.rope:
            return []
        mode = "head_dim"
    units = spec.units
    keep_units, keep_dims = units, spec.head_dim
    if mode == "heads":
        keep_units = _clamp(round(units * keep_fraction), units, floor_fraction)
    elif mode == "head_dim":
        keep_dims = _clamp(round(spec.head_dim * keep_fraction), spec.head_dim, floor_fraction)
    else:  # both
        axis = math.sqrt(keep_fraction)  # heads rounded up, so that with few heads the head dims take the rest
        keep_units = _clamp(math.ceil(units * axis - 1e-9), units, math.sqrt(floor_fraction))
        keep_dims = _clamp(round(spec.q_width * keep_fraction / (keep_units * spec.unit_heads)), spec.head_dim,
                           math.sqrt(floor_fraction))
    drop_units = torch.argsort(spec.unit_scores(q_scores), stable=True)[: units - keep_units].tolist()
    kept_heads = [h for h in range(spec.num_heads) if spec.unit_of(h) not in drop_units]
    dim_scores = q_scores[kept_heads].mean(0)
    drop_dims = set(torch.argsort(dim_scores, stable=True)[: spec.head_dim - keep_dims].tolist())
    removed = [
        h * spec.head_dim + d
        for h in range(spec.num_heads)
        for d in range(spec.head_dim)
        if spec.unit_of(h) in drop_units or d in drop_dims
    ]
    if spec.qkv is None or not removed:
        return removed
    kv = sorted(_kv_removed(spec, removed))
    qw, kw = spec.q_width, spec.num_kv_heads * spec.head_dim
    return layouts.to_physical(spec, removed + [qw + c for c in kv] + [qw + kw + c for c in kv])


def _clamp(keep: int, current: int, floor_fraction: float) -> int:
    return int(min(current, max(keep, math.ceil(current * floor_fraction - 1e-9), 1)))


def q_space(spec: AttentionSpec, scores: torch.Tensor) -> torch.Tensor:
    """Scores as (heads, head_dim); a fused q|k|v layer adds k and v scores to every query head that reads them."""
    qw, kw, d = spec.q_width, spec.num_kv_heads * spec.head_dim, spec.head_dim
    scores = layouts.to_logical(spec, scores)
    q = scores[:qw].view(spec.num_heads, d)
    if spec.qkv is None:
        return q
    kv = (scores[qw : qw + kw] + scores[qw + kw : qw + 2 * kw]).view(spec.num_kv_heads, d)
    return q + kv.repeat_interleave(spec.group_size, dim=0)


# ------------------------------------------------------------------ cutting
def prune(spec: AttentionSpec, channels: Sequence[int]) -> None:
    """Remove root channels ``channels`` (whole heads and/or the same head-dim offsets) from every projection."""
    if spec.uncut is not None:
        raise AttentionError(layouts.ambiguous_message(spec))
    physical = sorted({int(c) for c in channels})
    try:
        channels = layouts.from_physical(spec, physical)
    except KeyError as err:
        raise AttentionError(f"the cut of {spec.root_name!r} names rows {physical} outside its width.") from err
    q_removed = sorted({int(c) for c in channels if int(c) < spec.q_width})
    heads, dims = _decode(spec, q_removed)
    if dims and spec.rope:
        raise AttentionError(f"{spec.name!r} uses rotary embeddings: its head dimension cannot be cut, only heads.")
    kv_removed = sorted(_kv_removed(spec, q_removed))
    if spec.qkv is not None:
        qw, kw = spec.q_width, spec.num_kv_heads * spec.head_dim
        expected = q_removed + [qw + c for c in kv_removed] + [qw + kw + c for c in kv_removed]
        if sorted({int(c) for c in channels}) != expected:
            raise AttentionError(f"the cut of {spec.root_name!r} removes different channels of q, k and v.")
        layers.pruner(spec.qkv).prune_out_channels(spec.qkv, layouts.to_physical(spec, expected))
    else:
        for layer, removed in ((spec.q, q_removed), (spec.k, kv_removed), (spec.v, kv_removed)):
            if removed:
                layers.pruner(layer).prune_out_channels(layer, removed)
    layers.pruner(spec.o).prune_in_channels(spec.o, q_removed)
    head_params.follow(spec, heads, dims, q_removed, kv_removed)
    layouts.follow(spec, [h for h in range(spec.num_heads) if h not in set(heads)], spec.head_dim - len(dims))
    kv_left = len({h // spec.group_size for h in range(spec.num_heads) if h not in set(heads)})
    sync(spec, spec.num_heads - len(heads), kv_left, spec.head_dim - len(dims))


def _decode(spec: AttentionSpec, q_removed: Sequence[int]) -> tuple[list[int], list[int]]:
    """Whole heads and uniform offsets of a cut; an ``AttentionError`` if it mixes heads or splits a KV group."""
    removed = set(q_removed)
    d = spec.head_dim
    heads = [h for h in range(spec.num_heads) if all(h * d + j in removed for j in range(d))]
    rest = removed - {h * d + j for h in heads for j in range(d)}
    dims = sorted({c % d for c in rest})
    kept = [h for h in range(spec.num_heads) if h not in heads]
    if rest != {h * d + j for h in kept for j in dims}:
        raise AttentionError(
            f"the cut of {spec.root_name!r} would mix attention heads: its channels are neither whole heads nor the "
            "same head-dim offsets in every head."
        )
    groups = {spec.unit_of(h) for h in heads}
    if len(heads) != len(groups) * spec.unit_heads:
        raise AttentionError(
            f"the cut of {spec.root_name!r} removes query heads {heads} that do not form whole key/value groups of "
            f"{spec.unit_heads} (or, sharded, leave its shards with unequal head counts)."
        )
    if heads and spec.locked is not None:
        raise AttentionError(f"the heads of {spec.name!r} cannot be removed: {spec.locked}.")
    return heads, dims


def _kv_removed(spec: AttentionSpec, q_removed: Sequence[int]) -> set[int]:
    """Key/value channels that go with removed query channels: whole KV heads, and head-dim offsets alike."""
    removed = set(q_removed)
    d, g = spec.head_dim, spec.group_size
    out = set()
    for kv_head in range(spec.num_kv_heads):
        for j in range(d):
            if all((kv_head * g + r) * d + j in removed for r in range(g)):
                out.add(kv_head * d + j)
    return out


_SYNCED = {
    "heads": _HEADS,
    "kv": _KV_HEADS,
    "head_dim": _HEAD_DIM,
    "width": ("all_head_size", "split_size", "inner_dim", "attn_dim", "dim_out"),  # dim_out: timm's Hiera
}


def sync(spec: AttentionSpec, heads: int, kv: int, head_dim: int) -> None:
    """Write the new head structure into the module's own attributes (the ones its forward reads)."""
    m = spec.module
    values = {"heads": heads, "kv": kv, "head_dim": head_dim, "width": heads * head_dim}
    old = {"heads": spec.num_heads, "kv": spec.num_kv_heads, "head_dim": spec.head_dim, "width": spec.q_width}
    for key, names in _SYNCED.items():
        for n in names:
            value = getattr(m, n, None)
            if isinstance(value, int) and not isinstance(value, bool) and value == old[key]:
                setattr(m, n, values[key])
    if hasattr(m, "num_key_value_groups"):
        m.num_key_value_groups = heads // kv
    # also on the module itself, so that finding it again does not read a shared config (Llama keeps none)
    m.num_heads, m.num_key_value_heads, m.head_dim = heads, kv, head_dim
    spec.num_heads, spec.num_kv_heads, spec.head_dim = heads, kv, head_dim
