"""The same cut on every DDP rank: real 2-process runs on CPU with gloo, each rank seeing its own data."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_halfprune import HalfPrune
from models import Classifier, loaders, trainer

SCRIPT = Path(__file__).with_name("ddp_run.py")


def run(tmp_path, scorer, ckpt=None, devices=2, epochs=3, distill=0.0):
    env = os.environ | {"HALFPRUNE_DEVICES": str(devices), "HALFPRUNE_EPOCHS": str(epochs)}
    env |= {"HALFPRUNE_DISTILL": str(distill)}
    args = [sys.executable, str(SCRIPT), scorer, str(tmp_path)] + ([str(ckpt)] if ckpt else [])
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout + out.stderr


def load(tmp_path, tag, rank):
    return torch.load(tmp_path / f"{tag}-rank{rank}.pt", weights_only=False)


@pytest.mark.parametrize("scorer", ["taylor", "activation", "redundancy", "random"])
def test_every_rank_cuts_the_same_channels_and_stays_identical(tmp_path, scorer):
    text = run(tmp_path, scorer)
    for tag in ("epoch0", "epoch1", "epoch2", "end"):  # right after each cut, after more training, at the end
        a, b = load(tmp_path, tag, 0), load(tmp_path, tag, 1)
        assert a["state"].keys() == b["state"].keys()
        for name, value in a["state"].items():
            assert torch.equal(value, b["state"][name]), (tag, name)
        assert a["reports"] == b["reports"]
    end = load(tmp_path, "end", 0)
    assert end["state"]["net.blocks.0.conv1.weight"].shape[0] == 8
    assert text.count("HalfPrune summary") == 1  # only rank 0 prints


def test_distillation_under_ddp_keeps_every_rank_identical(tmp_path):
    run(tmp_path, "l2", distill=1.0)  # the teacher is a plain copy on each rank, never wrapped in DDP
    for tag in ("epoch1", "end"):
        a, b = load(tmp_path, tag, 0), load(tmp_path, tag, 1)
        assert all(torch.equal(v, b["state"][k]) for k, v in a["state"].items()), tag
    assert load(tmp_path, "end", 0)["reports"][0]["teacher_bytes"] > 0


def test_a_ddp_checkpoint_resumes_under_ddp_and_on_one_device(tmp_path):
    run(tmp_path / "first", "l2", epochs=1)  # the epoch-0 cut is in the checkpoint, the epoch-1 cut is still to come
    ckpt = tmp_path / "first" / "last.ckpt"
    run(tmp_path / "ddp", "l2", ckpt=ckpt)
    a, b = load(tmp_path / "ddp", "end", 0), load(tmp_path / "ddp", "end", 1)
    assert all(torch.equal(v, b["state"][k]) for k, v in a["state"].items())
    assert a["state"]["net.blocks.0.conv1.weight"].shape[0] == 8 and len(a["reports"]) == 1
    run(tmp_path / "single", "l2", ckpt=ckpt, devices=1)
    single = load(tmp_path / "single", "end", 0)
    assert single["state"]["net.blocks.0.conv1.weight"].shape[0] == 8
    model = Classifier("resnet")
    results = trainer(tmp_path, callbacks=[HalfPrune({0: 0.25, 1: 0.5})]).validate(
        model, loaders(n=32)[1], ckpt_path=tmp_path / "ddp" / "last.ckpt"
    )
    assert model.net.blocks[0].conv1.out_channels == 8 and "val_acc" in results[0]


def test_unsupported_strategies_are_refused_at_setup():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

    from lightning_halfprune.fit.distributed import check_strategy

    with pytest.raises(ValueError, match="not FSDPStrategy"):
        check_strategy(FSDPStrategy(use_orig_params=False))  # flat parameters; the check happens in setup
    check_strategy(DDPStrategy())
    check_strategy(SingleDeviceStrategy("cpu"))
