"""Mamba mixers (Hugging Face ``MambaMixer`` and any module shaped like it): their inner width is cut.

Mamba-2 mixers are cut by whole heads instead (``mamba2.py``); this module finds both kinds and dispatches.

A selective state-space mixer of inner width ``I`` (``intermediate_size``, the SSM channels) holds channel ``c`` in
rows ``c`` and ``I + c`` of ``in_proj`` (the input ``x`` and the gate ``z``, split by ``chunk``), the depthwise
``conv1d``'s filter and bias ``c``, column ``c`` of ``x_proj`` (``I -> dt_rank + 2 * state``), row and bias ``c`` of
``dt_proj`` (``dt_rank -> I``), row ``c`` of ``A_log`` (``I x state``), entry ``c`` of ``D``, and column ``c`` of
``out_proj`` (``I -> hidden``). torch-pruning's graph cannot follow that: ``A_log`` and ``D`` are read as tensors
inside the scan, ``dt_proj`` and ``conv1d`` are used through their weights (never called), and the two halves of
``in_proj`` meet again only in the scan. So a mixer is cut here as one group of its own, named by the mixer module
(``Cut(mixer_name, channels)``, replayed from checkpoints through the same path), and every slice is recorded with
``cut.record_slice`` so optimizer state (Adam moments of ``A_log``, ``D``, ...) follows.

The hidden size (``in_proj``'s inputs, ``out_proj``'s outputs) is the residual stream: it stays, unless
``prune_hidden_size=True`` cuts it through torch-pruning's graph as for any model. ``dt_rank`` and the state size
are left alone. Channels are ranked by the L2 norm of the weights that read and write the residual stream (their
``x`` and ``z`` rows of ``in_proj``, their ``out_proj`` column), as experts are (``moe.py``): the configured scorer
reads torch-pruning groups, which a mixer is not. Each mixer keeps ``1 - ratio`` of its original width (rounding
and floors as for any group), also with ``global_pruning``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_halfprune.core import log, mamba2
from lightning_halfprune.core.errors import SurgeryError
from lightning_halfprune.core.graph import ChannelGroup, left_alone, removable

_LAYERS = ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj")
_WARNED: set[int] = set()  # configs already told their mixers' widths differ


def width(module: nn.Module) -> int | None:
    """What a cut of a Mamba mixer removes from: its inner width, or its heads (Mamba-2); None for other modules."""
    if not isinstance(module, nn.Module):
        return None
    return _inner(module) or mamba2.heads(module)


def in_heads(module: nn.Module) -> bool:
    """True for a Mamba-2 mixer, cut in whole heads."""
    return mamba2.heads(module) is not None


def _inner(module: nn.Module) -> int | None:
    """The inner width of a Mamba (1) mixer, None for any other module."""
    a_log, d = module._parameters.get("A_log"), module._parameters.get("D")
    children = [module._modules.get(n) for n in _LAYERS]
    if not isinstance(a_log, torch.Tensor) or not isinstance(d, torch.Tensor) or a_log.dim() != 2 or d.dim() != 1:
        return None
    if any(c is None for c in children) or type(children[1]) is not nn.Conv1d:
        return None
    if any(type(c) is not nn.Linear for n, c in zip(_LAYERS, children, strict=True) if n != "conv1d"):
        return None
    in_proj, conv, x_proj, dt_proj, out_proj = children
    inner = d.shape[0]
    if (
        a_log.shape[0] != inner
        or in_proj.out_features != 2 * inner
        or not conv.in_channels == conv.out_channels == conv.groups == inner
        or x_proj.in_features != inner
        or dt_proj.out_features != inner
        or x_proj.out_features <= dt_proj.in_features
        or out_proj.in_features != inner
    ):
        return None
    return inner


@dataclass(eq=False)
class Mixer:
    """One Mamba mixer and its name."""

    name: str
    module: nn.Module

    @property
    def width(self) -> int:
        return self.module.D.shape[0]  # one entry per inner channel (Mamba) or per head (Mamba-2)

    @property
    def layers(self) -> list[nn.Module]:
        """Its projections and convolution (and a Mamba-2 mixer's gated norm), ``out_proj`` last."""
        return [self.module._modules[n] for n in (mamba2.LAYERS if in_heads(self.module) else _LAYERS)]


class MixerGroup:
    """Stands in a ``ChannelGroup`` for torch-pruning's group: no graph items, hashed by identity."""

    def __init__(self, mixer: Mixer) -> None:
        self.mixer = mixer

    def __iter__(self):
        return iter(())


def find_mixers(model: nn.Module) -> list[Mixer]:
    """Every Mamba mixer of ``model`` HalfPrune can cut."""
    return [Mixer(name, m) for name, m in model.named_modules() if width(m)]


def not_roots(mixers: Sequence[Mixer]) -> list[nn.Module]:
    """The layers torch-pruning's own groups must not start from: all but ``out_proj`` (the hidden size's root)."""
    return [layer for m in mixers for layer in m.layers[:-1]]


def channel_groups(mixers: Sequence[Mixer], ignored: Sequence[nn.Module]) -> list[ChannelGroup]:
    """One group per mixer that neither it nor one of its layers is ignored."""
    return [ChannelGroup(m.name, MixerGroup(m), m.width) for m in mixers if not left_alone(m.module, m.layers, ignored)]


# ------------------------------------------------------------------ scoring and planning
def magnitudes(mixer: nn.Module) -> torch.Tensor:
    """The L2 norm of each inner channel's ``x`` and ``z`` rows of ``in_proj`` and its ``out_proj`` column."""
    with torch.no_grad():
        inner = mixer.D.shape[0]
        rows = mixer.in_proj.weight.detach().float().pow(2).sum(1)
        cols = mixer.out_proj.weight.detach().float().pow(2).sum(0)
        return (rows[:inner] + rows[inner:] + cols).sqrt().cpu()


def plan_cuts(g: ChannelGroup, keep: int) -> list[tuple[str, list[int]]]:
    """(mixer, channels or heads) to cut so the mixer keeps ``keep`` of them (the planner's rounding and floors)."""
    module = g.group.mixer.module
    if in_heads(module):
        drop = mamba2.plan(module, keep)
    else:
        drop = torch.argsort(magnitudes(module), stable=True)[: g.group.mixer.width - keep].tolist()
    return [(g.name, sorted(int(c) for c in drop))] if len(drop) else []


# ------------------------------------------------------------------ cutting
def owns(module: nn.Module) -> bool:
    """True if a cut of ``module`` is this room's: a Mamba mixer."""
    return width(module) is not None


def prune(module: nn.Module, channels: Sequence[int], name: str) -> None:
    """Remove inner ``channels`` (Mamba-2: heads) from the mixer in every tensor that holds them; slices recorded."""
    from lightning_halfprune.core.cut import slice_parameter as replace  # cut.py dispatches here

    if in_heads(module):
        mamba2.prune(module, channels, name, replace)
        return
    inner = width(module)
    drop = {int(c) for c in channels}
    if not removable(channels, inner):
        raise SurgeryError(
            f"cannot remove channels {list(channels)[:8]} from the Mamba mixer {name!r} of width {inner}."
        )
    keep = torch.tensor([c for c in range(inner) if c not in drop], dtype=torch.long)
    both = torch.cat([keep, keep + inner])  # x rows, then gate rows: ``chunk(2)`` splits them in the middle again
    m = module._modules
    replace(m["in_proj"], "weight", 0, both)
    replace(m["in_proj"], "bias", 0, both)
    m["in_proj"].out_features = len(both)
    for pname in ("weight", "bias"):
        replace(m["conv1d"], pname, 0, keep)
        replace(m["dt_proj"], pname, 0, keep)
    m["conv1d"].in_channels = m["conv1d"].out_channels = m["conv1d"].groups = len(keep)
    m["dt_proj"].out_features = len(keep)
    replace(m["x_proj"], "weight", 1, keep)
    m["x_proj"].in_features = len(keep)
    replace(m["out_proj"], "weight", 1, keep)
    m["out_proj"].in_features = len(keep)
    replace(module, "A_log", 0, keep)
    replace(module, "D", 0, keep)
    if getattr(module, "intermediate_size", None) == inner:  # read by some forwards (and the cache)
        module.intermediate_size = len(keep)


# ------------------------------------------------------------------ configs
def sync_config(config: Any, owner: nn.Module) -> None:
    """The mixers' inner width into a Hugging Face config (``intermediate_size``) where they all agree."""
    mixers = [m for m in find_mixers(owner) if getattr(m.module, "config", config) is config]
    second = [m.module for m in mixers if in_heads(m.module)]
    if second:
        _warn_once(config, mamba2.sync_config(config, second))
        return
    widths = {m.width for m in mixers}
    if not widths or not isinstance(getattr(config, "intermediate_size", None), int):
        return
    if len(widths) == 1:
        config.intermediate_size = widths.pop()
    else:
        _warn_once(config, f"the Mamba mixers ended with different inner widths ({sorted(widths)}): "
                           "`config.intermediate_size` cannot say them")


def _warn_once(config: Any, why: str | None) -> None:
    if why is not None and id(config) not in _WARNED:
        _WARNED.add(id(config))
        log.warn(
            f"{why}; the config keeps its value. Reload the pruned model with `load_pruned`, not `from_pretrained`.",
            stacklevel=5,
        )
