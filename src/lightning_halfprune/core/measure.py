"""What a model costs: parameters, MACs per sample, per-layer widths and measured inference latency.

Nothing here logs; ``report.py`` turns these numbers into tables and logger payloads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_halfprune.core.graph import graph_safe, run_model
from lightning_halfprune.core.layers import conv1d_class

WIDTH_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.MultiheadAttention)


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every Conv, Linear and attention layer, by module name."""
    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            widths[name] = m.embed_dim
        elif isinstance(m, nn.Linear) and not _inside_attention(model, name):
            widths[name] = m.out_features
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            widths[name] = m.out_channels
    return widths


def _inside_attention(model: nn.Module, name: str) -> bool:
    parent = name.rpartition(".")[0]
    return bool(name) and isinstance(model.get_submodule(parent), nn.MultiheadAttention)


def architecture(model: nn.Module) -> tuple:
    """A key that changes exactly when a parameter's name or shape does: what MACs and latency depend on."""
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


class MacCounter:
    """Multiply-accumulates of one forward pass per sample, counted with forward hooks, cached per architecture.

    Counts Conv, Linear and MultiheadAttention (projections and the two attention products); elementwise ops
    and norms are ignored, as usual for MAC counts. No deep copy of the model is made.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple, int] = {}

    def __call__(self, model: nn.Module, example_input: Any) -> int:
        key = architecture(model)
        if key not in self._cache:
            self._cache[key] = self._count(model, example_input)
        return self._cache[key]

    @staticmethod
    def _count(model: nn.Module, example_input: Any) -> int:
        total = 0
        batch = batch_size_of(example_input)

        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            nonlocal total
            total += _macs(module, inputs, output)

        handles = [
            m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (*WIDTH_TYPES, *_extra_types()))
        ]
        try:
            with graph_safe(model), torch.no_grad():
                model.eval()
                run_model(model, example_input)
        finally:
            for h in handles:
                h.remove()
        return total // max(batch, 1)


def _extra_types() -> tuple[type, ...]:  # noqa: N802
    """Layers counted besides Conv/Linear/attention: transposed convs and Hugging Face's ``Conv1D`` (GPT-2)."""
    conv1d = conv1d_class()
    return (nn.ConvTranspose2d,) if conv1d is None else (nn.ConvTranspose2d, conv1d)


def _macs(module: nn.Module, inputs: tuple, output: Any) -> int:
    if isinstance(module, nn.MultiheadAttention):
        q = inputs[0]
        seq = q.shape[1] if module.batch_first or q.dim() == 2 else q.shape[0]
        rows = q.numel() // module.embed_dim
        e = module.embed_dim
        return rows * e * e * 4 + rows * seq * e * 2  # q, k, v, out projections + QK^T and AV
    out = output[0] if isinstance(output, tuple) else output
    if isinstance(module, nn.Linear):
        return out.numel() * module.in_features
    conv1d = conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):  # a Linear with a transposed (in, out) weight
        return out.numel() * module.weight.shape[0]
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
        kernel = int(torch.tensor(module.kernel_size).prod())
        return out.numel() * (module.in_channels // module.groups) * kernel
    return 0


def batch_size_of(example_input: Any) -> int:
    first = example_input
    while isinstance(first, (tuple, list)):
        first = first[0]
    if isinstance(first, dict):
        first = next(iter(first.values()))
    return int(first.shape[0]) if torch.is_tensor(first) and first.dim() > 0 else 1


def repeat_batch(example_input: Any, batch_size: int) -> Any:
    """The example input tiled along its first dimension to ``batch_size`` samples."""
    if torch.is_tensor(example_input):
        reps = -(-batch_size // max(example_input.shape[0], 1))
        return example_input.repeat(reps, *([1] * (example_input.dim() - 1)))[:batch_size]
    if isinstance(example_input, tuple):
        return tuple(repeat_batch(x, batch_size) for x in example_input)
    if isinstance(example_input, dict):
        return {k: repeat_batch(v, batch_size) for k, v in example_input.items()}
    return example_input
