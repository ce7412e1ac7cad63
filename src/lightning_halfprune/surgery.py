"""Channel removal through torch-pruning's dependency graph, atomic, with a replayable record of every cut.

This room knows nothing about Lightning: it gets an ``nn.Module`` and an example input, and removes channels so
that every coupled layer (residual adds, concatenations, depthwise/grouped convs, norms, attention) stays
consistent. Scores come from a scorer (see ``scoring.py``); *how many* channels go is decided here from the
cumulative ratio and the widths the model had when pruning started.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops
from torch_pruning.pruner import function as tp_function

from lightning_halfprune import attention as attn
from lightning_halfprune import hf_config, layers
from lightning_halfprune.group_search import all_groups, new_graph

ROOT_TYPES = (ops.TORCH_CONV, ops.TORCH_LINEAR)
_SKIPPED_OUTPUTS = ("past_key_values", "hidden_states", "attentions", "cross_attentions")


class SurgeryError(RuntimeError):
    """Surgery could not be done; the model was left exactly as it was before.

    ``groups`` names the coupled groups (by root layer) the failure is attributed to, where known.
    """

    def __init__(self, message: str, groups: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.groups = list(groups)


class BrokenForward(SurgeryError):
    """The pruned model no longer ran the example input (or changed its output's shape); the cut was undone.

    ``layer`` is the innermost module whose forward was running when it failed ('' for the model itself).
    """

    def __init__(self, message: str, groups: Sequence[str] = (), layer: str | None = None, reason: str = "") -> None:
        super().__init__(message, groups)
        self.layer = layer
        self.reason = reason or message  # the short form: what broke, without the advice


@dataclass
class Cut:
    """Channels removed from one coupled group, named by its root layer, in that layer's output channels."""

    layer: str
    channels: list[int]

    def to_list(self) -> list:
        return [self.layer, list(self.channels)]


@dataclass
class ChannelGroup:
    """One set of coupled channels that can only be removed together."""

    name: str
    group: Any  # torch_pruning Group over all current channels
    width: int
    slots: int = 1  # channel groups (grouped conv, attention heads): a cut removes the same offset in each slot
    attention: attn.AttentionSpec | None = None  # set for an attention module, cut head-wise (attention.py)

    @property
    def slot_size(self) -> int:
        return self.width // self.slots


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
            if value.shape[dim] == shape[dim] != 1:
                value = torch.index_select(value, dim, keep.to(value.device))
            shape[dim] = len(keep)
        return value

    def __len__(self) -> int:
        return len(self.steps)


def run_model(model: nn.Module, x: Any) -> Any:
    """Lightning's ``example_input_array`` convention: tuple -> ``*args``, dict -> ``**kwargs``, else one arg."""
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, tuple):
        return model(*x)
    return model(x)


@contextlib.contextmanager
def graph_safe(model: nn.Module) -> Iterator[None]:
    """Grad enabled (also inside inference mode); every module's train/eval mode and buffer values restored after.

    HalfPrune's own forward passes (tracing, checks, MACs, timing, scoring) leave no trace in the model: a
    BatchNorm traced in train mode, or a fake-quantization observer (QAT), which observes in eval mode too, gets
    its statistics back, also where it resized them in place. Buffers the block replaced (a cut makes new ones)
    are the block's result and kept.
    """
    modes = {m: m.training for m in model.modules()}
    buffers = [
        (m, name, b, b.detach().clone())
        for m in model.modules()
        for name, b in m._buffers.items()
        if b is not None and not b.is_inference()
    ]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for m, training in modes.items():
            m.training = training
        with torch.no_grad():
            for m, name, b, value in buffers:
                if m._buffers.get(name) is b:  # observers resize theirs in place to a pruned layer's width
                    b.resize_(value.shape).copy_(value)


