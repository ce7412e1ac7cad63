"""Mixture-of-experts blocks: find the experts, rank and cut each expert's MLP width, keep configs in sync.

torch-pruning cannot see inside an experts block: the routing is data-dependent (an expert that got no token of
the example input is not traced at all), and Hugging Face 5.x stores the experts fused in 3-D parameters
(``gate_up_proj`` ``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``) that its graph does not know. Here an experts block
is recognised by its structure and cut as one group of its own, named by the experts module:

* **fused** (Mixtral, Qwen2-MoE, Qwen3-MoE, and any module with 3-D ``gate_up_proj``/``up_proj`` and ``down_proj``):
  every expert keeps the same number of intermediate channels (one tensor holds them all), each expert its own
  most important ones; the layout (concatenated or interleaved gate|up, transposed, biases) is read from the
  attributes transformers' ``use_experts_implementation`` sets.
* **a list of per-expert MLPs** (an ``experts`` ``ModuleList``/``ModuleDict`` of blocks with up/gate and down
  ``Linear`` layers: Switch/GShard-style, older Mixtral): each expert keeps its share of its own width.

A cut is recorded like any other, ``Cut(experts_module_name, channels)`` with channel ``offset_e + j`` for channel
``j`` of expert ``e`` (``offset_e``: the widths of the experts before it), so checkpoints replay it through the same
path. The router (hidden -> E) and the residual stream are untouched; shared experts (plain MLPs) are cut by the
ordinary graph path. Channels are ranked by the L2 norm of their weights (gate and up rows, down column): the
configured scorer reads torch-pruning groups, which experts do not have.

The Surgeon's ``moe_mode`` chooses what goes: ``"width"`` (the above), ``"experts"`` (whole experts of fused blocks
with their router rows, ``moe_experts.py``), ``"both"`` (each by the square root of the kept fraction), ``"none"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lightning_halfprune.core import layers, log
from lightning_halfprune.core import moe_experts as whole
from lightning_halfprune.core.errors import SurgeryError
from lightning_halfprune.core.graph import ChannelGroup

MoEMode = Literal["width", "experts", "both", "none"]
MOE_MODES = ("width", "experts", "both", "none")

_UP = ("gate_proj", "up_proj", "w1", "w3", "wi", "wi_0", "wi_1", "fc1", "c_fc")  # per-expert layers widening to I
_DOWN = ("down_proj", "w2", "wo", "fc2", "c_proj")  # the per-expert layer reading I
_FUSED_UP = (("gate_up_proj", 2), ("gate_proj", 1), ("up_proj", 1))  # 3-D parameter, chunks of I it holds
_WIDTH_ATTRS = ("intermediate_dim", "intermediate_size", "moe_intermediate_size", "expert_dim")
_SHARED = (".shared_expert", ".shared_experts")
_WARNED: set[int] = set()  # configs already told their experts' widths differ
_WARNED_MODE: set[tuple[int, str]] = set()  # (model, experts) already told whole experts cannot go


@dataclass(eq=False)
class Experts:
    """One experts block: its module, its name, and how its intermediate channels are laid out."""

    name: str
    module: nn.Module
    mlps: list[tuple[list[nn.Module], nn.Module]] | None = None  # list layout: (up-like layers, down layer) each

    @property
    def fused(self) -> bool:
        return self.mlps is None

    @property
    def num_experts(self) -> int:
        return self.module.down_proj.shape[0] if self.fused else len(self.mlps)

    @property
    def widths(self) -> list[int]:
        """Each expert's intermediate width now."""
        if self.fused:
            return [_fused_width(self.module)] * self.num_experts
        return [layers.in_width(down) for _, down in self.mlps]

    @property
    def layers(self) -> list[nn.Module]:
        """The per-expert linear layers (list layout): never roots of torch-pruning's own groups."""
        return [m for ups, down in self.mlps or [] for m in (*ups, down)]


class ExpertGroup:
    """Stands in a ``ChannelGroup`` for torch-pruning's group: it has no graph items, and is hashed by identity.

    The group of an experts block's widths; ``router_name``: its router, if whole experts can be removed.
    """

    def __init__(self, experts: Experts, router_name: str | None = None) -> None:
        self.experts, self.router_name = experts, router_name

    def __iter__(self):
        return iter(())


