"""Cuts under FSDP2: real 2-process fits on CPU (gloo, ``ModelParallelStrategy``, ``fully_shard`` per layer), the
full view taken apart and put back in one process, and the strategies refused at setup."""

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, ParallelStrategy
from torch import nn

from lightning_halfprune import HalfPrune, load_pruned
from lightning_halfprune.fit import sharded
from lightning_halfprune.fit.distributed import check_strategy
from lightning_halfprune.options import Distill, Guard, Sparsity

SCRIPT = Path(__file__).with_name("sharded_run.py")


def run(out, kind, ckpt=None, epochs=3, consolidated=False):
    env = os.environ | {"HALFPRUNE_EPOCHS": str(epochs), "HALFPRUNE_CONSOLIDATED": "1" if consolidated else ""}
    args = [sys.executable, str(SCRIPT), kind, str(out)] + ([str(ckpt)] if ckpt else [])
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout + done.stderr


def load(out, tag, rank):
    return torch.load(Path(out) / f"{tag}-rank{rank}.pt", weights_only=False)


def params_of(dump, module_class):
    """The dumped entries that are parameters (FSDP leaves buffers such as BatchNorm running stats per rank)."""
    names = {name for name, _ in module_class().named_parameters()}
    return {k: v for k, v in dump["state"].items() if k in names}


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cnn")
    return out, run(out, "cnn", consolidated=True)


@pytest.mark.slow
def test_cnn_cut_twice_under_fsdp2_every_rank_identical_and_sharded_again(cnn_run):
    from sharded_run import ShardedCNN

    out, text = cnn_run
    for tag in ("epoch0", "epoch1", "epoch2", "end"):  # right after each cut, after more training, at the end
        a, b = load(out, tag, 0), load(out, tag, 1)
        pa, pb = params_of(a, lambda: ShardedCNN("resnet")), params_of(b, lambda: ShardedCNN("resnet"))
        assert pa.keys() == pb.keys() and all(torch.equal(v, pb[k]) for k, v in pa.items()), tag
        assert a["sharded"] and a["optimizer_sharded"], tag  # parameters and AdamW state are DTensors again
        assert a["reports"] == b["reports"]
    end = load(out, "end", 0)
    assert end["state"]["net.blocks.0.conv1.weight"].shape[0] == 8
    reports = end["reports"]
    assert len(reports) == 2 and reports[0]["after"]["params"] < reports[0]["before"]["params"]
    assert reports[1]["after"]["params"] < reports[0]["after"]["params"]
    losses = end["losses"]
    assert sum(losses[-4:]) < sum(losses[:4])  # it goes on learning after both cuts
    assert text.count("HalfPrune summary") == 1


@pytest.mark.slow
def test_consolidated_checkpoint_loads_with_load_pruned(cnn_run):
    from sharded_run import ShardedCNN

    out, _ = cnn_run
    model = load_pruned(ShardedCNN, out / "consolidated.ckpt")
    trained = load(out, "end", 0)["state"]
    state = model.state_dict()
    assert state.keys() == trained.keys() and all(torch.equal(v, state[k]) for k, v in trained.items())


@pytest.mark.slow
def test_consolidated_checkpoint_resumes_into_the_sharded_model(cnn_run, tmp_path):
    out, _ = cnn_run
    run(tmp_path, "cnn", ckpt=out / "consolidated.ckpt")  # written after the fit: restored, nothing left to train
    trained = load(out, "end", 0)["state"]
    for rank in (0, 1):
        restored = load(tmp_path, "end", rank)
        assert restored["sharded"] and restored["state"]["net.blocks.0.conv1.weight"].shape[0] == 8
        assert all(torch.equal(v, trained[k]) for k, v in restored["state"].items() if "running" not in k), rank


@pytest.mark.slow
def test_sharded_checkpoint_after_the_first_cut_resumes_exactly(cnn_run, tmp_path):
    from sharded_run import ShardedCNN

    out, _ = cnn_run
    run(tmp_path / "first", "cnn", epochs=2)  # last.ckpt (a folder) holds the epoch-0 cut; epoch 1's is still due
    assert (tmp_path / "first" / "last.ckpt").is_dir()
    run(tmp_path / "resumed", "cnn", ckpt=tmp_path / "first" / "last.ckpt")
    whole = params_of(load(out, "end", 0), lambda: ShardedCNN("resnet"))
    for rank in (0, 1):
        resumed = params_of(load(tmp_path / "resumed", "end", rank), lambda: ShardedCNN("resnet"))
        assert all(torch.equal(v, resumed[k]) for k, v in whole.items()), rank
    assert load(out, "end", 0)["losses"][-4:] == load(tmp_path / "resumed", "end", 0)["losses"][-4:]


