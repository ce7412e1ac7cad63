"""Mamba: every mixer's inner width (SSM channels) is cut in all the tensors that hold it, the hidden size stays,
Adam moments follow, the config follows, checkpoints reload and resume."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

pytest.importorskip("transformers")

from lightning_halfprune import HalfPrune, load_pruned  # noqa: E402
from lightning_halfprune.core import mamba  # noqa: E402
from lightning_halfprune.core.errors import SurgeryError  # noqa: E402
from lightning_halfprune.core.measure import count_params  # noqa: E402
from lightning_halfprune.core.plan import Cut  # noqa: E402
from lightning_halfprune.core.scoring import get_scorer  # noqa: E402
from lightning_halfprune.core.surgeon import Surgeon  # noqa: E402
from transformer_models import Wrapper, assert_adam_state_follows, loader, short_trainer  # noqa: E402

HIDDEN, INNER, STATE = 32, 64, 8


def fit(tmp_path, epochs=3, callbacks=(), ckpt_path=None, kind="mamba"):
    model = Wrapper(kind, optimizer="adamw")
    cb = HalfPrune(schedule={0: 0.3, 1: 0.5}, latency_batch_size=0, verbose=False)
    trainer = short_trainer(tmp_path, epochs, cb, callbacks)
    trainer.fit(model, loader(kind), loader(kind), ckpt_path=ckpt_path)
    return model, cb


def assert_mixer_width(mixer, inner):
    """Every tensor holding the inner channels has ``inner`` of them; the hidden size and the state stay."""
    assert mixer.in_proj.weight.shape == (2 * inner, HIDDEN) and mixer.in_proj.out_features == 2 * inner
    assert mixer.conv1d.weight.shape == (inner, 1, 4) and mixer.conv1d.bias.shape == (inner,)
    assert mixer.conv1d.in_channels == mixer.conv1d.out_channels == mixer.conv1d.groups == inner
    assert mixer.x_proj.weight.shape[1] == inner == mixer.x_proj.in_features
    assert mixer.dt_proj.weight.shape[0] == inner == mixer.dt_proj.out_features and mixer.dt_proj.bias.shape == (inner,)
    assert mixer.A_log.shape == (inner, STATE) and mixer.D.shape == (inner,)
    assert mixer.out_proj.weight.shape == (HIDDEN, inner) and mixer.out_proj.in_features == inner
    assert mixer.intermediate_size == inner


@pytest.mark.slow
def test_fit_halves_every_mixer_and_resumes_and_reloads(tmp_path):
    original = count_params(Wrapper("mamba"))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    model, cb = fit(tmp_path, callbacks=[ckpt])
    assert len(cb.history) == 2
    for mixer in mixers_of(model.net):
        assert_mixer_width(mixer, INNER // 2)
    assert model.net.backbone.embeddings.embedding_dim == HIDDEN and model.net.config.hidden_size == HIDDEN
    assert model.net.config.intermediate_size == INNER // 2
    assert count_params(model) <= 0.7 * original
    assert len(model.losses) == 9 and all(math.isfinite(loss) for loss in model.losses)  # every step after a cut
    assert_adam_state_follows(model)

    first = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]
    resumed, cb2 = fit(tmp_path / "resume", ckpt_path=str(first))
    assert [e["cuts"] for e in cb2.history] == [e["cuts"] for e in cb.history]
    assert resumed.losses == pytest.approx(model.losses[len(model.losses) - len(resumed.losses):], rel=1e-4)
    assert_adam_state_follows(resumed)

    last = sorted((tmp_path / "ckpt").glob("epoch=2*.ckpt"))[0]
    loaded = load_pruned(Wrapper, last)
    for mixer in mixers_of(loaded.net):
        assert_mixer_width(mixer, INNER // 2)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
    x = model.example_input_array
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x))


def test_cut_mixer_computes_what_the_uncut_one_does_without_the_removed_channels():
    """Zeroing the removed channels' reads (x_proj columns) and writes (out_proj columns) in the uncut mixer gives
    the cut mixer's output: every tensor was sliced at the same channels."""
    net = Wrapper("mamba").net.eval()
    x = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    surgeon = Surgeon(net, (x,))
    assert [g.name for g in surgeon.groups()] == ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]
    drop = [0, 3, 4, 10, 31, 32, 50, 63]
    mixer = net.backbone.layers[0].mixer
    with torch.no_grad():
        for p in mixer.parameters():  # away from the init (D of ones, A_log the same in every row)
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    h = torch.randn(2, 8, HIDDEN, generator=torch.Generator().manual_seed(4))
    before = {n: p.detach().clone() for n, p in mixer.named_parameters()}
    with torch.no_grad():
        mixer.x_proj.weight[:, drop] = 0
        mixer.out_proj.weight[:, drop] = 0
        expected = mixer(h)
    moment = torch.randn(INNER, STATE)
    old_a_log = mixer.A_log
    mamba._WARNED.clear()  # told once per config (by id): a config of an earlier test may have had this id
    with pytest.warns(UserWarning, match="different inner widths"):
        remap = surgeon.cut([Cut("backbone.layers.0.mixer", drop)])
    assert_mixer_width(mixer, INNER - len(drop))
    with torch.no_grad():
        torch.testing.assert_close(mixer(h), expected)
    keep = [c for c in range(INNER) if c not in drop]
    torch.testing.assert_close(mixer.in_proj.weight, before["in_proj.weight"][keep + [INNER + c for c in keep]])
    torch.testing.assert_close(mixer.A_log, before["A_log"][keep])
    torch.testing.assert_close(remap.slice_like(old_a_log, moment), moment[keep])  # Adam moments follow
    assert net.config.intermediate_size == INNER  # the other mixer keeps its width: the config cannot say one
    assert net(x).logits.shape == (2, 8, 64)


