"""Minitron's activation importance: what each MLP neuron and attention head feeds forward, over calibration tokens.

From Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation".

``ActivationScorer`` looks at each layer's *outputs*; in a transformer the output of ``gate_proj`` or ``up_proj``
alone says little about a neuron (SwiGLU multiplies them), and a query projection's outputs say nothing about what
a head contributes. Minitron scores the places where the signal is complete:

* an MLP neuron by the mean ``|x|`` of its activation at the input of the down projection (``act(gate) * up``
  in SwiGLU, ``act(fc1)`` in a plain MLP), over every calibration token;
* an attention head by the mean L2 norm of its output (the head's slice of the output projection's input, i.e.
  the attention result before ``o_proj``), over every token; each channel of a head gets the head's score, so
  HalfPrune's head planner (mean over a key/value group's channels) ranks whole heads by it.

Generally: a group is scored on the *input* statistics of the layers consuming its channels (any Linear/Conv
whose input channels the group prunes); a group no layer consumes is scored on its producers' output, like
``ActivationScorer``. Only one vector per layer is kept (sums and counts), so memory does not grow with tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_halfprune._compat import torch_pruning as tpc
from lightning_halfprune.core.attention import AttentionSpec, find_attention
from lightning_halfprune.core.scoring import HOOKED_TYPES, CalibratedScorer, _inputs_of, run_hooked

__all__ = ["MinitronScorer"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` as (positions, channels): channels last for Linear, dim 1 for convolutions."""
    x = x.movedim(1, -1) if isinstance(module, _CONV) else x
    return x.reshape(-1, x.shape[-1]).detach().float()


class MinitronScorer(CalibratedScorer):
    """Mean ``|activation|`` per MLP neuron and mean L2 norm per attention head, on calibration token batches.

    Args:
        heads: score attention heads by the norm of their output (True) or, like neurons, by the mean ``|x|`` of
            each channel at the output projection's input (False).

    ``inputs_of(batch)`` gives a calibration batch's model input; ``HalfPrune`` sets it to what the
    LightningModule's ``training_step`` feeds ``forward`` (or the user's ``input_fn``).
    """

    def __init__(self, heads: bool = True) -> None:
        self.heads = bool(heads)
        self.inputs_of: Callable[[Any], Any] = _inputs_of
        self._inputs: dict[nn.Module, tuple[torch.Tensor, int]] = {}
        self._outputs: dict[nn.Module, tuple[torch.Tensor, int]] = {}

    def calibrate(self, model: nn.Module, batches: Sequence[Any], loss_fn: Callable[[Any], torch.Tensor]) -> None:
        """Run the batches (no grad) with hooks that sum per-channel statistics of every Conv/Linear."""
        self.release()
        outputs = {s.o: s for s in find_attention(model)} if self.heads else {}
        handles = []
        for module in model.modules():
            if isinstance(module, HOOKED_TYPES):
                spec = outputs.get(module)
                handles.append(module.register_forward_pre_hook(self._input_hook(spec)))
                handles.append(module.register_forward_hook(self._output_hook))
        run_hooked(model, batches, self.inputs_of, handles)

    def _input_hook(self, spec: AttentionSpec | None) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            if not args or not torch.is_tensor(args[0]):
                return
            rows = _rows(module, args[0])
            if spec is not None and rows.shape[1] == spec.num_heads * spec.head_dim:
                norms = rows.view(rows.shape[0], spec.num_heads, spec.head_dim).norm(dim=-1)  # (tokens, heads)
                value = norms.repeat_interleave(spec.head_dim, dim=1).sum(0)  # every channel of a head: its norm
            else:
                value = rows.abs().sum(0)
            _add(self._inputs, module, value, rows.shape[0])

        return hook

    def _output_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        if torch.is_tensor(out):
            rows = _rows(module, out)
            _add(self._outputs, module, rows.abs().sum(0), rows.shape[0])

    def release(self) -> None:
        self._inputs, self._outputs = {}, {}

    def __call__(self, group: Any) -> torch.Tensor | None:
        """Scores over the group's root channels: consumers' input statistics, else producers' output ones."""
        graph = tpc.graph_of(group)
        width = len(group[0].idxs)
        for consumers in (True, False):
            stats = self._inputs if consumers else self._outputs
            total, found = torch.zeros(width), False
            for item in group:
                module = item.dep.target.module
                if module not in stats or graph.is_out_channel_pruning_fn(item.dep.handler) == consumers:
                    continue
                values = _mean(stats[module]).cpu()
                idxs = torch.as_tensor(item.idxs, dtype=torch.long)
                if len(idxs) and len(values) <= int(idxs.max()):
                    continue  # a layer seen at another width (e.g. before a cut): not this group's channels
                total.index_add_(0, torch.as_tensor(item.root_idxs, dtype=torch.long), values[idxs])
                found = True
            if found:
                return total
        return None


def _add(stats: dict, module: nn.Module, value: torch.Tensor, count: int) -> None:
    total, n = stats.get(module, (0.0, 0))
    stats[module] = (value + total, n + count)


def _mean(stat: tuple[torch.Tensor, int]) -> torch.Tensor:
    total, n = stat
    return total / max(n, 1)
