"""The residual stream of a model with attention: the layers whose width is its hidden size.

``prune_hidden_size=False`` (the default) promises that the hidden size stays: embeddings, the norms on the residual
path and every projection writing into it keep their width. torch-pruning couples all of them into one group (the
residual adds tie them), reachable from many roots (an attention output projection, an MLP's down projection, a
patch embedding, ...). Rather than trusting that every such root was recognised, a group is refused if it would cut
*any* layer of the stream, found here from the model's own structure:

* the output projections of its attention modules (their output is added to the stream);
* its embeddings and norm layers (LayerNorm, RMSNorm and look-alikes) whose width is a hidden size, i.e. the width
  of an attention output or a config's ``hidden_size``/``d_model``/``n_embd``.

A model without a recognised attention module but with a token embedding at its config's hidden size (Mamba and
other state-space or recurrent Hugging Face LMs) has its embeddings and norms at that width as its stream. Other
models without a recognised attention module (CNNs, MLPs, ``nn.MultiheadAttention`` models, which torch-pruning cuts
by embedding width itself) have no stream here: nothing is refused.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from lightning_halfprune.core.attention import out_width  # 1x1-conv projections too (CoAtNet)

_HIDDEN = ("hidden_size", "d_model", "n_embd", "embed_dim", "dim")
_NOT_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def stream_modules(model: nn.Module, specs: Iterable) -> set[nn.Module]:
    """Layers whose width is the residual stream of ``model`` (attention outputs, embeddings, norms); empty if none."""
    specs = list(specs)
    outputs = {s.o for s in specs}
    widths = {w for o in outputs if (w := out_width(o))} | _config_widths(model)
    if not outputs and not any(isinstance(m, nn.Embedding) and m.embedding_dim in widths for m in model.modules()):
        return set()  # no attention and no token embedding at a config's hidden size: not a residual-stream model
    qk_norms = {id(c) for s in specs for n, c in s.module.named_children() if n.lower().startswith(("q", "k"))}
    stream: set[nn.Module] = set(outputs)
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m.embedding_dim in widths:
            stream.add(m)
        elif is_norm(m) and norm_width(m) in widths and id(m) not in qk_norms:  # OLMo-2's q_norm: the heads' width
            stream.add(m)
    return stream


def is_norm(m: nn.Module) -> bool:
    """A LayerNorm/RMSNorm-like layer (by type, or a class name ending in ``Norm``): not batch/group/instance norm."""
    if isinstance(m, _NOT_NORMS):
        return False
    return isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or type(m).__name__.lower().endswith(("layernorm", "rmsnorm"))


def norm_width(m: nn.Module) -> int | None:
    weight = getattr(m, "weight", None)
    if isinstance(weight, nn.Parameter) and weight.dim() == 1:
        return int(weight.shape[0])
    shape = getattr(m, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and len(shape) == 1:
        return int(shape[0])
    return shape if isinstance(shape, int) else None


def _config_widths(model: nn.Module) -> set[int]:
    widths = set()
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is None or isinstance(config, nn.Module):
            continue
        for n in _HIDDEN:
            value = getattr(config, n, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                widths.add(value)
    return widths
