"""Scorers: how important each channel of a coupled group is. Low scores are removed first.

A scorer is any callable ``scorer(group) -> Tensor`` returning one score per channel of a torch-pruning group
(over the group's root channels), so every ``torch_pruning.importance`` object works as is. Data-driven scorers
also have ``calibrate(model, batches, loss_fn)``, called on a few calibration batches before scoring, and
``release()``, called after, to free what calibration collected.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from difflib import get_close_matches
from typing import Any, Protocol, runtime_checkable

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function as tp_function

from lightning_halfprune._compat import torch_pruning as tpc
from lightning_halfprune.core import layers, pruners
from lightning_halfprune.core.graph import run_model

__all__ = [
    "ActivationScorer",
    "CalibratedScorer",
    "MagnitudeScorer",
    "RandomScorer",
    "RedundancyScorer",
    "Scorer",
    "TaylorScorer",
    "SCORERS",
    "get_scorer",
]

HOOKED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@runtime_checkable
class Scorer(Protocol):
    """One score per channel of ``group`` (higher = more important), or None to leave the group alone."""

    def __call__(self, group: Any) -> torch.Tensor | None: ...


class CalibratedScorer:
    """Base of scorers that look at data: ``calibrate`` runs first on a few batches, ``release`` after scoring."""

    needs_data = True
    inputs_of: Callable[[Any], Any] = staticmethod(lambda batch: _inputs_of(batch))  # HalfPrune sets the fit's own

    def calibrate(self, model: nn.Module, batches: Sequence[Any], loss_fn: Callable[[Any], torch.Tensor]) -> None:
        raise NotImplementedError

    def release(self) -> None:
        """Free whatever calibration collected."""

    def __call__(self, group: Any) -> torch.Tensor | None:
        raise NotImplementedError


class PlainView:
    """A torch-pruning importance that reads every group through ``pruners.plain_view`` (NF-Nets' std convs)."""

    def __init__(self, importance: Callable[[Any], torch.Tensor | None]) -> None:
        self.importance = importance

    def __call__(self, group: Any) -> torch.Tensor | None:
        return self.importance(pruners.plain_view(group))


class RandomScorer:
    """Uniform random scores: the control every benchmark needs. Seeded, so every DDP rank draws the same."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    def __call__(self, group: Any) -> torch.Tensor:
        return torch.rand(len(group[0].idxs), generator=self._generator)


class TaylorScorer(CalibratedScorer):
    """First-order Taylor estimate ``|w * dL/dw|`` summed over the group (Molchanov et al. 2019).

    Lightning has zeroed the gradients when an epoch ends, so ``calibrate`` computes them itself: it sums the
    gradients of the training loss over the calibration batches into ``.grad``; the caller restores the fit's
    own gradients afterwards.
    """

    def __init__(self) -> None:
        self._importance = tp.importance.GroupTaylorImportance()

    def calibrate(self, model: nn.Module, batches: Sequence[Any], loss_fn: Callable[[Any], torch.Tensor]) -> None:
        for p in model.parameters():
            p.grad = None
        for batch in batches:
            loss_fn(batch).backward()
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def __call__(self, group: Any) -> torch.Tensor | None:
        return self._importance(pruners.plain_view(group))


class _ChannelStatsScorer(CalibratedScorer):
    """Collects per-channel statistics of every Conv/Linear output with forward hooks, then maps them to groups.

    ``inputs_of(batch)`` gives the model input of a calibration batch; ``HalfPrune`` sets it to what the
    LightningModule's ``training_step`` feeds the model (or the user's ``input_fn``).
    """

    def __init__(self) -> None:
        self._stats: dict[nn.Module, Any] = {}

    def calibrate(self, model: nn.Module, batches: Sequence[Any], loss_fn: Callable[[Any], torch.Tensor]) -> None:
        self._stats = {}
        hooked = [m for m in model.modules() if isinstance(m, HOOKED_TYPES)]
        run_hooked(model, batches, self.inputs_of, [m.register_forward_hook(self._hook) for m in hooked])

    def _hook(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        channels = out.movedim(1, -1) if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else out
        self._accumulate(module, channels.reshape(-1, channels.shape[-1]).detach().float())

    def _accumulate(self, module: nn.Module, rows: torch.Tensor) -> None:
        raise NotImplementedError

    def _channel_scores(self, module: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def release(self) -> None:
        self._stats = {}

    def __call__(self, group: Any) -> torch.Tensor | None:
        graph = tpc.graph_of(group)
        total = torch.zeros(len(group[0].idxs))
        found = False
        for item in group:
            dep, idxs = item.dep, item.idxs
            if dep.target.module in self._stats and graph.is_out_channel_pruning_fn(dep.handler):
                scores = self._channel_scores(dep.target.module).cpu()
                total.index_add_(0, torch.as_tensor(item.root_idxs), scores[torch.as_tensor(idxs)])
                found = True
        return total if found else None


class ActivationScorer(_ChannelStatsScorer):
    """How much each channel's output carries, averaged over the calibration batches.

    ``statistic="mean_abs"``: the mean absolute output. ``statistic="apoz"``: one minus the fraction of outputs at
    or below zero, i.e. of zeros after a ReLU (APoZ, Hu et al. 2016).
    """

    def __init__(self, statistic: str = "mean_abs") -> None:
        super().__init__()
        if statistic not in ("mean_abs", "apoz"):
            raise ValueError(f"`statistic` must be 'mean_abs' or 'apoz', got {statistic!r}.")
        self.statistic = statistic

    def _accumulate(self, module: nn.Module, rows: torch.Tensor) -> None:
        value = rows.abs() if self.statistic == "mean_abs" else (rows > 0).float()
        total, count = self._stats.get(module, (0.0, 0))
        self._stats[module] = (value.sum(0) + total, count + rows.shape[0])

    def _channel_scores(self, module: nn.Module) -> torch.Tensor:
        total, count = self._stats[module]
        return total / max(count, 1)


class RedundancyScorer(_ChannelStatsScorer):
    """Channels that another, stronger channel already duplicates score low; so do channels carrying no signal.

    Over the calibration batches each layer's outputs give, per channel ``i``, its signal
    ``s_i = sqrt(mean(y_i ** 2))`` and, for each pair, the Pearson correlation ``rho_ij``. Channel ``i`` is
    redundant to the degree a *stronger* channel copies it: ``r_i = max |rho_ij|`` over channels ``j`` with
    ``s_j > s_i`` (ties broken by index). The score is::

        score_i = (s_i / mean(s)) * (1 - r_i)

    so in a cluster of near-duplicates the strongest member keeps its full score and the copies go first, and a
    dead channel scores 0. For wide layers at most ``max_positions`` output positions per batch are sampled
    (seeded) and only the running ``C x C`` Gram matrix is kept, so memory per layer is ``O(C**2)``, never
    ``O(positions * C)``.
    """

    def __init__(self, max_positions: int = 1024, seed: int = 0) -> None:
        super().__init__()
        self.max_positions = max_positions
        self.seed = seed

    def calibrate(self, model: nn.Module, batches: Sequence[Any], loss_fn: Callable[[Any], torch.Tensor]) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)
        super().calibrate(model, batches, loss_fn)

    def _accumulate(self, module: nn.Module, rows: torch.Tensor) -> None:
        if rows.shape[0] > self.max_positions:
            pick = torch.randperm(rows.shape[0], generator=self._generator)[: self.max_positions]
            rows = rows[pick.to(rows.device)]
        rows = rows.double() if rows.shape[1] <= 1024 else rows
        n, total, gram = self._stats.get(module, (0, 0.0, 0.0))
        self._stats[module] = (n + rows.shape[0], rows.sum(0) + total, rows.T @ rows + gram)

    def _channel_scores(self, module: nn.Module) -> torch.Tensor:
        n, total, gram = self._stats[module]
        mean = total / n
        second = gram / n
        cov = second - torch.outer(mean, mean)
        std = cov.diagonal().clamp_min(0).sqrt()
        signal = second.diagonal().clamp_min(0).sqrt()
        live = std > 1e-12
        corr = (cov / torch.outer(std, std).clamp_min(1e-24)).abs()
        corr[~live, :] = 0
        corr[:, ~live] = 0
        idx = torch.arange(len(signal), device=signal.device)
        stronger = (signal[None, :] > signal[:, None]) | (
            (signal[None, :] == signal[:, None]) & (idx[None, :] < idx[:, None])
        )
        redundancy = (corr * stronger).amax(1).clamp(0, 1)
        return (signal / signal.mean().clamp_min(1e-12) * (1 - redundancy)).float()


class MagnitudeScorer(tp.importance.GroupMagnitudeImportance):
    """torch-pruning's group magnitude (``sum |w| ** p`` per channel, reduced and normalised), without weight copies.

    ``GroupMagnitudeImportance`` indexes, transposes and flattens every weight of a group before taking norms,
    i.e. makes several full-size copies per layer; with large weights those allocations make one event cost grow
    faster than the model. Here each layer's per-channel sums are reductions over the weight as it lies in
    memory (the output dim for producers, the input dim for consumers, the scale of norms), then indexed. Same
    layers, same reduction (``group_reduction``) and normalisation (``normalizer``) as torch-pruning, equal to
    float tolerance; linear-like layers torch-pruning skips (HF ``Conv1D``, peft adapters) count too.
    """

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        group_imp, group_idxs = [], []
        group = pruners.plain_view(group)  # NF-Nets' scaled std convs read as convs
        for i, (dep, idxs) in enumerate(group):
            layer, prune_fn = dep.layer, dep.pruning_fn
            if not isinstance(layer, tuple(self.target_types)):
                matrix = layers.weight_matrix(layer) if isinstance(layer, nn.Module) else None
                if matrix is not None:  # HF Conv1D, peft adapters: their (out, in) weight
                    out = tpc.graph_of(group) is None or tpc.graph_of(group).is_out_channel_pruning_fn(dep.handler)
                    index = torch.as_tensor(idxs, dtype=torch.long, device=matrix.device)
                    group_imp.append(_power_sum(matrix, self.p, keep_dim=0 if out else 1)[index])
                    group_idxs.append(group[i].root_idxs)
                continue
            weight = getattr(layer, "weight", None)
            if prune_fn in (tp_function.prune_conv_out_channels, tp_function.prune_linear_out_channels):
                dim = 1 if getattr(layer, "transposed", False) else 0
                local = _power_sum(weight, self.p, keep_dim=dim)
                biased = self.bias and layer.bias is not None
            elif prune_fn in (tp_function.prune_conv_in_channels, tp_function.prune_linear_in_channels):
                local = _power_sum(weight, self.p, keep_dim=0 if getattr(layer, "transposed", False) else 1)
                groups = getattr(layer, "groups", 1)
                if prune_fn == tp_function.prune_conv_in_channels and groups not in (1, layer.in_channels):
                    local = local.repeat(groups)
                biased = False
            elif (prune_fn == tp_function.prune_batchnorm_out_channels and layer.affine) or (
                prune_fn == tp_function.prune_layernorm_out_channels and layer.elementwise_affine
            ):
                local = weight.detach().abs().pow(self.p)  # one value per channel: no large copy
                biased = self.bias and layer.bias is not None
            else:
                continue
            index = torch.as_tensor(idxs, dtype=torch.long, device=local.device)
            group_imp.append(local[index])
            group_idxs.append(group[i].root_idxs)
            if biased:
                group_imp.append(layer.bias.detach()[index].abs().pow(self.p))
                group_idxs.append(group[i].root_idxs)
        if not group_imp:
            return None
        return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)


def _power_sum(weight: torch.Tensor, p: float, keep_dim: int) -> torch.Tensor:
    """``sum |w| ** p`` over every dim of ``weight`` but ``keep_dim``: a strided reduction, no copy of ``weight``."""
    dims = [d for d in range(weight.dim()) if d != keep_dim]
    w = weight.detach()
    if p == 1:
        return torch.linalg.vector_norm(w, ord=1, dim=dims)
    return torch.linalg.vector_norm(w, ord=p, dim=dims).pow(p)


def _inputs_of(batch: Any) -> Any:
    """The model input of a training batch: the batch itself if a tensor, else its first element."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


