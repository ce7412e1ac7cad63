"""Distillation from the model before the cut, and LR rewinding: real Trainers, real cuts, real checkpoints."""

import gc
import weakref

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_halfprune import HalfPrune

ALPHA, T = 0.5, 2.0


class MLP(pl.LightningModule):
    """No BatchNorm, no dropout: a forward in train mode changes nothing, so the loss can be recomputed by hand."""

    def __init__(self, manual: bool = False, as_dict: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
        self.example_input_array = torch.zeros(1, 8)
        self.automatic_optimization = not manual
        self.as_dict = as_dict

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if not self.automatic_optimization:
            self.manual_backward(loss)
            self.optimizers().step()
            self.optimizers().zero_grad()
        return {"loss": loss} if self.as_dict else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def data(n: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)), 16)


def trainer(tmp_path, epochs: int, callbacks: list, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        enable_checkpointing=kwargs.pop("enable_checkpointing", False),
        **kwargs,
    )


class LossByHand(Callback):
    """Compares the loss Lightning back-propagates with CE (+ alpha T^2 KL against the teacher) by hand."""

    def __init__(self, prune: HalfPrune) -> None:
        self.prune, self.seen, self.teacher_widths = prune, [], {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = batch

    def on_before_backward(self, trainer, pl_module, loss):
        x, y = self.batch
        with torch.no_grad():
            student = pl_module(x)
            expected = F.cross_entropy(student, y)
            teacher = self.prune._distiller.teacher
            if teacher is not None:
                p_t = torch.softmax(teacher(x) / T, dim=1)
                log_p_s = torch.log_softmax(student / T, dim=1)
                kl = (p_t * (p_t.log() - log_p_s)).sum(1).mean()
                expected = expected + ALPHA * T**2 * kl
                self.teacher_widths[trainer.current_epoch] = teacher.net[0].out_features
        self.seen.append((trainer.current_epoch, teacher is not None, float(loss.detach()), float(expected)))
        assert torch.allclose(loss.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("as_dict", [False, True])
def test_loss_gets_exactly_the_documented_term_only_while_distilling(tmp_path, as_dict):
    prune = HalfPrune({0: 0.5}, distill_alpha=ALPHA, distill_temperature=T, distill_epochs=1, verbose=False)
    check = LossByHand(prune)
    model = MLP(as_dict=as_dict)
    trainer(tmp_path, 3, [prune, check]).fit(model, data())
    by_epoch = {e: {active for ep, active, *_ in check.seen if ep == e} for e in range(3)}
    assert by_epoch == {0: {False}, 1: {True}, 2: {False}}  # distills from the cut until distill_epochs after it
    assert check.teacher_widths == {1: 32}  # the teacher is the dense model, the student has half its channels
    assert model.net[0].out_features == 16
    distilled = [(loss, exp) for _, active, loss, exp in check.seen if active]
    assert all(abs(loss - exp) < 1e-5 for loss, exp in distilled)
    assert prune.reports[0].teacher_bytes == sum(4 * p.numel() for p in MLP().parameters())
    assert "teacher" in prune.reports[0].timings
    assert "training_step" not in model.__dict__  # the wrapper is gone after fit


def test_teacher_never_enters_optimizer_nor_checkpoint_and_is_freed(tmp_path):
    prune = HalfPrune({0: 0.5}, distill_alpha=ALPHA, distill_epochs=1, verbose=False)
    refs = []

    class Peek(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            teacher = prune._distiller.teacher
            if trainer.current_epoch == 1:
                assert teacher is not None and not any(p.requires_grad for p in teacher.parameters())
                assert not teacher.training
                in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
                assert in_optimizer == {id(p) for p in pl_module.parameters()}
                assert not in_optimizer & {id(p) for p in teacher.parameters()}
                assert not any(m is teacher for m in pl_module.modules())
                refs.append(weakref.ref(teacher))
            if trainer.current_epoch == 2:
                assert teacher is None  # dropped distill_epochs=1 after the last cut

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    model = MLP()
    trainer(tmp_path, 3, [prune, Peek(), ckpt], enable_checkpointing=True).fit(model, data())
    saved = torch.load(tmp_path / "epoch=1-step=8.ckpt", weights_only=False)
    assert set(saved["state_dict"]) == set(model.state_dict())
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("HalfPrune"))
    assert not any("teacher" in key or "distill" in key for key in state)
    assert not any(isinstance(v, (torch.Tensor, torch.nn.Module)) for v in state.values())
    assert not any("teacher" in key for key in saved)
    n_params = len(list(model.parameters()))
    assert sum(len(g["params"]) for g in saved["optimizer_states"][0]["param_groups"]) == n_params
    gc.collect()
    assert refs and refs[0]() is None


def test_resume_mid_distillation_takes_the_model_before_the_next_cut_as_teacher(tmp_path):
    def run(epochs, ckpt_path=None):
        prune = HalfPrune({0: 0.25, 2: 0.5}, distill_alpha=ALPHA, distill_temperature=T, verbose=False)
        check = LossByHand(prune)
        ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
        model = MLP()
        trainer(tmp_path, epochs, [prune, check, ckpt], enable_checkpointing=True).fit(
            model, data(), ckpt_path=ckpt_path
        )
        return model, check

    _, straight = run(4)
    assert straight.teacher_widths == {1: 32, 2: 32, 3: 32}  # the dense model teaches all the way
    model, resumed = run(4, str(tmp_path / "epoch=1-step=8.ckpt"))
    assert {e for e, *_ in resumed.seen} == {2, 3}  # the fit continued where the checkpoint left it
    assert resumed.teacher_widths == {3: 24}  # no teacher until the next cut; then the model before that cut
    assert model.net[0].out_features == 16


def test_resumed_after_the_last_cut_warns_that_there_is_no_teacher(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    prune = HalfPrune({0: 0.5}, distill_alpha=ALPHA, verbose=False)
    trainer(tmp_path, 2, [prune, ckpt], enable_checkpointing=True).fit(MLP(), data())
    prune = HalfPrune({0: 0.5}, distill_alpha=ALPHA, verbose=False)
    with pytest.warns(UserWarning, match="resumed after the last cut"):
        trainer(tmp_path, 3, [prune], enable_checkpointing=True).fit(
            MLP(), data(), ckpt_path=str(tmp_path / "epoch=1-step=8.ckpt")
        )
    assert prune._distiller.teacher is None


def test_manual_optimization_is_refused_before_training(tmp_path):
    prune = HalfPrune({0: 0.5}, distill_alpha=ALPHA, verbose=False)
    with pytest.raises(ValueError, match="automatic optimization.*automatic_optimization=False"):
        trainer(tmp_path, 1, [prune]).fit(MLP(manual=True), data())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"distill": {"alpha": -1.0}}, "`distill.alpha` must be a number > 0, got -1.0"),
        ({"distill": {"temperature": 0}}, "`distill.temperature` must be a number > 0, got 0"),
        ({"distill": {"teacher": "best"}}, "`distill.teacher` must be one of \\['first', 'each'\\], got 'best'"),
        ({"distill": {"epochs": -2}}, "`distill.epochs` must be an int >= 0, got -2"),
        ({"lr_rewind": 1.5}, "`lr_rewind` must be an int >= 0, got 1.5"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        HalfPrune({0: 0.5}, **kwargs)


class Scheduled(MLP):
    def __init__(self, interval: str) -> None:
        super().__init__()
        self.interval = interval

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=1.0)
        gamma = 0.5 if self.interval == "epoch" else 0.5**0.25  # 4 steps per epoch: both halve per epoch
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.interval}}


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_lr_rewind_trains_the_next_epoch_at_the_rate_of_earlier_epochs(tmp_path, interval):
    def lrs(rewind):
        seen = []

        class Record(Callback):
            def on_train_epoch_start(self, trainer, pl_module):
                seen.append(round(trainer.optimizers[0].param_groups[0]["lr"], 6))

        prune = HalfPrune({2: 0.5}, lr_rewind=rewind, verbose=False)
        trainer(tmp_path, 5, [prune, Record()]).fit(Scheduled(interval), data())
        return seen

    assert lrs(0) == [1.0, 0.5, 0.25, 0.125, 0.0625]
    # the cut ends epoch 2; epoch 3 trains at epoch 1's rate, and the schedule goes on from there
    assert lrs(2) == [1.0, 0.5, 0.25, 0.5, 0.25]