def resolve_ignored(model: nn.Module, ignored: Sequence[str | nn.Module] | None) -> list[nn.Module]:
    """Turn names, regular expressions or module objects into modules; an unmatched name is an error."""
    names = {name: module for name, module in model.named_modules() if name}
    resolved: list[nn.Module] = []
    for item in ignored or []:
        if isinstance(item, nn.Module):
            resolved.append(item)
            continue
        if not isinstance(item, str):
            raise TypeError(f"`ignored_layers` takes module names, regular expressions or modules, got {item!r}.")
        matches = [m for n, m in names.items() if n == item or _fullmatch(item, n)]
        if not matches:
            close = get_close_matches(item, list(names), n=3, cutoff=0.4)
            hint = f" Closest layer names: {close}." if close else f" Layer names look like: {list(names)[:5]}."
            raise ValueError(f"`ignored_layers` entry {item!r} matches no layer of the model.{hint}")
        resolved.extend(matches)
    return resolved


def _fullmatch(pattern: str, name: str) -> bool:
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


class Surgeon:
    """Owns one model's dependency graph and removes channels through it.

    The graph is built once and kept across events, since torch-pruning updates it in place as it prunes; it is
    rebuilt only when the model's parameters are no longer the ones the last cut produced.

    Args:
        model: the module to prune (a LightningModule is fine: names match its state dict).
        example_input: one input for tracing, on the model's device (tuple -> ``*args``, dict -> ``**kwargs``).
        ignored_layers: modules never pruned; layers producing the model's output are always added.
        round_to: keep channel counts a multiple of this.
        max_layer_ratio: no group loses more than this fraction of its original channels.
        global_pruning: rank channels across all groups instead of within each.
        original_widths: group -> width when pruning started (restored from a checkpoint); default: now.
        attention: how attention modules are cut: ``"heads"``, ``"head_dim"``, ``"both"`` or ``"none"``.
        prune_hidden_size: also cut the residual stream width (embeddings, norms, every projection reading it)
            of models with attention; by default it is left alone.
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Any,
        ignored_layers: Sequence[nn.Module] = (),
        *,
        round_to: int | None = None,
        max_layer_ratio: float = 0.9,
        global_pruning: bool = False,
        original_widths: dict[str, int] | None = None,
        attention: attn.AttentionMode = "heads",
        prune_hidden_size: bool = False,
    ) -> None:
        attn.check_mode(attention)
        self.attention = attention
        self.prune_hidden_size = bool(prune_hidden_size)
        self.model = model
        self.example_input = example_input
        self.ignored_layers = list(ignored_layers)
        self.round_to = round_to
        self.max_layer_ratio = max_layer_ratio
        self.global_pruning = global_pruning
        self.graph_builds = 0
        self._graph: tp.DependencyGraph | None = None
        self._signature: tuple = ()
        self._groups: tuple[tuple, list[ChannelGroup]] | None = None
        self.original_widths = dict(original_widths) if original_widths else {g.name: g.width for g in self.groups()}
        if not self.original_widths:
            raise ValueError(
                f"{type(model).__name__} has nothing prunable: every Conv/Linear layer is ignored or produces the "
                "model's output. Check `ignored_layers`."
            )

    # ---------------------------------------------------------------- graph
    @property
    def graph(self) -> tp.DependencyGraph:
        if self._graph is None or self._signature != _signature(self.model):
            self._graph = self._build_graph()
            self._signature = _signature(self.model)
        return self._graph

    def _build_graph(self) -> tp.DependencyGraph:
        self.graph_builds += 1
        with graph_safe(self.model), attn.without_kv_cache(self.model):
            try:
                return new_graph().build_dependency(
                    self.model,
                    example_inputs=_plain_tensors(self.example_input),
                    forward_fn=run_model,
                    output_transform=_output_tensors,
                    customized_pruners=layers.customized_pruners(self.model),
                    verbose=False,
                )
            except Exception as err:
                raise _trace_error(self.model, self.example_input, err) from err

    def groups(self) -> list[ChannelGroup]:
        """Every prunable coupled group, in a stable order, without those that reach the model's output.

        Cached until the model's parameters change (a cut, or anything else that replaces them).
        """
        graph = self.graph
        if self._groups is not None and self._groups[0] == self._signature:
            return self._groups[1]
        ignored = [m for layer in self.ignored_layers for m in layer.modules()]
        specs = attn.find_attention(self.model)
        # q/k/v are never roots of the graph's own groups: heads are cut by attention.py, and searching groups
        # from them through rotary embeddings is what made torch-pruning hang on Llama
        not_roots = ignored + [m for s in specs for m in s.inputs]
        outputs = {s.o for s in specs}
        roots = ROOT_TYPES + tuple(layers.customized_pruners(self.model))
        holders = _shared_parameter_holders(self.model)
        found = []
        for group in all_groups(graph, self.model, not_roots, roots):
            if _reaches_output(graph, group) or _inconsistent(graph, group) or _unties(graph, group, holders):
                continue
            if outputs and not self.prune_hidden_size and _prunes_out(graph, group, outputs):
                continue  # the residual stream of a transformer: left alone unless asked
            root = group[0].dep.target.module
            found.append(
                ChannelGroup(graph._module2name[root], group, graph.get_out_channels(root), _slots(graph, group))
            )
        if self.attention != "none":
            for s in specs:
                if s.root in ignored or s.module in ignored or s.root not in graph.module2node:
                    continue
                found.append(ChannelGroup(s.root_name, attn.scoring_group(s, graph), layers.out_width(s.root), 1, s))
        self._groups = (self._signature, found)
        return found

    @property
    def widths(self) -> dict[str, int]:
        return {g.name: g.width for g in self.groups()}

    # ---------------------------------------------------------------- choosing
    def plan(self, ratio: float, score: Callable[[Any], torch.Tensor | None]) -> list[Cut]:
        """Which channels to remove to reach cumulative ``ratio``; raises before anything is cut if scores are bad."""
        scored, heads = [], []
        cuts = []
        for g in self.groups():
            if g.name not in self.original_widths:
                continue
            if g.attention is not None and not self.global_pruning:
                cuts.extend(self._plan_attention(g, ratio, score))
                continue
            if g.attention is not None:  # ranked with everything else, a key/value group (its heads) at a time
                heads.append((g, _check_scores(g, _score_or_magnitude(g, score))))
                continue
            scores = _per_slot(g, _check_scores(g, _score_or_magnitude(g, score)))
            if scores is not None:
                scored.append((g, scores))
        if self.global_pruning:
            keep, head_keep = self._global_keep(scored, ratio, heads)
            for g, scores in heads:
                cuts.extend(self._plan_attention(g, ratio, score, head_keep[g.name], scores))
        else:
            keep = self._local_keep(scored, ratio)
        for g, scores in scored:
            n_slots_kept = keep[g.name] // g.slots
            drop = torch.argsort(scores, stable=True)[: g.slot_size - n_slots_kept].tolist()
            if drop:
                channels = sorted(j + s * g.slot_size for s in range(g.slots) for j in drop)
                cuts.append(Cut(g.name, channels))
        return cuts

    def _plan_attention(
        self,
        g: ChannelGroup,
        ratio: float,
        score: Callable[[Any], torch.Tensor | None],
        keep_fraction: float | None = None,
        scores: torch.Tensor | None = None,
    ) -> list[Cut]:
        """Whole heads / uniform head dims of one attention module.

        As many as the ratio leaves of it, or ``keep_fraction`` of its current width (given by global pruning).
        """
        scores = scores if scores is not None else _check_scores(g, _score_or_magnitude(g, score))
        original = self.original_widths[g.name]
        if keep_fraction is None:
            keep_fraction = min(1.0, original * (1 - ratio) / g.width)
        floor_fraction = original * (1 - self.max_layer_ratio) / g.width
        channels = attn.plan(g.attention, scores, keep_fraction, floor_fraction, self.attention)
        return [Cut(g.name, channels)] if channels else []

    def _floor(self, g: ChannelGroup) -> int:
        original = self.original_widths[g.name]
        floor = max(1, math.ceil(original * (1 - self.max_layer_ratio) - 1e-9))
        return _round_up(floor, g.slots)

    def _fit(self, g: ChannelGroup, keep: int) -> int:
        if self.round_to:
            keep = max(self.round_to, int(math.floor(keep / self.round_to + 0.5)) * self.round_to)
        keep = max(keep, self._floor(g))
        keep = _round_up(keep, g.slots)
        return min(keep, g.width)

    def _local_keep(self, scored: list, ratio: float) -> dict[str, int]:
        return {
            g.name: self._fit(g, int(math.floor(self.original_widths[g.name] * (1 - ratio) + 0.5))) for g, _ in scored
        }

    def _global_keep(
        self, scored: list, ratio: float, heads: list | None = None
    ) -> tuple[dict[str, int], dict[str, float]]:
        """Channels kept per group when every channel competes with all others (scores normalised per group).

        Attention modules (``heads``) compete a key/value group at a time, with its mean score and its query width;
        they get back the fraction of their current width to keep.
        """
        heads = [(g, _head_units(g.attention, s)) for g, s in heads or []]
        q_original = {g.name: self.original_widths[g.name] * g.attention.q_width / g.width for g, _ in heads}
        total_original = sum(self.original_widths[g.name] for g, _ in scored) + sum(q_original.values())
        total_now = sum(g.width for g, _ in scored) + sum(g.attention.q_width for g, _ in heads)
        to_remove = total_now - int(math.floor(total_original * (1 - ratio) + 0.5))
        keep = {g.name: g.width for g, _ in scored}
        units = {g.name: g.attention.num_kv_heads for g, _ in heads}
        candidates = sorted(
            [
                (float(s) / (float(scores.mean()) + 1e-12), i, False)
                for i, (g, scores) in enumerate(scored)
                for s in scores
            ]
            + [
                (float(s) / (float(unit_scores.mean()) + 1e-12), i, True)
                for i, (g, unit_scores) in enumerate(heads)
                if unit_scores is not None
                for s in unit_scores
            ],
            key=lambda c: (c[0], c[2], c[1]),
        )
        for _, i, is_head in candidates:
            if to_remove <= 0:
                break
            if is_head:
                g = heads[i][0]
                size = g.attention.q_width // g.attention.num_kv_heads
                floor = max(1, math.ceil(q_original[g.name] / size * (1 - self.max_layer_ratio) - 1e-9))
                if units[g.name] - 1 >= floor:
                    units[g.name] -= 1
                    to_remove -= size
                continue
            g = scored[i][0]
            if keep[g.name] - g.slots >= self._floor(g):
                keep[g.name] -= g.slots
                to_remove -= g.slots
        kept = {g.name: self._fit(g, keep[g.name]) if self.round_to else keep[g.name] for g, _ in scored}
        return kept, {g.name: units[g.name] / g.attention.num_kv_heads for g, _ in heads}

    # ---------------------------------------------------------------- cutting
    def cut(
        self, cuts: Sequence[Cut], then: Callable[[ParamRemap], None] | None = None, *, dry_run: bool = False
    ) -> ParamRemap:
        """Remove the channels of ``cuts``, check the pruned model still runs, then call ``then(remap)``.

        All or nothing: before anything is committed the pruned model must run ``example_input`` (eval mode, no
        grad, RNG untouched) and return an output of the same structure and shapes as before the cut; if it does
        not, the cut is undone and :class:`BrokenForward` names the coupled groups and the layer whose forward
        failed. ``then`` (e.g. rebinding the optimizer) runs only after that check. If anything raises (also
        KeyboardInterrupt), the model's modules are put back exactly as they were, the graph is dropped to be
        rebuilt, and the error propagates. ``dry_run``: do the cut and the check, then undo it anyway.
        """
        expected = self._expected_output()
        graph = self.graph
        members = _members(graph, self.groups())
        snapshot, graph_snapshot = _ModuleSnapshot(self.model), _GraphSnapshot(graph, self.model)
        try:
            with _tracking_slices() as remap, graph_safe(self.model), torch.no_grad():
                for c in cuts:
                    _attributed(lambda c=c: self._prune_group(graph, c), c.layer)
                hf_config.sync(self.model)  # once per cut, before the check: some forwards read the config
            for old, (new, _) in remap.steps.items():
                new.requires_grad_(old.requires_grad)
            _check_output(expected, _structure(self._forward(cuts, members)), cuts)
            if dry_run:
                raise _DryRun
            if then is not None:
                then(remap)
        except BaseException as err:
            snapshot.restore()
            if _graph_intact(err):  # no torch-pruning call failed halfway: the graph can be put back
                graph_snapshot.restore()
            else:
                self._graph = None
            if not isinstance(err, _DryRun):
                raise
        self._signature = _signature(self.model)
        return remap

    @contextlib.contextmanager
    def trial(self, cuts: Sequence[Cut]) -> Iterator[None]:
        """Make ``cuts`` for the duration of the block (to count or time the result), then undo them exactly.

        The model and torch-pruning's graph are both put back copy-free, so a search over many candidates (see
        ``target.py``) does not rebuild the graph after each one. A cut that fails undoes itself in ``cut``.
        """
        graph, groups = self.graph, self._groups
        snapshot, graph_snapshot = _ModuleSnapshot(self.model), _GraphSnapshot(graph, self.model)
        self.cut(cuts)
        try:
            yield
        finally:
            snapshot.restore()
            graph_snapshot.restore()  # the cut went through whole: the graph can be put back as it was
            self._graph, self._groups, self._signature = graph, groups, _signature(self.model)

    def ignore(self, layers: Sequence[str]) -> None:
        """Leave the groups rooted at ``layers`` alone from now on, as if they were in ``ignored_layers``."""
        self.ignored_layers.extend(_module_by_name(self.model, name) for name in layers)
        self._groups = None

    def _expected_output(self) -> tuple:
        """The structure of the model's output now (cached until the parameters change): what a cut must keep."""
        signature = _signature(self.model)
        cached = self.__dict__.get("_expected")
        if cached is None or cached[0] != signature:
            self._expected = cached = (signature, _structure(self._forward()))
        return cached[1]

    def _forward(self, cuts: Sequence[Cut] = (), members: dict[str, set[str]] | None = None) -> Any:
        """Run the example input in eval mode without grad or RNG side effects; a failure is a ``BrokenForward``."""
        names = {m: name for name, m in self.model.named_modules()}
        running: list[nn.Module] = []  # the modules whose forward has started and not yet returned

        def leave(module: nn.Module, args: Any, out: Any) -> None:
            running.pop()

        handles = [
            h
            for m in names
            for h in (m.register_forward_pre_hook(lambda m, args: running.append(m)), m.register_forward_hook(leave))
        ]
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        try:
            with graph_safe(self.model), torch.no_grad(), torch.random.fork_rng(devices=devices):
                self.model.eval()
                return run_model(self.model, self.example_input)
        except Exception as err:
            if not cuts:
                raise
            layer = names.get(running[-1], "") if running else None
            groups = _groups_touching(members or {}, cuts, layer)
            where = f"in layer {layer!r} ({type(running[-1]).__name__})" if layer else "in the model's own forward"
            reason = f"the forward failed {where} with {type(err).__name__}: {err}"
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

    def _prune_group(self, graph: tp.DependencyGraph, cut: Cut) -> None:
        module = _module_by_name(self.model, cut.layer)
        spec = next((s for s in attn.find_attention(self.model) if s.root is module), None)
        if spec is not None:
            try:
                attn.prune(spec, cut.channels)
            except attn.AttentionError as err:
                raise SurgeryError(str(err)) from err
            self._graph = None  # the graph's split sizes inside attention are stale: rebuilt before the next use
            return
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
            raise SurgeryError(f"removing {len(cut.channels)} channels from {cut.layer!r} would empty a coupled layer.")
        widths = {dep.target.module: dep.target.module.embed_dim for dep, _ in group
                  if isinstance(dep.target.module, nn.MultiheadAttention)}
        group.prune(record_history=False)
        _sync_split_offsets(group)
        _sync_hidden_dim(self.model, widths)


