"""torch-pruning's dependency graph of one model, and the coupled groups HalfPrune may cut in it.

Building the graph (tracing the example input), finding groups, and the filters that leave a group alone: it
reaches the model's output, mixes tokens, unties tied weights, or (by default) cuts a transformer's residual stream.
"""

from __future__ import annotations

import contextlib
import re
import traceback
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from difflib import get_close_matches
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops

from lightning_halfprune._compat import torch_pruning as tpc
from lightning_halfprune.core import attention as attn
from lightning_halfprune.core.errors import SurgeryError

ROOT_TYPES = (ops.TORCH_CONV, ops.TORCH_LINEAR)


_SKIPPED_OUTPUTS = ("past_key_values", "hidden_states", "attentions", "cross_attentions")


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


def left_alone(module: nn.Module, layers: Sequence[nn.Module], ignored: Sequence[nn.Module]) -> bool:
    """True if a module cut by its own room (a Mamba mixer, an MLA module) or one of its layers is ignored."""
    ids = {id(m) for m in ignored}
    return id(module) in ids or any(id(layer) in ids for layer in layers)


def removable(removed: Sequence[int], width: int) -> bool:
    """Whether ``removed`` names distinct units of ``width`` (channels, heads) and leaves at least one."""
    drop = {int(c) for c in removed}
    return len(drop) == len(removed) and all(0 <= c < width for c in drop) and len(drop) < width


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


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's output to trace from; Hugging Face caches and extra states are not outputs."""
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, Mapping):
        return [t for k, v in out.items() if k not in _SKIPPED_OUTPUTS for t in output_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in output_tensors(v)]
    return []


def plain_tensors(x: Any) -> Any:
    """Inference-mode tensors cannot enter autograd: clone them into ordinary ones."""
    if torch.is_tensor(x):
        return x.clone() if x.is_inference() else x
    if isinstance(x, (tuple, list)):
        return type(x)(plain_tensors(v) for v in x)
    if isinstance(x, dict):
        return {k: plain_tensors(v) for k, v in x.items()}
    return x


def module_by_name(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise SurgeryError(f"the model has no layer {name!r}.") from err


def signature(model: nn.Module) -> tuple:
    return tuple((name, id(p), tuple(p.shape)) for name, p in model.named_parameters())


def reaches_output(graph: tp.DependencyGraph, group: Any) -> bool:
    """True if removing this group's channels would change the shape of the model's output."""
    for dep, _ in group:
        if not graph.is_out_channel_pruning_fn(dep.handler):
            continue
        node = dep.target
        if node.type == ops.OPTYPE.OUTPUT or (isinstance(node.module, nn.Module) and not node.outputs):
            return True
    return False


def prunes_out(graph: tp.DependencyGraph, group: Any, modules: set) -> bool:
    return any(dep.target.module in modules and graph.is_out_channel_pruning_fn(dep.handler) for dep, _ in group)


def inconsistent(graph: tp.DependencyGraph, group: Any) -> bool:
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
                f"HalfPrune leaves the channels of {tpc.module_names(graph).get(root)!r} alone: they are coupled to "
                f"{tpc.module_names(graph).get(module)!r}, whose width differs ({graph.get_out_channels(module)} vs "
                f"{width}); a layer that "
                "mixes tokens (as in MLP-Mixer) rather than channels cannot be cut this way.",
                stacklevel=2,
            )
            return True
    return False


def cuts_residual_stream(graph: tp.DependencyGraph, group: Any, stream: set[nn.Module]) -> bool:
    """True (with a warning naming the group) if the group would change the width of the residual stream.

    ``stream`` (``residual.stream_modules``): attention output projections, embeddings and norms of the hidden size.
    A projection counts when its output channels would go; an embedding or a norm whenever it is in the group.
    """
    hit = sorted(
        tpc.module_names(graph).get(m, type(m).__name__)
        for dep, _ in group
        if (m := dep.target.module) in stream
        and (not isinstance(m, ROOT_TYPES) or graph.is_out_channel_pruning_fn(dep.handler))
    )
    if not hit:
        return False
    warnings.warn(
        f"HalfPrune leaves the channels of {tpc.module_names(graph).get(group[0].dep.target.module)!r} alone: "
        f"cutting them would change the residual stream (hidden size) of the model, through {hit[:4]}"
        f"{' and more' if len(hit) > 4 else ''}; `prune_hidden_size=False` (the default) keeps it. Pass "
        "`prune_hidden_size=True` to cut the hidden size too.",
        stacklevel=2,
    )
    return True


def shared_parameter_holders(model: nn.Module) -> dict[int, set[nn.Module]]:
    """Tied parameters (an embedding shared with an LM head, ...): parameter id -> every module holding it."""
    holders: dict[int, set[nn.Module]] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                holders.setdefault(id(p), set()).add(module)
    return {k: v for k, v in holders.items() if len(v) > 1}


def unties(graph: tp.DependencyGraph, group: Any, holders: dict[int, set[nn.Module]]) -> bool:
    """True (with a warning) if the group would cut a tied parameter in some of the layers sharing it only."""
    modules = {dep.target.module for dep, _ in group}
    for module in modules:
        if not isinstance(module, nn.Module):
            continue
        for p in module._parameters.values():
            if p is not None and id(p) in holders and not holders[id(p)] <= modules:
                root = tpc.module_names(graph).get(group[0].dep.target.module)
                warnings.warn(
                    f"HalfPrune leaves the channels of {root!r} alone: they cut a parameter tied between "
                    f"{sorted(tpc.module_names(graph).get(m, '?') for m in holders[id(p)])}, not all of which are "
                    "coupled to them; tied weights are only cut all together.",
                    stacklevel=2,
                )
                return True
    return False


def slots_of(graph: tp.DependencyGraph, group: Any) -> int:
    """Channel groups that must stay equal in size: grouped convs, GroupNorm, attention heads, equal chunks.

    Equal chunks: a fused layer split in equal parts (Phi-3's ``gate_up_proj``), whose channel j pairs with channel
    j of every other part.
    """
    slots = 1
    width = graph.get_out_channels(group[0].dep.target.module)
    for dep, _ in group:
        module = dep.target.module
        sizes = getattr(module, "split_sizes", None) if isinstance(module, tpc.SplitOp) else None
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


def trace_error(model: nn.Module, example_input: Any, err: Exception) -> Exception:
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

