"""Layer families cut like their plain cousins, or left out by name; a cut is checked in training mode too."""

import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F

from lightning_halfprune import HalfPrune, load_pruned
from lightning_halfprune.core.errors import BrokenForward
from lightning_halfprune.core.plan import Cut
from lightning_halfprune.core.preflight import PreflightWarning
from lightning_halfprune.core.surgeon import Surgeon
from models import Classifier, loaders, trainer


class AuxNet(nn.Module):
    """GoogLeNet in small: an auxiliary head that only runs in training mode."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.aux = nn.Linear(8, 4)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        out = self.fc(F.relu(self.conv2(h)).mean((2, 3)))
        if self.training:  # GoogLeNet returns its aux logits; the sum keeps one output a Classifier can train
            return out + 0.3 * self.aux(h.mean((2, 3)))
        return out


def test_a_cut_that_breaks_only_the_training_forward_is_undone():
    model, x = AuxNet().eval(), torch.randn(1, 3, 8, 8)  # traced in eval mode: the aux head is not in the graph
    surgeon = Surgeon(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BrokenForward, match=r"forward in training mode failed in layer 'aux'"):
        surgeon.cut([Cut("conv1", [0, 1])])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not model.training and model.train()(x).shape == (1, 4)


class NeedsLabels(AuxNet):
    """A train-mode forward that fails whatever the widths (it wants labels): cuts are not held to it."""

    def forward(self, x):
        if self.training:
            raise ValueError("labels are required in training mode")
        return super().forward(x)


def test_a_train_mode_forward_that_fails_uncut_does_not_refuse_cuts():
    model, x = NeedsLabels().eval(), torch.randn(2, 3, 8, 8)
    Surgeon(model, x).cut([Cut("conv2", [0, 1])])
    assert model.conv2.out_channels == 14 and not model.training


def test_a_fit_leaves_out_what_only_training_mode_breaks_and_cuts_the_rest(tmp_path):
    model = Classifier(AuxNet())  # torch-pruning traces in eval mode: the aux head is never in its graph
    with pytest.warns(PreflightWarning, match=r"(?s)'net\.conv1'.*training mode"):
        trainer(tmp_path, max_epochs=2, callbacks=[HalfPrune({0: 0.5})]).fit(model, *loaders(n=32))
    assert model.net.conv1.out_channels == 8 and model.net.conv2.out_channels < 16
    assert len(model.losses) == 4


class FrozenBatchNorm2d(nn.Module):
    """torchvision's ``ops.misc.FrozenBatchNorm2d``: a batch norm whose affine weight and statistics are buffers."""

    def __init__(self, n: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.rand(n) + 0.5)
        self.register_buffer("bias", torch.randn(n))
        self.register_buffer("running_mean", torch.randn(n))
        self.register_buffer("running_var", torch.rand(n) + 0.5)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


