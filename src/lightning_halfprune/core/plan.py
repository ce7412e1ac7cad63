"""How many channels each coupled group keeps, and which: local or global ranking, floors, rounding, heads."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from lightning_halfprune._compat import torch_pruning as tpc
from lightning_halfprune.core import allocation, layers, log, mamba, mla, moe
from lightning_halfprune.core import attention as attn
from lightning_halfprune.core import attention_layouts as layouts
from lightning_halfprune.core.errors import SurgeryError
from lightning_halfprune.core.graph import ChannelGroup


@dataclass
class Cut:
    """Channels removed from one coupled group, named by its root layer, in that layer's output channels."""

    layer: str
    channels: list[int]

    def to_list(self) -> list:
        return [self.layer, list(self.channels)]


def _head_units(spec: attn.AttentionSpec, scores: torch.Tensor | None) -> torch.Tensor | None:
    """One score per key/value group (the heads that go together), from an attention group's root scores."""
    return None if scores is None else spec.unit_scores(attn.q_space(spec, scores))


def _score_or_magnitude(g: ChannelGroup, score: Callable[[Any], torch.Tensor | None]) -> torch.Tensor | None:
    """The scorer's scores; weight magnitude where it cannot read the group's layers (HF ``Conv1D``, peft adapters)."""
    scores = score(g.group)
    if scores is None or (hasattr(scores, "__len__") and len(scores) == 0):
        if any(layers.needs_fallback(item.dep.target.module) for item in g.group):
            return layers.magnitude(g.group, g.width)
    return scores


def _check_scores(g: ChannelGroup, scores: torch.Tensor | None) -> torch.Tensor | None:
    if scores is None:
        return None
    if not torch.is_tensor(scores):
        raise SurgeryError(
            f"the scorer returned {type(scores).__name__} for layer {g.name!r}; it must return a tensor."
        )
    scores = scores.detach().float().flatten().cpu()
    if scores.numel() != g.width:
        raise SurgeryError(
            f"the scorer returned {scores.numel()} scores for layer {g.name!r}, which has {g.width} channels; "
            "nothing was pruned."
        )
    if not torch.isfinite(scores).all():
        broken = _non_finite_weights(g)
        if broken:
            raise SurgeryError(
                f"the weights of layer {broken!r} hold NaN or inf (has training diverged?), so its channels cannot be "
                "ranked; nothing was pruned."
            )
        raise SurgeryError(f"the scorer returned NaN or inf scores for layer {g.name!r}; nothing was pruned.")
    return scores


def _non_finite_weights(g: ChannelGroup) -> str | None:
    """The name of a layer of the group whose parameters hold NaN or inf, if any."""
    graph = tpc.graph_of(g.group)
    for item in g.group:
        module = item.dep.target.module
        if isinstance(module, nn.Module) and any(not torch.isfinite(p).all() for p in module.parameters(False)):
            return tpc.module_names(graph).get(module, type(module).__name__) if graph else type(module).__name__
    return None


def _per_slot(g: ChannelGroup, scores: torch.Tensor | None) -> torch.Tensor | None:
    if scores is None or g.slots == 1:
        return scores
    return scores.view(g.slots, -1).mean(0)


def _unscored_message(score: Any, names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (
        f"HalfPrune's scorer ({type(score).__name__}) gives no scores for {len(names)} coupled group(s), so they are "
        f"not cut: {shown}. A scorer that reads only some layers (bn_scale: groups with a BatchNorm) leaves the others "
        "alone; `scorer='l2'` scores every group."
    )


def _partial_tie_message(members: list, size: int) -> str:
    names = [g.attention.name for g, _ in members]
    return (
        f"HalfPrune cuts head dims, not whole heads, of {names}: they add one per-head position bias shared by "
        f"{size} attention modules, and {size - len(members)} of those are left out (ignored) or now differ, so "
        "no head may go."
    )


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)



