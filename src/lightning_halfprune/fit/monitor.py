"""Which logged metric ``monitor`` names, also with several validation dataloaders, and how to evaluate it.

With several validation dataloaders Lightning logs ``self.log("val_acc", ...)`` as ``val_acc/dataloader_idx_0``,
``val_acc/dataloader_idx_1``, ... ``monitor`` may be any of those names, or the plain ``val_acc`` when exactly one
loader logs it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import Metric

from lightning_halfprune.core.graph import graph_safe
from lightning_halfprune.core.measure import batch_size_of
from lightning_halfprune.fit.batches import logging_redirected, undisturbed
from lightning_halfprune.fit.distributed import mean_over_ranks

_SUFFIX = re.compile(r"/dataloader_idx_(\d+)$")


def candidates(monitor: str, logged: Iterable[str]) -> list[str]:
    """The logged names ``monitor`` can mean: itself, or ``monitor/dataloader_idx_N`` for every loader N."""
    logged = list(logged)
    if monitor in logged:
        return [monitor]
    return sorted(k for k in logged if k.startswith(monitor + "/dataloader_idx_") and _SUFFIX.search(k))


def resolve(monitor: str | None, logged: Iterable[str]) -> str | None:
    """The one logged name ``monitor`` means, or None if it is not logged or ambiguous."""
    if not monitor:
        return None
    found = candidates(monitor, logged)
    return found[0] if len(found) == 1 else None


def problem(monitor: str, logged: Iterable[str]) -> str | None:
    """Why ``monitor`` cannot be read from the logged names (a message for a warning), or None if it can."""
    logged = sorted(logged)
    found = candidates(monitor, logged)
    if len(found) == 1:
        return None
    if found:
        return (
            f"HalfPrune `monitor={monitor!r}` is logged by several validation dataloaders: {found}. "
            "Pass one of these names as `monitor`; until then no metric is reported and the guard cannot judge."
        )
    return (
        f"HalfPrune `monitor={monitor!r}` was not logged by the validation; logged metrics are {logged}. "
        "No metric is reported and the guard cannot judge."
    )


def evaluate(module: Any, loaders: Any, name: str) -> float | None:
    """The value ``validation_step`` logs as ``name`` over the validation loader(s), outside the fit's loops.

    With several loaders, a ``/dataloader_idx_N`` name is evaluated on loader N only; a plain name on each loader
    in turn until one logs it (Lightning logs plain names when ``add_dataloader_idx=False``).
    """
    if loaders is None:
        return None
    if not isinstance(loaders, Sequence) or len(loaders) == 1:
        return evaluate_metric(module, loaders[0] if isinstance(loaders, Sequence) else loaders, name)
    suffix = _SUFFIX.search(name)
    indices = [int(suffix.group(1))] if suffix else range(len(loaders))
    for i in indices:
        if i < len(loaders):
            value = evaluate_metric(module, loaders[i], name, dataloader_idx=i)
            if value is not None:
                return value
    return None


def evaluate_metric(
    module: Any, dataloader: Any, monitor: str, max_batches: int | None = None, dataloader_idx: int | None = None
) -> float | None:
    """The value ``module.validation_step`` logs as ``monitor``, averaged over ``dataloader`` like Lightning does.

    Runs outside the Trainer's loops: ``self.log`` calls are captured (the fit's own logging, checkpointing and
    early stopping see nothing), the model is in eval mode under ``no_grad`` and its mode is restored. Values
    logged per batch are averaged weighted by batch size; a logged torchmetrics ``Metric`` is computed at the end
    and reset. Returns None if ``validation_step`` never logs ``monitor``. With several validation loaders pass
    ``dataloader_idx``: it goes to ``validation_step`` and names are suffixed like Lightning does
    (``val_acc/dataloader_idx_1``).
    """
    values: list[tuple[float, int]] = []
    metrics: list[Metric] = []
    size = [1]

    def capture(
        name: str, value: Any, *args: Any, batch_size: int | None = None, add_dataloader_idx: bool = True, **kwargs: Any
    ) -> None:
        if dataloader_idx is not None and add_dataloader_idx:
            name = f"{name}/dataloader_idx_{dataloader_idx}"
        if name != monitor:
            return
        if isinstance(value, Metric):
            metrics[:] = [value]
        else:
            values.append((float(value), batch_size or size[0]))

    with logging_redirected(module, capture), graph_safe(module), torch.no_grad():
        module.eval()
        for i, batch in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            batch = move_data_to_device(batch, module.device)
            size[0] = batch_size_of(batch)
            module.validation_step(batch, i, *([] if dataloader_idx is None else [dataloader_idx]))
    if metrics:
        value = float(metrics[0].compute())
        metrics[0].reset()
        return value
    if not values:
        return None
    return sum(v * n for v, n in values) / sum(n for _, n in values)


class Monitor:
    """The metric ``monitor`` names, read from the fit: its last logged value, a fresh evaluation, recovery.

    Args:
        name: the metric ``validation_step`` logs (None: nothing is monitored, every read is None).
    """

    def __init__(self, name: str | None) -> None:
        self.name = name
        self._checked = False

    def last(self, trainer: Any) -> float | None:
        """The last logged value, averaged over ranks."""
        name = resolve(self.name, trainer.callback_metrics)
        value = trainer.callback_metrics.get(name) if name else None
        return mean_over_ranks(trainer.strategy, None if value is None else float(value))

    def evaluate(self, trainer: Any, pl_module: Any) -> float | None:
        """The metric of the model as it is now, on the validation data, outside the fit's loops (rank mean)."""
        if not self.name:
            return None
        name = resolve(self.name, trainer.callback_metrics) or self.name
        with undisturbed(pl_module):
            return mean_over_ranks(trainer.strategy, evaluate(pl_module, trainer.val_dataloaders, name))

    def warn_if_unreadable(self, trainer: Any) -> None:
        """Once, at the first validation: a name that matches no logged metric (or several) is a warning."""
        if self.name and not self._checked:
            self._checked = True
            message = problem(self.name, trainer.callback_metrics)
            if message:
                rank_zero_warn(message)

    def recovered(self, trainer: Any, reports: Sequence[Any]) -> float | None:
        """Fill ``metric_recovered`` of the last report still waiting for it (at a later step); the value set."""
        waiting = [r for r in reports if r.monitor and r.metric_recovered is None]
        value = self.last(trainer)
        if not waiting or value is None or waiting[-1].global_step == trainer.global_step:
            return None
        waiting[-1].metric_recovered = value
        return value