# -------------------------------------------------------------------- helpers
def _output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's output to trace from; Hugging Face caches and extra states are not outputs."""
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, Mapping):
        return [t for k, v in out.items() if k not in _SKIPPED_OUTPUTS for t in _output_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _output_tensors(v)]
    return []


def _plain_tensors(x: Any) -> Any:
    """Inference-mode tensors cannot enter autograd: clone them into ordinary ones."""
    if torch.is_tensor(x):
        return x.clone() if x.is_inference() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_plain_tensors(v) for v in x)
    if isinstance(x, dict):
        return {k: _plain_tensors(v) for k, v in x.items()}
    return x


def _module_by_name(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise SurgeryError(f"the model has no layer {name!r}.") from err


def _signature(model: nn.Module) -> tuple:
    return tuple((name, id(p), tuple(p.shape)) for name, p in model.named_parameters())


def _reaches_output(graph: tp.DependencyGraph, group: Any) -> bool:
    """True if removing this group's channels would change the shape of the model's output."""
    for dep, _ in group:
        if not graph.is_out_channel_pruning_fn(dep.handler):
            continue
        node = dep.target
        if node.type == ops.OPTYPE.OUTPUT or (isinstance(node.module, nn.Module) and not node.outputs):
            return True
    return False


def _prunes_out(graph: tp.DependencyGraph, group: Any, modules: set) -> bool:
    return any(dep.target.module in modules and graph.is_out_channel_pruning_fn(dep.handler) for dep, _ in group)


def _inconsistent(graph: tp.DependencyGraph, group: Any) -> bool:
    """Channels that do not line up: a layer that mixes tokens (Mixer) coupled to one that mixes channels.

    Such a group is skipped with a warning: pruning it would change the number of tokens.
    """
    root = group[0].dep.target.module
    width = graph.get_out_channels(root)
    for dep, idxs in group:
        module = dep.target.module
        if not isinstance(module, ROOT_TYPES) or not graph.is_out_channel_pruning_fn(dep.handler):
            continue  # inputs may legitimately be wider (concatenations)
        if graph.get_out_channels(module) not in (None, width) and len(idxs) == width:
            warnings.warn(
                f"HalfPrune leaves the channels of {graph._module2name.get(root)!r} alone: they are coupled to "
                f"{graph._module2name.get(module)!r}, whose width differs ({graph.get_out_channels(module)} vs "
                f"{width}); a layer that "
                "mixes tokens (as in MLP-Mixer) rather than channels cannot be cut this way.",
                stacklevel=2,
            )
            return True
    return False


def _sync_split_offsets(group: Any) -> None:
    """The offsets of every split the group went through, from its new sizes.

    torch-pruning 1.6.1's split pruner updates ``split_sizes`` but writes the new offsets onto itself, not onto the
    split op; the next group search then maps indices with the old offsets (past the end of the layer).
    """
    for dep, _ in group:
        op = dep.target.module
        if isinstance(op, ops._SplitOp) and op.split_sizes:
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


def _shared_parameter_holders(model: nn.Module) -> dict[int, set[nn.Module]]:
    """Tied parameters (an embedding shared with an LM head, ...): parameter id -> every module holding it."""
    holders: dict[int, set[nn.Module]] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                holders.setdefault(id(p), set()).add(module)
    return {k: v for k, v in holders.items() if len(v) > 1}


def _unties(graph: tp.DependencyGraph, group: Any, holders: dict[int, set[nn.Module]]) -> bool:
    """True (with a warning) if the group would cut a tied parameter in some of the layers sharing it only."""
    modules = {dep.target.module for dep, _ in group}
    for module in modules:
        if not isinstance(module, nn.Module):
            continue
        for p in module._parameters.values():
            if p is not None and id(p) in holders and not holders[id(p)] <= modules:
                root = graph._module2name.get(group[0].dep.target.module)
                warnings.warn(
                    f"HalfPrune leaves the channels of {root!r} alone: they cut a parameter tied between "
                    f"{sorted(graph._module2name.get(m, '?') for m in holders[id(p)])}, not all of which are "
                    "coupled to them; tied weights are only cut all together.",
                    stacklevel=2,
                )
                return True
    return False


def _slots(graph: tp.DependencyGraph, group: Any) -> int:
    """Channel groups that must stay equal in size: grouped convs, GroupNorm, attention heads, equal chunks.

    Equal chunks: a fused layer split in equal parts (Phi-3's ``gate_up_proj``), whose channel j pairs with channel
    j of every other part.
    """
    slots = 1
    width = graph.get_out_channels(group[0].dep.target.module)
    for dep, _ in group:
        module = dep.target.module
        sizes = getattr(module, "split_sizes", None) if isinstance(module, ops._SplitOp) else None
        if sizes and len(set(sizes)) == 1 and sum(sizes) == width:  # a fused layer chunked (Phi-3's gate_up_proj)
            slots = max(slots, len(sizes))
            continue
        if isinstance(module, nn.MultiheadAttention):
            slots = max(slots, module.num_heads)
            continue
        if isinstance(module, ops.TORCH_CONV) and module.groups == module.out_channels:
            continue  # depthwise: pruned channel by channel
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or not isinstance(module, nn.Module):
            continue
        if graph.is_out_channel_pruning_fn(dep.handler):
            slots = max(slots, pruner.get_out_channel_groups(module))
        else:
            slots = max(slots, pruner.get_in_channel_groups(module))
    return slots


def _head_units(spec: attn.AttentionSpec, scores: torch.Tensor | None) -> torch.Tensor | None:
    """One score per key/value group (the heads that go together), from an attention group's root scores."""
    return None if scores is None else attn.q_space(spec, scores).view(spec.num_kv_heads, -1).mean(1)


def _score_or_magnitude(g: ChannelGroup, score: Callable[[Any], torch.Tensor | None]) -> torch.Tensor | None:
    """The scorer's scores; weight magnitude where it cannot read the group's layers (HF ``Conv1D``, peft adapters)."""
    scores = score(g.group)
    if scores is None or (hasattr(scores, "__len__") and len(scores) == 0):
        if any(layers.needs_fallback(item.dep.target.module) for item in g.group):
            return layers.magnitude(g.group, g.width)
    return scores


def _check_scores(g: ChannelGroup, scores: torch.Tensor | None) -> torch.Tensor | None:
    if scores is None:
        return None
    if not torch.is_tensor(scores):
        raise SurgeryError(
            f"the scorer returned {type(scores).__name__} for layer {g.name!r}; it must return a tensor."
        )
    scores = scores.detach().float().flatten().cpu()
    if scores.numel() != g.width:
        raise SurgeryError(
            f"the scorer returned {scores.numel()} scores for layer {g.name!r}, which has {g.width} channels; "
            "nothing was pruned."
        )
    if not torch.isfinite(scores).all():
        broken = _non_finite_weights(g)
        if broken:
            raise SurgeryError(
                f"the weights of layer {broken!r} hold NaN or inf (has training diverged?), so its channels cannot be "
                "ranked; nothing was pruned."
            )
        raise SurgeryError(f"the scorer returned NaN or inf scores for layer {g.name!r}; nothing was pruned.")
    return scores


def _non_finite_weights(g: ChannelGroup) -> str | None:
    """The name of a layer of the group whose parameters hold NaN or inf, if any."""
    graph = g.group._DG
    for item in g.group:
        module = item.dep.target.module
        if isinstance(module, nn.Module) and any(not torch.isfinite(p).all() for p in module.parameters(False)):
            return graph._module2name.get(module, type(module).__name__) if graph is not None else type(module).__name__
    return None


def _per_slot(g: ChannelGroup, scores: torch.Tensor | None) -> torch.Tensor | None:
    if scores is None or g.slots == 1:
        return scores
    return scores.view(g.slots, -1).mean(0)


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


class _ModuleSnapshot:
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


class _DryRun(Exception):
    """Raised inside ``Surgeon.cut(dry_run=True)`` to take the undo path after a successful check."""


class _GraphSnapshot:
    """What a cut changes in torch-pruning's graph besides the model's modules: an exact, copy-free undo.

    The sizes its own op nodes (concat, split, slice, output) keep, the index mappings between nodes, and the
    entries of unwrapped parameters, which a cut replaces.
    """

    def __init__(self, graph: tp.DependencyGraph, model: nn.Module) -> None:
        own = set(model.modules())
        self.graph = graph
        self.module2node, self.param_to_name = dict(graph.module2node), dict(graph._param_to_name)
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
        self.graph._param_to_name.clear()
        self.graph._param_to_name.update(self.param_to_name)
        for node, module in self.nodes:
            node.module = module
        for dep, mapping in self.mappings:
            dep.index_mapping[:] = mapping
        for op, state in self.ops:
            vars(op).update({k: copy.copy(v) for k, v in state.items()})


def _graph_intact(err: BaseException) -> bool:
    """True unless ``err`` came from inside torch-pruning (or an interrupt), which may have left its graph halfway."""
    return (
        isinstance(err, _DryRun)
        or (isinstance(err, SurgeryError) and err.__cause__ is None)
        or isinstance(err, BrokenForward)
    )


def _sizes(value: Any) -> bool:
    """Plain size bookkeeping (ints and lists of ints), as torch-pruning's op nodes keep it."""
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, int) for v in value)
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


