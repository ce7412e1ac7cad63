"""Checks that a head cut removed exactly the heads it names, and that configs agree with the weights.

* ``without_heads``: the reference a head cut must reproduce. Removing a head from softmax attention removes its
  contribution to the output projection and nothing else (heads are computed independently, each with its own
  position bias or ALiBi slope), so the original model with the output projection's input columns of those heads
  zeroed computes what the cut model must compute, exactly up to float rounding. A wrong fused layout (rows of
  another head, or q rows of one head with k rows of another) or a wrong ALiBi slope shows up as a mismatch.
* ``config_mismatches``: Hugging Face config head fields that disagree with the weights' head counts.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_halfprune.core import attention as attn
from lightning_halfprune.core import attention_layouts as layouts


def removed_heads(spec: attn.AttentionSpec, channels: Sequence[int]) -> list[int]:
    """The query heads a cut of ``spec``'s root channels removes (an ``AttentionError`` if it mixes heads)."""
    logical = layouts.from_physical(spec, channels)
    heads, _ = attn._decode(spec, [c for c in logical if c < spec.q_width])
    return heads


def without_heads(model: nn.Module, cuts: Sequence[Any]) -> nn.Module:
    """A copy of ``model`` (uncut) whose output projections ignore the heads ``cuts`` remove.

    ``cuts``: :class:`~lightning_halfprune.core.plan.Cut` objects (layer name, channels) against ``model`` as it is.
    """
    reference = copy.deepcopy(model)
    specs = {s.root_name: s for s in attn.find_attention(reference)}
    with torch.no_grad():
        for cut in cuts:
            spec = specs.get(cut.layer)
            if spec is None:
                continue
            heads = removed_heads(spec, cut.channels)
            cols = [h * spec.head_dim + j for h in heads for j in range(spec.head_dim)]
            spec.o.weight[:, cols] = 0
    return reference


def config_mismatches(model: nn.Module) -> list[str]:
    """Head fields of every Hugging Face config in ``model`` that differ from its attention weights' head counts."""
    problems = []
    for owner in model.modules():
        config = getattr(owner, "config", None)
        if config is None or isinstance(config, nn.Module) or not hasattr(config, "to_dict"):
            continue
        specs = [s for s in attn.find_attention(owner) if getattr(s.module, "config", config) is config]
        for stack in ("encoder", "decoder", None):
            members = [s for s in specs if stack is None or stack in s.name.split(".")]
            names = (f"{stack}_attention_heads",) if stack else ("num_attention_heads", "n_head", "num_heads")
            counts = {s.num_heads for s in members}
            for n in names:
                value = getattr(config, n, None)
                if len(counts) == 1 and isinstance(value, int) and value not in counts:
                    problems.append(f"{type(config).__name__}.{n} = {value}, the weights have {counts.pop()} heads")
    return problems
