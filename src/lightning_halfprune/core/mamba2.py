"""Mamba-2 mixers (Hugging Face ``Mamba2Mixer`` and any module shaped like it): whole SSM heads are cut.

A Mamba-2 mixer of ``H`` heads of ``P`` channels (inner width ``I = H * P``), ``G`` groups and state size ``N``
projects the residual stream with ``in_proj`` into ``[gate (I) | x (I) | B (G*N) | C (G*N) | dt (H)]``; the
depthwise ``conv1d`` runs over ``x | B | C``; ``dt_bias``, ``A_log`` and ``D`` hold one entry per head; the gated
RMS norm (``norm``, one weight per inner channel, normalising groups of ``I / G``) and ``out_proj`` (``I -> hidden``)
close it. Head ``h`` reads the ``B``/``C`` of its group ``h // (H / G)``, so heads go the same number per group,
which keeps every group's heads together and ``B``/``C`` untouched. This is the head pruning NVIDIA's Minitron
applies to Mamba layers (``mamba_num_heads``); the head dim and the state size are left alone.

torch-pruning's graph cannot follow a mixer (the five-way split of ``in_proj``, tensors read inside the scan), so a
mixer is one group of its own (``mamba.py``), named by the mixer and cut in heads. Heads are ranked by the L2 norm
of the weights that read and write the residual stream: their gate and ``x`` rows and their ``dt`` row of
``in_proj``, and their ``out_proj`` columns. The norm's statistics are over the channels that remain, as after any
cut of a normalised width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from lightning_halfprune.core.errors import SurgeryError
from lightning_halfprune.core.graph import removable

LAYERS = ("in_proj", "conv1d", "norm", "out_proj")


def heads(module: nn.Module) -> int | None:
    """The number of SSM heads of a Mamba-2 mixer, None for any other module."""
    geometry = _geometry(module)
    return None if geometry is None else geometry[0]


def _geometry(module: nn.Module) -> tuple[int, int, int, int] | None:
    """(heads, head dim, groups, state size) of a Mamba-2 mixer whose tensors agree with them, else None."""
    ints = [getattr(module, n, None) for n in ("num_heads", "head_dim", "n_groups", "ssm_state_size")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in ints):
        return None
    h, p, g, n = ints
    tensors = [module._parameters.get(name) for name in ("A_log", "D", "dt_bias")]
    children = [module._modules.get(name) for name in LAYERS]
    if any(t is None or t.shape != (h,) for t in tensors) or h % g:
        return None
    in_proj, conv, norm, out_proj = children
    if type(in_proj) is not nn.Linear or type(conv) is not nn.Conv1d or type(out_proj) is not nn.Linear:
        return None
    inner, conv_dim = h * p, h * p + 2 * g * n
    weight = getattr(norm, "weight", None)
    if (
        in_proj.out_features != inner + conv_dim + h
        or not conv.in_channels == conv.out_channels == conv.groups == conv_dim
        or out_proj.in_features != inner
        or not isinstance(weight, torch.Tensor)
        or weight.shape != (inner,)
    ):
        return None
    return h, p, g, n


def magnitudes(module: nn.Module) -> torch.Tensor:
    """One score per head: the L2 norm of its gate, ``x`` and ``dt`` rows of ``in_proj`` and ``out_proj`` columns."""
    h, p, _, _ = _geometry(module)
    inner = h * p
    with torch.no_grad():
        rows = module.in_proj.weight.detach().float().pow(2).sum(1)
        cols = module.out_proj.weight.detach().float().pow(2).sum(0)
        dt = rows[-h:]
        per_channel = rows[:inner] + rows[inner : 2 * inner] + cols
        return (per_channel.view(h, p).sum(1) + dt).sqrt().cpu()


def plan(module: nn.Module, keep: int) -> list[int]:
    """The heads to remove so that ``keep`` stay (rounded up to a multiple of the groups), the same per group."""
    h, _, g, _ = _geometry(module)
    per_group = h // g
    keep_per_group = min(per_group, max(1, -(-keep // g)))
    scores = magnitudes(module).view(g, per_group)
    drop = torch.argsort(scores, dim=1, stable=True)[:, : per_group - keep_per_group]
    return sorted(int(i + grp * per_group) for grp in range(g) for i in drop[grp])


def prune(module: nn.Module, removed: Sequence[int], name: str, replace: Callable) -> None:
    """Remove heads ``removed`` from every tensor of the mixer that holds them; ``replace`` slices and records."""
    h, p, g, n = _geometry(module)
    drop = {int(c) for c in removed}
    per_group = h // g
    counts = {sum(1 for c in drop if c // per_group == grp) for grp in range(g)}
    if not removable(removed, h) or len(counts) > 1:
        raise SurgeryError(
            f"cannot remove heads {list(removed)[:8]} from the Mamba-2 mixer {name!r} ({h} heads in {g} group(s)): "
            "heads go the same number per group, at least one stays."
        )
    kept_heads = torch.tensor([c for c in range(h) if c not in drop], dtype=torch.long)
    channels = (kept_heads[:, None] * p + torch.arange(p)).flatten()  # the kept heads' inner channels
    inner, bc = h * p, 2 * g * n
    conv_keep = torch.cat([channels, inner + torch.arange(bc)])  # x channels, then all of B and C
    rows = torch.cat([channels, inner + conv_keep, 2 * inner + bc + kept_heads])  # gate | x B C | dt
    m = module._modules
    for pname in ("weight", "bias"):
        replace(m["in_proj"], pname, 0, rows)
        replace(m["conv1d"], pname, 0, conv_keep)
    replace(m["out_proj"], "weight", 1, channels)
    replace(m["norm"], "weight", 0, channels)
    for pname in ("A_log", "D", "dt_bias"):
        replace(module, pname, 0, kept_heads)
    new_inner = len(channels)
    m["in_proj"].out_features = len(rows)
    m["conv1d"].in_channels = m["conv1d"].out_channels = m["conv1d"].groups = len(conv_keep)
    m["out_proj"].in_features = new_inner
    if hasattr(m["norm"], "group_size"):
        m["norm"].group_size = new_inner // g
    module.num_heads, module.intermediate_size, module.conv_dim = len(kept_heads), new_inner, len(conv_keep)


_FIELDS = (("mamba_n_heads", "mamba_d_head", "mamba_expand"), ("num_heads", "head_dim", "expand"))  # hybrids first


def sync_config(config: object, mixers: Sequence[nn.Module]) -> str | None:
    """The head count (and ``expand``, which sets the inner width) into a config; why not, if it cannot say them.

    Mamba-2 configs name them ``num_heads``/``head_dim``/``expand``; hybrids with attention (Bamba, Granite-4)
    ``mamba_n_heads``/``mamba_d_head``/``mamba_expand``, their ``num_heads`` being the attention's.
    """
    counts = sorted({heads(m) for m in mixers})
    if len(counts) != 1:
        return f"the Mamba-2 mixers ended with different head counts ({counts}): the config cannot say them"
    count = counts[0]
    names = next((f for f in _FIELDS if isinstance(getattr(config, f[0], None), int)), None)
    if names is None:
        return None
    heads_field, dim_field, expand_field = names
    setattr(config, heads_field, count)
    hidden, head_dim = getattr(config, "hidden_size", None), getattr(config, dim_field, None)
    expand = getattr(config, expand_field, None)
    if isinstance(expand, (int, float)) and isinstance(hidden, int) and isinstance(head_dim, int):
        inner = count * head_dim  # the config computes it as int(expand * hidden_size)
        if inner % hidden == 0:
            setattr(config, expand_field, type(expand)(inner // hidden))
        elif isinstance(expand, float):
            exact = int(inner / hidden * hidden) == inner
            setattr(config, expand_field, inner / hidden if exact else (inner + 0.5) / hidden)
        else:
            return (
                f"the Mamba-2 mixers' inner width is now {inner}, which the config's integer `{expand_field}` (x "
                f"hidden size {hidden}) cannot say; `{heads_field}` is {count}"
            )
    return None