class RouterGroup(ExpertGroup):
    """The group of a fused block's whole experts, named by its router; ``mass()``: routing mass per router."""

    def __init__(self, experts: Experts, router_name: str, router: nn.Module, mass: Any) -> None:
        super().__init__(experts, router_name)
        self.router, self.mass = router, mass


def not_roots(model: nn.Module, experts: Sequence[Experts]) -> list[nn.Module]:
    """Layers torch-pruning's own groups must not start from: the experts' own layers and their routers.

    A router's outputs are expert scores: a plain cut of them would silently disconnect experts.
    """
    routers = [whole.router_of(model, e.name, e.num_experts) for e in experts]
    return [m for e in experts for m in e.layers] + [r[1] for r in routers if r is not None]


def check_mode(moe: Any) -> None:
    if moe not in MOE_MODES:
        raise ValueError(f"`moe` must be one of {MOE_MODES}, got {moe!r}.")


def channel_groups(
    model: nn.Module, experts: Sequence[Experts], ignored: Sequence[nn.Module], mode: MoEMode, run: Any
) -> list[ChannelGroup]:
    """The groups of ``experts`` that ``mode`` cuts.

    Widths with ``"width"``/``"both"``; whole experts with ``"experts"``/``"both"`` (fused blocks with a router).
    ``run()`` runs the example input, to rank experts by routing mass.
    """
    found, routers = [], []
    for e in experts:
        if e.module in ignored or mode == "none":
            continue
        router = whole.router_of(model, e.name, e.num_experts) if e.fused else None
        router = router if router is not None and router[1] not in ignored else None
        if mode in ("experts", "both") and router is not None:
            routers.append((e, *router))
        elif mode != "width" and (id(model), e.name) not in _WARNED_MODE:
            _WARNED_MODE.add((id(model), e.name))
            log.warn(f"`moe={mode!r}`: {e.name!r} has no router HalfPrune can follow, or is a list of expert "
                     "modules: whole experts cannot be removed from it, its experts' widths are cut instead.",
                     stacklevel=4)
        if mode == "width" or router is None:
            found.append(ChannelGroup(e.name, ExpertGroup(e), sum(e.widths)))
        elif mode == "both":
            found.append(ChannelGroup(e.name, ExpertGroup(e, router[0]), sum(e.widths)))
    mass = _MassCache([r for _, _, r in routers], run)
    found += [ChannelGroup(n, RouterGroup(e, n, r, mass), e.num_experts) for e, n, r in routers]
    return found


class _MassCache:
    """Routing mass of every router, measured in one forward, again only once a router's weight has changed."""

    def __init__(self, routers: list[nn.Module], run: Any) -> None:
        self.routers, self.run, self.key, self.value = routers, run, None, {}

    def __call__(self, router: nn.Module) -> torch.Tensor | None:
        key = tuple((id(r.weight), r.weight._version) for r in self.routers)
        if key != self.key:
            self.value, self.key = whole.routing_mass(self.run, self.routers), key
        return self.value.get(router)


# ------------------------------------------------------------------ finding
def _is_transposed(module: nn.Module) -> bool:
    return bool(getattr(module, "is_transposed", False))


def _fused_width(module: nn.Module) -> int:
    return module.down_proj.shape[1 if _is_transposed(module) else 2]


def _fused_ups(module: nn.Module) -> list[tuple[str, int]]:
    """The 3-D up-like parameters of a fused experts module, with how many chunks of ``I`` each holds."""
    gated = bool(getattr(module, "has_gate", True))
    ups = []
    for pname, chunks in _FUSED_UP:
        p = module._parameters.get(pname)
        if isinstance(p, torch.Tensor) and p.dim() == 3:
            ups.append((pname, chunks if gated else 1))
    return ups


def _fused(module: nn.Module) -> bool:
    down = module._parameters.get("down_proj")
    if not isinstance(down, torch.Tensor) or down.dim() != 3:
        return False
    ups = _fused_ups(module)
    t = _is_transposed(module)
    width, hidden = (down.shape[1], down.shape[2]) if t else (down.shape[2], down.shape[1])
    for pname, chunks in ups:
        p = module._parameters[pname]
        rows, cols = (p.shape[2], p.shape[1]) if t else (p.shape[1], p.shape[2])
        if p.shape[0] != down.shape[0] or rows != chunks * width or cols != hidden:
            return False
    return bool(ups)