@dataclass
class Planner:
    """Turns a cumulative ratio and scores into cuts, relative to the widths the groups had when pruning started."""

    original_widths: dict[str, int]
    round_to: int | None = None
    max_layer_ratio: float = 0.9
    global_pruning: bool = False
    attention: attn.AttentionMode = "heads"
    moe_mode: moe.MoEMode = "width"

    def plan(
        self, groups: Sequence[ChannelGroup], ratio: float, score: Callable[[Any], torch.Tensor | None]
    ) -> list[Cut]:
        """Which channels to remove to reach cumulative ``ratio``; raises before anything is cut if scores are bad."""
        if self.attention == "heads_last":
            return self.allocations(groups, ratio, score)[0]
        scored, heads, unscored = [], [], []
        cuts = []
        for g in groups:
            if g.name not in self.original_widths:
                continue
            if isinstance(g.group, moe.ExpertGroup):  # expert widths or whole experts, always to the ratio
                args = (self.original_widths, ratio, self.max_layer_ratio, self.round_to, self.moe_mode)
                cuts.extend(Cut(*cut) for cut in moe.plan_cuts(g, *args))
                continue
            if isinstance(g.group, mamba.MixerGroup):  # a Mamba mixer's inner width, always to the ratio
                keep = self._kept_heads(g, ratio) if mamba.in_heads(g.group.mixer.module) else self._kept(g, ratio)
                cuts.extend(Cut(*cut) for cut in mamba.plan_cuts(g, keep))
                continue
            if isinstance(g.group, mla.Latent):  # multi-head latent attention: whole heads, always to the ratio
                cuts.extend(Cut(*cut) for cut in mla.plan_cuts(g, self._kept_heads(g, ratio)))
                continue
            scores = _check_scores(g, _score_or_magnitude(g, score))
            if scores is None:
                unscored.append(g.name)
            elif g.attention is not None:  # globally: ranked with everything else, a key/value group at a time
                heads.append((g, scores))
            else:
                scored.append((g, _per_slot(g, scores)))
        if unscored:
            log.warn(_unscored_message(score, unscored), stacklevel=3)
        if self.global_pruning:
            keep, head_keep = self._global_keep(scored, ratio, heads)
        else:
            keep, head_keep = self._local_keep(scored, ratio), {}
        cuts.extend(self._plan_heads(heads, ratio, head_keep))
        for g, scores in scored:
            n_slots_kept = keep[g.name] // g.slots
            drop = torch.argsort(scores, stable=True)[: g.slot_size - n_slots_kept].tolist()
            if drop:
                channels = sorted(j + s * g.slot_size for s in range(g.slots) for j in drop)
                cuts.append(Cut(g.name, channels))
        return cuts

    def allocations(
        self, groups: Sequence[ChannelGroup], ratio: float, score: Callable[[Any], torch.Tensor | None]
    ) -> list[list[Cut]]:
        """``attention="heads_last"``: the plans that keep the parameters of ``ratio``, fewest heads removed first."""
        known = [g for g in groups if g.name in self.original_widths]
        planner = replace(self, attention="heads")
        own = (moe.ExpertGroup, mamba.MixerGroup, mla.Latent)  # planned by their own rooms, always to the ratio
        experts = [g for g in known if isinstance(g.group, own)]
        channels = [g for g in known if g.attention is None and not isinstance(g.group, own)]
        heads = [g for g in known if g.attention is not None]
        options = allocation.splits(channels, heads, self.original_widths, ratio, self.max_layer_ratio, self._kept)
        return [
            planner.plan(channels, f, score) + planner.plan(heads, h, score) + planner.plan(experts, ratio, score)
            for f, h in options
        ]

    def _plan_heads(self, heads: list, ratio: float, head_keep: dict[str, float]) -> list[Cut]:
        """Every attention module's cut; the modules of a tie (one shared position bias) lose the same heads."""
        ties: dict[str, list] = {}
        for g, scores in heads:
            if g.attention.tie is not None and g.attention.locked is None:
                ties.setdefault(g.attention.tie, []).append((g, scores))
        cuts = []
        for g, scores in heads:
            members = ties.get(g.attention.tie, [])
            if not members:
                cuts.extend(self._plan_attention(g, ratio, scores, head_keep.get(g.name)))
            elif len(members) < g.attention.tie_size or not layouts.same_heads([m.attention for m, _ in members]):
                mode = "head_dim" if self.attention in ("heads", "both") else self.attention
                if g is members[0][0]:
                    log.warn(_partial_tie_message(members, g.attention.tie_size), stacklevel=3)
                cuts.extend(self._plan_attention(g, ratio, scores, head_keep.get(g.name), mode))
            elif g is members[0][0]:
                cuts.extend(self._plan_tie(members, ratio, head_keep))
        return cuts

    def _plan_tie(self, members: list, ratio: float, head_keep: dict[str, float]) -> list[Cut]:
        """The same heads of every module of a tie, ranked by their scores summed (each on its own scale)."""
        total = sum(scores / scores.abs().mean().clamp_min(1e-12) for _, scores in members)
        fractions = [head_keep[g.name] for g, _ in members if g.name in head_keep]
        keep = sum(fractions) / len(fractions) if fractions else None
        first = members[0][0]
        channels = [c for cut in self._plan_attention(first, ratio, total, keep) for c in cut.channels]
        return [Cut(g.name, list(channels)) for g, _ in members] if channels else []

    def _plan_attention(
        self, g: ChannelGroup, ratio: float, scores: torch.Tensor, keep_fraction: float | None = None,
        mode: str | None = None,
    ) -> list[Cut]:
        """Whole heads / uniform head dims of one attention module.

        As many as the ratio leaves of it, or ``keep_fraction`` of its current width (given by global pruning).
        """
        original = self.original_widths[g.name]
        if keep_fraction is None:
            keep_fraction = min(1.0, original * (1 - ratio) / g.width)
        floor_fraction = original * (1 - self.max_layer_ratio) / g.width
        channels = attn.plan(g.attention, scores, keep_fraction, floor_fraction, mode or self.attention)
        return [Cut(g.name, channels)] if channels else []

    def _floor(self, g: ChannelGroup) -> int:
        original = self.original_widths[g.name]
        floor = max(1, math.ceil(original * (1 - self.max_layer_ratio) - 1e-9))
        return _round_up(floor, g.slots)

    def _fit(self, g: ChannelGroup, keep: int) -> int:
        if self.round_to:
            keep = max(self.round_to, int(math.floor(keep / self.round_to + 0.5)) * self.round_to)
        keep = max(keep, self._floor(g))
        keep = _round_up(keep, g.slots)
        return min(keep, g.width)

    def _kept(self, g: ChannelGroup, ratio: float) -> int:
        """Channels group ``g`` keeps at cumulative ``ratio`` of its original width (rounding and floors)."""
        return self._fit(g, int(math.floor(self.original_widths[g.name] * (1 - ratio) + 0.5)))

    def _kept_heads(self, g: ChannelGroup, ratio: float) -> int:
        """Whole heads group ``g`` keeps at cumulative ``ratio``: floors, never ``round_to`` (a channel count)."""
        return min(g.width, max(int(math.floor(self.original_widths[g.name] * (1 - ratio) + 0.5)), self._floor(g)))

    def _local_keep(self, scored: list, ratio: float) -> dict[str, int]:
        return {g.name: self._kept(g, ratio) for g, _ in scored}

    def _global_keep(
        self, scored: list, ratio: float, heads: list | None = None
    ) -> tuple[dict[str, int], dict[str, float]]:
        """Channels kept per group when every channel competes with all others (scores normalised per group).

        Attention modules (``heads``) compete a key/value group at a time, with its mean score and its query width;
        they get back the fraction of their current width to keep.
        """
        heads = [(g, _head_units(g.attention, s)) for g, s in heads or []]
        q_original = {g.name: self.original_widths[g.name] * g.attention.q_width / g.width for g, _ in heads}
        total_original = sum(self.original_widths[g.name] for g, _ in scored) + sum(q_original.values())
        total_now = sum(g.width for g, _ in scored) + sum(g.attention.q_width for g, _ in heads)
        to_remove = total_now - int(math.floor(total_original * (1 - ratio) + 0.5))
        keep = {g.name: g.width for g, _ in scored}
        units = {g.name: g.attention.units for g, _ in heads}
        candidates = sorted(
            [
                (float(s) / (float(scores.mean()) + 1e-12), i, False)
                for i, (g, scores) in enumerate(scored)
                for s in scores
            ]
            + [
                (float(s) / (float(unit_scores.mean()) + 1e-12), i, True)
                for i, (g, unit_scores) in enumerate(heads)
                if unit_scores is not None
                for s in unit_scores
            ],
            key=lambda c: (c[0], c[2], c[1]),
        )
        for _, i, is_head in candidates:
            if to_remove <= 0:
                break
            if is_head:
                g = heads[i][0]
                size = g.attention.q_width // g.attention.units
                floor = max(1, math.ceil(q_original[g.name] / size * (1 - self.max_layer_ratio) - 1e-9))
                if units[g.name] - 1 >= floor:
                    units[g.name] -= 1
                    to_remove -= size
                continue
            g = scored[i][0]
            if keep[g.name] - g.slots >= self._floor(g):
                keep[g.name] -= g.slots
                to_remove -= g.slots
        kept = {g.name: self._fit(g, keep[g.name]) if self.round_to else keep[g.name] for g, _ in scored}
        return kept, {g.name: units[g.name] / g.attention.units for g, _ in heads}
