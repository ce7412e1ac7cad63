"""Mixture of experts: every expert's MLP width is cut (fused 3-D experts and expert lists), the router and the
residual stream stay, Adam moments follow, configs follow, checkpoints reload and resume."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

pytest.importorskip("transformers")

from lightning_halfprune import HalfPrune, load_pruned  # noqa: E402
from lightning_halfprune.core import moe  # noqa: E402
from lightning_halfprune.core.cut import tracking_slices  # noqa: E402
from lightning_halfprune.core.errors import SurgeryError  # noqa: E402
from lightning_halfprune.core.measure import count_params  # noqa: E402
from lightning_halfprune.core.plan import Cut  # noqa: E402
from lightning_halfprune.core.scoring import get_scorer  # noqa: E402
from lightning_halfprune.core.surgeon import Surgeon  # noqa: E402
from moe_models import MoEWrapper, SwitchMoE  # noqa: E402
from transformer_models import assert_adam_state_follows, loader, short_trainer  # noqa: E402


def fit(tmp_path, kind, epochs=3, callbacks=(), ckpt_path=None, moe_mode="width", **halfprune):
    model = MoEWrapper(kind)
    cb = HalfPrune(schedule={0: 0.3, 1: 0.5}, timing=None, verbose=False, **halfprune)
    cb.moe = moe_mode  # read by fit/planning.build_surgeon; HalfPrune takes no `moe=` argument yet (lead's call)
    trainer = short_trainer(tmp_path, epochs, cb, callbacks)
    trainer.fit(model, loader("llama"), loader("llama"), ckpt_path=ckpt_path)
    return model, cb


def expert_widths(model):
    return [w for e in moe.find_experts(model) for w in e.widths]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe", "switch"])
def test_fit_halves_moe_and_reloads(tmp_path, kind):
    original = count_params(MoEWrapper(kind))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model, cb = fit(tmp_path, kind, callbacks=[ckpt])
    assert count_params(model) <= 0.7 * original
    assert len(cb.history) == 2  # the 0.5 point cuts too (the experts were never at that width before)
    fresh = {e.name: e.widths for e in moe.find_experts(MoEWrapper(kind))}
    for e in moe.find_experts(model):  # every expert at about half its width
        assert all(w <= math.ceil(0.55 * w0) for w, w0 in zip(e.widths, fresh[e.name], strict=True))
    assert all(math.isfinite(loss) for loss in model.losses)
    assert_adam_state_follows(model)
    x = model.example_input_array
    model.train()
    model.loss((x, None)).backward()  # train mode runs (and backpropagates) on the pruned experts
    loaded = load_pruned(MoEWrapper, ckpt.last_model_path)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    if kind != "switch":
        config, width = model.net.config, expert_widths(model)[0]
        assert getattr(config, "moe_intermediate_size", config.intermediate_size) == width
        if kind == "qwen2_moe":
            shared = model.net.model.layers[0].mlp.shared_expert
            assert config.shared_expert_intermediate_size == shared.up_proj.out_features < 128


@pytest.mark.slow
@pytest.mark.parametrize("kind, mode", [("qwen2_moe", "width"), ("switch", "width"), ("mixtral", "both")])
def test_resume_after_first_cut(tmp_path, kind, mode):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    model, cb = fit(tmp_path, kind, epochs=3, callbacks=[ckpt], moe_mode=mode)
    first = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]
    resumed, cb2 = fit(tmp_path / "resume", kind, epochs=3, ckpt_path=str(first), moe_mode=mode)
    assert [e["cuts"] for e in cb2.history] == [e["cuts"] for e in cb.history]
    assert resumed.losses == pytest.approx(model.losses[len(model.losses) - len(resumed.losses):], rel=1e-4)
    assert expert_widths(resumed) == expert_widths(model)
    assert_adam_state_follows(resumed)


def test_fused_experts_keep_their_own_channels_and_adam_moments_follow():
    model = MoEWrapper("mixtral")
    surgeon = Surgeon(model, model.example_input_array)
    experts = model.net.model.layers[0].mlp.experts
    name = "net.model.layers.0.mlp.experts"
    width = experts.down_proj.shape[2]
    drop = [[0, 1, 2, 3], [4, 5, 6, 7], [0, 5, 10, 127], [120, 121, 122, 123]]  # each expert its own channels
    channels = [e * width + j for e, d in enumerate(drop) for j in d]
    gate_up, down = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
    moment = torch.randn_like(gate_up)
    other = [e * width + j for e in range(4) for j in range(4)]
    remap = surgeon.cut([Cut(name, channels), Cut(name.replace("layers.0", "layers.1"), other)])
    assert experts.gate_up_proj.shape == (4, 2 * (width - 4), 64) and experts.down_proj.shape == (4, 64, width - 4)
    for e, d in enumerate(drop):
        keep = [j for j in range(width) if j not in d]
        torch.testing.assert_close(experts.down_proj[e], down[e][:, keep])
        rows = keep + [width + j for j in keep]  # gate rows, then up rows
        torch.testing.assert_close(experts.gate_up_proj[e], gate_up[e][rows])
        sliced = remap.slice_like(remap_source(remap, experts.gate_up_proj), moment)
        torch.testing.assert_close(sliced[e], moment[e][rows])
    assert model.net.config.intermediate_size == width - 4
    assert experts.intermediate_dim == width - 4


def remap_source(remap, new):
    return next(old for old, (p, _) in remap.steps.items() if p is new)


def test_a_fused_cut_that_differs_per_expert_in_count_is_refused_and_undone():
    model = MoEWrapper("qwen3_moe")
    surgeon = Surgeon(model, model.example_input_array)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SurgeryError, match="same number of channels"):
        surgeon.cut([Cut("net.model.layers.1.mlp.experts", [0, 1, 64])])
    torch.testing.assert_close(model.state_dict(), before)
    assert model.net.config.moe_intermediate_size == 64


def test_experts_of_different_widths_keep_the_config_and_say_so():
    model = MoEWrapper("qwen3_moe")
    surgeon = Surgeon(model, model.example_input_array)
    with pytest.warns(UserWarning, match="different widths.*load_pruned"):
        surgeon.cut([Cut("net.model.layers.1.mlp.experts", [0, 1, 2, 3, 64, 65, 66, 67, 128, 129, 130, 131, 192,
                                                            193, 194, 195])])
    assert model.net.config.moe_intermediate_size == 64
    model(model.example_input_array)


def test_expert_lists_cut_each_expert_and_record_the_slices():
    block = SwitchMoE(8, 16)
    (experts,) = moe.find_experts(block)
    assert experts.name == "experts" and experts.widths == [16] * 4
    weight = block.experts[2].fc1.weight
    with tracking_slices() as remap:
        moe.prune(block.experts, [0, 1, 16 + 3, 2 * 16 + 15], "experts")
    assert experts.widths == [14, 15, 15, 16]
    assert remap.new(weight) is block.experts[2].fc1.weight and remap.new(weight).shape == (15, 8)
    assert block.router.weight.shape == (4, 8)
    block(torch.randn(2, 5, 8))


def test_plan_keeps_floors_and_aligns_fused_widths_for_grouped_mm():
    model = MoEWrapper("mixtral")
    (experts, *_) = moe.find_experts(model)
    channels = moe.plan(experts, [128] * 4, 0.3, 0.9, None)
    assert len(channels) == 4 * (128 - 88)  # 89.6 -> 88: a multiple of 8 values (16 bytes in bfloat16)
    assert len(moe.plan(experts, [128] * 4, 0.99, 0.9, None)) == 4 * (128 - 16)  # floor 12.8 -> 13, aligned to 16


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_pruned_moe_saves_and_reloads_with_from_pretrained(tmp_path, kind):
    """The config describes the pruned experts, shared expert and heads: `save_pretrained` -> `from_pretrained`."""
    model = MoEWrapper(kind)
    surgeon = Surgeon(model, model.example_input_array)
    surgeon.cut(surgeon.plan(0.5, get_scorer("l2")))
    net = model.net.eval()
    net.save_pretrained(tmp_path / "pruned")
    reloaded = type(net).from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(model.example_input_array).logits, net(model.example_input_array).logits)


@pytest.mark.slow
def test_whole_experts_go_with_their_router_rows_and_reload(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model, cb = fit(tmp_path, "qwen3_moe", callbacks=[ckpt], moe_mode="experts")
    block = model.net.model.layers[0].mlp
    assert block.experts.gate_up_proj.shape == (2, 128, 64) and block.gate.weight.shape == (2, 64)
    assert block.experts.num_experts == block.gate.num_experts == model.net.config.num_experts == 2
    assert [layer for e in cb.history for layer, _ in e["cuts"] if "mlp" in layer][0].endswith("mlp.gate")
    assert all(math.isfinite(loss) for loss in model.losses)
    assert_adam_state_follows(model)
    loaded = load_pruned(MoEWrapper, ckpt.last_model_path)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
    x = model.example_input_array
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_both_removes_experts_and_width_and_keeps_top_k():
    model = MoEWrapper("mixtral")
    surgeon = Surgeon(model, model.example_input_array, moe_mode="both")
    surgeon.cut(surgeon.plan(0.5, get_scorer("l2")))
    experts = model.net.model.layers[1].mlp.experts
    assert experts.gate_up_proj.shape == (3, 2 * 88, 64)  # sqrt(0.5) of 4 experts and of 128 channels each
    assert model.net.config.num_local_experts == 3 and model.net.config.intermediate_size == 88
    surgeon.cut(surgeon.plan(0.99, get_scorer("l2")))
    assert experts.num_experts == 2  # never fewer than the experts each token is routed to


def test_a_list_of_experts_cannot_lose_whole_experts_and_says_so():
    model = MoEWrapper("switch")
    with pytest.warns(UserWarning, match="whole experts cannot be removed"):
        surgeon = Surgeon(model, model.example_input_array, moe_mode="experts")
    assert [g.name for g in surgeon.groups() if "experts" in g.name] == [
        "net.blocks.0.moe.experts", "net.blocks.1.moe.experts"
    ]