def test_plan_halves_each_mixer_and_keeps_the_hidden_size():
    net = Wrapper("mamba").net.eval()
    x = torch.randint(1, 64, (2, 8))
    surgeon = Surgeon(net, (x,))
    cuts = surgeon.plan(0.5, get_scorer("l2"))
    assert [(c.layer, len(c.channels)) for c in cuts] == [(f"backbone.layers.{i}.mixer", INNER // 2) for i in (0, 1)]
    weakest = torch.argsort(mamba.magnitudes(net.backbone.layers[0].mixer), stable=True)[: INNER // 2]
    assert cuts[0].channels == sorted(weakest.tolist())
    surgeon.cut(cuts)
    for mixer in mixers_of(net):
        assert_mixer_width(mixer, INNER // 2)
    assert net.config.intermediate_size == INNER // 2 and net.backbone.embeddings.embedding_dim == HIDDEN


def test_a_cut_that_would_empty_a_mixer_is_refused_and_undone():
    net = Wrapper("mamba").net.eval()
    surgeon = Surgeon(net, (torch.randint(1, 64, (2, 8)),))
    with pytest.raises(SurgeryError, match="Mamba mixer"):
        surgeon.cut([Cut("backbone.layers.1.mixer", list(range(INNER)))])
    for mixer in mixers_of(net):
        assert_mixer_width(mixer, INNER)


def mixers_of(net):
    return [layer.mixer for layer in net.backbone.layers]


def test_falcon_mamba_mixers_are_cut_alike():
    """Falcon-Mamba's mixer has Mamba's shape (its B/C/dt norms hold no parameters): found and cut the same way."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.FalconMambaConfig(hidden_size=HIDDEN, intermediate_size=INNER, state_size=STATE, num_hidden_layers=2,
                                  vocab_size=64, use_cache=False)
    net = tf.FalconMambaForCausalLM(config).eval()
    x = torch.randint(0, 64, (2, 8))
    surgeon = Surgeon(net, (x,))
    assert [g.name for g in surgeon.groups()] == ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]
    surgeon.cut(surgeon.plan(0.5, get_scorer("l2")))
    for mixer in mixers_of(net):
        assert_mixer_width(mixer, INNER // 2)
    assert net.config.intermediate_size == INNER // 2 and net(x).logits.shape == (2, 8, 64)


# ------------------------------------------------------------------ Mamba-2: whole heads
HEADS2, HEAD_DIM2, GROUPS2 = 8, 8, 2


def assert_mixer2_heads(mixer, heads):
    """Every tensor holding heads or their channels has ``heads`` of them; B, C, the state and hidden size stay."""
    inner, bc = heads * HEAD_DIM2, 2 * GROUPS2 * STATE
    assert mixer.num_heads == heads and mixer.intermediate_size == inner and mixer.conv_dim == inner + bc
    assert mixer.in_proj.weight.shape == (2 * inner + bc + heads, HIDDEN)
    assert mixer.conv1d.weight.shape == (inner + bc, 1, 4) and mixer.conv1d.groups == inner + bc
    assert mixer.A_log.shape == mixer.D.shape == mixer.dt_bias.shape == (heads,)
    assert mixer.norm.weight.shape == (inner,) and mixer.norm.group_size == inner // GROUPS2
    assert mixer.out_proj.weight.shape == (HIDDEN, inner)


def test_mamba2_heads_are_cut_in_every_tensor_that_holds_them():
    net = Wrapper("mamba2").net.eval()
    x = torch.randint(1, 64, (2, 8))
    surgeon = Surgeon(net, (x,))
    assert [g.name for g in surgeon.groups()] == ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]
    mixer = net.backbone.layers[0].mixer
    before = {n: p.detach().clone() for n, p in mixer.named_parameters()}
    old_a_log, moment = mixer.A_log, torch.randn(HEADS2)
    remap = surgeon.cut([Cut("backbone.layers.0.mixer", [1, 6])])  # one head of each group of 4
    assert_mixer2_heads(mixer, 6)
    kept = [0, 2, 3, 4, 5, 7]
    channels = [h * HEAD_DIM2 + j for h in kept for j in range(HEAD_DIM2)]
    inner, bc = HEADS2 * HEAD_DIM2, 2 * GROUPS2 * STATE
    rows = channels + [inner + c for c in channels] + list(range(2 * inner, 2 * inner + bc)) + [
        2 * inner + bc + h for h in kept]
    torch.testing.assert_close(mixer.in_proj.weight, before["in_proj.weight"][rows])
    torch.testing.assert_close(mixer.out_proj.weight, before["out_proj.weight"][:, channels])
    torch.testing.assert_close(mixer.dt_bias, before["dt_bias"][kept])
    torch.testing.assert_close(remap.slice_like(old_a_log, moment), moment[kept])  # Adam moments follow
    assert net(x).logits.shape == (2, 8, 64)
    net.train()
    net(x).logits.sum().backward()  # the training forward runs on the cut mixer


def test_mamba2_heads_go_the_same_number_per_group():
    net = Wrapper("mamba2").net.eval()
    surgeon = Surgeon(net, (torch.randint(1, 64, (2, 8)),))
    with pytest.raises(SurgeryError, match="the same number per group"):
        surgeon.cut([Cut("backbone.layers.0.mixer", [0, 1])])  # both from the first group
    assert_mixer2_heads(net.backbone.layers[0].mixer, HEADS2)
    cuts = surgeon.plan(0.5, get_scorer("l2"))
    assert [(c.layer, len(c.channels)) for c in cuts] == [(f"backbone.layers.{i}.mixer", 4) for i in (0, 1)]
    assert all(sum(1 for h in c.channels if h < 4) == 2 for c in cuts)


@pytest.mark.slow
def test_mamba2_fit_halves_every_mixer_and_resumes_and_reloads(tmp_path):
    original = count_params(Wrapper("mamba2"))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    model, cb = fit(tmp_path, callbacks=[ckpt], kind="mamba2")
    for mixer in mixers_of(model.net):
        assert_mixer2_heads(mixer, HEADS2 // 2)
    config = model.net.config
    assert (config.num_heads, config.expand, config.hidden_size) == (HEADS2 // 2, 1, HIDDEN)  # the config follows
    assert model.net.backbone.embeddings.embedding_dim == HIDDEN
    assert count_params(model) <= 0.7 * original
    assert all(math.isfinite(loss) for loss in model.losses)
    assert_adam_state_follows(model)
    first = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]
    resumed, _ = fit(tmp_path / "resume", ckpt_path=str(first), kind="mamba2")
    assert resumed.losses == pytest.approx(model.losses[len(model.losses) - len(resumed.losses):], rel=1e-4)
    loaded = load_pruned(Wrapper, sorted((tmp_path / "ckpt").glob("epoch=2*.ckpt"))[0])
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())


def test_a_hybrid_of_mamba2_and_attention_loses_heads_in_both_and_its_config_follows():
    """Bamba (IBM's Mamba-2 + attention hybrid, like Granite-4 and NemotronH): mixers and attention both lose heads."""
    import transformers as tf

    from lightning_halfprune.core import attention as attn

    config = tf.BambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=64, mamba_n_heads=8, mamba_d_head=8,
                            mamba_n_groups=1, mamba_d_state=8, mamba_expand=2, mamba_chunk_size=8,
                            attn_layer_indices=[1], use_cache=False)
    torch.manual_seed(0)
    net = tf.BambaForCausalLM(config).eval()
    x = torch.randint(0, 64, (2, 8))
    surgeon = Surgeon(net, (x,))
    surgeon.cut(surgeon.plan(0.5, get_scorer("l2")))
    assert net.model.layers[0].mamba.num_heads == 4 and net.model.layers[0].mamba.out_proj.in_features == 32
    assert [s.num_heads for s in attn.find_attention(net)] == [2]
    assert (net.config.mamba_n_heads, net.config.mamba_expand, net.config.num_attention_heads) == (4, 1, 2)
    assert net.config.hidden_size == 32 and net(x).logits.shape == (2, 8, 64)
