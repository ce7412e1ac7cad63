"""torch-pruning's private names HalfPrune relies on (tested against the pinned range ``SUPPORTED``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any

import torch
import torch_pruning as tp
from torch_pruning import ops
from torch_pruning.dependency import index_mapping
from torch_pruning.pruner import function as tp_function

SUPPORTED = ("1.6", "1.7")  # [low, high): the releases this module was written against

SplitOp = ops._SplitOp  # a split node of the graph: its ``split_sizes``/``offsets`` go stale after a cut (1.6.1)
FlattenIndexMapping = index_mapping._FlattenIndexMapping  # index lists through flatten/reshape (Swin's loop)
BasePruningFunc = tp_function.BasePruningFunc


def installed() -> str:
    """The installed torch-pruning version."""
    return metadata.version("torch-pruning")


def module_names(graph: tp.DependencyGraph) -> dict[Any, str]:
    """Module -> qualified name, as the graph traced them."""
    return graph._module2name


def param_names(graph: tp.DependencyGraph) -> dict[Any, str]:
    """Unwrapped parameter -> name (parameters used outside any module, e.g. a class token)."""
    return graph._param_to_name


def graph_of(group: Any) -> tp.DependencyGraph | None:
    """The graph a group was made by (None for a group built by hand without one)."""
    return getattr(group, "_DG", None)


def set_graph(group: Any, graph: tp.DependencyGraph) -> None:
    """Tie a hand-built group (attention heads) to its graph, as torch-pruning's own groups are."""
    group._DG = graph


def prune_parameter(param: torch.nn.Parameter, keep: list[int], dim: int) -> torch.nn.Parameter:
    """torch-pruning's own parameter slicing (keeps ``.grad`` sliced along), for parameters outside its graph."""
    return BasePruningFunc._prune_parameter_and_grad(None, param, keep, dim)


