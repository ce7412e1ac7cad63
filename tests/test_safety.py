"""A cut never leaves a broken model, and what cannot be cut is found before the first training step."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_halfprune import HalfPrune, load_pruned
from lightning_halfprune.core.errors import BrokenForward, SurgeryError
from lightning_halfprune.core.preflight import PreflightWarning, preflight
from lightning_halfprune.core.scoring import get_scorer
from lightning_halfprune.core.surgeon import Surgeon
from lightning_halfprune.fit.rebind import rebind_optimizers
from models import FAMILIES, Classifier, loaders, trainer

X = torch.zeros(2, 3, 8, 8)


class EinsumMix(nn.Module):
    """Mixes channels through ``torch.einsum`` with a (c, c) parameter torch-pruning does not know how to cut."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.mix = nn.Parameter(torch.eye(c))

    def forward(self, x):
        return torch.einsum("bchw,cd->bdhw", F.relu(self.conv(x)), self.mix)


class EinsumNet(nn.Module):
    def __init__(self, other_layers: bool) -> None:
        super().__init__()
        self.pre = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
        if not other_layers:
            self.pre = nn.Identity()
        self.block = EinsumMix()
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.block(self.pre(x)).mean((2, 3)))


class MultipleOf4(nn.Module):
    """A user's check on a width that only holds once training has started: the dry run at train start misses it."""

    def __init__(self) -> None:
        super().__init__()
        self.trained = False

    def forward(self, x):
        self.trained |= self.training
        assert not self.trained or x.shape[1] % 4 == 0, f"width {x.shape[1]} is not a multiple of 4"
        return x


class Picky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.check = MultipleOf4()
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.check(F.relu(self.b(F.relu(self.a(x))))).mean((2, 3)))


class Unflatten(nn.Module):
    """A Linear whose output is viewed as 4 channels of 2x2: cutting half its width would empty the conv after it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 16)
        self.conv = nn.Conv2d(4, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.conv(self.fc(x.flatten(1)).view(-1, 4, 2, 2)).mean((2, 3)))


class Detached(nn.Module):
    """Runs any input fine, but torch-pruning's tracing fails on it (a layer its graph cannot follow)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def fit(tmp_path, model, prune, **kwargs):
    trainer(tmp_path, callbacks=[prune], **kwargs).fit(model, *loaders())


