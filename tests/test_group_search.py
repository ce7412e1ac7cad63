"""torch-pruning's group search is bounded and stoppable; a root it cannot handle is left out by name, not fatal."""

import os
import signal
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.nn import functional as F

from lightning_halfprune import HalfPrune
from lightning_halfprune.core import group_search
from lightning_halfprune.core.graph import ROOT_TYPES, output_tensors, run_model
from lightning_halfprune.core.group_search import Stopped, all_groups, new_graph, stopping
from lightning_halfprune.core.plan import Cut
from lightning_halfprune.core.surgeon import Surgeon
from lightning_halfprune.fit.checks import stop_on_sigterm
from models import Classifier, loaders, trainer


class Mixer(nn.Module):
    """HF Mamba's slow path in small: torch-pruning's split mapping raises IndexError on its chunk/split.

    Its ``D`` is a buffer, so HalfPrune's own Mamba support (``core/mamba.py``, which wants the parameters of a real
    mixer) does not take it over: what is left is a layer torch-pruning fails on, as any unknown layer may be.
    """

    def __init__(self, d: int = 8, inner: int = 16, state: int = 4, rank: int = 2):
        super().__init__()
        self.in_proj = nn.Linear(d, 2 * inner)
        self.conv1d = nn.Conv1d(inner, inner, 3, groups=inner, padding=2)
        self.x_proj = nn.Linear(inner, rank + 2 * state)
        self.dt_proj = nn.Linear(rank, inner)
        self.A_log = nn.Parameter(torch.zeros(inner, state))
        self.register_buffer("D", torch.ones(inner))
        self.out_proj = nn.Linear(inner, d)
        self.rank, self.state = rank, state

    def forward(self, x):
        length = x.shape[1]
        h, gate = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)
        h = F.silu(self.conv1d(h)[..., :length])
        dt, b, c = torch.split(self.x_proj(h.transpose(1, 2)), [self.rank, self.state, self.state], dim=-1)
        dt = F.softplus(self.dt_proj(dt)).transpose(1, 2)
        da = torch.exp(-torch.exp(self.A_log)[None, :, None, :] * dt[..., None])
        dbu = dt[..., None] * b[:, None] * h[..., None]
        state, ys = torch.zeros(x.shape[0], h.shape[1], self.state), []
        for i in range(length):
            state = da[:, :, i] * state + dbu[:, :, i]
            ys.append(torch.matmul(state, c[:, i, :, None]))
        y = (torch.stack(ys, dim=-1)[..., 0, :] + h * self.D[None, :, None]) * F.silu(gate)
        return self.out_proj(y.transpose(1, 2))


class MambaNet(nn.Module):
    """Two Mamba-like mixers on 8 tokens of a 3x8x8 image, beside a plain MLP branch torch-pruning handles."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(3, 8)
        self.m1, self.m2 = Mixer(), Mixer()
        self.fc1, self.fc2 = nn.Linear(3 * 8 * 8, 32), nn.Linear(32, 4)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        t = self.emb(x.mean(2).transpose(1, 2))
        t = t + self.m1(t)
        t = t + self.m2(t)
        return self.head(t.mean(1)) + self.fc2(F.relu(self.fc1(x.flatten(1))))


class ShuffleNet(nn.Module):
    """A chunk, a concatenation and a channel shuffle: torch-pruning cannot size that concatenation."""

    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.d = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.b(F.relu(self.bn(self.a(x))))
        x1, x2 = x.chunk(2, dim=1)
        x = torch.cat([x1, x2 * 2], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return self.fc(self.d(self.c(x)).mean((2, 3)))


class DeepResidual(nn.Module):
    """A residual stream through many blocks: its group is far larger than any block's own."""

    def __init__(self, blocks: int = 24):
        super().__init__()
        self.stem = nn.Linear(3 * 8 * 8, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 16)) for _ in range(blocks))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.stem(x.flatten(1))
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def graph_of(model, x):
    return new_graph().build_dependency(model, example_inputs=x, forward_fn=run_model, output_transform=output_tensors)


def test_a_root_torch_pruning_raises_on_is_named_and_the_rest_is_cut():
    model, x = MambaNet(), torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"(?s)'m1\.in_proj'.*IndexError.*ignored_layers=\[.*'m1\.in_proj'"):
        surgeon = Surgeon(model, x)
    names = {g.name for g in surgeon.groups()}
    assert "fc1" in names and "m1.in_proj" not in names
    surgeon.cut([Cut("fc1", list(range(16)))])
    assert model.fc1.out_features == 16 and model.fc2.in_features == 16
    assert model(x).shape == (2, 4)


