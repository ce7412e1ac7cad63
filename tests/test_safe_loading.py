"""Pruned checkpoints load safely (no code runs), at any precision, and also without HalfPrune in the Trainer."""

import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_halfprune import CheckpointError, HalfPrune, load_pruned
from models import Classifier, loaders, trainer


def pruned_checkpoint(tmp_path, precision="32-true", net="plain_cnn"):
    pl.seed_everything(0)
    model = Classifier(net)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    t = trainer(tmp_path, max_epochs=2, precision=precision, enable_checkpointing=True, callbacks=[
        HalfPrune({0: 0.5}, latency_batch_size=0), checkpoints])
    t.fit(model, *loaders())
    return model.eval(), tmp_path / "ckpt" / "last.ckpt"


class Payload:
    """What an attacker pickles: unpickling it runs ``os.system``, which writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_checkpoint_runs_no_code_in_load_pruned(tmp_path):
    _, path = pruned_checkpoint(tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    marker = tmp_path / "pwned"
    checkpoint["hyper_parameters"]["net"] = Payload(marker)
    torch.save(checkpoint, tmp_path / "evil.ckpt")

    with pytest.raises(CheckpointError, match=r"evil.ckpt.* safe load refuses .* `weights_only=False`"):
        load_pruned(Classifier, tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_a_truncated_checkpoint_names_the_file_and_the_problem(tmp_path):
    _, path = pruned_checkpoint(tmp_path)
    data = path.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut.ckpt.* cannot be read as a torch checkpoint \(truncated"):
        load_pruned(Classifier, tmp_path / "cut.ckpt")


class WithTestStep(Classifier):
    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx)


def test_a_plain_trainer_validates_and_tests_a_pruned_checkpoint(tmp_path):
    model, path = pruned_checkpoint(tmp_path)
    x = torch.randn(4, 3, 8, 8)
    for run in ("validate", "test"):
        fresh = WithTestStep("plain_cnn")
        plain = trainer(tmp_path)  # no HalfPrune: the common mistake
        getattr(plain, run)(fresh, loaders()[1], ckpt_path=path, verbose=False)
        assert fresh.net.features[0].out_channels == 8
        torch.testing.assert_close(fresh.eval()(x), model(x))


def test_load_from_checkpoint_rebuilds_the_pruned_shape(tmp_path):
    model, path = pruned_checkpoint(tmp_path)
    loaded = Classifier.load_from_checkpoint(path).eval()
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model(x))
    assert "on_load_checkpoint" not in Classifier.__dict__  # the class is as it was after the call
    unpruned = Classifier("plain_cnn")
    unpruned.load_state_dict(Classifier("plain_cnn").state_dict())  # ordinary loads are untouched


def test_a_plain_trainer_resumes_training_the_pruned_model(tmp_path):
    _, path = pruned_checkpoint(tmp_path)
    fresh = Classifier("plain_cnn")
    trainer(tmp_path, max_epochs=3).fit(fresh, *loaders(), ckpt_path=path)
    assert fresh.net.features[0].out_channels == 8 and len(fresh.losses) == 4


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_checkpoints_of_any_precision_load_and_resume(tmp_path, precision):
    model, path = pruned_checkpoint(tmp_path, precision)
    loaded = load_pruned(Classifier, path)
    assert loaded.net.features[0].out_channels == 8
    dtype = next(model.parameters()).dtype
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    torch.testing.assert_close(loaded.to(dtype)(x), model(x))

    resumed = Classifier("plain_cnn")
    prune = HalfPrune({0: 0.5}, latency_batch_size=0)
    trainer(tmp_path, max_epochs=3, precision=precision, callbacks=[prune]).fit(resumed, *loaders(), ckpt_path=path)
    assert resumed.net.features[0].out_channels == 8 and len(prune.history) == 1