@pytest.mark.slow
def test_llama_gqa_sharded_per_decoder_layer_cut_twice(tmp_path):
    out = tmp_path
    run(out, "llama", epochs=3)
    for tag in ("epoch0", "epoch1", "end"):
        a, b = load(out, tag, 0), load(out, tag, 1)
        assert all(torch.equal(v, b["state"][k]) for k, v in a["state"].items()), tag  # buffers too
        assert a["sharded"] and a["optimizer_sharded"]
    end = load(out, "end", 0)
    state = end["state"]
    attn = "net.model.layers.0.self_attn."
    q, k = state[attn + "q_proj.weight"].shape[0], state[attn + "k_proj.weight"].shape[0]
    assert (q, k) == (32, 16)  # whole key/value heads with their query heads: 4 q / 2 kv heads -> 2 / 1
    assert torch.equal(state["net.lm_head.weight"], state["net.model.embed_tokens.weight"])  # still tied
    assert end["reports"][-1]["after"]["params"] < end["reports"][0]["before"]["params"] * 0.6
    assert sum(end["losses"][-4:]) < sum(end["losses"][:4])


@pytest.mark.slow
def test_fsdp1_with_orig_params_cut_twice_every_rank_identical_and_wrapped_again(tmp_path):
    from models import Classifier

    run(tmp_path, "cnn-fsdp1")  # a CPU subclass of FSDPStrategy: each residual block its own FSDP unit
    names = {name for name, _ in Classifier("resnet").named_parameters()}
    for tag in ("epoch0", "epoch1", "end"):
        a, b = load(tmp_path, tag, 0), load(tmp_path, tag, 1)
        assert all(torch.equal(v, b["state"][k]) for k, v in a["state"].items() if k in names), tag
        assert a["sharded"] and a["optimizer_sharded"], tag  # flat shards again, AdamW state for every parameter
    end = load(tmp_path, "end", 0)
    assert end["state"]["net.blocks.0.conv1.weight"].shape[0] == 8 and len(end["reports"]) == 2
    assert sum(end["losses"][-4:]) < sum(end["losses"][:4])


# ------------------------------------------------------------------ in one process
@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


class _Trainer:
    def __init__(self, optimizers):
        self.optimizers = optimizers


def test_full_view_takes_fsdp_off_and_puts_it_back_the_same_way(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    model[4].weight = nn.Parameter(model[4].weight)  # a plain attribute set: still one parameter
    mesh = init_device_mesh("cpu", (1,))
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    fully_shard(model[0], mesh=mesh, reshard_after_forward=False)
    fully_shard(model[2], mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    before = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    moments = [optimizer.state[p]["exp_avg"].full_tensor().clone() for p in model.parameters()]
    with sharded.full_model(_Trainer([optimizer]), model) as full:
        assert not any(isinstance(m, FSDPModule) for m in full.modules())
        assert not any(isinstance(p, DTensor) for p in full.parameters())
        assert all(not isinstance(v, DTensor) for s in optimizer.state.values() for v in s.values())
        assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in full.parameters()}
        with sharded.full_model(_Trainer([optimizer]), model):  # nested: nothing more happens
            assert not isinstance(full[0].weight, DTensor)
    assert all(isinstance(m, FSDPModule) for m in (model, model[0], model[2]))
    assert model[2]._get_fsdp_state()._mp_policy == policy
    assert model[0]._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is None  # reshard_after_forward=False
    assert all(torch.equal(v.full_tensor(), before[k]) for k, v in model.state_dict().items())
    assert all(
        torch.equal(optimizer.state[p]["exp_avg"].full_tensor(), m)
        for p, m in zip(model.parameters(), moments, strict=True)
    )
    model(torch.randn(3, 4)).sum().backward()  # it trains on as before
    optimizer.step()


def test_a_module_not_sharded_is_left_alone():
    model = nn.Linear(2, 2)
    weight = model.weight
    with sharded.full_model(None, model) as full:
        assert full is model and model.weight is weight


# ------------------------------------------------------------------ what is refused at setup
def test_supported_and_refused_strategies():
    check_strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    check_strategy(DDPStrategy())
    with pytest.raises(ValueError, match="Sharded training.*tensor_parallel_size=2"):
        check_strategy(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2))
    with pytest.raises(ValueError, match="tensor_parallel_size=auto"):
        check_strategy(ModelParallelStrategy())  # 'auto' makes every device tensor parallel
    check_strategy(FSDPStrategy())  # FSDP1 with use_orig_params=True (Lightning's default)
    with pytest.raises(ValueError, match="not FSDPStrategy with `use_orig_params=False`.*ModelParallelStrategy"):
        check_strategy(FSDPStrategy(use_orig_params=False))

    class PipelineStrategy(ParallelStrategy):  # stands for any other parallel strategy (none is built in)
        pass

    PipelineStrategy.__abstractmethods__ = frozenset()
    with pytest.raises(ValueError, match="not strategy PipelineStrategy.*pipeline"):
        check_strategy(PipelineStrategy.__new__(PipelineStrategy))


@pytest.mark.parametrize(
    "options, refused",
    [
        ({"monitor": "val_acc", "guard": Guard(max_drop=0.1)}, "guard"),
        ({"sparsity": Sparsity(strength=1e-4)}, "sparsity"),
        ({"distill": Distill(alpha=1.0)}, "distill"),
    ],
)
def test_options_not_yet_supported_sharded_are_refused_at_setup(tmp_path, options, refused):
    from models import Classifier

    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, strategy=strategy, logger=False)
    with pytest.raises(ValueError, match=f"does not support `{refused}`.*Sharded training"):
        sharded.setup(trainer, Classifier(), HalfPrune({0: 0.5}, **options))
