"""The transactional cut: remove channels, record how every parameter was sliced, check the model still runs."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from lightning_halfprune._compat import torch_pruning as tpc
from lightning_halfprune.core import attention as attn
from lightning_halfprune.core import mamba, mla, moe
from lightning_halfprune.core.errors import BrokenForward, SurgeryError
from lightning_halfprune.core.graph import ChannelGroup, graph_safe, module_by_name, run_model
from lightning_halfprune.core.plan import Cut


@dataclass
class ParamRemap:
    """How each parameter that surgery replaced maps to its successor: the slices taken along each dimension."""

    steps: dict[nn.Parameter, tuple[nn.Parameter, list[tuple[int, torch.Tensor]]]] = field(default_factory=dict)

    def new(self, param: torch.Tensor) -> torch.Tensor:
        """The parameter that replaced ``param`` (``param`` itself if surgery did not touch it)."""
        return self.steps[param][0] if param in self.steps else param

    def slice_like(self, param: torch.Tensor, value: Any) -> Any:
        """Slice ``value`` (e.g. an optimizer state tensor) the way ``param`` was sliced.

        A tensor shaped like ``param``, or broadcasting against it (size 1 where Adafactor factors a dimension),
        is sliced along every pruned dimension it has; scalars and non-tensors are returned as they are. Raises
        ``ValueError`` for a tensor of another shape (e.g. a flat vector over all parameters): it cannot follow.
        """
        if param not in self.steps or not torch.is_tensor(value) or value.numel() <= 1:
            return value
        shape = list(param.shape)
        if value.dim() != len(shape) or any(v not in (s, 1) for v, s in zip(value.shape, shape, strict=True)):
            raise ValueError(f"state of shape {tuple(value.shape)} for a parameter of shape {tuple(shape)}")
        for dim, keep in self.steps[param][1]:
            if keep.dim() == 2:  # one row of kept indices per entry of dim 0 (each expert of a fused MoE tensor)
                value = take_per_row(value, keep, dim) if value.shape[dim] == shape[dim] != 1 else value
                shape[dim] = keep.shape[1]
                continue
            if value.shape[dim] == shape[dim] != 1:
                value = torch.index_select(value, dim, keep.to(value.device))
            shape[dim] = len(keep)
        return value

    def __len__(self) -> int:
        return len(self.steps)


class DryRun(Exception):
    """Raised inside ``Surgeon.cut(dry_run=True)`` to take the undo path after a successful check."""


def graph_intact(err: BaseException) -> bool:
    """True unless ``err`` came from inside torch-pruning (or an interrupt), which may have left its graph halfway."""
    return (
        isinstance(err, DryRun)
        or (isinstance(err, SurgeryError) and err.__cause__ is None)
        or isinstance(err, BrokenForward)
    )


def take_per_row(value: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """``value`` keeping, along ``dim``, the indices ``keep[i]`` in its slice ``i`` of dim 0 (``keep``: rows x kept)."""
    if value.shape[0] != keep.shape[0]:
        raise ValueError(f"a tensor of shape {tuple(value.shape)} cannot keep {tuple(keep.shape)} indices per row")
    view = [keep.shape[0] if d == 0 else keep.shape[1] if d == dim else 1 for d in range(value.dim())]
    size = [keep.shape[1] if d == dim else n for d, n in enumerate(value.shape)]
    return torch.take_along_dim(value, keep.to(value.device).view(view).expand(size), dim)


_RECORDERS: list[Callable[[nn.Parameter, nn.Parameter, int, torch.Tensor], None]] = []


def record_slice(old: nn.Parameter, new: nn.Parameter, dim: int, keep: torch.Tensor) -> None:
    """Record, in the innermost ``tracking_slices`` block, a slice made outside torch-pruning (MoE experts)."""
    if _RECORDERS:
        _RECORDERS[-1](old, new, dim, keep)


def slice_parameter(module: nn.Module, pname: str, dim: int, keep: torch.Tensor) -> None:
    """Keep indices ``keep`` along ``dim`` of ``module.<pname>`` (and its gradient), recording the slice.

    ``keep`` is one index list, or one per slice of dim 0 (rows x kept: fused experts, each its own channels).
    """
    old = module._parameters.get(pname)
    if old is None:
        return

    def take(t: torch.Tensor) -> torch.Tensor:
        return torch.index_select(t, dim, keep.to(t.device)) if keep.dim() == 1 else take_per_row(t, keep, dim)

    new = nn.Parameter(take(old.detach()), requires_grad=old.requires_grad)
    if old.grad is not None:
        new.grad = take(old.grad)
    setattr(module, pname, new)
    record_slice(old, new, dim, keep)


@contextlib.contextmanager
def tracking_slices() -> Iterator[ParamRemap]:
    """Record every slice torch-pruning takes of a parameter, chaining repeated slices of the same tensor."""
    remap = ParamRemap()
    successor: dict[nn.Parameter, nn.Parameter] = {}  # newest tensor -> the original it came from
    done: dict[tuple[int, int], tuple[nn.Parameter, nn.Parameter, torch.Tensor]] = {}  # (tensor, dim) -> slice

    def remember(weight: nn.Parameter, new: nn.Parameter, dim: int, keep: torch.Tensor) -> None:
        source = successor.pop(weight, weight)
        _, steps = remap.steps.get(source, (None, []))
        remap.steps[source] = (new, [*steps, (dim, keep)])
        successor[new] = source

    def wrap(original: Callable[..., nn.Parameter]) -> Callable[..., nn.Parameter]:
        def tracked(self: Any, weight: nn.Parameter, keep_idxs: Sequence[int], pruning_dim: int) -> nn.Parameter:
            keep = torch.as_tensor(list(keep_idxs), dtype=torch.long)
            dim = pruning_dim % weight.dim()
            if (id(weight), dim) in done:  # a shared (tied) tensor reached again through another module: one cut
                _, new, kept = done[(id(weight), dim)]
                if not torch.equal(kept, keep):
                    raise SurgeryError(
                        f"a parameter of shape {tuple(weight.shape)} is shared by two layers that would keep different "
                        "channels of it; tied weights must be cut alike."
                    )
                return new
            new = original(self, weight, keep_idxs, pruning_dim)
            done[(id(weight), dim)] = (weight, new, keep)
            remember(weight, new, dim, keep)
            return new

        return tracked

    _RECORDERS.append(remember)
    try:
        with tpc.parameter_slicing(wrap):
            yield remap
    finally:
        _RECORDERS.remove(remember)


def attributed(prune: Callable[[], bool], group: str) -> bool:
    """Run one group's removal; any failure becomes a ``SurgeryError`` that names the group."""
    try:
        return prune()
    except SurgeryError as err:
        err.groups = err.groups or [group]
        raise
    except Exception as err:
        raise SurgeryError(
            f"torch-pruning failed removing channels from the coupled group {group!r}: {type(err).__name__}: {err}",
            [group],
        ) from err


