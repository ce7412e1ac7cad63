"""Copy-free, exact undo of a cut: references to every module's tensors and attributes, and the graph's sizes."""

from __future__ import annotations

import copy
from typing import Any

import torch_pruning as tp
from torch import nn

from lightning_halfprune._compat import torch_pruning as tpc


class ModuleSnapshot:
    """References to every module's parameters, buffers and plain attributes: an exact, copy-free undo.

    torch-pruning never edits a tensor in place (it builds new ones), so keeping the old references is enough.
    """

    def __init__(self, model: nn.Module) -> None:
        self.saved = []
        configs = {}
        for m in model.modules():
            state = {k: v for k, v in vars(m).items() if k not in ("_parameters", "_buffers", "_modules")}
            self.saved.append((m, state, dict(m._parameters), dict(m._buffers)))
            config = getattr(m, "config", None)  # Hugging Face configs: attention cuts write head counts there
            if config is not None and not isinstance(config, nn.Module) and hasattr(config, "__dict__"):
                configs[id(config)] = (config, dict(vars(config)))
        self.configs = list(configs.values())

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

