"""What HalfPrune holds besides the model: each copy, its bytes and device, said at train start (issue 19).

A user prunes because the model is big, so every copy HalfPrune keeps is bounded and named before the first step:

- the original architecture for the final side-by-side timing: shapes only (0 bytes); its weights are made, random,
  on the model's device for the timing at fit end (``timing=None``: not kept);
- the accuracy guard's rollback point: a host-memory copy of the model and its optimizer state, from each cut to
  the guard's verdict (``guard=None``: none);
- the distillation teacher: the pre-cut tensors of the pruned layers (which the cut would free) plus copies of the
  layers no cut touches, from the cut until ``Distill(epochs=...)`` after the last one (``distill=None``: none).

The optimizer state is counted as it is now (empty before the first step for most optimizers), so the guard's
figure is a lower bound until then: AdamW adds twice the parameters' bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_halfprune.fit.guard import state_bytes


@dataclass(frozen=True)
class Held:
    """One copy HalfPrune keeps: what it is, its bytes (at most), where, and for how long."""

    name: str
    bytes: int
    device: str
    when: str

    def describe(self) -> str:
        return f"{self.name}: {self.bytes / 2**20:.1f} MiB on {self.device}, {self.when}"


def held(
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    original: object | None,
    guard: object | None,
    distill: object | None,
) -> list[Held]:
    """The copies HalfPrune will hold for ``model`` with these options (``original``: the kept architecture)."""
    device = str(next((p.device for p in model.parameters()), torch.device("cpu")))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    out = []
    if original is not None:
        weights = getattr(original, "shape_bytes", 0)
        out.append(Held("original architecture", getattr(original, "nbytes", 0), device,
                        f"shapes only; its weights ({weights / 2**20:.1f} MiB, random) are made for the final timing"))
    if guard is not None:
        state = sum(state_bytes(o.state) for o in optimizers)
        out.append(Held("guard rollback point", params + state, "cpu",
                        "from each cut to the guard's verdict (the model, its EMA/SWA copies, the optimizer state as "
                        "it is now)"))
    if distill is not None:
        out.append(Held("distillation teacher", params, device,
                        "at most, from each cut until distillation ends (the pre-cut tensors a cut frees, plus copies "
                        "of the layers it does not touch)"))
    return out


def message(copies: Sequence[Held]) -> str:
    """One line for the log; says so when HalfPrune holds nothing."""
    if not copies:
        return "HalfPrune holds no copy of the model."
    return "HalfPrune holds: " + "; ".join(c.describe() for c in copies) + "."