def test_bf16_mixed_distills_in_float32(tmp_path):
    terms = []

    def loss_fn(student, teacher):
        terms.append((student.dtype, teacher.dtype))
        return F.mse_loss(student.float(), teacher.float())

    prune = HalfPrune({0: 0.5}, distill_alpha=ALPHA, distill_loss_fn=loss_fn, verbose=False)
    trainer(tmp_path, 2, [prune], precision="bf16-mixed").fit(MLP(), data())
    assert terms and terms[0] == (torch.bfloat16, torch.bfloat16)  # both under autocast; the user term is used
    prune = HalfPrune({0: 0.5}, distill_alpha=ALPHA, verbose=False)
    model = MLP()
    trainer(tmp_path, 2, [prune], precision="bf16-mixed").fit(model, data())
    assert model.net[0].out_features == 16 and prune._distiller.seconds > 0


def test_the_recipe_config_runs_from_the_command_line(tmp_path):
    from test_cli import ROOT, SHORT, halfprune

    recipe, env = ROOT / "examples" / "recipe_recovery.yaml", {"PYTHONPATH": str(ROOT / "src")}
    out = halfprune(tmp_path, "fit", f"--config={recipe}", *SHORT, "--trainer.logger=false", env_extra=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HalfPrune summary: 2 prune event(s)" in out.stdout + out.stderr
    printed = halfprune(tmp_path, "fit", f"--config={recipe}", "--print_config", env_extra=env)
    args = __import__("yaml").safe_load(printed.stdout)["halfprune"]["init_args"]
    distill = args["distill"]
    assert distill["alpha"] > 0 and distill["teacher"] == "each" and distill["epochs"] == 2


def test_the_term_over_a_large_vocabulary_is_computed_in_pieces_with_the_same_value_and_gradient(monkeypatch):
    from lightning_halfprune.fit import distill

    torch.manual_seed(0)
    student = torch.randn(3, 50, 700, requires_grad=True)
    teacher = torch.randn(3, 50, 700)
    whole = distill.kd_loss(student, teacher, 2.0)
    (grad_whole,) = torch.autograd.grad(whole, student)
    monkeypatch.setattr(distill, "CHUNK_ELEMENTS", 700 * 16)  # 10 pieces of 16 rows (the last smaller)
    pieces = distill.kd_loss(student, teacher, 2.0)
    (grad_pieces,) = torch.autograd.grad(pieces, student)
    s, t = (F.log_softmax(x.reshape(-1, 700) / 2, -1) for x in (student, teacher))
    expected = F.kl_div(s, t, log_target=True, reduction="batchmean") * 4
    torch.testing.assert_close(whole, expected)
    torch.testing.assert_close(pieces, whole)
    torch.testing.assert_close(grad_pieces, grad_whole)
