"""Option groups, the versioned state, the guard's and the planner's rules: fast unit tests, plus the two fits that
prove the checkpoint format (a 0.1 checkpoint resumes; two HalfPrune instances keep their own state)."""

import pathlib

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_halfprune import Calibration, Distill, Guard, HalfPrune, Sparsity, Timing
from lightning_halfprune.cli import HalfPruneCLI
from lightning_halfprune.core.graph import ChannelGroup
from lightning_halfprune.core.plan import Planner
from lightning_halfprune.fit import retry
from lightning_halfprune.fit.guard import AccuracyGuard
from lightning_halfprune.state import PruneState, StateError
from models import Classifier, loaders, trainer

DATA = pathlib.Path(__file__).with_name("data")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Guard(max_drop=-1), "guard.max_drop"),
        (lambda: Guard(0.1, patience=0), "guard.patience"),
        (lambda: Guard(0.1, on_violation="retry"), "guard.on_violation"),
        (lambda: Distill(alpha=0), "distill.alpha"),
        (lambda: Distill(teacher="last"), "distill.teacher"),
        (lambda: Distill(output_fn=3), "distill.output_fn"),
        (lambda: Timing(batch_size=0), "timing.batch_size"),
        (lambda: Timing(budget_s=0), "timing.budget_s"),
        (lambda: Calibration(batches=0), "calibration.batches"),
        (lambda: Calibration(input_fn="x"), "calibration.input_fn"),
        (lambda: Sparsity(strength=0), "sparsity.strength"),
        (lambda: HalfPrune({0: 0.5}, guard=Guard(0.1)), "monitor"),
        (lambda: HalfPrune({0: 0.5}, target="latency", timing=None), "timing"),
        (lambda: HalfPrune({0: 0.5}, guard=0.1), "guard"),
        (lambda: HalfPrune({0: 0.5}, max_layer_ratio=1.0), "max_layer_ratio"),
    ],
)
def test_bad_options_fail_at_construction_naming_the_argument(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_the_flat_names_of_0_1_still_work_for_one_release_with_a_warning():
    with pytest.warns(DeprecationWarning, match=r"distill=Distill\(alpha=\.\.\., teacher=\.\.\.\)"):
        prune = HalfPrune({0: 0.5}, distill_alpha=1.0, distill_teacher="each", latency_batch_size=0, monitor="v",
                          max_drop=0.1, patience=2, regularization=1e-4, regularize_from=1, scoring_batches=3)
    o = prune.options
    assert o.distill == Distill(alpha=1.0, teacher="each") and o.timing is None
    assert o.guard == Guard(0.1, patience=2) and o.sparsity == Sparsity(1e-4, start=1) and o.calibration.batches == 3
    with pytest.warns(DeprecationWarning):
        assert HalfPrune({0: 0.5}, distill_alpha=0.0).options.distill is None
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        HalfPrune({0: 0.5}, distil_alpha=1.0)


def test_config_is_derived_from_the_groups_and_logs_every_field():
    config = HalfPrune({0: 0.5}, sparsity=Sparsity(1e-4, start=2), distill=Distill(output_fn=len)).config()
    assert config["sparsity"] == {"strength": 1e-4, "start": 2}  # 0.1 never logged `regularize_from`
    assert config["distill"]["output_fn"] == "len" and config["guard"] is None and config["timing"]["batch_size"] == 64


def test_dict_options_from_python_are_built_into_their_group():
    assert HalfPrune({0: 0.5}, monitor="val_acc", guard={"max_drop": 0.05}).options.guard == Guard(0.05)


def test_yaml_and_cli_reach_the_nested_groups():
    cli = HalfPruneCLI(
        args=[
            "--halfprune.schedule={0: 0.5}",
            "--halfprune.monitor=val_acc",
            "--halfprune.guard.max_drop=0.02",
            "--halfprune.distill.alpha=1.0",
            "--halfprune.timing=null",
            "--trainer.logger=false",
        ],
        run=False,
    )
    prune = next(c for c in cli.trainer.callbacks if isinstance(c, HalfPrune))
    assert prune.options.guard == Guard(0.02) and prune.options.distill == Distill(alpha=1.0)
    assert prune.options.timing is None


def test_state_round_trips_and_refuses_what_it_cannot_read():
    state = PruneState(history=[{"point": 0, "ratio": 0.5, "cuts": []}], skipped=[3], retries={4: 0.25}, cap=0.25)
    assert PruneState.from_dict(state.to_dict()) == state and state.to_dict()["version"] == 2
    old = {k: v for k, v in state.to_dict().items() if k != "version"} | {"schedule": {"points": {0: 0.5}}}
    assert PruneState.from_dict(old) == state  # version 1 (0.1's checkpoints)
    with pytest.raises(StateError, match="unknown keys"):
        PruneState.from_dict(state.to_dict() | {"histroy": []})
    with pytest.raises(StateError, match="version 7"):
        PruneState.from_dict(state.to_dict() | {"version": 7})
    with pytest.raises(StateError, match="stopped"):
        PruneState.from_dict(state.to_dict() | {"stopped": "no"})


def test_guard_verdicts_and_the_retry_rules():
    state = PruneState(history=[{"point": 0, "ratio": 0.25}, {"point": 1, "ratio": 0.5}])
    guard = AccuracyGuard(Guard(0.05, patience=2, on_violation="halve"), "val_acc", "max", state, "epoch")
    guard.arm(None, None, 0)
    assert guard.watch is None  # nothing to judge it by: it holds
    guard.arm(object(), 0.9, 1)
    assert guard.judge(None) == "wait" and guard.judge(0.8) == "wait" and guard.judge(0.8) == "undo"
    guard.arm(object(), 0.9, 1)
    assert guard.judge(0.88, final=True) == "keep" and guard.judge(None, final=True) == "keep"
    assert retry.halfway(0.25, 0.5) == 0.375 and retry.lifted(0.375, 0.375) is None and retry.lifted(0.4, 0.3) == 0.4
    assert retry.capped(0.5, 0.375, state.history)[0] == 0.375
    assert retry.capped(0.5, None, state.history)[1] is not None  # not past the current ratio: nothing to cut


def test_planner_keeps_floors_rounding_and_slots():
    planner = Planner({"a": 64, "b": 10, "c": 12}, round_to=8, max_layer_ratio=0.75)
    groups = [ChannelGroup("a", None, 64), ChannelGroup("b", None, 10), ChannelGroup("c", None, 12, slots=4)]
    keep = planner._local_keep([(g, None) for g in groups], 0.9)
    assert keep == {"a": 16, "b": 8, "c": 8}  # a: floor 16 (75%); b: rounded to 8; c: slots of 3 -> multiple of 4


def test_a_checkpoint_of_0_1_resumes_and_the_remaining_cut_happens(tmp_path):
    train, val = loaders()
    prune = HalfPrune({0: 0.25, 2: 0.5}, monitor="val_acc", guard=Guard(0.5), timing=None, verbose=False)
    model = Classifier("resnet")
    trainer(tmp_path, max_epochs=4, callbacks=[prune]).fit(model, train, val, ckpt_path=DATA / "halfprune_0.1.ckpt")
    assert [e["point"] for e in prune.history] == [0, 2] and prune.original_widths["net.blocks.0.conv1"] == 16
    assert model.net.blocks[0].conv1.out_channels == 8 and len(prune.reports) == 1


def test_two_instances_keep_their_own_state_in_one_checkpoint(tmp_path):
    train, val = loaders()
    first = HalfPrune({0: 0.25}, ignored_layers=["net.head"], timing=None, verbose=False)
    second = HalfPrune({1: 0.5}, timing=None, verbose=False)
    save = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, max_epochs=2, callbacks=[first, second, save], enable_checkpointing=True).fit(
        Classifier("plain_cnn"), train, val
    )
    states = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]
    mine = {k: v for k, v in states.items() if k.startswith("HalfPrune")}
    assert len(mine) == 2 and sorted(len(v["history"]) for v in mine.values()) == [1, 1]