def parameter_slicing(wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> contextlib.AbstractContextManager:
    """Route every slice torch-pruning takes of a parameter through ``wrap(original)`` inside the block."""
    return _patched(BasePruningFunc, "_prune_parameter_and_grad", wrap)


def flatten_mapping(wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> contextlib.AbstractContextManager:
    """Route torch-pruning's flatten index mapping through ``wrap(original)`` inside the block."""
    return _patched(FlattenIndexMapping, "__call__", wrap)


@contextlib.contextmanager
def _patched(owner: type, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Iterator[None]:
    """``owner.name`` replaced by ``wrap(original)`` for the block, put back after (also on error)."""
    original = getattr(owner, name)
    setattr(owner, name, wrap(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def flatten_stride(mapping: Any) -> int:
    return mapping._stride


# what torch-pruning's index mappings read from a traced op's autograd node after the graph is built
_SAVED = ("_saved_self_sizes", "_saved_self_sym_sizes", "_saved_split_sizes", "_saved_split_size", "_saved_dim")


def release_trace(graph: tp.DependencyGraph) -> None:
    """Drop the autograd graph of the tracing forward that every node's ``grad_fn`` keeps alive.

    Through ``next_functions`` a node's ``grad_fn`` reaches the whole traced graph, whose ``AccumulateGrad`` nodes
    hold the model's parameters as they were at tracing: after a cut those pre-cut tensors would stay alive as long
    as the graph. The few sizes and dims torch-pruning's index mappings read later are kept on a plain stand-in.
    """
    for node in graph.module2node.values():
        grad_fn = getattr(node, "grad_fn", None)
        if grad_fn is None:
            continue
        saved = {name: getattr(grad_fn, name) for name in _SAVED if hasattr(grad_fn, name)}
        node.grad_fn = _SavedSizes(saved) if saved else None


class _SavedSizes:
    """The sizes and dims of a traced op, without its autograd graph."""

    def __init__(self, saved: dict[str, Any]) -> None:
        for name, value in saved.items():
            setattr(self, name, tuple(value) if isinstance(value, (list, tuple)) else value)


# ------------------------------------------------------------------ group search (core/group_search.py, issue 22)
def update_split_index_mapping(graph: tp.DependencyGraph, node: Any) -> None:
    """torch-pruning's split mapping, also for a split along the last dim of a ``(batch, tokens, channels)`` tensor.

    torch-pruning maps a split's channels along dim 1 only (NCHW); a linear layer's output chunked along its last
    dim (a fused GLU ``fc1`` split into value and gate: timm's ``GluMlp`` in EVA-02) went unmapped, so its group
    carried ``fc1``'s indices unchanged into ``fc2``'s input, half as wide, and scoring it failed. Its slice mapping
    already reads dim 2 of a 3-D tensor as the channels; the split now does too, where the split dim has the width
    torch-pruning infers for the split's input (so a split along the tokens of a ``(batch, channels, length)``
    tensor stays unmapped, as before). Such a split is also mapped in a model with a 3-D parameter (a ViT's class
    token or position embedding), where torch-pruning turns the mapping of every split and concatenation off (its
    guard against the class token's concatenation along the tokens): a split along the channels is not that.
    """
    grad_fn = getattr(node, "grad_fn", None)
    sizes, dim = getattr(grad_fn, "_saved_self_sym_sizes", None), getattr(grad_fn, "_saved_dim", None)
    if isinstance(dim, int) and dim >= 2**63:  # a negative dim, saved unsigned
        dim -= 2**64
    if sizes is None or not isinstance(dim, int) or len(sizes) != 3 or dim % 3 != 2 or not node.inputs:
        index_mapping.update_split_index_mapping(graph, node)
        return
    channels = index_mapping.shape_infer.infer_out_channels_recursively(graph, node.inputs[0], [0])
    if channels != sizes[2]:
        index_mapping.update_split_index_mapping(graph, node)
        return
    node.grad_fn = _SavedSizes({"_saved_dim": 1, "_saved_self_sym_sizes": (sizes[0], sizes[2], sizes[1])})
    node.enable_index_mapping = True
    try:
        index_mapping.update_split_index_mapping(graph, node)
    finally:
        node.grad_fn = grad_fn


MAPPING_UPDATES = {  # node type -> torch-pruning's function that (re)builds that node's index mapping
    ops.OPTYPE.CONCAT: index_mapping.update_concat_index_mapping,
    ops.OPTYPE.SPLIT: update_split_index_mapping,
    ops.OPTYPE.RESHAPE: index_mapping.update_reshape_index_mapping,
    ops.OPTYPE.UNBIND: index_mapping.update_unbind_index_mapping,
    ops.OPTYPE.EXPAND: index_mapping.update_expand_index_mapping,
    ops.OPTYPE.SLICE: index_mapping.update_slice_index_mapping,
}


@contextlib.contextmanager
def mapping_update(replacement: Callable[[tp.DependencyGraph], None]) -> Iterator[None]:
    """Route torch-pruning's whole-graph index mapping update (graph build, each group search) to ``replacement``.

    Nested blocks keep the outer replacement.
    """
    original = index_mapping.update_index_mapping
    if original is replacement:
        yield
        return
    index_mapping.update_index_mapping = replacement
    try:
        yield
    finally:
        index_mapping.update_index_mapping = original


@contextlib.contextmanager
def search_steps(tick: Callable[[], None]) -> Iterator[None]:
    """Call ``tick()`` at every step of torch-pruning's group search (an edge followed, an item merged)."""
    from torch_pruning.dependency import dependency, group

    triggered, merge = dependency.Dependency.is_triggered_by, group.Group.add_and_merge

    def is_triggered_by(self: Any, fn: Any) -> bool:
        tick()
        return triggered(self, fn)

    def add_and_merge(self: Any, dep: Any, idxs: Any) -> None:
        tick()
        merge(self, dep, idxs)

    dependency.Dependency.is_triggered_by, group.Group.add_and_merge = is_triggered_by, add_and_merge
    try:
        yield
    finally:
        dependency.Dependency.is_triggered_by, group.Group.add_and_merge = triggered, merge
