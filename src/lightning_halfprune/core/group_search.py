"""Every coupled group of a dependency graph, found within a time bound, and stoppable.

torch-pruning's ``get_all_groups`` searches the coupled layers of every root layer in turn. Here that search is
guarded root by root, so one layer torch-pruning cannot handle costs the user that layer, not the fit:

- **Index mapping that does not terminate.** torch-pruning carries channel indices across reshapes with its flatten
  index mapping, which turns each index into ``stride`` indices. On a graph that loops through reshapes
  (torchvision's ``swin_t``) it does so on every turn, until memory runs out (24 GB in seconds). The indices are
  bounded by the widest dimension of any tensor in the model: no real channel index can go beyond it.
- **A budget per root** (``BUDGET_S`` of search each) and a progress message once the whole search passes
  ``PROGRESS_S``: timm's ``mobilevitv2_050`` kept torch-pruning searching for minutes.
- **torch-pruning raising** for one root (a ``ZeroDivisionError`` or ``IndexError`` in its index mapping): that
  root is left out, the rest is pruned.
- **Index mapping updates that fail** (torch-pruning cannot size a concatenation or a reshape, as around
  ShuffleNet's channel shuffle) no longer abort the graph build: ``SafeGraph`` records the node, and every group
  whose channels pass through it is left out.
- **A stop request** (``stopping``: SIGTERM under Lightning, see ``fit/checks.py``) is checked between roots and
  during each root's search, and raises ``Stopped``.

Every root left out is named in ONE warning, with what to put in ``ignored_layers`` to leave it alone on purpose.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import torch_pruning as tp
from torch import nn
from torch_pruning import ops

from lightning_halfprune._compat import torch_pruning as tpc
from lightning_halfprune.core import log, rnn

BUDGET_S = 5.0  # seconds of torch-pruning's search one root may take before it is left out
TOTAL_S = 60.0  # seconds the whole search may take; the roots not searched by then are left out
PROGRESS_S = 15.0  # the whole search says where it is once it passes this
_TICKS = 64  # search steps between two looks at the clock and the stop request

_STOP: ContextVar[Callable[[], bool] | None] = ContextVar("halfprune_stop", default=None)


class Stopped(BaseException):
    """A stop was requested (SIGTERM) while HalfPrune searched or cut; the model is as it was before.

    A ``BaseException``, like ``KeyboardInterrupt``: no ``except Exception`` on the way mistakes it for a failure.
    """


@contextlib.contextmanager
def stopping(stop: Callable[[], bool]) -> Iterator[None]:
    """Within the block, HalfPrune's searches ask ``stop()`` between roots and raise ``Stopped`` when it is true."""
    token = _STOP.set(stop)
    try:
        yield
    finally:
        _STOP.reset(token)


def check_stop() -> None:
    """Raise ``Stopped`` if a stop was requested (see ``stopping``); a cheap no-op otherwise."""
    stop = _STOP.get()
    if stop is not None and stop():
        raise Stopped("HalfPrune stopped on request (SIGTERM): the model was not changed.")


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


class SafeGraph(tp.DependencyGraph):
    """torch-pruning's graph whose index mapping updates fail node by node, not as a whole.

    ``mapping_failures``: node -> the error torch-pruning raised sizing it, from the latest update. A group whose
    channels pass through such a node has no valid index mapping there and is never cut (``all_groups``).
    """

    mapping_failures: dict[Any, Exception]
    _mapping_frozen = False  # inside one search the graph does not change: its mapping is updated once

    def __init__(self) -> None:
        super().__init__()
        self.IGNORED_LAYERS_IN_TRACING = ByIdentity()
        self.mapping_failures = {}

    def build_dependency(self, model: nn.Module, *args: Any, **kwargs: Any) -> SafeGraph:
        # a GRU on CPU is dozens of small autograd ops torch-pruning cannot map: traced as one op (rnn.py)
        with _guarded_updates(), rnn.traced_as_one_op(model):
            return super().build_dependency(model, *args, **kwargs)

    def get_pruning_group(self, *args: Any, **kwargs: Any) -> Any:
        with _guarded_updates():
            return super().get_pruning_group(*args, **kwargs)


def new_graph() -> SafeGraph:
    """An empty dependency graph: identity ignore lists (``ByIdentity``), node-by-node mapping updates."""
    return SafeGraph()