@contextlib.contextmanager
def _tracking_slices() -> Iterator[ParamRemap]:
    """Record every slice torch-pruning takes of a parameter, chaining repeated slices of the same tensor."""
    remap = ParamRemap()
    successor: dict[nn.Parameter, nn.Parameter] = {}  # newest tensor -> the original it came from
    done: dict[tuple[int, int], tuple[nn.Parameter, nn.Parameter, torch.Tensor]] = {}  # (tensor, dim) -> slice
    original = tp_function.BasePruningFunc._prune_parameter_and_grad

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
        source = successor.pop(weight, weight)
        _, steps = remap.steps.get(source, (None, []))
        remap.steps[source] = (new, [*steps, (dim, keep)])
        successor[new] = source
        return new

    tp_function.BasePruningFunc._prune_parameter_and_grad = tracked
    try:
        yield remap
    finally:
        tp_function.BasePruningFunc._prune_parameter_and_grad = original


def _trace_error(model: nn.Module, example_input: Any, err: Exception) -> Exception:
    """Why the graph could not be built: the user's input (the model cannot run it) or torch-pruning's tracing."""
    try:
        with graph_safe(model), torch.no_grad():
            model.eval()
            run_model(model, example_input)
    except Exception:  # the user's model could not run the example input
        return ValueError(
            f"`example_input` could not be traced through {type(model).__name__}: "
            f"{type(err).__name__}: {err}. Pass an `example_input` the model's forward accepts "
            "(or set `example_input_array` on the LightningModule)."
        )
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "torch_pruning" in f.filename]
    last = frames[-1] if frames else None
    where = f" (in torch_pruning{last.filename.split('torch_pruning')[-1]}:{last.lineno}, {last.name})" if last else ""
    return SurgeryError(
        f"torch-pruning could not build the dependency graph of {type(model).__name__}: {type(err).__name__}: "
        f"{err}{where}. The model runs `example_input` fine, so the error is in torch-pruning's graph tracing, not "
        "in your input; nothing was pruned. Models it cannot trace cannot be pruned by HalfPrune."
    )