def _mlp(expert: nn.Module) -> tuple[list[nn.Module], nn.Module] | None:
    children = expert._modules
    ups = [children[n] for n in _UP if children.get(n) is not None and layers.out_width(children[n])]
    downs = [children[n] for n in _DOWN if children.get(n) is not None and layers.in_width(children[n])]
    if not ups or len(downs) != 1 or any(layers.out_width(u) != layers.in_width(downs[0]) for u in ups):
        return None
    return ups, downs[0]


def find_experts(model: nn.Module) -> list[Experts]:
    """Every experts block of ``model`` HalfPrune can cut: fused 3-D experts and lists of expert MLPs."""
    found = []
    for name, module in model.named_modules():
        if _fused(module):
            found.append(Experts(name, module))
        elif isinstance(module, (nn.ModuleList, nn.ModuleDict)) and name.rsplit(".", 1)[-1].endswith("experts"):
            experts = list(module.values() if isinstance(module, nn.ModuleDict) else module)
            mlps = [_mlp(e) for e in experts]
            if len(mlps) >= 2 and all(m is not None for m in mlps):
                found.append(Experts(name, module, mlps))
    return found


def is_experts(module: nn.Module) -> bool:
    """True for a module ``find_experts`` would return (the name a cut of it is recorded under)."""
    if _fused(module):
        return True
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        experts = list(module.values() if isinstance(module, nn.ModuleDict) else module)
        return len(experts) >= 2 and all(_mlp(e) is not None for e in experts)
    return False


def _describe(module: nn.Module, name: str) -> Experts:
    if _fused(module):
        return Experts(name, module)
    experts = list(module.values() if isinstance(module, nn.ModuleDict) else module)
    return Experts(name, module, [_mlp(e) for e in experts])


def width(module: nn.Module) -> int | None:
    """The total intermediate width of an experts module (the sum over experts), None for any other module."""
    return sum(_describe(module, "").widths) if is_experts(module) else whole.router_width(module)


# ------------------------------------------------------------------ scoring and planning
def magnitudes(experts: Experts) -> list[torch.Tensor]:
    """Per expert, the L2 norm of each intermediate channel's weights (its gate/up rows and its down column)."""
    with torch.no_grad():
        if not experts.fused:
            return [_list_magnitude(ups, down) for ups, down in experts.mlps]
        m, t = experts.module, _is_transposed(experts.module)
        total = torch.zeros(experts.num_experts, _fused_width(m))
        every = torch.arange(total.shape[1]).repeat(total.shape[0], 1)
        for pname, chunks in _chunk_rows(m, every).items():
            p = getattr(m, pname).detach().float()
            sq = p.pow(2).sum(1 if t else 2).cpu()  # [E, rows]: one norm per output row
            total += sum(torch.gather(sq, 1, rows) for rows in chunks)
        down = m.down_proj.detach().float()
        total += (down.pow(2).sum(2) if t else down.pow(2).sum(1)).cpu()
        return list(total.sqrt())


def _list_magnitude(ups: Sequence[nn.Module], down: nn.Module) -> torch.Tensor:
    total = sum(layers.weight_matrix(u).float().pow(2).sum(1) for u in ups)
    return (total + layers.weight_matrix(down).float().pow(2).sum(0)).sqrt().cpu()