def _update_node_by_node(graph: Any) -> None:
    """torch-pruning's ``update_index_mapping``, recording the nodes it fails on rather than raising."""
    if getattr(graph, "_mapping_frozen", False):
        return
    failures: dict[Any, Exception] = {}
    for node in list(graph.module2node.values()):
        update = tpc.MAPPING_UPDATES.get(node.type)
        if update is None:
            continue
        try:
            update(graph, node)
        except Exception as err:  # torch-pruning could not size this op: its groups are left out
            failures[node] = err
    if isinstance(graph, SafeGraph):
        graph.mapping_failures = failures


def _guarded_updates() -> contextlib.AbstractContextManager[None]:
    return tpc.mapping_update(_update_node_by_node)


class _OverBudget(Exception):
    """One root's search took longer than its budget."""


class _Diverged(Exception):
    """The indices of one group grew beyond any width the model has."""


class _Watch:
    """The clock and the stop request, looked at every ``_TICKS`` steps of torch-pruning's search."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s, self.deadline, self.ticks = budget_s, float("inf"), 0

    def start(self) -> None:
        self.deadline, self.ticks = time.monotonic() + self.budget_s, 0

    def tick(self) -> None:
        self.ticks += 1
        if self.ticks % _TICKS:
            return
        check_stop()
        if time.monotonic() > self.deadline:
            raise _OverBudget


def all_groups(
    graph: tp.DependencyGraph,
    model: nn.Module,
    ignored: Sequence[nn.Module],
    roots: tuple[type, ...],
    *,
    budget_s: float = BUDGET_S,
    total_s: float = TOTAL_S,
    searched: dict[int, tuple[Any, str | None]] | None = None,
) -> list[Any]:
    """torch-pruning's ``get_all_groups``, less the roots it cannot search (left out, named in one warning).

    Args:
        graph: a built dependency graph (``new_graph``).
        model: the model it was built from (for the bound on channel indices).
        ignored: modules that are never roots, and whose groups are not cut.
        roots: the module types whose output channels root a group.
        budget_s: seconds of search one root may take; a root over it is left out.
        total_s: seconds the whole search may take; roots not reached by then are left out.
        searched: each root's earlier search outcome (its group, or why it has none) on this very graph with the
            model's parameters unchanged; filled in here. A root found there is not searched (nor warned about)
            again: a search over budget costs its ``budget_s`` every time (timm's ``mobilevitv2_050``).

    Raises:
        Stopped: a stop was requested (``stopping``); nothing was changed.
    """
    ignored = ByIdentity(ignored) + list(graph.IGNORED_LAYERS_IN_TRACING)
    left_out: dict[str, str] = {}
    found: list[Any] = []
    visited: set[int] = set()
    watch, began, told = _Watch(budget_s), time.monotonic(), False
    candidates = [m for m in graph.module2node if isinstance(m, roots) and m not in ignored]
    roots_left = {id(m) for m in candidates}
    with _bounded_flatten(_widest(model), watch), _ticking(watch), _guarded_updates():
        _update_node_by_node(graph)
        failed_nodes = dict(getattr(graph, "mapping_failures", {}))
        graph._mapping_frozen = True
        try:
            for i, module in enumerate(candidates):
                check_stop()
                if id(module) in visited:
                    continue
                if time.monotonic() - began > total_s:
                    left_out[_name(graph, module)] = f"the search as a whole passed {total_s:g} s before reaching it"
                    continue
                if not told and time.monotonic() - began > PROGRESS_S:
                    told = True
                    log.info(
                        f"HalfPrune is still searching the coupled layers of {type(model).__name__} after "
                        f"{PROGRESS_S:g} s (layer {i + 1} of {len(candidates)}); a layer whose search takes over "
                        f"{budget_s:g} s is left out."
                    )
                known = searched is not None and id(module) in searched
                if known:
                    group, why = searched[id(module)]
                else:
                    group, why = _search(graph, module, watch)
                    if why is None:
                        why = _through_failed(graph, group, failed_nodes)
                    if searched is not None:
                        searched[id(module)] = (group, why)
                if why is not None:
                    coupled = _coupled(graph, module) & roots_left - visited - {id(module)}
                    visited.update(coupled)  # they would fail alike: not searched again, counted here
                    more = f" (and {len(coupled)} layers coupled to it)" if coupled else ""
                    if not known:  # told once per graph
                        left_out[_name(graph, module)] = why + more
                    continue
                prunable = True
                for dep, _ in group:
                    if graph.is_out_channel_pruning_fn(dep.handler):
                        visited.add(id(dep.target.module))
                        prunable = prunable and dep.target.module not in ignored
                if prunable and group:
                    found.append(group)
        finally:
            graph._mapping_frozen = False
    if left_out:
        _warn(left_out)
    return found


def _search(graph: tp.DependencyGraph, module: nn.Module, watch: _Watch) -> tuple[Any, str | None]:
    """One root's group, or why there is none."""
    watch.start()
    try:
        pruner = graph.get_pruner_of_module(module)
        width = pruner.get_out_channels(module) if pruner is not None else None
        if width is None:
            return [], None
        return graph.get_pruning_group(module, pruner.prune_out_channels, list(range(width))), None
    except _OverBudget:
        return [], f"torch-pruning's search for its coupled layers took over {watch.budget_s:g} s"
    except _Diverged:
        return [], (
            "torch-pruning's index mapping through the reshapes around it does not terminate (a loop of "
            "reshapes in the traced graph)"
        )
    except Exception as err:  # torch-pruning failed on this root: the others are still searched
        return [], f"torch-pruning failed searching its coupled layers: {describe(err)}"


def _coupled(graph: tp.DependencyGraph, module: nn.Module) -> set[int]:
    """The layers whose output channels a root's search would reach, found without index mapping (cheap).

    Used when the real search failed: they would fail alike, so they are left out with the root, not each searched
    (and warned about) again. A superset of the real group: every dependency is followed, whatever its indices.
    """
    pruner = graph.get_pruner_of_module(module)
    start = (graph.module2node[module], pruner.prune_out_channels)
    seen, stack, found = {start}, [start], set()
    while stack:
        node, fn = stack.pop()
        if graph.is_out_channel_pruning_fn(fn):
            found.add(id(node.module))
        for dep in node.dependencies:
            nxt = (dep.target, dep.handler)
            if dep.trigger == fn and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return found


def _through_failed(graph: tp.DependencyGraph, group: Any, failed: dict[Any, Exception]) -> str | None:
    """Why a group is unsafe: its channels pass through an op whose index mapping torch-pruning could not size."""
    for dep, _ in group:
        for node in (dep.source, dep.target):
            if node in failed:
                op = _OPS.get(node.type, type(node.module).__name__)
                return (
                    f"its channels pass through a {op} whose channel mapping torch-pruning could not build: "
                    f"{describe(failed[node])}"
                )
    return None


_OPS = {
    ops.OPTYPE.CONCAT: "concatenation (torch.cat)",
    ops.OPTYPE.SPLIT: "split (torch.split / chunk)",
    ops.OPTYPE.RESHAPE: "reshape (view / reshape / flatten)",
    ops.OPTYPE.UNBIND: "unbind",
    ops.OPTYPE.EXPAND: "expand",
    ops.OPTYPE.SLICE: "slice",
}


def describe(err: BaseException) -> str:
    """``Type: message (in torch_pruning/<file>:<line>)``: a torch-pruning error in one line, without its traceback."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "torch_pruning" in f.filename]
    where = f" (in torch_pruning{frames[-1].filename.split('torch_pruning')[-1]}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {err}{where}"


def _name(graph: tp.DependencyGraph, module: Any) -> str:
    return tpc.module_names(graph).get(module) or type(module).__name__


def _warn(left_out: dict[str, str]) -> None:
    names = list(left_out)
    lines = "\n".join(f"  - {name!r}: {why}" for name, why in list(left_out.items())[:8])
    more = f"\n  - ... and {len(names) - 8} more" if len(names) > 8 else ""
    log.warn(
        f"HalfPrune leaves the channels of {len(names)} layer(s) alone: torch-pruning cannot find what they are "
        f"coupled to.\n{lines}{more}\nThe rest of the model is pruned. Add `ignored_layers={names}` to HalfPrune to "
        "leave them out on purpose (and skip this search).",
        stacklevel=4,
    )


def _widest(model: nn.Module) -> int:
    """4x the largest dimension of any parameter or buffer: a bound no real channel index reaches."""
    dims = [max(t.shape) for t in (*model.parameters(), *model.buffers()) if t.dim()]
    return 4 * max(dims, default=1)


@contextlib.contextmanager
def _bounded_flatten(limit: int, watch: _Watch) -> Iterator[None]:
    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def bounded(self: Any, idxs: Any) -> Any:
            watch.tick()
            if not self.reverse and len(idxs) * tpc.flatten_stride(self) > limit:
                raise _Diverged
            return original(self, idxs)

        return bounded

    with tpc.flatten_mapping(wrap):
        yield


def _ticking(watch: _Watch) -> contextlib.AbstractContextManager[None]:
    """Every step of torch-pruning's search (an edge followed, an item merged) ticks ``watch``."""
    return tpc.search_steps(watch.tick)
