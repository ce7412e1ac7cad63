"""Multi-head latent attention (DeepSeek-V3): whole heads go from the query projection, `kv_b_proj` and `o_proj`,
exactly, the latent and the hidden size stay, the config follows, fits resume and reload."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

pytest.importorskip("transformers")

from lightning_halfprune import HalfPrune, load_pruned  # noqa: E402
from lightning_halfprune.core import mla  # noqa: E402
from lightning_halfprune.core.plan import Cut  # noqa: E402
from lightning_halfprune.core.scoring import get_scorer  # noqa: E402
from lightning_halfprune.core.surgeon import Surgeon  # noqa: E402
from transformer_models import Wrapper, assert_adam_state_follows, loader, short_trainer  # noqa: E402

HEADS, Q_DIM, KV_DIM, V_DIM = 4, 8, 12, 8  # per head: nope 4 + rope 4 query, nope 4 + value 8 from kv_b_proj


def assert_heads(attn, heads):
    assert attn.num_heads == heads
    q = attn.q_b_proj
    assert q.weight.shape[0] == q.out_features == heads * Q_DIM
    assert attn.kv_b_proj.weight.shape == (heads * KV_DIM, 16) and attn.kv_b_proj.out_features == heads * KV_DIM
    assert attn.o_proj.weight.shape == (32, heads * V_DIM) and attn.o_proj.in_features == heads * V_DIM
    assert attn.kv_a_proj_with_mqa.out_features == 16 + 4  # the latent and the shared rotary key stay


def test_cut_mla_heads_compute_what_the_uncut_model_does_without_them():
    net = Wrapper("deepseek_v3").net.eval()
    x = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    surgeon = Surgeon(net, (x,))
    attn = net.model.layers[0].self_attn
    assert [g.name for g in surgeon.groups() if g.name.endswith("self_attn")] == [
        "model.layers.0.self_attn", "model.layers.1.self_attn"]
    with torch.no_grad():
        attn.o_proj.weight[:, 1 * V_DIM : 2 * V_DIM] = 0  # head 1 writes nothing: the model without it
        attn.o_proj.weight[:, 3 * V_DIM : 4 * V_DIM] = 0
        expected = net(x).logits
    surgeon.cut([Cut("model.layers.0.self_attn", [1, 3])])
    assert_heads(attn, 2)
    with torch.no_grad():
        torch.testing.assert_close(net(x).logits, expected, rtol=1e-5, atol=1e-5)
    assert net.config.num_attention_heads == HEADS  # the other layer keeps 4: the config cannot say one count


def test_plan_halves_every_mla_module_by_weight_magnitude():
    net = Wrapper("deepseek_v3").net.eval()
    surgeon = Surgeon(net, (torch.randint(1, 64, (2, 8)),))
    cuts = [c for c in surgeon.plan(0.5, get_scorer("l2")) if c.layer.endswith("self_attn")]
    weakest = torch.argsort(mla.magnitudes(net.model.layers[0].self_attn), stable=True)[:2]
    assert cuts[0].channels == sorted(weakest.tolist()) and len(cuts) == 2


@pytest.mark.slow
def test_fit_halves_mla_heads_resumes_and_reloads(tmp_path):
    def fit(path, ckpt_path=None, callbacks=()):
        model = Wrapper("deepseek_v3", optimizer="adamw")
        cb = HalfPrune(schedule={0: 0.3, 1: 0.5}, latency_batch_size=0, verbose=False)
        short_trainer(path, 3, cb, callbacks).fit(model, loader("deepseek_v3"), loader("deepseek_v3"),
                                                  ckpt_path=ckpt_path)
        return model

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    model = fit(tmp_path, callbacks=[ckpt])
    for layer in model.net.model.layers:
        assert_heads(layer.self_attn, HEADS // 2)
    assert (model.net.config.num_attention_heads, model.net.config.hidden_size) == (HEADS // 2, 32)
    assert all(math.isfinite(loss) for loss in model.losses)
    assert_adam_state_follows(model)
    resumed = fit(tmp_path / "resume", ckpt_path=str(sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]))
    assert resumed.losses == pytest.approx(model.losses[len(model.losses) - len(resumed.losses):], rel=1e-4)
    loaded = load_pruned(Wrapper, sorted((tmp_path / "ckpt").glob("epoch=2*.ckpt"))[0])
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
