"""Distillation during recovery: the model as it was before a cut teaches the pruned one.

While a teacher is held, the LightningModule's own ``training_step`` returns its loss plus
``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` on the model's outputs (the logits). The teacher
sees exactly the student's input: a forward hook on the module captures the first ``forward`` call inside
``training_step``. The teacher is a frozen deep copy (eval mode, no gradients, same device), kept on the
``Distiller`` only: it is no submodule, so it never enters ``state_dict``, a checkpoint, an optimizer or DDP.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_halfprune.options import Distill

_WRAPPED = ("training_step", "on_load_checkpoint")  # instance attributes a teacher copy must not carry


CHUNK_ELEMENTS = 1 << 20  # logits per piece of the term: 4 MB in float32


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` over the last dimension, in float32, mean per row.

    Computed in pieces of about ``CHUNK_ELEMENTS`` logits, each recomputed in the backward pass
    (activation checkpointing): a language model's logits over its vocabulary are the largest tensors of a step,
    and the float32 softmaxes of the whole batch would otherwise add several copies of them to the peak memory.
    """
    classes = student.shape[-1]
    s, t = student.reshape(-1, classes), teacher.reshape(-1, classes)
    rows = max(1, CHUNK_ELEMENTS // max(1, classes))
    if s.shape[0] <= rows or not (torch.is_grad_enabled() and s.requires_grad):
        total = _kl_sum(s, t, temperature)
    else:
        total = sum(
            checkpoint(_kl_sum, s_part, t_part, temperature, use_reentrant=False)
            for s_part, t_part in zip(s.split(rows), t.split(rows), strict=True)
        )
    return total / max(1, s.shape[0]) * temperature**2


def _kl_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The KL divergence summed over rows of 2-D logits, in float32."""
    s = F.log_softmax(student.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="sum")


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, ``.logits``, ``["logits"]``, or the first element."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output:
        return logits_of(output[0])
    raise TypeError(
        f"distillation cannot find logits in the model's output ({type(output).__name__}): "
        "pass `Distill(output_fn=...)` (output -> logits) or `Distill(loss_fn=...)` to HalfPrune."
    )


def param_bytes(model: nn.Module) -> int:
    """Bytes held by a model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


class Distiller:
    """Holds the frozen teacher and adds the distillation term to ``training_step`` while it exists.

    It also decides when a teacher is taken and dropped.

    Args:
        options: the user's :class:`~lightning_halfprune.options.Distill`.
    """

    def __init__(self, options: Distill) -> None:
        self.options = options
        self.alpha, self.temperature = float(options.alpha), float(options.temperature)
        self.output_fn = options.output_fn or logits_of
        self.loss_fn = options.loss_fn
        self.teacher: nn.Module | None = None
        self.teacher_bytes = 0  # what the teacher holds
        self.copied_bytes = 0  # of which copied for it (the rest are the pre-cut tensors a cut freed)
        self.seconds = 0.0  # time spent in teacher forwards and the term, since the teacher was taken
        self.last_loss: torch.Tensor | None = None
        self._warned = False

    def due(self) -> bool:
        """The model before this cut becomes the teacher: at the first cut, or at each one (``"each"``)."""
        return self.options.teacher == "each" or not self.active

    def over(self, epoch: int, last_cut_epoch: int | None, cuts_left: bool) -> bool:
        """True once ``epochs`` epochs have trained since the last cut and no cut is left."""
        if self.options.epochs is None or last_cut_epoch is None or cuts_left:
            return False
        return epoch >= last_cut_epoch + self.options.epochs

    @property
    def active(self) -> bool:
        return self.teacher is not None

    def take_teacher(self, model: nn.Module) -> None:
        """Make the model as it is now the teacher, sharing its tensors: call :meth:`seal` once the cut is made.

        The teacher is the model's module structure with the same parameter and buffer objects. A cut replaces the
        tensors it prunes, so those pre-cut tensors, which the cut would free, become the teacher's own at no cost;
        :meth:`seal` then copies only what the cut left shared with the student (unpruned layers, e.g. embeddings).
        """
        shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
        teacher = copy.deepcopy(model, memo=dict(shared))  # a LightningModule copies without its trainer
        for name in _WRAPPED:
            teacher.__dict__.pop(name, None)
        teacher._forward_hooks.clear()
        self.teacher, self.copied_bytes = teacher, 0

    def seal(self, model: nn.Module) -> None:
        """After the cut (made or not): the teacher gets its own copy of every tensor still shared with ``model``."""
        if self.teacher is None:
            return
        live = {id(t) for t in (*model.parameters(), *model.buffers())}
        copied = 0
        for m in self.teacher.modules():
            for registry in (m._parameters, m._buffers):
                for key, t in registry.items():
                    if t is not None and id(t) not in live:
                        t.grad = None  # a pre-cut tensor the teacher now owns: its gradient was the student's
                    elif t is not None:
                        clone = t.detach().clone()
                        is_param = isinstance(t, nn.Parameter)
                        registry[key] = nn.Parameter(clone, requires_grad=False) if is_param else clone
                        copied += clone.numel() * clone.element_size()
        self.teacher.eval().requires_grad_(False)
        self.teacher_bytes, self.copied_bytes = param_bytes(self.teacher), copied

    def drop_teacher(self) -> None:
        self.teacher, self.last_loss = None, None

    def attach(self, module: nn.Module) -> None:
        """Wrap ``module.training_step`` (this instance only) to add the term while a teacher is held."""
        if getattr(module.__dict__.get("training_step"), "_halfprune_distill", False):
            return
        original = module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            if self.teacher is None:
                return original(*args, **kwargs)
            captured: list[tuple[tuple, dict, Any]] = []

            def capture(_: nn.Module, inputs: tuple, kw: dict, output: Any) -> None:
                if not captured:
                    captured.append((inputs, kw, output))

            handle = module.register_forward_hook(capture, with_kwargs=True)
            try:
                out = original(*args, **kwargs)
            finally:
                handle.remove()
            return self._add_term(module, out, captured)

        training_step._halfprune_distill = True
        training_step._halfprune_inner = module.__dict__.get("training_step")  # an earlier instance wrapper
        module.training_step = training_step

    @staticmethod
    def detach(module: nn.Module) -> None:
        """Undo :meth:`attach` (restoring a wrapper that was there before it)."""
        ours = module.__dict__.get("training_step")
        if getattr(ours, "_halfprune_distill", False):
            if ours._halfprune_inner is None:
                del module.__dict__["training_step"]
            else:
                module.training_step = ours._halfprune_inner

    def _add_term(self, module: nn.Module, out: Any, captured: list) -> Any:
        if not captured or out is None:
            if not self._warned:
                rank_zero_warn(
                    "HalfPrune skipped distillation for a batch: `training_step` "
                    + ("returned None." if out is None else "never called the module's `forward` (`self(x)`).")
                )
                self._warned = True
            return out
        start = time.perf_counter()
        inputs, kwargs, student = captured[0]
        with torch.no_grad():
            teacher = self.teacher(*inputs, **kwargs)
        if self.loss_fn is not None:
            term = self.loss_fn(student, teacher)
        else:
            term = kd_loss(self.output_fn(student), self.output_fn(teacher), self.temperature)
        term = self.alpha * term
        self.last_loss = term.detach()
        self.seconds += time.perf_counter() - start
        if getattr(module, "_trainer", None) is not None:
            module.log("halfprune/distill_loss", self.last_loss, on_step=True, on_epoch=True)
        if isinstance(out, torch.Tensor):
            return out + term
        if isinstance(out, dict) and "loss" in out:
            return {**out, "loss": out["loss"] + term}
        raise TypeError(
            f"distillation needs `training_step` to return a loss tensor or a dict with 'loss', got {type(out)!r}."
        )
