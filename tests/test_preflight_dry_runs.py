"""Pre-flight finds what breaks in few dry runs: it does not retry every cut alone (issue 22, timm's CaiT)."""

import warnings

import pytest
import torch
from torch import nn

from lightning_halfprune.core.preflight import PreflightWarning, preflight
from lightning_halfprune.core.surgeon import Surgeon

DIM, HEADS = 32, 4


class TalkingHeads(nn.Module):
    """timm's ``TalkingHeadAttn``: attention maps mixed across heads by (heads, heads) linears no cut follows."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = HEADS
        self.qkv = nn.Linear(DIM, DIM * 3)
        self.proj_l = nn.Linear(HEADS, HEADS)
        self.proj_w = nn.Linear(HEADS, HEADS)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        a = self.proj_l((q @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2).softmax(-1)
        a = self.proj_w(a.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.attn = TalkingHeads()
        self.mlp = nn.Sequential(nn.Linear(DIM, 64), nn.GELU(), nn.Linear(64, DIM))

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


class TalkingNet(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.embed = nn.Linear(6, DIM)
        self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
        self.head = nn.Linear(DIM, 3)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)).mean(1))


class Checked(nn.Module):
    """Eight branches; the model's own forward checks one branch's width: only that cut breaks it."""

    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 6)) for _ in range(8))
        self.odd, self.odd_out = nn.Linear(6, 16), nn.Linear(16, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h, o = sum(b(x) for b in self.branches), self.odd(x)
        if o.shape[-1] != 16:
            raise ValueError(f"16 features expected, got {o.shape[-1]}")
        return self.head(h + self.odd_out(o.relu()))


@pytest.fixture
def dry_runs(monkeypatch):
    calls = []
    cut = Surgeon.cut

    def counted(self, cuts, *args, **kwargs):
        calls.append([c.layer for c in cuts])
        return cut(self, cuts, *args, **kwargs)

    monkeypatch.setattr(Surgeon, "cut", counted)
    return calls


@pytest.mark.parametrize("depth", [2, 8])
def test_attention_modules_alike_to_one_that_breaks_are_left_out_at_once(dry_runs, depth):
    torch.manual_seed(0)
    net = TalkingNet(depth)
    surgeon = Surgeon(net, torch.randn(2, 5, 6))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        left_out = preflight(surgeon, [0.3, 0.5])
    attention = {f"blocks.{i}.attn.qkv" for i in range(depth)}
    assert set(left_out) == attention
    assert sum("configured alike" in why for why in left_out.values()) == depth - 1
    told = [w for w in caught if issubclass(w.category, PreflightWarning)]
    assert len(told) == 1 and "TalkingHeads" in str(told[0].message)
    # all; the group it names; the groups in the failing module, halved; the rest; the smaller ratio
    assert len(dry_runs) <= 6  # the same for 2 and 8 modules: not one per module
    assert all(not attention & set(run) for run in dry_runs[-2:])  # what is kept passed its dry runs together
    names = {g.name for g in surgeon.groups()}
    assert not attention & names and {f"blocks.{i}.mlp.0" for i in range(depth)} <= names
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_a_break_in_the_models_own_forward_is_found_by_halving(dry_runs):
    torch.manual_seed(0)
    net = Checked()
    surgeon = Surgeon(net, torch.randn(2, 6))
    groups = len(surgeon.groups())
    with pytest.warns(PreflightWarning, match="'odd'"):
        left_out = preflight(surgeon, [0.5])
    assert list(left_out) == ["odd"]
    assert "in the model's own forward" in left_out["odd"]
    assert len(dry_runs) < groups + 2  # one dry run per group alone, and the two together, before
    assert "odd" not in dry_runs[-1] and len(dry_runs[-1]) == groups - 1


def test_leaving_groups_out_does_not_search_every_root_again(monkeypatch):
    from lightning_halfprune.core import group_search

    torch.manual_seed(0)
    surgeon = Surgeon(TalkingNet(2), torch.randn(2, 5, 6))
    searches = []
    search = group_search._search
    monkeypatch.setattr(group_search, "_search", lambda *a: searches.append(a) or search(*a))
    assert preflight(surgeon, [0.3, 0.5])
    assert searches == []  # the graph is put back after each dry run: each root's search still holds
