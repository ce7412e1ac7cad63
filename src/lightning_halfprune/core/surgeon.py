"""``Surgeon``: one model's graph, its groups, a plan, and the all-or-nothing cut, behind one object.

This room knows nothing about Lightning: it gets an ``nn.Module`` and an example input, and removes channels so
that every coupled layer (residual adds, concatenations, depthwise/grouped convs, norms, attention) stays
consistent. Scores come from a scorer (``scoring.py``); *how many* channels go is decided by ``plan.py``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from lightning_halfprune._compat import torch_pruning as tpc
from lightning_halfprune.core import attention as attn
from lightning_halfprune.core import attention_layouts, hf_config, layers, mamba, mla, moe, residual
from lightning_halfprune.core.cut import (
    DryRun,
    ParamRemap,
    attributed,
    check_output,
    checked_forward,
    graph_intact,
    members_of,
    prune_group,
    structure,
    tracking_slices,
)
from lightning_halfprune.core.graph import (
    ROOT_TYPES,
    ChannelGroup,
    cuts_residual_stream,
    graph_safe,
    inconsistent,
    module_by_name,
    output_tensors,
    plain_tensors,
    reaches_output,
    run_model,
    shared_parameter_holders,
    signature,
    slots_of,
    trace_error,
    unties,
)
from lightning_halfprune.core.group_search import all_groups, new_graph
from lightning_halfprune.core.plan import Cut, Planner
from lightning_halfprune.core.snapshot import GraphSnapshot, ModuleSnapshot


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
        moe_mode: how mixture-of-experts blocks are cut: each expert's width (``"width"``), whole experts with
            their router rows (``"experts"``), ``"both"`` or ``"none"`` (see ``moe.py``).
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
        moe_mode: moe.MoEMode = "width",
    ) -> None:
        attn.check_mode(attention)
        moe.check_mode(moe_mode)
        self.moe_mode = moe_mode
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
        self._searched: tuple[Any, tuple, dict] = (None, (), {})  # graph, signature -> each root's search outcome
        self.original_widths = dict(original_widths) if original_widths else {g.name: g.width for g in self.groups()}
        if not self.original_widths:
            raise ValueError(
                f"{type(model).__name__} has nothing prunable: every Conv/Linear layer is ignored or produces the "
                "model's output, or its groups were left out (the warnings above say why: torch-pruning could not "
                "search them, or they would change the residual stream, which `prune_hidden_size=False` keeps). "
                "Check `ignored_layers`."
            )

    # ---------------------------------------------------------------- graph
    @property
    def graph(self) -> tp.DependencyGraph:
        if self._graph is None or self._signature != signature(self.model):
            self._graph = self._build_graph()
            self._signature = signature(self.model)
        return self._graph

    def forget_graph(self) -> None:
        """Drop the graph and groups (rebuilt on next use): they hold the parameters, e.g. full ones now sharded."""
        self._graph, self._groups, self._signature = None, None, ()
        self._searched = (None, (), {})

    def _build_graph(self) -> tp.DependencyGraph:
        self.graph_builds += 1
        with graph_safe(self.model), attn.without_kv_cache(self.model):
            try:
                graph = new_graph().build_dependency(
                    self.model,
                    example_inputs=plain_tensors(self.example_input),
                    forward_fn=run_model,
                    output_transform=output_tensors,
                    customized_pruners=layers.customized_pruners(self.model),
                    verbose=False,
                )
            except Exception as err:
                raise trace_error(self.model, self.example_input, err) from err
        tpc.release_trace(graph)  # else the traced autograd graph keeps every pre-cut parameter alive
        return graph

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
        experts = moe.find_experts(self.model)  # routed experts: cut by moe.py, never roots of the graph's groups
        mixers = mamba.find_mixers(self.model)  # state-space mixers: their inner width is cut by mamba.py
        not_roots = ignored + [m for s in specs for m in s.inputs] + moe.not_roots(self.model, experts)
        latents = mla.find(self.model)  # multi-head latent attention: whole heads cut by mla.py
        not_roots += mamba.not_roots(mixers) + mla.not_roots(latents)
        stream = set() if self.prune_hidden_size else residual.stream_modules(self.model, specs)
        pruners = layers.customized_pruners(self.model)  # a norm's pruner (is_root False) never roots a group
        roots = ROOT_TYPES + tuple(t for t, p in pruners.items() if getattr(p, "is_root", True))
        holders = shared_parameter_holders(self.model)
        found = []
        if self._searched[0] is not graph or self._searched[1] != self._signature:
            self._searched = (graph, self._signature, {})  # a root's search holds until graph or params change
        for group in all_groups(graph, self.model, not_roots, roots, searched=self._searched[2]):
            if reaches_output(graph, group):
                continue
            if stream and cuts_residual_stream(graph, group, stream):
                continue  # the residual stream of a transformer: left alone unless asked
            if inconsistent(graph, group) or unties(graph, group, holders):
                continue
            root = group[0].dep.target.module
            found.append(
                ChannelGroup(tpc.module_names(graph)[root], group, graph.get_out_channels(root), slots_of(graph, group))
            )
        if self.attention != "none":
            for s in specs:
                if s.root in ignored or s.module in ignored:
                    continue
                if not {s.root, s.o} & graph.module2node.keys():
                    warnings.warn(attention_layouts.untraced_message(s), stacklevel=2)
                    continue
                if s.uncut is not None:  # an ambiguous fused layout: its projections are not roots either
                    warnings.warn(attention_layouts.ambiguous_message(s), stacklevel=2)
                    continue
                found.append(ChannelGroup(s.root_name, attn.scoring_group(s, graph), attn.out_width(s.root), 1, s))
        run = lambda: checked_forward(self.model, self.example_input)  # noqa: E731 - ranks experts by routing
        found += moe.channel_groups(self.model, experts, ignored, self.moe_mode, run)
        found += mamba.channel_groups(mixers, ignored) + mla.channel_groups(latents, ignored)
        self._groups = (self._signature, found)
        return found

    @property
    def widths(self) -> dict[str, int]:
        return {g.name: g.width for g in self.groups()}

    # ---------------------------------------------------------------- choosing
    def plan(
        self,
        ratio: float,
        score: Callable[[Any], torch.Tensor | None],
        judge: Callable[[], float] | None = None,
    ) -> list[Cut]:
        """Which channels to remove to reach cumulative ``ratio``; raises before anything is cut if scores are bad.

        ``judge``: the loss of the model as it is (e.g. on calibration batches). With ``attention="heads_last"``
        each way to split the ratio between heads and the other groups is made on trial and the one ``judge``
        finds lowest is kept (``allocation.py``); without it, the fewest heads are removed.
        """
        planner = Planner(
            self.original_widths, self.round_to, self.max_layer_ratio, self.global_pruning, self.attention,
            self.moe_mode,
        )
        if self.attention != "heads_last":
            return planner.plan(self.groups(), ratio, score)
        options = planner.allocations(self.groups(), ratio, score)
        if judge is None or len(options) == 1:
            return options[0]
        return min(options, key=lambda cuts: self._judged(cuts, judge))

    def _judged(self, cuts: Sequence[Cut], judge: Callable[[], float]) -> float:
        if not cuts:
            return judge()
        with self.trial(cuts):
            return judge()

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
        members = members_of(graph, self.groups())
        snapshot, graph_snapshot = ModuleSnapshot(self.model), GraphSnapshot(graph, self.model)
        try:
            with tracking_slices() as remap, graph_safe(self.model), torch.no_grad():
                for c in cuts:
                    if attributed(lambda c=c: prune_group(self.model, graph, c), c.layer):
                        self._graph = None
                hf_config.sync(self.model)  # once per cut, before the check: some forwards read the config
            for old, (new, _) in remap.steps.items():
                new.requires_grad_(old.requires_grad)
            check_output(expected, structure(checked_forward(self.model, self.example_input, cuts, members)), cuts)
            if dry_run:
                raise DryRun
            if then is not None:
                then(remap)
        except BaseException as err:
            snapshot.restore()
            if graph_intact(err):  # no torch-pruning call failed halfway: the graph is put back as it was
                graph_snapshot.restore()
                self._graph = graph  # also after an attention cut marked it stale: the model is as before
            else:
                self._graph = None
            if not isinstance(err, DryRun):
                raise
            return remap  # a dry run: model, graph and groups are exactly as before
        self._signature = signature(self.model)
        self._groups = None  # groups of the pre-cut graph hold pre-cut tensors: found again when next asked for
        return remap

    @contextlib.contextmanager
    def trial(self, cuts: Sequence[Cut]) -> Iterator[None]:
        """Make ``cuts`` for the duration of the block (to count or time the result), then undo them exactly.

        The model and torch-pruning's graph are both put back copy-free, so a search over many candidates (see
        ``target.py``) does not rebuild the graph after each one. A cut that fails undoes itself in ``cut``.
        """
        graph, groups = self.graph, self._groups
        snapshot, graph_snapshot = ModuleSnapshot(self.model), GraphSnapshot(graph, self.model)
        self.cut(cuts)
        try:
            yield
        finally:
            snapshot.restore()
            graph_snapshot.restore()  # the cut went through whole: the graph can be put back as it was
            self._graph, self._groups, self._signature = graph, groups, signature(self.model)

    def ignore(self, layers: Sequence[str]) -> None:
        """Leave the groups rooted at ``layers`` alone from now on, as if they were in ``ignored_layers``."""
        if not layers:
            return
        self.ignored_layers.extend(module_by_name(self.model, name) for name in layers)
        self._groups = None

    def _expected_output(self) -> tuple:
        """The structure of the model's output now (cached until the parameters change): what a cut must keep."""
        now = signature(self.model)
        cached = self.__dict__.get("_expected")
        if cached is None or cached[0] != now:
            self._expected = cached = (now, structure(checked_forward(self.model, self.example_input)))
        return cached[1]

