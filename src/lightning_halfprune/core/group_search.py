"""Every coupled group of a dependency graph, with a bound on torch-pruning's index mapping.

torch-pruning carries channel indices across reshapes with its flatten index mapping, which turns each index into
``stride`` indices. On a graph that loops through reshapes (torchvision's ``swin_t``, whose windowed attention
reshapes around functional ``F.linear`` calls) it does so on every turn of the loop, without end, until memory runs
out (24 GB in seconds). The search here bounds the indices by the widest dimension of any tensor in the model: no
real channel index can go beyond it. A root whose group would is skipped, and named in a warning.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch_pruning as tp
from torch import nn

from lightning_halfprune._compat import torch_pruning as tpc


class ByIdentity(list):
    """A list of modules whose membership test is identity, as torch-pruning's ignore lists need.

    torch-pruning asks ``module in ignored_layers``, which compares with ``==``; a torchmetrics ``Metric`` (a
    LightningModule's accuracy) overloads ``==`` to build a new metric, which is truthy, so once one is in the list
    every layer seemed ignored and a model with a customized pruner (transformers or peft imported) had nothing
    prunable.
    """

    def __contains__(self, item: object) -> bool:
        return any(item is x for x in self)

    def __add__(self, other: list) -> ByIdentity:
        return ByIdentity([*self, *other])


def new_graph() -> tp.DependencyGraph:
    """An empty dependency graph whose list of layers ignored in tracing compares by identity (see ``ByIdentity``)."""
    graph = tp.DependencyGraph()
    graph.IGNORED_LAYERS_IN_TRACING = ByIdentity()
    return graph


class _Diverged(Exception):
    """The indices of one group grew beyond any width the model has."""


def all_groups(
    graph: tp.DependencyGraph, model: nn.Module, ignored: Sequence[nn.Module], roots: tuple[type, ...]
) -> list[Any]:
    """torch-pruning's ``get_all_groups``, less the roots whose index mapping does not terminate (warned about)."""
    skipped: list[str] = []
    search = graph.get_pruning_group

    def guarded(module: nn.Module, fn: Any, idxs: Sequence[int]) -> Any:
        try:
            return search(module, fn, idxs)
        except _Diverged:
            skipped.append(tpc.module_names(graph).get(module, type(module).__name__))
            return []

    graph.get_pruning_group = guarded  # this search only: instance attribute over the method
    try:
        with _bounded_flatten(_widest(model)):
            found = [g for g in graph.get_all_groups(ignored_layers=ByIdentity(ignored), root_module_types=roots) if g]
    finally:
        del graph.get_pruning_group
    if skipped:
        warnings.warn(
            f"HalfPrune leaves the channels of {', '.join(map(repr, skipped))} alone: torch-pruning's index mapping "
            "through the reshapes around them does not terminate (a loop of reshapes in the traced graph), so their "
            "coupled layers cannot be found.",
            stacklevel=3,
        )
    return found


def _widest(model: nn.Module) -> int:
    """4x the largest dimension of any parameter or buffer: a bound no real channel index reaches."""
    dims = [max(t.shape) for t in (*model.parameters(), *model.buffers()) if t.dim()]
    return 4 * max(dims, default=1)


@contextlib.contextmanager
def _bounded_flatten(limit: int) -> Iterator[None]:
    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def bounded(self: Any, idxs: Any) -> Any:
            if not self.reverse and len(idxs) * tpc.flatten_stride(self) > limit:
                raise _Diverged
            return original(self, idxs)

        return bounded

    with tpc.flatten_mapping(wrap):
        yield
