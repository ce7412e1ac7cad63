"""timm families of the model zoo (issue 22), rebuilt from plain torch modules named like timm's (timm is not
imported beside the project's torch): EVA-02's packed GLU MLP in a ViT with a class token, an NF-Net bottleneck of
scaled weight-standardised convs alone."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_halfprune.core.scoring import get_scorer
from lightning_halfprune.core.surgeon import Surgeon
from test_pruners import ScaledStdConv2d

DIM, HIDDEN, TOKENS = 16, 24, 5


class GluMlp(nn.Module):
    """timm's ``GluMlp`` (EVA-02's ``SwiGLUPacked``): one ``fc1`` whose output is chunked into value and gate."""

    def __init__(self, gate_last: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2, self.gate_last = nn.Linear(DIM, 2 * HIDDEN), nn.Linear(HIDDEN, DIM), gate_last

    def forward(self, x):
        x1, x2 = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(x1 * nn.functional.silu(x2) if self.gate_last else nn.functional.silu(x1) * x2)


class GluViT(nn.Module):
    """Patch tokens, a class token and a position embedding (3-D parameters), two residual GLU MLP blocks."""

    def __init__(self, gate_last: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(8, DIM)
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM))
        self.pos_embed = nn.Parameter(torch.randn(1, TOKENS + 1, DIM))
        self.blocks = nn.ModuleList(GluMlp(gate_last) for _ in range(2))
        self.norms = nn.ModuleList(nn.LayerNorm(DIM) for _ in range(2))
        self.head = nn.Linear(DIM, 3)

    def forward(self, x):
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.embed(x)], dim=1) + self.pos_embed
        for norm, mlp in zip(self.norms, self.blocks, strict=True):
            h = h + mlp(norm(h))
        return self.head(h[:, 0])


def test_packed_glu_mlp_is_cut_in_both_halves_alike():
    """The chunk of ``fc1`` along its last dim is mapped to ``fc2``'s input (torch-pruning maps splits on dim 1 only,
    and none in a model with a class token): channel j of the value goes with channel j of the gate."""
    for gate_last in (False, True):
        torch.manual_seed(0)
        net, x = GluViT(gate_last).eval(), torch.randn(2, TOKENS, 8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the residual stream is left alone, with a warning
            surgeon = Surgeon(net, x)
            groups = {g.name: g for g in surgeon.groups()}
        assert {"blocks.0.fc1", "blocks.1.fc1"} <= set(groups)
        assert groups["blocks.0.fc1"].slots == 2 and groups["blocks.0.fc1"].width == 2 * HIDDEN
        fc1 = net.blocks[0].fc1
        bias = fc1.bias.detach().clone()  # (its input columns may go too: this toy's stream is not protected)
        cuts = surgeon.plan(0.5, get_scorer("l2"))
        cut = next(c for c in cuts if c.layer == "blocks.0.fc1")
        value = sorted(c for c in cut.channels if c < HIDDEN)
        assert sorted(cut.channels) == value + [c + HIDDEN for c in value]  # the same offsets in both halves
        surgeon.cut(cuts)
        kept = [c for c in range(HIDDEN) if c not in value]
        assert net.blocks[0].fc1.out_features == 2 * len(kept) and net.blocks[0].fc2.in_features == len(kept)
        assert torch.equal(net.blocks[0].fc1.bias, bias[kept + [c + HIDDEN for c in kept]])
        assert net(x).shape == (2, 3)


class NormFreeBlock(nn.Module):
    """timm's NF-ResNet bottleneck: ``conv1 -> conv2 -> conv3`` of ``ScaledStdConv2d``, no norm, a scaled residual."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ScaledStdConv2d(3, 16, 3, padding=1)
        self.conv1, self.conv2 = ScaledStdConv2d(16, 8, 1), ScaledStdConv2d(8, 8, 3, padding=1)
        self.conv3 = ScaledStdConv2d(8, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = self.stem(x)
        out = self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(F.gelu(x) * 0.5)))))
        return self.fc((x + 0.2 * out).mean((2, 3)))


@pytest.mark.parametrize("scorer", ["l2", "l1", "taylor"])
def test_groups_of_scaled_std_convs_alone_are_scored_and_cut(scorer):
    """NF-Nets have no BatchNorm: a bottleneck group holds scaled std convs only, which torch-pruning's importances
    skipped (not their own handlers), so the group had no scores and was never cut (19% of nf_resnet26)."""
    torch.manual_seed(0)
    net, x = NormFreeBlock(), torch.randn(2, 3, 8, 8)
    surgeon, score = Surgeon(net, x), get_scorer(scorer)
    if scorer == "taylor":
        score.calibrate(net, [x], lambda batch: net(batch).square().mean())
    assert {"conv1", "conv2"} <= set(surgeon.widths)
    cuts = {c.layer: c.channels for c in surgeon.plan(0.5, score)}
    assert len(cuts.get("conv1", [])) == 4 and len(cuts.get("conv2", [])) == 4
    surgeon.cut([c for c in surgeon.plan(0.5, score)])
    assert net.conv1.gain.shape == (4, 1, 1, 1) and net.conv2.gain.shape == (4, 1, 1, 1)
    assert net.conv2.in_channels == 4 and net.conv3.in_channels == 4 and net(x).shape == (2, 4)
