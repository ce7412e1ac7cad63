"""The averaged copies of the model that Lightning's weight-averaging callbacks keep, cut with the live model.

``StochasticWeightAveraging`` keeps a deep copy of the LightningModule in ``_average_model``;
``WeightAveraging`` / ``EMAWeightAveraging`` keep an ``AveragedModel`` whose ``.module`` is such a copy. After a
cut their averaged parameters no longer fit the live ones. Every cut is therefore replayed on each copy with its
own dependency graph: a cut names a root layer and its channels, so the same ``Cut`` removes the same channels
from the copy, and torch-pruning keeps everything coupled consistent there too (BatchNorm running statistics,
``in_channels``/``out_channels``, attention heads), which slicing parameters by name would have to re-implement.
The averaging state itself (``n_averaged``, update counters) is untouched.

Any other callback that holds a copy of the model's parameters cannot be updated and is refused before training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import StochasticWeightAveraging
from torch import nn

from lightning_halfprune.core.graph import graph_safe
from lightning_halfprune.core.plan import Cut
from lightning_halfprune.core.surgeon import Surgeon

try:  # Lightning >= 2.5
    from lightning.pytorch.callbacks import WeightAveraging
except ImportError:  # pragma: no cover
    WeightAveraging = StochasticWeightAveraging  # type: ignore[assignment,misc]

SUPPORTED = (StochasticWeightAveraging, WeightAveraging)

IGNORE_ATTRIBUTE = "halfprune_ignore"


def averaged_copies(trainer: pl.Trainer | None) -> list[nn.Module]:
    """The model copies that Lightning's weight-averaging callbacks of ``trainer`` hold now."""
    found = []
    for callback in getattr(trainer, "callbacks", None) or []:
        average = getattr(callback, "_average_model", None)
        if isinstance(callback, StochasticWeightAveraging) and isinstance(average, nn.Module):
            found.append(average)
        elif isinstance(callback, WeightAveraging) and average is not None:
            found.append(average.module)
    return found


def refuse_unknown_copies(trainer: pl.Trainer, pl_module: nn.Module, owner: Any) -> None:
    """Raise ``ValueError`` naming any callback that holds a copy of the model's parameters HalfPrune cannot cut."""
    live = {name: tuple(p.shape) for name, p in pl_module.named_parameters()}
    for callback in trainer.callbacks:
        if callback is owner or isinstance(callback, SUPPORTED) or getattr(callback, IGNORE_ATTRIBUTE, False):
            continue
        for attribute, value in vars(callback).items():
            if any(_is_copy(m, pl_module, live) for m in _modules_in(value)):
                raise ValueError(
                    f"HalfPrune cannot prune the copy of the model that callback {type(callback).__name__} keeps in "
                    f"`{attribute}`: after the first cut its parameters would no longer fit the model. Remove the "
                    f"callback, or set `{type(callback).__name__}.{IGNORE_ATTRIBUTE} = True` if the copy is meant to "
                    "keep its shape (e.g. a distillation teacher). Lightning's StochasticWeightAveraging and "
                    "WeightAveraging/EMAWeightAveraging are supported."
                )


class AveragedCopies:
    """Replays each cut on the averaged copies, each with its own ``Surgeon`` (dependency graph kept across cuts)."""

    def __init__(self) -> None:
        self._surgeons: dict[int, Surgeon] = {}

    def cut(
        self,
        copies: Sequence[nn.Module],
        cuts: Sequence[Cut],
        example_input: Any,
        original_widths: dict[str, int],
        then: Callable[[], None],
    ) -> None:
        """Cut every copy, then call ``then()``; all or nothing (an error puts every copy back, then re-raises)."""
        if not copies:
            then()
            return
        first, rest = copies[0], copies[1:]
        surgeon = self._surgeon(first, example_input, original_widths)
        with graph_safe(first):
            first.eval()  # tracing in train mode would move the copy's BatchNorm statistics
            surgeon.cut(cuts, then=lambda _: self.cut(rest, cuts, example_input, original_widths, then))

    def _surgeon(self, copy: nn.Module, example_input: Any, original_widths: dict[str, int]) -> Surgeon:
        surgeon = self._surgeons.get(id(copy))
        if surgeon is None or surgeon.model is not copy:
            device = next((p.device for p in copy.parameters()), None)
            example = move_data_to_device(example_input, device) if device is not None else example_input
            surgeon = Surgeon(copy, example, original_widths=original_widths)
            self._surgeons[id(copy)] = surgeon
        return surgeon


def _modules_in(value: Any, depth: int = 0) -> list[nn.Module]:
    if isinstance(value, nn.Module):
        return [value]
    if depth >= 3:
        return []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [m for v in value for m in _modules_in(v, depth + 1)]
    return []


def _is_copy(module: nn.Module, pl_module: nn.Module, live: dict[str, tuple]) -> bool:
    """True if every parameter of ``module`` has the name (suffix) and shape of a live parameter, but is not it."""
    if module is pl_module or any(module is m for m in pl_module.modules()):
        return False
    params = list(module.named_parameters())
    if not params:
        return False
    live_ids = {id(p) for p in pl_module.parameters()}
    return all(
        id(p) not in live_ids
        and any(n == name or n.endswith("." + name) for n, shape in live.items() if shape == tuple(p.shape))
        for name, p in params
    )