def _attributed(prune: Callable[[], None], group: str) -> None:
    """Run one group's removal; any failure becomes a ``SurgeryError`` that names the group."""
    try:
        prune()
    except SurgeryError as err:
        err.groups = err.groups or [group]
        raise
    except Exception as err:
        raise SurgeryError(
            f"torch-pruning failed removing channels from the coupled group {group!r}: {type(err).__name__}: {err}",
            [group],
        ) from err


def _members(graph: tp.DependencyGraph, groups: Sequence[ChannelGroup]) -> dict[str, set[str]]:
    """Group name -> the names of every layer (and unwrapped parameter) in it."""
    names = {**graph._module2name, **graph._param_to_name}
    return {g.name: {g.name} | {names.get(dep.target.module, "") for dep, _ in g.group} - {""} for g in groups}


def _groups_touching(members: dict[str, set[str]], cuts: Sequence[Cut], layer: str | None) -> list[str]:
    """The cut groups with a member inside (or around) ``layer``; all of them if none is, or the layer is unknown."""
    cut = [c.layer for c in cuts]
    if not layer:
        return cut

    def near(name: str) -> bool:
        return name == layer or name.startswith(layer + ".") or layer.startswith(name + ".")

    return [g for g in cut if any(near(m) for m in members.get(g, {g}))] or cut


def _structure(x: Any) -> tuple:
    """What a cut must not change in the model's output: nesting, types, keys, every tensor's dtype and shape."""
    if torch.is_tensor(x):
        return ("tensor", str(x.dtype), tuple(x.shape))
    if isinstance(x, (list, tuple)):
        return ("seq", type(x).__name__, tuple(_structure(v) for v in x))
    if isinstance(x, dict):
        return ("map", type(x).__name__, tuple((str(k), _structure(v)) for k, v in x.items()))
    return ("obj", type(x).__name__)  # opaque objects (e.g. a key/value cache): only their type


def _check_output(expected: tuple, got: tuple, cuts: Sequence[Cut]) -> None:
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
