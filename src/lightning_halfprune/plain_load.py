"""A pruned checkpoint loads where Lightning loads checkpoints, also without HalfPrune in the Trainer.

The common mistake: ``trainer.test(model, ckpt_path=...)`` with a plain Trainer, or ``MyModel.load_from_checkpoint``,
on a checkpoint of a fit that HalfPrune pruned. The fresh module has the dense shapes, the checkpoint the pruned
ones, and torch reports dozens of size mismatches. Lightning loads weights into a module in two places, both
wrapped here when ``lightning_halfprune`` is imported:

- ``Strategy.load_model_state_dict``: a Trainer's ``ckpt_path=`` in fit, validate, test and predict;
- ``LightningModule.load_from_checkpoint``, through the module's ``on_load_checkpoint`` for that one call.

Both replay the checkpoint's history of cuts on the module first (``checkpoint.restore_shape``, as HalfPrune does),
and say so. They act only on a checkpoint that carries a HalfPrune history and does not fit the module; everything
else loads exactly as before. A history that does not fit the module is a ``CheckpointError`` naming the layer.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_halfprune import checkpoint as ckpt
from lightning_halfprune._compat import lightning as lc

_MARK = "_halfprune_rebuilds"


def install() -> None:
    """Wrap Lightning's two load paths (once per process)."""
    if not getattr(Strategy.load_model_state_dict, _MARK, False):
        Strategy.load_model_state_dict = _rebuilding_strategy_load(Strategy.load_model_state_dict)
    if not getattr(lc.load_state(), _MARK, False):
        lc.set_load_state(_rebuilding_load_state(lc.load_state()))


def rebuild(module: nn.Module, checkpoint: Mapping[str, Any]) -> bool:
    """Cut ``module`` to the checkpoint's pruned shape if it still has other shapes; True if it was cut."""
    if not ckpt.restore_shape(module, checkpoint):
        return False
    events = len(checkpoint[ckpt.KEY].get("history", []))
    rank_zero_info(
        f"HalfPrune rebuilt the pruned shape of {type(module).__name__} from the checkpoint's history ({events} prune "
        "event(s)) before loading its weights. To go on pruning when resuming, add HalfPrune to the Trainer."
    )
    return True


def _rebuilding_strategy_load(original: Any) -> Any:
    @functools.wraps(original)
    def load_model_state_dict(self: Strategy, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if self.lightning_module is not None:
            rebuild(self.lightning_module, checkpoint)
        return original(self, checkpoint, strict=strict)

    setattr(load_model_state_dict, _MARK, True)
    return load_model_state_dict


def _rebuilding_load_state(original: Any) -> Any:
    @functools.wraps(original)
    def _load_state(cls: type, checkpoint: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if not (isinstance(cls, type) and issubclass(cls, LightningModule) and checkpoint.get(ckpt.KEY)):
            return original(cls, checkpoint, *args, **kwargs)
        with _rebuilt_on_load(cls):
            return original(cls, checkpoint, *args, **kwargs)

    setattr(_load_state, _MARK, True)
    return _load_state


@contextlib.contextmanager
def _rebuilt_on_load(cls: type) -> Iterator[None]:
    """For one ``load_from_checkpoint`` call: ``cls.on_load_checkpoint`` first rebuilds the pruned shape."""
    own = cls.__dict__.get("on_load_checkpoint")
    hook = cls.on_load_checkpoint

    def on_load_checkpoint(self: LightningModule, checkpoint: dict[str, Any]) -> None:
        rebuild(self, checkpoint)
        hook(self, checkpoint)

    cls.on_load_checkpoint = on_load_checkpoint
    try:
        yield
    finally:
        if own is None:
            del cls.on_load_checkpoint
        else:
            cls.on_load_checkpoint = own
