"""Named recipes: the ``HalfPrune`` arguments that measured best for a setting, in one call.

``finetuning(ratio=0.5)`` is for the setting most users start from (Minitron's): a trained model that is
fine-tuned on new data and should come out smaller. Measured on a byte-level Qwen3 (``benchmarks/lm.md``): one
early cut ranked on calibration batches, its parameters taken from the MLPs first and heads only where the
calibration loss says so (``attention="heads_last"``), the model before the cut (the parent) teaching the pruned
one on its logits for the rest of the fine-tune (KL mixed with the task loss), and the learning rate warmed up
again after the cut.
"""

from __future__ import annotations

from typing import Any

from lightning_halfprune.options import Calibration, Distill
from lightning_halfprune.schedule import Schedule

__all__ = ["finetuning", "finetuning_callbacks"]


def finetuning(
    ratio: float = 0.5,
    *,
    at_step: int = 5,
    scorer: str = "taylor",
    distill_alpha: float = 1.0,
    distill_temperature: float = 2.0,
    rewarm_steps: int = 30,
    scoring_batches: int = 8,
    **overrides: Any,
) -> dict[str, Any]:
    """``HalfPrune`` keyword arguments for pruning a trained model while it is fine-tuned.

    Args:
        ratio: fraction of the parameters of the MLPs and attention modules to remove (residual stream kept): as
            many as removing that fraction of the MLP neurons and heads would, split between them by
            ``attention="heads_last"``.
        at_step: the optimizer step after which the one cut is made: early (about 1-5% of the fine-tune), so
            that almost all the fine-tune trains the pruned model, but after the first steps on the new data.
        scorer: how channels are ranked; ``"taylor"`` kept the loss lowest right after the cut on the LM
            benchmark, ``"minitron"`` (activation importance) was as good after recovery.
        distill_alpha: weight of the distillation term (KL on logits at ``distill_temperature``) added to the task
            loss; the teacher is the model before the cut (``distill_teacher="first"``) until fit ends.
        distill_temperature: softening temperature of the distillation term.
        rewarm_steps: optimizer steps over which the LR ramps up again after the cut (0: no re-warm-up).
        scoring_batches: calibration batches the scorer looks at.
        **overrides: any other ``HalfPrune`` argument, or one of the above by name, taking precedence.

    Returns:
        A dict for ``HalfPrune(**kwargs)``, with ``rewarm_steps`` for ``fit.rewarm.RewarmAfterCut`` (pop it
        first; :func:`finetuning_callbacks` builds both).
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise ValueError(f"`ratio` must be a fraction in (0, 1) of the channels to remove, got {ratio!r}.")
    if isinstance(at_step, bool) or not isinstance(at_step, int) or at_step < 1:
        raise ValueError(f"`at_step` must be an optimizer step >= 1, got {at_step!r}.")
    kwargs: dict[str, Any] = {
        "schedule": Schedule({at_step: float(ratio)}, interval="step"),
        "scorer": scorer,
        "attention": "heads_last",
        "calibration": Calibration(batches=scoring_batches),
        "distill": Distill(alpha=distill_alpha, temperature=distill_temperature, teacher="first", epochs=None),
        "rewarm_steps": rewarm_steps,
    }
    kwargs.update(overrides)
    return kwargs


def finetuning_callbacks(ratio: float = 0.5, **kwargs: Any) -> list:
    """The callbacks of :func:`finetuning`: ``[HalfPrune(...), RewarmAfterCut(...)]`` (the latter if it re-warms).

    ``Trainer(callbacks=presets.finetuning_callbacks(0.5))``; ``kwargs`` as for :func:`finetuning`.
    """
    from lightning_halfprune.callback import HalfPrune
    from lightning_halfprune.fit.rewarm import RewarmAfterCut

    arguments = finetuning(ratio, **kwargs)
    rewarm = arguments.pop("rewarm_steps")
    prune = HalfPrune(**arguments)
    return [prune, RewarmAfterCut(prune, rewarm)] if rewarm else [prune]