def members_of(graph: tp.DependencyGraph, groups: Sequence[ChannelGroup]) -> dict[str, set[str]]:
    """Group name -> the names of every layer (and unwrapped parameter) in it."""
    names = {**tpc.module_names(graph), **tpc.param_names(graph)}
    return {g.name: {g.name} | {names.get(dep.target.module, "") for dep, _ in g.group} - {""} for g in groups}


def _groups_touching(members: dict[str, set[str]], cuts: Sequence[Cut], layer: str | None) -> list[str]:
    """The cut groups with a member inside (or around) ``layer``; all of them if none is, or the layer is unknown."""
    cut = [c.layer for c in cuts]
    if not layer:
        return cut

    def near(name: str) -> bool:
        return name == layer or name.startswith(layer + ".") or layer.startswith(name + ".")

    return [g for g in cut if any(near(m) for m in members.get(g, {g}))] or cut


def structure(x: Any) -> tuple:
    """What a cut must not change in the model's output: nesting, types, keys, every tensor's dtype and shape."""
    if torch.is_tensor(x):
        return ("tensor", str(x.dtype), tuple(x.shape))
    if isinstance(x, (list, tuple)):
        return ("seq", type(x).__name__, tuple(structure(v) for v in x))
    if isinstance(x, dict):
        return ("map", type(x).__name__, tuple((str(k), structure(v)) for k, v in x.items()))
    return ("obj", type(x).__name__)  # opaque objects (e.g. a key/value cache): only their type


