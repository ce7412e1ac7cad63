"""Head counts of a Hugging Face config follow the attention cuts, per stack (encoder / decoder) where it has two.

Configs name their head fields in many ways: ``num_attention_heads`` (BERT, Llama, GPT-NeoX, ModernBERT), ``n_head``
(GPT-2, Bloom), ``num_heads`` (T5), ``num_key_value_heads`` / ``num_kv_heads`` (Llama / Falcon), per-stack
``encoder_attention_heads`` / ``decoder_attention_heads`` (Whisper, BART, Marian), and the head dim as ``head_dim``
or ``d_kv`` (T5). A field is written only where every attention module it describes agrees (after global pruning
they may not: the field keeps its value, and ``load_pruned`` rebuilds the model instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_HEADS = ("num_attention_heads", "n_head", "num_heads", "n_heads")
_KV = ("num_key_value_heads", "num_kv_heads")
_HEAD_DIM = ("head_dim", "d_kv")
_STACKS = ("encoder", "decoder")


def sync_heads(config: Any, specs: Sequence[Any]) -> None:
    """Write the head structure of ``specs`` (attention modules under ``config``'s owner) into ``config``."""
    if not specs:
        return
    stacks = {stack: [s for s in specs if _stack(s.name) == stack] for stack in _STACKS}
    per_stack = any(isinstance(getattr(config, f"{stack}_attention_heads", None), int) for stack in _STACKS)
    if per_stack:
        for stack, members in stacks.items():
            _write(config, members, (f"{stack}_attention_heads",), (f"{stack}_key_value_heads",), ())
    # the shared fields describe every module; with per-stack fields they may alias one of them (Whisper maps
    # `num_attention_heads` to `encoder_attention_heads`), so they are written only where all modules agree
    _write(config, specs, () if per_stack else _HEADS, _KV, _HEAD_DIM)


def _stack(name: str) -> str | None:
    parts = name.split(".")
    if "decoder" in parts:
        return "decoder"
    if "encoder" in parts:
        return "encoder"
    return None


def _write(config: Any, specs: Sequence[Any], heads: Sequence[str], kv: Sequence[str], dims: Sequence[str]) -> None:
    shapes = {(s.num_heads, s.num_kv_heads, s.head_dim) for s in specs}
    if len(shapes) != 1:
        return
    h, k, d = shapes.pop()
    for names, value in ((heads, h), (kv, k), (dims, d)):
        for n in names:
            if isinstance(getattr(config, n, None), int) and not isinstance(getattr(config, n), bool):
                try:
                    setattr(config, n, value)
                except (AttributeError, TypeError):  # a derived field (Falcon's `head_dim` property)
                    continue
