"""After a cut nothing holds the pre-cut tensors: parameters, gradients and optimizer state of the dense shapes are
freed (the teacher, which *is* those tensors, until distillation ends); the copies HalfPrune keeps are bounded."""

import gc
import weakref

import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging

from lightning_halfprune import Distill, Guard, HalfPrune
from models import Classifier, loaders, trainer


class PreCutTensors(Callback):
    """Weak references to every parameter, gradient and optimizer state tensor right before the epoch-0 cut."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref] = []

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            tensors = [p for p in pl_module.parameters()] + [p.grad for p in pl_module.parameters()]
            tensors += [t for opt in trainer.optimizers for s in opt.state.values() for t in s.values()]
            self.refs = [weakref.ref(t) for t in tensors if torch.is_tensor(t) and t.dim() > 0]


def dead_shapes(refs, pl_module, trainer) -> int:
    """How many of ``refs`` are still alive and no longer the model's or the optimizer's own."""
    gc.collect()
    own = {id(p) for p in pl_module.parameters()} | {id(p.grad) for p in pl_module.parameters()}
    own |= {id(t) for opt in trainer.optimizers for s in opt.state.values() for t in s.values()}
    return sum(1 for r in refs if r() is not None and id(r()) not in own)


class Count(Callback):
    def __init__(self, before: PreCutTensors) -> None:
        self.before, self.alive = before, {}

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.current_epoch == 1 and 1 not in self.alive:
            self.alive[1] = dead_shapes(self.before.refs, pl_module, trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            self.alive["end"] = dead_shapes(self.before.refs, pl_module, trainer)


@pytest.mark.parametrize("extra", ["plain", "ema", "guard", "distill"])
def test_a_cut_frees_the_pre_cut_tensors(tmp_path, extra):
    before = PreCutTensors()
    count = Count(before)
    kwargs = {"timing": None, "verbose": False}
    if extra == "guard":
        kwargs |= {"monitor": "val_acc", "guard": Guard(max_drop=1.0)}
    if extra == "distill":
        kwargs |= {"distill": Distill(epochs=1)}
    prune = HalfPrune({0: 0.5}, **kwargs)
    callbacks = [before, prune, count] + ([EMAWeightAveraging(decay=0.9)] if extra == "ema" else [])
    model = Classifier("resnet", optimizer="adamw")
    train, val = loaders()
    trainer(tmp_path, max_epochs=2, callbacks=callbacks).fit(model, train, val)
    assert model.net.blocks[0].conv1.out_channels == 8
    if extra == "distill":  # the teacher is the pre-cut tensors while it teaches, freed when it is dropped
        distiller = prune._distiller
        assert count.alive[1] > 0 and 0 < distiller.copied_bytes < distiller.teacher_bytes / 2
    else:
        assert count.alive[1] == 0
    assert count.alive["end"] == 0


def test_the_original_architecture_is_kept_without_its_weights(tmp_path):
    prune = HalfPrune({0: 0.5}, timing={"batch_size": 8, "budget_s": 0.05}, verbose=False)
    train, val = loaders()
    trainer(tmp_path, max_epochs=2, callbacks=[prune]).fit(Classifier("resnet"), train, val)
    assert prune._speed.original.nbytes < prune._speed.original.shape_bytes / 10  # buffers only, no weights
    assert prune.final_speed is not None  # timed against it all the same, with random weights