def check_output(expected: tuple, got: tuple, cuts: Sequence[Cut]) -> None:
    if expected != got:
        groups = [c.layer for c in cuts]
        reason = f"the model's output changed from {_describe(expected)} to {_describe(got)}"
        raise BrokenForward(
            f"after removing channels from the coupled group(s) {groups} {reason}. The cut was undone; the model is "
            "exactly as before. Add the layers the output's shape depends on to `ignored_layers`.",
            groups,
            reason=reason,
        )


def _describe(spec: tuple) -> str:
    kind, name = spec[0], spec[1]
    if kind == "tensor":
        return f"tensor{list(spec[2])} {name}"
    if kind == "seq":
        return f"{name}({', '.join(_describe(v) for v in spec[2])})"
    if kind == "map":
        return f"{name}({', '.join(f'{k}={_describe(v)}' for k, v in spec[2])})"
    return name


def _emptied(graph: tp.DependencyGraph, group: Any, asked: int) -> str:
    """Which coupled layer a cut of ``asked`` channels would empty, and how torch-pruning's index mapping got there."""
    names = tpc.module_names(graph)
    for dep, idxs in group:
        out = graph.is_out_channel_pruning_fn(dep.handler)
        if not out and not graph.is_in_channel_pruning_fn(dep.handler):
            continue
        module = dep.target.module
        width = graph.get_out_channels(module) if out else graph.get_in_channels(module)
        if width is not None and width <= len(idxs):
            name, side = names.get(module, type(module).__name__), "output" if out else "input"
            how = "" if len(idxs) == len(set(idxs)) == asked else (
                f" ({len(set(idxs))} distinct of {len(idxs)} indices for the {asked} asked: torch-pruning's index "
                "mapping widens or folds the cut through a reshape or split it cannot follow)"
            )
            return f": {name!r}, {width} {side} channels, would lose {len(idxs)}{how}."
    return "."


def _sync_split_offsets(group: Any) -> None:
    """The offsets of every split the group went through, from its new sizes.

    torch-pruning 1.6.1's split pruner updates ``split_sizes`` but writes the new offsets onto itself, not onto the
    split op; the next group search then maps indices with the old offsets (past the end of the layer).
    """
    for dep, _ in group:
        op = dep.target.module
        if isinstance(op, tpc.SplitOp) and op.split_sizes:
            op.offsets = [sum(op.split_sizes[:i]) for i in range(len(op.split_sizes) + 1)]


def _sync_hidden_dim(model: nn.Module, widths: dict[nn.MultiheadAttention, int]) -> None:
    """``hidden_dim`` attributes that hold an ``nn.MultiheadAttention``'s old width (torchvision's ViT) follow it."""
    for mha, old in widths.items():
        if mha.embed_dim == old:
            continue
        for module in model.modules():
            value = getattr(module, "hidden_dim", None)
            if isinstance(value, int) and value == old and any(m is mha for m in module.modules()):
                module.hidden_dim = mha.embed_dim