def plan_cuts(
    g: ChannelGroup, original_widths: dict[str, int], ratio: float, max_layer_ratio: float, round_to: int | None,
    mode: MoEMode,
) -> list[tuple[str, list[int]]]:
    """(layer, channels) to cut from one experts group at cumulative ``ratio`` (``"both"``: each by its square root).

    Whole experts: ``1 - ratio`` of the block's original experts stay (at least ``top_k``, and the floor of
    ``max_layer_ratio``), the least routed go. Widths: see ``plan``.
    """
    group = g.group
    part = 1 - math.sqrt(1 - ratio) if mode == "both" and group.router_name else ratio
    original = original_widths[g.name]
    if isinstance(group, RouterGroup):
        keep = max(int(math.floor(original * (1 - part) + 0.5)), math.ceil(original * (1 - max_layer_ratio) - 1e-9))
        drop = whole.plan(group.router, group.mass(group.router), keep)
        return [(g.name, drop)] if drop else []
    experts = group.experts
    if experts.fused:  # the original per-expert width (whole experts may have gone since)
        starts = [original / original_widths.get(group.router_name or "", experts.num_experts)] * experts.num_experts
    else:  # cuts keep the proportions between experts
        starts = [original * w / sum(experts.widths) for w in experts.widths]
    channels = plan(experts, starts, part, max_layer_ratio, round_to)
    return [(g.name, channels)] if channels else []


def plan(
    experts: Experts, starts: Sequence[float], ratio: float, max_layer_ratio: float, round_to: int | None
) -> list[int]:
    """The channels (``offset_e + j``) to remove so each expert keeps ``1 - ratio`` of its original width.

    ``starts``: each expert's width when pruning started. Floors (``max_layer_ratio``) and ``round_to`` apply per
    expert; fused experts all keep the same number of channels.
    """
    now = experts.widths
    channels, offset = [], 0
    align = _alignment(experts)
    for width_now, scores, start in zip(now, magnitudes(experts), starts, strict=True):
        keep = int(math.floor(start * (1 - ratio) + 0.5))
        if round_to:
            keep = max(round_to, int(math.floor(keep / round_to + 0.5)) * round_to)
        floor = max(1, math.ceil(start * (1 - max_layer_ratio) - 1e-9))
        keep = max(keep, floor)
        if align > 1 and width_now % align == 0:
            keep = int(math.floor(keep / align + 0.5)) * align
            keep = keep if keep >= floor else math.ceil(floor / align) * align
        keep = min(width_now, keep)
        drop = torch.argsort(scores, stable=True)[: width_now - keep]
        channels.extend(sorted(offset + int(j) for j in drop))
        offset += width_now
    return channels


