"""Copy-free, exact undo of a cut: references to every module's tensors and attributes, and the graph's sizes."""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch_pruning as tp
from torch import nn

from lightning_halfprune._compat import torch_pruning as tpc

Keep = Literal["refs", "shapes", "cpu"]


class ModuleSnapshot:
    """Every module's parameters, buffers and plain attributes (and Hugging Face configs): an exact undo.

    The one snapshot mechanism of the package, keeping the tensors three ways:

    - ``"refs"``: references, copy-free. torch-pruning never edits a tensor in place (it builds new ones), so the old
      references undo a cut exactly, and run the old architecture for side-by-side timing.
    - ``"shapes"``: parameters as ``meta`` tensors (shape and dtype, no memory), buffers by reference: the
      architecture without its weights, e.g. the original model for the final timing. :meth:`on` gives it random
      weights when it is run (latency does not depend on the values).
    - ``"cpu"``: copies in host memory (the accuracy guard's rollback point).
    """

    def __init__(self, model: nn.Module, keep: Keep = "refs") -> None:
        self.saved = []
        configs = {}
        for m in model.modules():
            state = {k: v for k, v in vars(m).items() if k not in ("_parameters", "_buffers", "_modules")}
            params = {k: _kept(v, keep) for k, v in m._parameters.items()}
            buffers = {k: _kept(v, "cpu") if keep == "cpu" else v for k, v in m._buffers.items()}
            self.saved.append((m, state, params, buffers))
            config = getattr(m, "config", None)  # Hugging Face configs: attention cuts write head counts there
            if config is not None and not isinstance(config, nn.Module) and hasattr(config, "__dict__"):
                configs[id(config)] = (config, dict(vars(config)))
        self.configs = list(configs.values())

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors this snapshot holds that are not on the ``meta`` device."""
        seen = {id(t): t for _, _, p, b in self.saved for t in (*p.values(), *b.values()) if t is not None}
        return sum(t.numel() * t.element_size() for t in seen.values() if t.device.type != "meta")

    @property
    def shape_bytes(self) -> int:
        """Bytes the weights kept as shapes take once :meth:`on` gives them values."""
        seen = {id(t): t for _, _, p, _ in self.saved for t in p.values() if t is not None and t.device.type == "meta"}
        return sum(t.numel() * t.element_size() for t in seen.values())

    def on(self, device: torch.device) -> ModuleSnapshot:
        """The snapshot with every tensor on ``device`` (random weights for ``"shapes"``); itself if already there."""
        tensors = [t for _, _, p, b in self.saved for t in (*p.values(), *b.values()) if t is not None]
        if all(t.device == device for t in tensors):
            return self
        moved = copy.copy(self)
        moved.saved = [
            (m, state, {k: _moved(v, device) for k, v in p.items()}, {k: _moved(v, device) for k, v in b.items()})
            for m, state, p, b in self.saved
        ]
        return moved

    def restore(self) -> None:
        for config, state in self.configs:
            vars(config).clear()
            vars(config).update(state)
        for m, state, params, buffers in self.saved:
            for key in [k for k in vars(m) if k not in state and k not in ("_parameters", "_buffers", "_modules")]:
                delattr(m, key)  # attributes a failed cut added
            vars(m).update(state)
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)


def _kept(t: torch.Tensor | None, keep: Keep) -> torch.Tensor | None:
    if t is None or keep == "refs":
        return t
    if keep == "shapes":
        data = torch.empty(t.shape, dtype=t.dtype, device="meta")
    else:
        data = t.detach().to("cpu", copy=True)
    return nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data


def _moved(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if t is None or t.device == device:
        return t
    if t.device.type == "meta":  # weights of an architecture kept as shapes: small random values, no denormals
        data = torch.empty(t.shape, dtype=t.dtype, device=device)
        data = data.normal_(0.0, 0.02) if data.is_floating_point() else data.zero_()
    else:
        data = t.detach().to(device, copy=True)
    return nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data


class GraphSnapshot:
    """What a cut changes in torch-pruning's graph besides the model's modules: an exact, copy-free undo.

    The sizes its own op nodes (concat, split, slice, output) keep, the index mappings between nodes, and the
    entries of unwrapped parameters, which a cut replaces.
    """

    def __init__(self, graph: tp.DependencyGraph, model: nn.Module) -> None:
        own = set(model.modules())
        self.graph = graph
        self.module2node, self.param_to_name = dict(graph.module2node), dict(tpc.param_names(graph))
        nodes = list(self.module2node.values())
        self.nodes = [(node, node.module) for node in nodes]
        self.mappings = [(dep, list(dep.index_mapping)) for node in nodes for dep in node.dependencies]
        self.ops = [
            (node.module, {k: copy.copy(v) for k, v in vars(node.module).items() if _sizes(v)})
            for node in nodes
            if isinstance(node.module, nn.Module) and node.module not in own
        ]

    def restore(self) -> None:
        self.graph.module2node.clear()
        self.graph.module2node.update(self.module2node)
        tpc.param_names(self.graph).clear()
        tpc.param_names(self.graph).update(self.param_to_name)
        for node, module in self.nodes:
            node.module = module
        for dep, mapping in self.mappings:
            dep.index_mapping[:] = mapping
        for op, state in self.ops:
            vars(op).update({k: copy.copy(v) for k, v in state.items()})


def _sizes(value: Any) -> bool:
    """Plain size bookkeeping (ints and lists of ints), as torch-pruning's op nodes keep it."""
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, int) for v in value)
    return value is None or (isinstance(value, int) and not isinstance(value, bool))