def test_a_model_torch_pruning_raises_on_fits_and_shrinks(tmp_path):
    model = Classifier(MambaNet())
    before = model.net.fc1.out_features
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, max_epochs=1, callbacks=[HalfPrune({0: 0.5})]).fit(model, *loaders(n=32))
    assert model.net.fc1.out_features < before
    assert any("m1.in_proj" in str(w.message) and "ignored_layers" in str(w.message) for w in caught)


def test_a_concatenation_torch_pruning_cannot_size_leaves_out_its_groups_only():
    model, x = ShuffleNet(), torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"(?s)'c'.*concatenation \(torch\.cat\).*TypeError"):
        surgeon = Surgeon(model, x)  # the graph build used to fail as a whole
    names = {g.name for g in surgeon.groups()}
    assert not {"b", "c"} & names and {"a", "d"} <= names
    surgeon.cut([Cut("a", [0, 1, 2]), Cut("d", [0, 5])])
    assert (model.a.out_channels, model.bn.num_features, model.b.in_channels, model.d.out_channels) == (5, 5, 5, 14)
    assert model(x).shape == (2, 4)


def test_a_root_over_its_budget_is_named_and_the_others_are_kept():
    model, x = DeepResidual(), torch.randn(2, 3, 8, 8)
    graph = graph_of(model, x)
    budget = r"1 layer\(s\).*\n.*'blocks.23.2'.*took over 0 s \(and 24 layers coupled to it\)"
    with pytest.warns(UserWarning, match=budget):
        groups = all_groups(graph, model, [], ROOT_TYPES, budget_s=0.0)
    roots = {graph._module2name[g[0].dep.target.module] for g in groups}
    assert "stem" not in roots and {f"blocks.{i}.0" for i in range(24)} <= roots
    assert len(all_groups(graph, model, [], ROOT_TYPES)) == len(roots) + 1  # the default budget finds it


def test_a_long_search_says_where_it_is(monkeypatch, caplog):
    model, x = DeepResidual(4), torch.randn(2, 3, 8, 8)
    monkeypatch.setattr(group_search, "PROGRESS_S", 0.0)
    with caplog.at_level("INFO", logger="lightning_halfprune"):
        all_groups(graph_of(model, x), model, [], ROOT_TYPES)
    assert "still searching the coupled layers of DeepResidual" in caplog.text


def test_a_stop_request_stops_the_search_and_leaves_the_model_alone():
    model, x = DeepResidual(), torch.randn(2, 3, 8, 8)
    graph, asked = graph_of(model, x), []

    def stop():
        asked.append(1)
        return len(asked) > 3  # during the search, not before it

    state = {k: v.clone() for k, v in model.state_dict().items()}
    with stopping(stop), pytest.raises(Stopped):
        all_groups(graph, model, [], ROOT_TYPES)
    assert len(asked) == 4 and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert len(all_groups(graph, model, [], ROOT_TYPES)) == 26  # outside `stopping` nothing asks


class SigtermAtTrainStart(pl.Callback):
    """SIGTERM arrives while HalfPrune's search runs at train start (as the lead's callback wraps it)."""

    def on_train_start(self, trainer, pl_module):
        with stop_on_sigterm(trainer):
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler only records it
            Surgeon(pl_module, pl_module.example_input_array)


def test_sigterm_stops_the_search_at_train_start(tmp_path):
    model = Classifier(DeepResidual())
    with pytest.raises(SIGTERMException) as raised:
        trainer(tmp_path, max_epochs=1, callbacks=[SigtermAtTrainStart()]).fit(model, *loaders(n=32))
    assert isinstance(raised.value.__cause__, Stopped)  # HalfPrune stopped it, not the loop after a batch
    assert model.losses == []


def test_the_torch_pruning_names_the_search_relies_on_still_exist():
    from torch_pruning.dependency import dependency, group, index_mapping

    from lightning_halfprune._compat import torch_pruning as tpc

    assert all(callable(f) for f in tpc.MAPPING_UPDATES.values()) and len(tpc.MAPPING_UPDATES) == 6
    assert callable(index_mapping.update_index_mapping)
    assert callable(dependency.Dependency.is_triggered_by) and callable(group.Group.add_and_merge)
