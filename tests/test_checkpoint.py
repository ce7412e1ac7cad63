"""Pruned checkpoints resume, load for inference and export; bad histories are refused cleanly."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_halfprune import CheckpointError, HalfPrune, export, load_pruned
from models import Classifier, loaders, trainer


def fixed_loaders():
    train, val = loaders()
    return DataLoader(train.dataset, batch_size=16, shuffle=False), val


def fit(tmp_path, model, max_epochs=4, ckpt_path=None, every_epoch=True, **kwargs):
    pl.seed_everything(0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, save_last=True, every_n_epochs=1)
    prune = HalfPrune(schedule={1: 0.5}, **kwargs)
    t = trainer(tmp_path, max_epochs=max_epochs, callbacks=[prune, checkpoints], enable_checkpointing=True)
    t.fit(model, *fixed_loaders(), ckpt_path=ckpt_path)
    return t, prune


def seeded_model(seed=0):
    pl.seed_everything(seed)
    return Classifier("resnet", optimizer="adamw", scheduler=True)


def test_resume_after_a_cut_reproduces_the_uninterrupted_losses(tmp_path):
    full = seeded_model()
    fit(tmp_path / "full", full, max_epochs=4)

    first = seeded_model()
    fit(tmp_path / "part", first, max_epochs=2)  # epoch 1 ends with the cut, then the checkpoint
    assert first.losses == full.losses[:8]
    resumed = seeded_model(seed=1)  # a fresh, unpruned model; its own initial weights must not matter
    _, prune = fit(tmp_path / "part", resumed, max_epochs=4, ckpt_path=tmp_path / "part" / "ckpt" / "last.ckpt")

    assert len(prune.history) == 1  # the event did not happen again
    assert resumed.net.blocks[0].conv1.out_channels == 8
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(full.losses[8:]), rtol=1e-5, atol=1e-6)
    assert resumed.lrs == full.lrs[8:]


def test_checkpoints_hold_the_history_of_their_own_shape(tmp_path):
    fit(tmp_path, Classifier("plain_cnn"), max_epochs=3)
    before = torch.load(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weights_only=False)
    after = torch.load(tmp_path / "ckpt" / "epoch=1-step=8.ckpt", weights_only=False)
    assert before["halfprune"]["history"] == [] and before["state_dict"]["net.features.0.weight"].shape[0] == 16
    assert [e["point"] for e in after["halfprune"]["history"]] == [1]
    assert after["state_dict"]["net.features.0.weight"].shape[0] == 8


def test_resume_from_last_and_a_remaining_event_still_happens(tmp_path):
    pl.seed_everything(0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    t = trainer(
        tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[HalfPrune({0: 0.25, 2: 0.5}), checkpoints]
    )
    t.fit(Classifier("plain_cnn"), *fixed_loaders())
    prune = HalfPrune({0: 0.25, 2: 0.5})
    model = Classifier("plain_cnn")
    t = trainer(
        tmp_path,
        max_epochs=4,
        enable_checkpointing=True,
        callbacks=[prune, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
    )
    t.fit(model, *fixed_loaders(), ckpt_path="last")
    assert [e["point"] for e in prune.history] == [0, 2]
    assert model.net.features[0].out_channels == 8


def test_load_pruned_validate_and_export(tmp_path):
    model = Classifier("mobilenet")
    t, _ = fit(tmp_path, model, max_epochs=3)
    path = tmp_path / "ckpt" / "last.ckpt"
    x = torch.randn(6, 3, 8, 8)
    model.eval()

    loaded = load_pruned(Classifier, path)
    assert not loaded.training
    torch.testing.assert_close(loaded(x), model(x))

    fresh = Classifier("mobilenet")
    results = trainer(tmp_path, callbacks=[HalfPrune({1: 0.5})]).validate(fresh, fixed_loaders()[1], ckpt_path=path)
    assert fresh.net.pw[0].out_channels == 16 and "val_loss" in results[0]

    scripted = torch.jit.load(export(loaded, tmp_path / "model.pt"))
    torch.testing.assert_close(scripted(x), model(x))


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = Classifier("plain_cnn").eval()
    path = export(model, tmp_path / "model.onnx", format="onnx", example_input=torch.randn(2, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    out = ort.InferenceSession(path).run(None, {"input": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), rtol=1e-4, atol=1e-5)


def test_a_history_from_another_architecture_names_the_layer_and_changes_nothing(tmp_path):
    fit(tmp_path, Classifier("plain_cnn"), max_epochs=3)
    other = Classifier("resnet")
    shapes = {n: p.shape for n, p in other.named_parameters()}
    with pytest.raises(CheckpointError, match="'net.features.[03]'"):
        load_pruned(Classifier, tmp_path / "ckpt" / "last.ckpt", net="resnet")
    wider = Classifier("plain_cnn")
    wider.net = type(wider.net)(width=24)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    from lightning_halfprune.checkpoint import restore_shape

    with pytest.raises(CheckpointError, match="layer 'net.features.[03]' .* has (24|48) output channels"):
        restore_shape(wider, checkpoint)
    assert {n: p.shape for n, p in other.named_parameters()} == shapes


def test_a_corrupted_history_is_a_clear_error(tmp_path):
    fit(tmp_path, Classifier("plain_cnn"), max_epochs=3)
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    checkpoint["halfprune"]["history"][0]["cuts"][0][1] = ["x"]
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="corrupted or hand-edited"):
        load_pruned(Classifier, tmp_path / "bad.ckpt")
    checkpoint["halfprune"]["history"][0]["cuts"][0][1] = [999]
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="cannot remove channels \\[999\\]"):
        load_pruned(Classifier, tmp_path / "bad.ckpt")