def _alignment(experts: Experts) -> int:
    """Widths a fused experts tensor must keep a multiple of.

    ``torch._grouped_mm`` (transformers' default ``grouped_mm`` experts implementation) needs rows of a multiple of
    16 bytes: 8 values, so that a model pruned in float32 still runs in bfloat16 (16 for 1-byte types).
    """
    if not experts.fused:
        return 1
    return max(8, 16 // experts.module.down_proj.element_size())


# ------------------------------------------------------------------ cutting
def _per_expert(experts: Experts, channels: Sequence[int], name: str) -> list[list[int]]:
    widths = experts.widths
    total = sum(widths)
    bad = [c for c in channels if not 0 <= int(c) < total]
    if bad or len(set(channels)) != len(channels):
        raise SurgeryError(f"cannot remove channels {list(channels)[:8]} from the experts {name!r} of width {total}.")
    drops: list[list[int]] = [[] for _ in widths]
    bounds = [sum(widths[:i]) for i in range(len(widths) + 1)]
    for c in sorted(int(c) for c in channels):
        e = next(i for i in range(len(widths)) if bounds[i] <= c < bounds[i + 1])
        drops[e].append(c - bounds[e])
    if any(len(d) >= w for d, w in zip(drops, widths, strict=True)):
        raise SurgeryError(f"removing these channels would leave an expert of {name!r} with no channel.")
    if experts.fused and len({len(d) for d in drops}) > 1:
        raise SurgeryError(
            f"the experts of {name!r} are stored in one tensor: every expert must lose the same number of channels, "
            f"got {[len(d) for d in drops]}."
        )
    return drops


def owns(model: nn.Module, name: str, module: nn.Module) -> bool:
    """True if a cut named ``name`` is one of this room's: an experts block, or the router of a fused one."""
    return is_experts(module) or _routed(model, name, module) is not None


def _routed(model: nn.Module, name: str, module: nn.Module) -> Experts | None:
    """The fused experts block that ``module`` (named ``name``) is the router of, if it is one."""
    parent_name, _, child = name.rpartition(".")
    if child not in whole._ROUTERS or whole.router_width(module) is None:
        return None
    parent = model.get_submodule(parent_name)
    return next(
        (Experts(f"{parent_name}.{n}", m) for n, m in parent._modules.items()
         if m is not None and _fused(m) and m.down_proj.shape[0] == whole.router_width(module)),
        None,
    )


def prune_cut(model: nn.Module, name: str, module: nn.Module, channels: Sequence[int]) -> None:
    """Cut ``channels`` of the layer ``name``: experts' widths, or (named by a router) whole experts."""
    routed = _routed(model, name, module)
    if routed is not None:
        whole.remove(model, name, channels, routed.module)
    else:
        prune(module, channels, name)


def prune(module: nn.Module, channels: Sequence[int], name: str) -> None:
    """Remove ``channels`` (``offset_e + j``) from the experts ``module``; every slice is recorded for the optimizer."""
    experts = _describe(module, name)
    drops = _per_expert(experts, channels, name)
    if not experts.fused:
        for (ups, down), drop in zip(experts.mlps, drops, strict=True):
            if drop:
                for up in ups:
                    layers.pruner(up).prune_out_channels(up, drop)
                layers.pruner(down).prune_in_channels(down, drop)
        return
    from lightning_halfprune.core.cut import slice_parameter  # cut.py dispatches here

    old = _fused_width(module)
    keep = torch.stack([torch.tensor(sorted(set(range(old)) - set(d)), dtype=torch.long) for d in drops])
    t = _is_transposed(module)
    for pname, rows in _up_rows(module, keep).items():
        slice_parameter(module, pname, 2 if t else 1, rows)
        if isinstance(module._parameters.get(pname + "_bias"), torch.Tensor):
            slice_parameter(module, pname + "_bias", 1, rows)
    slice_parameter(module, "down_proj", 1 if t else 2, keep)
    for attr in _WIDTH_ATTRS:
        if getattr(module, attr, None) == old:
            setattr(module, attr, keep.shape[1])


def _chunk_rows(module: nn.Module, keep: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Per up-like parameter, per chunk (gate, up), the rows holding intermediate channels ``keep`` (``[E, k]``)."""
    width = _fused_width(module)
    concatenated = getattr(module, "is_concatenated", True)  # [gate; up], else interleaved [g0, u0, g1, u1, ...]
    return {
        pname: [keep + i * width if concatenated else keep * chunks + i for i in range(chunks)]
        for pname, chunks in _fused_ups(module)
    }


def _up_rows(module: nn.Module, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows of each up-like parameter to keep, in the parameter's own order."""
    concatenated = getattr(module, "is_concatenated", True)
    return {
        pname: torch.cat(chunks, 1) if concatenated else torch.stack(chunks, 2).flatten(1)
        for pname, chunks in _chunk_rows(module, keep).items()
    }


# ------------------------------------------------------------------ configs
def sync_config(config: Any, owner: nn.Module) -> None:
    """The experts' and shared experts' widths into a Hugging Face config, where one number describes them all."""
    blocks = [e for e in find_experts(owner) if getattr(e.module, "config", config) is config]
    whole.sync_config(config, {e.num_experts for e in blocks if e.fused})
    widths = {w for e in blocks for w in e.widths}
    field = "moe_intermediate_size" if hasattr(config, "moe_intermediate_size") else "intermediate_size"
    if len(widths) == 1 and isinstance(getattr(config, field, None), int):
        setattr(config, field, widths.pop())
    elif len(widths) > 1 and isinstance(getattr(config, field, None), int) and id(config) not in _WARNED:
        _WARNED.add(id(config))  # once per config: every later cut would say the same
        log.warn(
            f"the experts ended with different widths ({sorted(widths)}): `config.{field}` cannot describe them and "
            "keeps its value; reload the pruned model with `load_pruned`, not `from_pretrained`.",
            stacklevel=4,
        )
    shared = {
        layers.out_width(m._modules[n])
        for name, m in owner.named_modules()
        if name.endswith(_SHARED) and (n := next((n for n in _UP if m._modules.get(n) is not None), None))
    }
    if len(shared) == 1 and isinstance(getattr(config, "shared_expert_intermediate_size", None), int):
        config.shared_expert_intermediate_size = shared.pop()
