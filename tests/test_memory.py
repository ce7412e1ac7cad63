"""After a cut nothing holds the pre-cut tensors: parameters, gradients and optimizer state of the dense shapes are
freed (the teacher, which *is* those tensors, until distillation ends); the copies HalfPrune keeps are bounded."""

import gc
import weakref

import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging

from lightning_halfprune import Distill, Guard, HalfPrune, Schedule
from lightning_halfprune.core.scoring import get_scorer
from lightning_halfprune.core.surgeon import Surgeon
from lightning_halfprune.fit.rebind import rebind_optimizers
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


# ------------------------------------------------------------------ the event's own peak: what a cut holds at once
def adam_after_one_step():
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_the_optimizer_moves_to_the_pruned_model_one_parameter_at_a_time():
    model, optimizer = adam_after_one_step()
    surgeon = Surgeon(model, torch.zeros(2, 6))
    old = [weakref.ref(s["exp_avg"]) for s in optimizer.state.values()]
    alive_when_slicing = []

    def rebind(remap):
        slice_like = remap.slice_like

        def watched(param, value):  # how many old moments are still alive as each state tensor is sliced
            alive_when_slicing.append(sum(r() is not None for r in old))
            return slice_like(param, value)

        remap.slice_like = watched
        rebind_optimizers([optimizer], remap)

    surgeon.cut(surgeon.plan(0.5, get_scorer("l2")), then=rebind)
    pruned = 5  # both hidden layers' weights and biases, and the last weight's inputs
    assert [p.shape for p in model.parameters()] == [(8, 6), (8,), (8, 8), (8,), (3, 8), (3,)]
    # the old state of each parameter is let go before the next is sliced, never a second copy of all of it
    assert max(alive_when_slicing) == len(old) and min(alive_when_slicing) == len(old) - pruned + 1
    assert all(optimizer.state[p]["exp_avg"].shape == p.shape for p in model.parameters())


def test_an_interrupted_optimizer_move_puts_it_back_on_the_old_parameters():
    model, optimizer = adam_after_one_step()
    params = list(model.parameters())
    moments = {p: optimizer.state[p]["exp_avg"] for p in params}
    surgeon = Surgeon(model, torch.zeros(2, 6))
    calls = []

    def rebind(remap):
        slice_like = remap.slice_like

        def interrupted(param, value):
            calls.append(param)
            if len({id(p) for p in calls}) == 3:
                raise KeyboardInterrupt
            return slice_like(param, value)

        remap.slice_like = interrupted
        rebind_optimizers([optimizer], remap)

    with pytest.warns(UserWarning, match=r"back on the old parameters.*2 parameter\(s\) already moved starts over"):
        with pytest.raises(KeyboardInterrupt):
            surgeon.cut(surgeon.plan(0.5, get_scorer("l2")), then=rebind)
    assert all(p is q for p, q in zip(model.parameters(), params, strict=True)) and model[0].out_features == 16
    assert all(p is q for p, q in zip(optimizer.param_groups[0]["params"], params, strict=True))
    moved = {id(p): p for p in calls}
    assert len(moved) == 3 and all(p not in optimizer.state for p in list(moved.values())[:2])  # they start over
    assert all(optimizer.state[p]["exp_avg"] is moments[p] for p in params if id(p) not in list(moved)[:2])
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()  # and training goes on
    assert all(optimizer.state[p]["exp_avg"].shape == p.shape for p in params)


class GradsAfterCut(Callback):
    """After HalfPrune on the batch of its step-interval cut: does the model still hold gradients?"""

    def __init__(self, prune: HalfPrune) -> None:
        self.prune, self.grads = prune, None

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.prune.history and self.grads is None:
            self.grads = [None if p.grad is None else (p.grad.shape == p.shape) for p in pl_module.parameters()]


class ManualClassifier(Classifier):
    """Manual optimization: HalfPrune cannot tell whether the gradients are still wanted, so it keeps them."""

    def __init__(self) -> None:
        super().__init__("resnet", optimizer="adamw")
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        optimizer.step()


@pytest.mark.parametrize("optimization", ["automatic", "accumulating", "manual"])
def test_a_cut_lets_go_of_spent_gradients(tmp_path, optimization):
    prune = HalfPrune(Schedule({1: 0.5}, interval="step"), timing=None, verbose=False)
    after = GradsAfterCut(prune)
    model = ManualClassifier() if optimization == "manual" else Classifier("resnet", optimizer="adamw")
    accumulate = 2 if optimization == "accumulating" else 1
    fit = trainer(tmp_path, max_epochs=2, accumulate_grad_batches=accumulate, callbacks=[prune, after])
    fit.fit(model, loaders()[0])
    assert model.net.blocks[0].conv1.out_channels == 8
    if optimization == "manual":  # carried through the cut, sliced like their parameters
        assert after.grads == [True] * len(after.grads)
    else:  # the step used them and the next one zeroes them: not carried through the cut
        assert after.grads == [None] * len(after.grads)
    assert len(model.losses) == 8 and all(torch.isfinite(torch.tensor(model.losses)))


def test_every_copy_halfprune_holds_is_said_at_train_start(tmp_path, caplog):
    prune = HalfPrune({0: 0.5}, monitor="val_acc", guard=Guard(max_drop=1.0), distill=Distill(epochs=1))
    model = Classifier("resnet", optimizer="adamw")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    with caplog.at_level("INFO"):
        trainer(tmp_path, max_epochs=2, callbacks=[prune]).fit(model, *loaders())
    held = {c.name: c for c in prune.held}
    assert list(held) == ["original architecture", "guard rollback point", "distillation teacher"]
    assert held["original architecture"].bytes < params / 10  # shapes only: buffers, no weights
    assert held["guard rollback point"].bytes >= params and held["guard rollback point"].device == "cpu"
    assert held["distillation teacher"].bytes == params and held["distillation teacher"].device == "cpu"
    said = [r.getMessage() for r in caplog.records if "HalfPrune holds" in r.getMessage()]
    assert len(said) == 1 and "guard rollback point" in said[0] and "MiB on cpu" in said[0]
    bare = HalfPrune({0: 0.5}, timing=None, verbose=False)
    trainer(tmp_path, max_epochs=2, callbacks=[bare]).fit(Classifier("resnet"), *loaders())
    assert bare.held == []
