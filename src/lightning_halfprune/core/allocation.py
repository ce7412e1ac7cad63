"""``attention="heads_last"``: a ratio's parameters come from the MLPs (and other channel groups) first, heads last.

NVIDIA ModelOpt's guidance for width-pruning language models (Minitron) is to prune attention heads last. On the
LM benchmark (``benchmarks/lm.md``: a byte-level Qwen3, 4 query / 2 key-value heads, MLP 512) the loss of the
trained model right after a cut to the same 53% of its parameters was 2.56 bits per byte with all heads kept and
62.5% of the MLP neurons removed, against 3.02 with half of both removed.

With this mode a schedule value ``r`` keeps ``1 - r`` of the parameters that the cut groups (channel groups and
attention modules) held at fit start, the same number a uniform cut of every group at ``r`` keeps. Each way to
get there is a number of whole head units removed (uniformly, least important first) and the channel groups cut
uniformly to the least fraction ``f <= max_layer_ratio`` that makes up the rest. In a fit HalfPrune makes each
candidate on trial and keeps the one whose loss on the calibration batches is lowest (a few candidates: one per
key/value head); without batches (a dry run) it takes the first, the fewest heads removed. Groups of routed MoE
experts are outside the trade and follow ``r`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import nn

from lightning_halfprune.core.graph import ChannelGroup

STEPS = 40  # bisection steps over the fraction of channels cut (well below one channel of any real layer)


def channel_params(g: ChannelGroup) -> float:
    """Parameters one channel of a torch-pruning group holds, over all its coupled layers (each counted once)."""
    seen, total = set(), 0.0
    for dep, _ in g.group:
        module, handler = dep.target.module, getattr(dep.handler, "__name__", "")
        side = 0 if "out_channels" in handler else 1 if "in_channels" in handler else None
        if side is None or (id(module), side) in seen:
            continue
        seen.add((id(module), side))
        for p in module.parameters(recurse=False):
            if p.dim() > side and p.shape[side] > 0:
                total += p.numel() / p.shape[side]
    return total


def unit_params(g: ChannelGroup) -> float:
    """Parameters one head unit (a key/value group, or a head) of an attention module holds: q/k/v rows, o columns."""
    spec = g.attention
    layers: list[nn.Module] = [*spec.inputs, spec.o]
    total = sum(p.numel() for layer in layers for name, p in layer.named_parameters(recurse=False)
                if not (layer is spec.o and name == "bias"))
    return total / max(1, spec.units)


def splits(
    channels: Sequence[ChannelGroup],
    heads: Sequence[ChannelGroup],
    original_widths: dict[str, int],
    ratio: float,
    max_layer_ratio: float,
    keep: Callable[[ChannelGroup, float], int],
) -> list[tuple[float, float]]:
    """Every ``(f, h)`` that keeps the parameters of ``ratio``: the cumulative ratios of channel groups and heads.

    One per number of head units removed (``h`` rising from what is cut already), each with the least ``f`` that
    reaches the goal (none where ``f`` would pass ``max_layer_ratio``); the first one is "heads last". ``keep(g,
    f)``: the channels group ``g`` keeps at ratio ``f`` (the planner's own rounding and floors). ``channels``: the
    channel groups (routed experts excluded), ``heads``: the attention modules.
    """
    if not channels or not heads:
        return [(ratio, ratio)]
    per_channel = {g.name: channel_params(g) for g in channels}
    per_unit = {g.name: unit_params(g) for g in heads}
    units_original = {g.name: g.attention.units * original_widths[g.name] / g.width for g in heads}
    original = sum(per_channel[g.name] * original_widths[g.name] for g in channels)
    original += sum(per_unit[g.name] * units_original[g.name] for g in heads)
    goal = original * (1 - ratio)

    def channels_kept(f: float) -> float:
        return sum(per_channel[g.name] * keep(g, f) for g in channels)

    def heads_kept(h: float) -> float:
        units = {g.name: min(g.attention.units, max(1, round(units_original[g.name] * (1 - h)))) for g in heads}
        return sum(per_unit[name] * n for name, n in units.items())

    most = max(units_original.values())
    least_channels = channels_kept(max_layer_ratio)
    found: list[tuple[float, float]] = []
    last_heads = None
    for removed in range(int(round(most))):
        h = removed / most
        with_heads = heads_kept(h)
        if h > max_layer_ratio or with_heads == last_heads:
            continue
        if least_channels + with_heads > goal:
            continue  # the channel groups cannot give the rest
        lo, hi = 0.0, max_layer_ratio
        for _ in range(STEPS):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if channels_kept(mid) + with_heads > goal else (lo, mid)
        found.append((math.ceil(hi * 1e9) / 1e9, h))
        last_heads = with_heads
    return found or [(ratio, ratio)]
