"""Every torch optimizer (and schedule-free AdamW) carries its state across two cuts, and checkpoints after them."""

import inspect

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_halfprune import HalfPrune
from lightning_halfprune.fit.rebind import CarryError, check_optimizers
from models import loaders, trainer

OPTIMIZERS = sorted(
    name
    for name, cls in vars(torch.optim).items()
    if inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer
)
SETTINGS = {"SGD": {"lr": 0.05, "momentum": 0.9}, "Adadelta": {"lr": 1.0}, "LBFGS": {"lr": 0.1}, "Rprop": {"lr": 0.001}}


def net() -> nn.Module:
    """2-D weights only: Muon takes nothing else."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(192, 32, bias=False), nn.ReLU(), nn.Linear(32, 32, bias=False), nn.ReLU(),
        nn.Linear(32, 4, bias=False),
    )


class Model(pl.LightningModule):
    def __init__(self, optimizer: str):
        super().__init__()
        self.optimizer = optimizer
        self.net = net()
        self.example_input_array = torch.zeros(2, 3, 8, 8)
        self.losses = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        if self.optimizer == "AdamWScheduleFree":
            import schedulefree

            return schedulefree.AdamWScheduleFree(self.parameters(), lr=0.01)
        return getattr(torch.optim, self.optimizer)(self.parameters(), **SETTINGS.get(self.optimizer, {"lr": 0.01}))

    def on_train_epoch_start(self):  # schedule-free optimizers switch between train and eval weights
        if hasattr(self.optimizers().optimizer, "train"):
            self.optimizers().optimizer.train()


def optimizer_cases():
    cases = [n for n in OPTIMIZERS if n != "SparseAdam"]  # sparse gradients only: covered below
    return cases + [pytest.param("AdamWScheduleFree", marks=pytest.mark.skipif(not _has("schedulefree"), reason=""))]


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("name", optimizer_cases())
def test_every_optimizer_carries_its_state_across_two_cuts(tmp_path, name):
    pl.seed_everything(0)
    model = Model(name)
    prune = HalfPrune({0: 0.25, 1: 0.5}, latency_batch_size=0)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)  # a save after each cut (LBFGS crashed there)
    t = trainer(tmp_path, max_epochs=3, callbacks=[prune, checkpoints], enable_checkpointing=True)
    t.fit(model, loaders()[0])

    assert len(prune.history) == 2 and model.net[1].out_features == 16
    optimizer = t.optimizers[0]
    live = list(model.parameters())
    assert [p for g in optimizer.param_groups for p in g["params"]] == live  # the pruned tensors, no others
    state = optimizer.state
    if name == "LBFGS":  # its history restarted over the pruned parameters: flat vectors of their size
        assert optimizer._params == live and state[live[0]]["d"].numel() == sum(p.numel() for p in live)
        return
    for p in live:
        for key, value in state[p].items():  # sliced: every tensor broadcasts against the pruned parameter
            if torch.is_tensor(value) and value.numel() > 1:
                assert value.dim() == p.dim(), key
                assert all(v in (s, 1) for v, s in zip(value.shape, p.shape, strict=True)), key
        if "step" in state[p]:  # carried, not started over: it counts every step of the fit
            assert float(state[p]["step"]) == t.global_step
    assert all(state[p] for p in live)
    assert all(torch.isfinite(torch.tensor(model.losses)))
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["optimizer_states"]


class Sparse(pl.LightningModule):
    """SparseAdam takes sparse gradients only: the embedding gets it, the rest Adam (manual optimization)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.embed = nn.Embedding(16, 8, sparse=True)
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
        self.example_input_array = torch.zeros(2, 6, dtype=torch.long)

    def forward(self, tokens):
        return self.body(self.embed(tokens).mean(1))

    def training_step(self, batch, batch_idx):
        tokens, y = batch
        loss = F.cross_entropy(self(tokens), y)
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self):
        return torch.optim.SparseAdam(self.embed.parameters()), torch.optim.Adam(self.body.parameters())


def test_sparse_adam_beside_a_dense_optimizer(tmp_path):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16, (64, 6), generator=g)
    data = torch.utils.data.TensorDataset(tokens, tokens[:, 0] % 4)
    model = Sparse()
    t = trainer(tmp_path, max_epochs=3, callbacks=[HalfPrune({0: 0.25, 1: 0.5}, latency_batch_size=0)])
    t.fit(model, torch.utils.data.DataLoader(data, batch_size=16))
    assert model.body[0].out_features == 16
    adam = t.optimizers[1]
    assert [p for g in adam.param_groups for p in g["params"]] == list(model.body.parameters())
    assert adam.state[model.body[0].weight]["exp_avg"].shape == (16, 8)


class Cached(torch.optim.SGD):
    """An optimizer keeping its own list of the parameters, which a cut would leave behind."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.mine = [p for g in self.param_groups for p in g["params"]]


def test_an_optimizer_that_caches_parameters_is_refused_before_training():
    model = net()
    with pytest.raises(CarryError, match="Cached .* keeps the model's parameters in `mine`"):
        check_optimizers([Cached(model.parameters(), lr=0.1)], list(model.parameters()))
    check_optimizers([torch.optim.LBFGS(model.parameters())], list(model.parameters()))  # handled: no error
