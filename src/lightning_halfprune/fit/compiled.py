"""``torch.compile``d models: HalfPrune's own forward passes run eagerly, and each cut recompiles once.

A compiled inner module (``self.net = torch.compile(net)``) keeps the real one in ``_orig_mod``; a compiled
LightningModule passed to ``fit`` is unwrapped by Lightning, which compiles its ``forward``. Either way the
parameters that surgery replaces are the real module's. Forward hooks do not fire inside compiled code, so
tracing, MAC counting, scoring, latency and the metric right after a cut all run under
``torch.compiler.set_stance("force_eager")``: nothing is compiled for them and every hook fires. (Latency is
therefore the eager module's.) After a cut (or rollback) Dynamo's caches are cleared once with
``torch._dynamo.reset()``, so the next training step compiles the new shapes once instead of piling up guarded
variants until the recompile limit; note that this clears every compiled function's cache in the process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def is_compiled(module: nn.Module) -> bool:
    """True if ``module`` or one of its submodules is compiled (by ``torch.compile`` or Lightning's unwrapping)."""
    if getattr(module, "_compiler_ctx", None):
        return True
    optimized = getattr(torch._dynamo.eval_frame, "OptimizedModule", ())
    return any(isinstance(m, optimized) for m in module.modules())


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run compiled modules and functions eagerly inside: no compilation, hooks fire."""
    with torch.compiler.set_stance("force_eager"):
        yield


class CompileCounter:
    """Counts Dynamo compilations during a fit, split at each cut.

    ``counts[0]``: before the first cut; then one entry per cut (and rollback): compilations after it.
    """

    def __init__(self) -> None:
        self.counts: list[int] = []
        self._registered = False

    def start(self) -> None:
        self.counts = [0]
        self._register()

    def cut_made(self, module: nn.Module) -> None:
        """Clear Dynamo's caches if ``module`` is compiled (its shapes changed), and start counting the next span."""
        if not is_compiled(module):
            return
        torch._dynamo.reset()  # also drops registered compile callbacks: register again
        self._registered = False
        self._register()
        self.counts.append(0)

    def stop(self) -> None:
        if self._registered:
            with contextlib.suppress(ValueError):
                torch._dynamo.callback.callback_handler.remove_start_callback(self._on_compile)
            self._registered = False

    @property
    def total(self) -> int:
        return sum(self.counts)

    def _register(self) -> None:
        if not self._registered:
            torch._dynamo.callback.on_compile_start(self._on_compile)
            self._registered = True

    def _on_compile(self, *args: Any) -> None:
        if self.counts:
            self.counts[-1] += 1
