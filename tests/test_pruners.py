"""Layer families cut like their plain cousins, or left out by name; a cut is checked in training mode too."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_halfprune import HalfPrune
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
    with pytest.raises(BrokenForward, match=r"training mode\) failed in layer 'aux'"):
        surgeon.cut([Cut("conv1", [0, 1])])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not model.training and model.train()(x).shape == (1, 4)


def test_a_fit_leaves_out_what_only_training_mode_breaks_and_cuts_the_rest(tmp_path):
    model = Classifier(AuxNet())  # torch-pruning traces in eval mode: the aux head is never in its graph
    with pytest.warns(PreflightWarning, match=r"(?s)'net\.conv1'.*training mode"):
        trainer(tmp_path, max_epochs=2, callbacks=[HalfPrune({0: 0.5})]).fit(model, *loaders(n=32))
    assert model.net.conv1.out_channels == 8 and model.net.conv2.out_channels < 16
    assert len(model.losses) == 4