SCORERS: dict[str, Callable[[], Scorer]] = {
    "l1": lambda: MagnitudeScorer(p=1),
    "l2": lambda: MagnitudeScorer(p=2),
    "bn_scale": lambda: PlainView(tp.importance.BNScaleImportance()),
    "fpgm": lambda: PlainView(tp.importance.FPGMImportance()),
    "taylor": TaylorScorer,
    "activation": ActivationScorer,
    "redundancy": RedundancyScorer,
    "random": RandomScorer,
    "minitron": lambda: _minitron(),
}


def _minitron() -> Scorer:
    from lightning_halfprune.core.minitron import MinitronScorer  # imports this module: loaded on first use

    return MinitronScorer()


def get_scorer(scorer: str | Scorer) -> Scorer:
    """A scorer object from a name in ``SCORERS`` or an object that is already one."""
    if isinstance(scorer, str):
        if scorer not in SCORERS:
            close = get_close_matches(scorer, list(SCORERS), n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"`scorer` {scorer!r} is not a known scorer; valid names: {sorted(SCORERS)}.{hint}")
        return SCORERS[scorer]()
    if not callable(scorer):
        raise TypeError(f"`scorer` must be a name or a callable scorer(group) -> Tensor, got {scorer!r}.")
    return scorer


@contextlib.contextmanager
def state_kept(scorer: Scorer) -> Iterator[None]:
    """Score inside the block without moving the scorer's random generators (a dry run draws nothing)."""
    generators = (
        [g for g in vars(scorer).values() if isinstance(g, torch.Generator)] if hasattr(scorer, "__dict__") else []
    )
    states = [g.get_state() for g in generators]
    try:
        yield
    finally:
        for g, state in zip(generators, states, strict=True):
            g.set_state(state)


def run_hooked(model: nn.Module, batches: Sequence[Any], inputs_of: Callable[[Any], Any], handles: list) -> None:
    """Run ``batches`` through ``model`` without grad for the hooks behind ``handles``, then remove them (always)."""
    try:
        with torch.no_grad():
            for batch in batches:
                run_model(model, inputs_of(batch))
    finally:
        for h in handles:
            h.remove()


def needs_data(scorer: Scorer) -> bool:
    """True for scorers that look at data: ``needs_data`` set and a ``calibrate`` method (:class:`CalibratedScorer`)."""
    return bool(getattr(scorer, "needs_data", False)) and callable(getattr(scorer, "calibrate", None))


def release(scorer: Scorer) -> None:
    """Let a data-driven scorer free what calibration collected (a plain scorer holds nothing)."""
    if callable(getattr(scorer, "release", None)):
        scorer.release()