def exact_state(model, optimizer=None):
    state = {
        "params": {n: (p, p.detach().clone()) for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "rng": torch.get_rng_state(),
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
    }
    if optimizer is not None:
        state["opt"] = [(list(g["params"]), dict(g)) for g in optimizer.param_groups]
        state["opt_state"] = {p: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    return state


def assert_exactly(model, before, optimizer=None):
    now = exact_state(model, optimizer)
    assert now["params"].keys() == before["params"].keys()
    for n, (p, value) in before["params"].items():
        assert now["params"][n][0] is p and torch.equal(p, value), n
    assert all(torch.equal(now["buffers"][n], b) for n, b in before["buffers"].items())
    assert torch.equal(now["rng"], before["rng"])
    assert all((g is None) == (now["grads"][n] is None) for n, g in before["grads"].items())
    assert all(g is None or torch.equal(g, now["grads"][n]) for n, g in before["grads"].items())
    if optimizer is not None:
        for (params, group), (params_now, group_now) in zip(before["opt"], now["opt"], strict=True):
            assert all(p is q for p, q in zip(params, params_now, strict=True))
            assert {k: v for k, v in group.items() if k != "params"} == {
                k: v for k, v in group_now.items() if k != "params"
            }
        assert before["opt_state"].keys() == now["opt_state"].keys()
        for p, s in before["opt_state"].items():
            assert all(torch.equal(v, now["opt_state"][p][k]) for k, v in s.items())


# ------------------------------------------------------------------------------------ the einsum model of issue 11
def test_einsum_model_that_is_the_only_prunable_part_refuses_to_start_untouched(tmp_path):
    model = Classifier(EinsumNet(other_layers=False))
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(SurgeryError, match=r"(?s)cannot prune this model safely.*'net.block.conv'.*einsum") as err:
        fit(tmp_path, model, HalfPrune({0: 0.3, 1: 0.5}))
    assert "The fit was not started" in str(err.value) and "layer 'net.block' (EinsumMix)" in str(err.value)
    assert model.losses == []  # before the first training step
    assert all(torch.equal(model.state_dict()[n], v) for n, v in before.items())
    assert model(X).shape == (2, 4)


def test_einsum_layer_is_skipped_with_a_warning_when_other_groups_can_be_pruned(tmp_path):
    model = Classifier(EinsumNet(other_layers=True))
    with pytest.warns(
        PreflightWarning, match=r"(?s)1 coupled group.*before training.*ignored_layers=\['net.block.conv'\]"
    ):
        fit(tmp_path, model, HalfPrune({0: 0.3, 1: 0.5}))
    assert model.net.block.conv.out_channels == 16 and model.net.block.mix.shape == (16, 16)
    assert model.net.pre[0].out_channels == 4  # the rest was pruned to 0.5
    assert len(model.losses) == 12 and all(torch.isfinite(torch.tensor(model.losses)))
    assert model(X).shape == (2, 4)


# ------------------------------------------------------------------------------------ verified cuts, mid-fit
def test_a_cut_whose_forward_fails_is_undone_exactly_with_the_optimizer_untouched():
    model = Picky().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    surgeon = Surgeon(model, X)
    before = exact_state(model, opt)
    rebound = []
    with pytest.raises(BrokenForward, match=r"(?s)forward failed in layer 'check' \(MultipleOf4\).*width 11") as err:
        surgeon.cut(surgeon.plan(0.3, get_scorer("l2")), then=lambda r: rebound.append(rebind_optimizers([opt], r)))
    assert rebound == []  # the optimizer is rebound only after the check
    assert err.value.layer == "check" and set(err.value.groups) == {"a", "b"}
    assert_exactly(model, before, opt)
    assert model.a.out_channels == 16 and model.b.in_channels == 16 and model(X).shape == (2, 4)
    surgeon.cut(surgeon.plan(0.5, get_scorer("l2")), then=lambda r: rebind_optimizers([opt], r))  # a good width
    assert model.b.out_channels == 8 and model(X).shape == (2, 4)


def test_a_group_that_breaks_the_forward_mid_fit_is_left_out_and_the_fit_goes_on(tmp_path):
    model = Classifier(Picky())
    prune = HalfPrune({0: 0.3, 1: 0.5})  # 0.3 leaves width 11, 0.5 width 8
    expected = r"(?s)at this prune point.*'net.b'.*width 11.*ignored_layers=\['net.b'\]"
    with pytest.warns(PreflightWarning, match=expected):
        checkpoints = ModelCheckpoint(tmp_path, save_last=True)
        trainer(tmp_path, callbacks=[prune, checkpoints], max_epochs=3, enable_checkpointing=True).fit(
            model, *loaders()
        )
    assert model.net.b.out_channels == 16 and model.net.a.out_channels == 8
    assert [layer for event in prune.history for layer, _ in event["cuts"]] == ["net.a", "net.a"]
    assert list(prune.left_out) == ["net.b"] and "width 11" in prune.left_out["net.b"]
    assert len(model.losses) == 12 and model(X).shape == (2, 4)
    states = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"].values()
    assert [list(state["left_out"]) for state in states if "left_out" in state] == [["net.b"]]  # kept for a resume
    loaded = load_pruned(Classifier, tmp_path / "last.ckpt", net=Picky())
    assert torch.equal(loaded(X), model.eval()(X))


def test_a_mid_fit_cut_that_breaks_the_only_group_stops_with_the_model_as_before(tmp_path):
    model = Classifier(Picky())
    shapes = {n: p.shape for n, p in model.named_parameters()}
    with pytest.raises(SurgeryError, match=r"(?s)Nothing was cut; the model is exactly as before.*'net.b'"):
        fit(tmp_path, model, HalfPrune({0: 0.3, 1: 0.5}, ignored_layers=["net.a"]))
    assert len(model.losses) == 4  # one epoch trained, then the cut at its end was refused
    assert {n: p.shape for n, p in model.named_parameters()} == shapes and model(X).shape == (2, 4)


def test_a_cut_that_changes_the_output_shape_is_refused():
    class WidthInOutput(nn.Module):  # the output's shape depends on a width through a path the graph cannot see
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            h = self.conv(x)
            return torch.cat([self.head(h.mean((2, 3))), torch.zeros(len(h), h.shape[1])], 1)

    model = WidthInOutput()
    surgeon = Surgeon(model, X)
    with pytest.raises(BrokenForward, match=r"output changed from tensor\[2, 12\].* to tensor\[2, 8\]"):
        surgeon.cut(surgeon.plan(0.5, get_scorer("l2")))
    assert model.conv.out_channels == 8


# ------------------------------------------------------------------------------------ pre-flight at train start
def test_would_empty_a_coupled_layer_is_caught_at_train_start(tmp_path):
    model = Classifier(Unflatten())
    # the layer and how: fc's 16 outputs are viewed as 4 channels of 2x2, so the 8 asked widen (fc) or fold (conv)
    layer = r"'net\.(fc|conv)', \d+ (output|input) channels, would lose \d+"
    emptied = rf"empty a coupled layer: {layer} \(\d+ distinct of \d+ indices for the 8 asked"
    with pytest.warns(PreflightWarning, match=rf"(?s)before training.*'net.fc'.*{emptied}"):
        fit(tmp_path, model, HalfPrune({0: 0.3, 1: 0.5}), max_epochs=2)
    assert model.net.fc.out_features == 16 and model.net.conv.out_channels == 4


def test_an_untraceable_model_is_reported_at_train_start_with_the_real_error(tmp_path, monkeypatch):
    import torch_pruning as tp

    def broken_shapes(graph):  # torch-pruning failing inside its own bookkeeping for the whole graph
        raise IndexError("list index out of range")

    # (a failure sizing one op's index mapping no longer fails the build: only the groups through it are left out)
    monkeypatch.setattr(tp.dependency.graph.shape_infer, "init_shape_information", broken_shapes)
    model = Classifier(Detached())
    with pytest.raises(SurgeryError) as err:
        fit(tmp_path, model, HalfPrune({0: 0.5}))
    message = str(err.value)
    assert "IndexError: list index out of range" in message and "torch_pruning/dependency/graph.py" in message
    assert "runs `example_input` fine" in message and "graph tracing, not in your input" in message
    assert model.losses == []


def test_preflight_leaves_model_optimizer_and_rng_exactly_untouched():
    for family in FAMILIES:
        model = Classifier(family)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
        model.train()
        surgeon = Surgeon(model, X)
        before = exact_state(model, opt)
        assert preflight(surgeon, [0.3, 0.5]) == {}
        assert_exactly(model, before, opt)
        assert model.training and surgeon.graph_builds == 1  # the dry run put torch-pruning's graph back too


def test_a_dry_run_leaves_the_graph_as_a_fresh_one(tmp_path):
    for family, net in FAMILIES.items():
        torch.manual_seed(0)
        a = net()
        torch.manual_seed(0)
        b = net()
        dry, fresh = Surgeon(a, X), Surgeon(b, X)
        dry.cut(dry.plan(0.6, get_scorer("l2")), dry_run=True)
        for ratio in (0.3, 0.5):
            dry.cut(dry.plan(ratio, get_scorer("l2")))
            fresh.cut(fresh.plan(ratio, get_scorer("l2")))
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), family


class Probe(Callback):
    def __init__(self, seen: dict, key: str) -> None:
        self.seen, self.key = seen, key

    def on_train_start(self, trainer, pl_module):
        self.seen[self.key] = exact_state(pl_module, trainer.optimizers[0])


def test_preflight_after_a_resume_runs_on_the_remaining_plan_and_touches_nothing(tmp_path):
    schedule = {0: 0.3, 2: 0.5}
    first = Classifier("resnet")
    checkpoints = ModelCheckpoint(tmp_path, save_on_train_epoch_end=True, filename="{epoch}")
    t = trainer(tmp_path, callbacks=[HalfPrune(schedule), checkpoints], max_epochs=1, enable_checkpointing=True)
    t.fit(first, *loaders())
    seen: dict = {}
    resumed = Classifier("resnet")
    callbacks = [Probe(seen, "before"), HalfPrune(schedule), Probe(seen, "after")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, callbacks=callbacks, max_epochs=3).fit(
            resumed, *loaders(), ckpt_path=tmp_path / "epoch=0.ckpt"
        )
    assert not [w for w in caught if issubclass(w.category, PreflightWarning)]
    after = seen.pop("after")
    assert seen["before"]["opt_state"]  # momentum restored from the checkpoint
    for n, (p, value) in seen["before"]["params"].items():
        assert after["params"][n][0] is p and torch.equal(after["params"][n][1], value)
    assert torch.equal(seen["before"]["rng"], after["rng"])
    assert all(
        torch.equal(v, after["opt_state"][p][k]) for p, s in seen["before"]["opt_state"].items() for k, v in s.items()
    )
    assert resumed.net.blocks[0].conv1.out_channels == 8


class AlwaysMultipleOf4(MultipleOf4):
    def forward(self, x):
        assert x.shape[1] % 4 == 0, f"width {x.shape[1]} is not a multiple of 4"  # e.g. a view into heads of 4
        return x


def test_every_ratio_of_the_schedule_is_dry_run_at_train_start(tmp_path):
    net = Picky()
    net.check = AlwaysMultipleOf4()  # 0.5 leaves width 8 (a dry run of the final ratio alone passes); 0.3 leaves 11
    model = Classifier(net)
    prune = HalfPrune({0: 0.3, 1: 0.5})
    with pytest.warns(PreflightWarning, match=r"(?s)before training.*'net.b'.*width 11"):
        fit(tmp_path, model, prune)
    assert list(prune.left_out) == ["net.b"] and model.net.b.out_channels == 16
    assert model.net.a.out_channels == 8 and len(model.losses) == 12


def test_a_scorer_failing_on_a_group_mid_fit_leaves_that_group_out_and_training_goes_on(tmp_path):
    """torch-pruning's importance can raise on widths it first sees at a later event: that group is left out with a
    warning naming it, the rest is cut, and the fit continues (it used to end the fit with a raw IndexError)."""
    l2 = get_scorer("l2")
    calls = {"n": 0}

    def flaky(group):
        calls["n"] += 1
        if calls["n"] == 1:  # the first group scored at the first prune point
            raise IndexError("index 180 is out of bounds for dimension 0 with size 180")
        return l2(group)

    model = Classifier("plain_cnn")
    prune = HalfPrune({0: 0.5}, scorer=flaky, latency_batch_size=0, verbose=False)
    with pytest.warns(PreflightWarning, match=r"(?s)at this prune point.*scoring it failed: IndexError: index 180"):
        fit(tmp_path, model, prune, max_epochs=2)
    assert len(prune.left_out) == 1 and len(prune.history) == 1
    assert all(layer not in prune.left_out for layer, _ in prune.history[0]["cuts"])
    assert len(model.losses) > 0 and all(v == v for v in model.losses)


def test_a_module_holding_torchmetrics_is_pruned_with_customized_pruners_registered():
    """torchmetrics' Metric overloads ==: torch-pruning's `module in ignored` once made every layer look ignored."""
    import transformers.pytorch_utils  # noqa: F401  (registers HF Conv1D's pruner: torch-pruning fills its ignore list)

    from lightning_halfprune.demo import CNN1D

    model = CNN1D(channels=16)
    surgeon = Surgeon(model, model.example_input_array, [model.classifier])
    assert len(surgeon.groups()) == 3
