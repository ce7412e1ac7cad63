"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``): their hidden units are cut, every gate's rows with them.

A hidden unit ``j`` of a recurrent layer owns row ``j`` of each gate in ``weight_ih_l{k}``, ``weight_hh_l{k}`` and
both biases, and column ``j`` of ``weight_hh_l{k}`` (the recurrence reads it back), in every layer ``k`` and both
directions; in layers above the first it is also column ``j`` (and ``H + j`` when bidirectional) of
``weight_ih_l{k}``. The layer's output has ``H`` channels per direction (``[forward | backward]``), so a cut
removes the same units in each direction: the output channels come in ``num_directions`` equal slots.

torch-pruning's own ``LSTMPruner`` cuts ``weight_hh`` rows only and one layer only; GRU and RNN it does not know
(they looked like pass-through ops, so every cut next to them broke the model). This pruner replaces it for all
three. On CPU a GRU or an RNN runs as dozens of small autograd ops that torch-pruning would trace as a graph of
splits and stacks (and fail on); ``traced_as_one_op`` makes each recurrent layer one op while the graph is traced.
An LSTM with ``proj_size`` (projected hidden state) is refused by name (``RefusedRecurrent``): the check at
train start leaves it out with a warning saying so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch_pruning.pruner import function as tp_function

GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


class RefusedRecurrent(ValueError):
    """A recurrent layer this pruner cannot cut (an LSTM with ``proj_size``)."""


def gates(layer: nn.RNNBase) -> int:
    return next(n for cls, n in GATES.items() if isinstance(layer, cls))


def _directions(layer: nn.RNNBase) -> int:
    return 2 if layer.bidirectional else 1


def _suffixes(layer: nn.RNNBase) -> list[str]:
    return ["", "_reverse"][: _directions(layer)]


class RecurrentPruner(tp_function.BasePruningFunc):
    """torch-pruning pruner for ``nn.LSTM``/``nn.GRU``/``nn.RNN``: out channels are hidden units (per direction)."""

    def prune_out_channels(self, layer: nn.RNNBase, idxs: Sequence[int]) -> nn.Module:
        self._refuse(layer)
        size = layer.hidden_size
        units = sorted({int(i) % size for i in idxs})
        for d in range(_directions(layer)):  # the same units in each direction (the group's slots make it so)
            if sorted({int(i) - d * size for i in idxs if d * size <= int(i) < (d + 1) * size}) != units:
                raise RefusedRecurrent(f"a cut of {type(layer).__name__} must remove the same units in each direction")
        keep = [j for j in range(size) if j not in set(units)]
        rows = [g * size + j for g in range(gates(layer)) for j in keep]
        cols = [d * size + j for d in range(_directions(layer)) for j in keep]  # a deeper layer reads both directions
        self._fresh_flat_weights(layer)
        for k in range(layer.num_layers):
            for sfx in _suffixes(layer):
                self._slice(layer, f"weight_ih_l{k}{sfx}", rows, 0)
                if k > 0:
                    self._slice(layer, f"weight_ih_l{k}{sfx}", cols, 1)
                self._slice(layer, f"weight_hh_l{k}{sfx}", rows, 0)
                self._slice(layer, f"weight_hh_l{k}{sfx}", keep, 1)
                if layer.bias:
                    self._slice(layer, f"bias_ih_l{k}{sfx}", rows, 0)
                    self._slice(layer, f"bias_hh_l{k}{sfx}", rows, 0)
        layer.hidden_size = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.RNNBase, idxs: Sequence[int]) -> nn.Module:
        keep = [j for j in range(layer.input_size) if j not in {int(i) for i in idxs}]
        self._fresh_flat_weights(layer)
        for sfx in _suffixes(layer):
            self._slice(layer, f"weight_ih_l0{sfx}", keep, 1)
        layer.input_size = len(keep)
        return layer

    def get_out_channels(self, layer: nn.RNNBase) -> int:
        return (getattr(layer, "proj_size", 0) or layer.hidden_size) * _directions(layer)

    def get_in_channels(self, layer: nn.RNNBase) -> int:
        return layer.input_size

    def get_out_channel_groups(self, layer: nn.RNNBase) -> int:
        return _directions(layer)

    def _slice(self, layer: nn.RNNBase, name: str, keep: list[int], dim: int) -> None:
        setattr(layer, name, self._prune_parameter_and_grad(getattr(layer, name), keep, dim))

    @staticmethod
    def _fresh_flat_weights(layer: nn.RNNBase) -> None:
        """A new ``_flat_weights`` list, so an undone cut (which restores the old list) gets its old tensors back."""
        layer._flat_weights = list(layer._flat_weights)

    @staticmethod
    def _refuse(layer: nn.RNNBase) -> None:
        if getattr(layer, "proj_size", 0):
            raise RefusedRecurrent(
                f"{type(layer).__name__} with proj_size={layer.proj_size} (projected hidden state) is not cut by "
                "HalfPrune; its hidden units are left alone."
            )


RECURRENT = RecurrentPruner()


def customized_pruners(model: nn.Module) -> dict[type, Any]:
    """The recurrent pruner for each of ``nn.LSTM``/``nn.GRU``/``nn.RNN`` used in ``model`` (subclasses included)."""
    return {type(m): RECURRENT for m in model.modules() if isinstance(m, tuple(GATES))}



class _OneOp(torch.autograd.Function):
    """A recurrent layer's forward as one autograd node from its input (and weights) to its outputs; tracing only."""

    @staticmethod
    def forward(ctx: Any, run: Any, x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out, hidden = run(x)
        return (out, *(hidden if isinstance(hidden, tuple) else (hidden,)))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        raise RuntimeError("HalfPrune traces recurrent layers as one op for torch-pruning's graph only")


@contextlib.contextmanager
def traced_as_one_op(model: nn.Module) -> Iterator[None]:
    """Within the block every recurrent layer of ``model`` (given a tensor, with grad enabled) is one autograd op."""
    patched = [m for m in model.modules() if isinstance(m, tuple(GATES))]
    for m in patched:

        def forward(x: Any, hx: Any = None, _run: Any = m.forward, _lstm: bool = isinstance(m, nn.LSTM)) -> Any:
            if not torch.is_tensor(x) or not torch.is_grad_enabled():  # a PackedSequence: traced as it is
                return _run(x, hx)
            outs = _OneOp.apply(lambda t: _run(t, hx), x, *_run.__self__._flat_weights)
            return outs[0], (tuple(outs[1:]) if _lstm else outs[1])

        m.forward = forward
    try:
        yield
    finally:
        for m in patched:
            vars(m).pop("forward", None)