class ScaledStdConv2d(nn.Conv2d):
    """timm's ``ScaledStdConv2d`` (NF-Nets): weight standardisation with a per-output-channel ``gain``."""

    def __init__(self, *args, gamma: float = 1.0, eps: float = 1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None,
            weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0, eps=self.eps,
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """timm's ``StdConv2d``: weight standardisation, no extra parameter."""

    def forward(self, x):
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=1e-6
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class FrozenResNet(nn.Module):
    """A ResNet-style backbone with frozen batch norms (torchvision detection backbones)."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1, bias=False), FrozenBatchNorm2d(16)
        self.conv1, self.bn1 = nn.Conv2d(16, 12, 3, padding=1, bias=False), FrozenBatchNorm2d(12)
        self.conv2, self.bn2 = nn.Conv2d(12, 16, 3, padding=1, bias=False), FrozenBatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


class NFNet(nn.Module):
    """NF-Net style: scaled weight-standardised convs, no norm layers."""

    def __init__(self):
        super().__init__()
        self.stem = ScaledStdConv2d(3, 16, 3, padding=1)
        self.conv1 = ScaledStdConv2d(16, 12, 3, padding=1)
        self.conv2 = StdConv2d(12, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.gelu(self.stem(x))
        x = x + 0.2 * self.conv2(F.gelu(self.conv1(x)))
        return self.fc(x.mean((2, 3)))


def test_frozen_batch_norm_is_cut_like_batch_norm():
    model, x = FrozenResNet(), torch.randn(2, 3, 8, 8)
    surgeon = Surgeon(model, x)
    assert {g.name for g in surgeon.groups()} == {"conv1", "conv2"}  # conv2: the residual stream, stem with it
    bn1 = {k: v.clone() for k, v in model.bn1.named_buffers()}
    surgeon.cut([Cut("conv2", [0, 3]), Cut("conv1", [1, 2, 5])])
    assert model.bn0.weight.shape == model.bn2.running_var.shape == (14,) and model.stem.out_channels == 14
    keep = [0, 3, 4, 6, 7, 8, 9, 10, 11]
    assert all(torch.equal(b, bn1[k][keep]) for k, b in model.bn1.named_buffers())
    assert model(x).shape == (2, 4) and not list(model.bn1.parameters())


def test_scaled_std_conv_gain_follows_its_output_channels():
    model, x = NFNet(), torch.randn(2, 3, 8, 8)
    surgeon = Surgeon(model, x)
    gain = model.conv1.gain.detach().clone()
    surgeon.cut([Cut("stem", [1]), Cut("conv1", [0, 4])])
    assert model.stem.gain.shape == (15, 1, 1, 1) and model.conv1.gain.shape == (10, 1, 1, 1)
    assert torch.equal(model.conv1.gain.detach(), gain[[1, 2, 3, 5, 6, 7, 8, 9, 10, 11]])
    assert model.conv2.in_channels == 10 and model.conv2.out_channels == 15 and model(x).shape == (2, 4)


@pytest.mark.parametrize("net", [FrozenResNet, NFNet, lambda: Recurrent(nn.GRU, 2, True)])
def test_each_family_fits_shrinks_and_loads_pruned(tmp_path, net):
    model = Classifier(net())
    before = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    checkpoints = ModelCheckpoint(tmp_path, save_last=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PreflightWarning)  # no group left out
        fit = trainer(tmp_path, max_epochs=2, callbacks=[HalfPrune({0: 0.5}), checkpoints], enable_checkpointing=True)
        fit.fit(model, *loaders(n=32))
    after = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert after < 0.7 * before and len(model.losses) == 4
    loaded = load_pruned(Classifier, tmp_path / "last.ckpt", net=net())
    state, got = model.state_dict(), loaded.state_dict()
    assert state.keys() == got.keys() and all(torch.equal(v, state[k]) for k, v in got.items())


class Recurrent(nn.Module):
    """A recurrent classifier over the 8 rows of a 3x8x8 image."""

    def __init__(self, kind: type = nn.LSTM, layers: int = 2, bidirectional: bool = True, **kwargs):
        super().__init__()
        self.emb = nn.Linear(3, 10)
        self.rnn = kind(10, 12, num_layers=layers, bidirectional=bidirectional, batch_first=True, **kwargs)
        self.fc = nn.Linear((kwargs.get("proj_size") or 12) * (2 if bidirectional else 1), 4)

    def forward(self, x):
        out, _ = self.rnn(torch.relu(self.emb(x.mean(3).transpose(1, 2))))
        return self.fc(out[:, -1])


def kill_units(model: Recurrent, units: list[int]) -> None:
    """Zero every weight of these hidden units: they output 0 forever, and nothing reads them."""
    rnn, size = model.rnn, model.rnn.hidden_size
    rows = [g * size + j for g in range(rnn.weight_ih_l0.shape[0] // size) for j in units]
    with torch.no_grad():
        for p in rnn.parameters():
            p[rows] = 0
        for d in range(2 if rnn.bidirectional else 1):
            model.fc.weight[:, [d * size + j for j in units]] = 0


@pytest.mark.parametrize(
    ("kind", "layers", "bidirectional"),
    [(nn.LSTM, 2, True), (nn.GRU, 2, False), (nn.RNN, 1, True), (nn.GRU, 1, True)],
)
def test_recurrent_hidden_units_are_cut_with_every_gate(kind, layers, bidirectional):
    model, x = Recurrent(kind, layers, bidirectional), torch.randn(2, 3, 8, 8)
    surgeon = Surgeon(model, x)
    group = next(g for g in surgeon.groups() if g.name == "rnn")
    directions = 2 if bidirectional else 1
    assert (group.width, group.slots) == (12 * directions, directions)
    surgeon.cut([Cut("rnn", [d * 12 + j for d in range(directions) for j in (1, 4, 7)]), Cut("emb", [0, 2])])
    gates = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[kind]
    assert (model.rnn.hidden_size, model.rnn.input_size, model.fc.in_features) == (9, 8, 9 * directions)
    assert model.rnn.weight_ih_l0.shape == (9 * gates, 8) and model.rnn.weight_hh_l0.shape == (9 * gates, 9)
    assert model(x).shape == (2, 4) and model.train()(x).shape == (2, 4)


def test_recurrent_cut_keeps_the_output_exactly():
    for kind, layers, bidirectional in [(nn.LSTM, 2, True), (nn.GRU, 2, True), (nn.RNN, 2, False)]:
        model, x = Recurrent(kind, layers, bidirectional), torch.randn(2, 3, 8, 8)
        kill_units(model, [1, 4, 7])
        expected = model(x)
        directions = 2 if bidirectional else 1
        Surgeon(model, x).cut([Cut("rnn", [d * 12 + j for d in range(directions) for j in (1, 4, 7)])])
        assert model.rnn.hidden_size == 9 and model.rnn.weight_hh_l1.shape[1] == 9
        assert torch.allclose(model(x), expected, atol=1e-6), kind


def test_an_lstm_with_projections_is_left_out_by_name(tmp_path):
    model = Classifier(Recurrent(nn.LSTM, 1, False, proj_size=6))
    with pytest.warns(PreflightWarning, match=r"(?s)'net\.rnn'.*proj_size=6"):
        trainer(tmp_path, max_epochs=1, callbacks=[HalfPrune({0: 0.5})]).fit(model, *loaders(n=32))
    assert model.net.rnn.hidden_size == 12 and model.net.emb.out_features < 10
