"""Hugging Face configs follow the cuts: head counts, MLP width and hidden size, where every layer agrees.

A pruned module's forward reads its own attributes (``attention.sync`` keeps those right); the config is what
``save_pretrained`` writes and ``from_pretrained`` builds from, so it must describe the pruned shapes too. A field whose
layers ended with different widths (global pruning) cannot be one number: it keeps its value, and the model is
reloaded with ``load_pruned`` instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

from torch import nn

from lightning_halfprune.core import attention as attn
from lightning_halfprune.core import head_check, head_config, layers, mamba, mla, moe

# the layer of an MLP block that widens to `intermediate_size` (Llama/Qwen, BERT/ViT, GPT-2, OPT/Phi, GPT-NeoX, ALBERT)
_MLP_UP = (".mlp.up_proj", ".mlp.gate_proj", ".intermediate.dense", ".mlp.c_fc", ".fc1", ".mlp.dense_h_to_4h", ".ffn")
_MLP_GATE_UP = (".mlp.gate_up_proj",)  # gate and up projection in one layer (Phi-3): twice `intermediate_size`


def sync(model: nn.Module) -> None:
    """Write the current widths of ``model`` into every Hugging Face config inside it."""
    for owner, config in _configs(model):
        specs = attn.find_attention(owner)  # a config of its own, or else the outer one over all (T5's stacks copy it)
        _sync_heads(config, [s for s in specs if getattr(s.module, "config", config) is config] or specs)
        _sync_mlp(config, owner)
        moe.sync_config(config, owner)
        mamba.sync_config(config, owner)
        mla.sync_config(config, owner)
        _sync_hidden(config, owner)
    for problem in head_check.config_mismatches(model):  # a field the sync could not write (a derived property)
        warnings.warn(f"HalfPrune could not make the config follow the heads cut: {problem}; reload the model with "
                      "`load_pruned`, not `from_pretrained`.", stacklevel=2)


def _configs(model: nn.Module) -> Iterable[tuple[nn.Module, Any]]:
    """(the outermost module holding it, config) for each distinct config object."""
    seen: set[int] = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or isinstance(config, nn.Module) or not hasattr(config, "to_dict") or id(config) in seen:
            continue
        seen.add(id(config))
        yield module, config


def _set_if_agreed(config: Any, names: tuple[str, ...], values: set[int]) -> None:
    if len(values) != 1:
        return
    value = values.pop()
    for n in names:
        if isinstance(getattr(config, n, None), int):
            setattr(config, n, value)


def _sync_heads(config: Any, specs: list[attn.AttentionSpec]) -> None:
    head_config.sync_heads(config, specs)  # per stack (Whisper), Falcon's num_kv_heads, T5's d_kv
    shapes = {(s.num_heads, s.num_kv_heads, s.head_dim) for s in specs}
    if len(shapes) != 1:
        return
    heads, kv, head_dim = shapes.pop()
    derived = getattr(config, "hidden_size", head_dim * heads) // heads
    if getattr(config, "head_dim", None) is None and head_dim != derived:
        config.head_dim = head_dim  # absent or None reads as hidden_size / heads (Mixtral, Qwen2-MoE): no longer true


def _sync_mlp(config: Any, owner: nn.Module) -> None:
    ups = [(name, m) for name, m in owner.named_modules() if name.endswith(_MLP_UP + _MLP_GATE_UP)]
    widths = {(w // 2 if name.endswith(_MLP_GATE_UP) else w) for name, m in ups if (w := layers.out_width(m))}
    if len(widths) != 1:
        return
    width = next(iter(widths))
    _set_if_agreed(config, ("intermediate_size", "ffn_dim", "n_inner"), {width})
    if getattr(config, "n_inner", 0) is None and width != 4 * getattr(config, "n_embd", 0):  # GPT-2: None = 4x
        config.n_inner = width


def _sync_hidden(config: Any, owner: nn.Module) -> None:
    embeddings = getattr(owner, "get_input_embeddings", None)
    try:
        layer = embeddings() if callable(embeddings) else None
    except (NotImplementedError, AttributeError):
        layer = None
    if isinstance(layer, nn.Embedding):  # factorized embeddings (ALBERT, ELECTRA) are narrower than the stream
        factorized = isinstance(getattr(config, "embedding_size", None), int)
        fields = ("embedding_size",) if factorized else ("hidden_size", "n_embd", "d_model")
        _set_if_agreed(config, fields, {layer.weight.shape[1]})