def checked_forward(
    model: nn.Module, example_input: Any, cuts: Sequence[Cut] = (), members: dict[str, set[str]] | None = None
) -> Any:
    """Run the example input in eval mode without grad or RNG side effects; a failure is a ``BrokenForward``.

    After a cut, a layer with parameters that the eval forward never called (an auxiliary head, a branch that
    stochastic depth drops) may run only in training: the model's train-mode forward is then run too (no grad,
    RNG forked, normalization layers in eval mode so the statistics stay and a batch of one is fine).
    """
    names = {m: name for name, m in model.named_modules()}
    running: list[nn.Module] = []  # the modules whose forward has started and not yet returned
    called: set[nn.Module] = set()
    mode = "eval"

    def enter(module: nn.Module, args: Any) -> None:
        running.append(module)
        called.add(module)

    def leave(module: nn.Module, args: Any, out: Any) -> None:
        running.pop()

    handles = [h for m in names for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with graph_safe(model), torch.no_grad(), torch.random.fork_rng(devices=devices):
            model.eval()
            out = run_model(model, example_input)
            if any(m not in called and any(p is not None for p in m._parameters.values()) for m in names):
                mode = "training"
                _train_forward(model, example_input, cuts)
            return out
    except Exception as err:
        if not cuts:
            raise
        layer = names.get(running[-1], "") if running else None
        groups = _groups_touching(members or {}, cuts, layer)
        where = f"in layer {layer!r} ({type(running[-1]).__name__})" if layer else "in the model's own forward"
        mode = " in training mode" if mode == "training" else ""
        hint = attn.input_width_hint(running[-1], err) if running else ""
        reason = f"the forward{mode} failed {where} with {type(err).__name__}: {err}{hint}"
        raise BrokenForward(
            f"after removing channels from the coupled group(s) {groups} the model no longer runs "
            f"`example_input`: {reason}. The cut was undone; the model is exactly as before. Add {groups} to "
            "`ignored_layers` to leave these layers alone.",
            groups,
            layer,
            reason,
        ) from err
    finally:
        for h in handles:
            h.remove()


_TRAIN_RUNS: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _train_forward(model: nn.Module, example_input: Any, cuts: Sequence[Cut]) -> None:
    """The train-mode forward (normalization layers in eval mode), inside ``checked_forward``'s guards.

    Before a cut (no ``cuts``) it only records whether the model runs it at all: a model whose train-mode forward
    fails uncut (it needs labels, say) is not held to it after a cut.
    """
    if cuts and not _TRAIN_RUNS.get(model, True):
        return
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.eval()
    if cuts:
        run_model(model, example_input)
        return
    try:
        run_model(model, example_input)
        _TRAIN_RUNS[model] = True
    except Exception:
        _TRAIN_RUNS[model] = False


def prune_group(model: nn.Module, graph: tp.DependencyGraph, cut: Cut) -> bool:
    """Remove one cut's channels through the graph (attention head-wise); True if the graph is stale after it."""
    module = module_by_name(model, cut.layer)
    if moe.owns(model, cut.layer, module):
        moe.prune_cut(model, cut.layer, module, cut.channels)
        return True  # the experts' layers (or unwrapped tensors) in the graph are stale: rebuild it
    if mamba.owns(module):
        mamba.prune(module, cut.channels, cut.layer)
        return True  # the mixer's layers in the graph hold the old tensors: rebuild it
    if mla.owns(module):
        mla.prune(module, cut.channels, cut.layer, slice_parameter)
        return True  # the module's layers in the graph hold the old tensors: rebuild it
    spec = next((s for s in attn.find_attention(model) if s.root is module), None)
    if spec is not None:
        try:
            attn.prune(spec, cut.channels)
        except attn.AttentionError as err:
            raise SurgeryError(str(err)) from err
        return True  # the graph's split sizes inside attention are stale: rebuild it before the next use
    if module not in graph.module2node:
        raise SurgeryError(f"layer {cut.layer!r} is not in the model's dependency graph.")
    width = graph.get_out_channels(module)
    bad = [i for i in cut.channels if not 0 <= int(i) < width]
    if bad or len(set(cut.channels)) >= width:
        raise SurgeryError(
            f"cannot remove channels {cut.channels[:8]}{'...' if len(cut.channels) > 8 else ''} from layer "
            f"{cut.layer!r} of width {width}."
        )
    group = graph.get_pruning_group(
        module, graph.get_pruner_of_module(module).prune_out_channels, list(cut.channels)
    )
    if not graph.check_pruning_group(group):
        n = len(cut.channels)
        where = _emptied(graph, group, n)
        raise SurgeryError(f"removing {n} channels from {cut.layer!r} would empty a coupled layer{where}")
    widths = {dep.target.module: dep.target.module.embed_dim for dep, _ in group
              if isinstance(dep.target.module, nn.MultiheadAttention)}
    group.prune(record_history=False)
    _sync_split_offsets(group)
    _sync_hidden_dim(model, widths)
    return False

