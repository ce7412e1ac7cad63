"""Transformers: heads cut whole (or head dims uniformly), attributes synced, tied weights one tensor, resume."""

from __future__ import annotations

import math
import time

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

pytest.importorskip("transformers")

from lightning_halfprune import HalfPrune, load_pruned  # noqa: E402
from lightning_halfprune.core import attention as attn  # noqa: E402
from lightning_halfprune.core import head_check  # noqa: E402
from lightning_halfprune.core.errors import SurgeryError  # noqa: E402
from lightning_halfprune.core.measure import MacCounter, count_params  # noqa: E402
from lightning_halfprune.core.plan import Cut  # noqa: E402
from lightning_halfprune.core.surgeon import Surgeon  # noqa: E402
from transformer_models import Wrapper, loader, short_trainer  # noqa: E402


def fit(tmp_path, kind, epochs=3, callbacks=(), ckpt_path=None, model=None, **halfprune):
    model = model or Wrapper(kind, optimizer=halfprune.pop("optimizer", "sgd"))
    cb = HalfPrune(schedule={0: 0.3, 1: 0.5}, latency_batch_size=0, verbose=False, **halfprune)
    trainer = short_trainer(tmp_path, epochs, cb, callbacks)
    trainer.fit(model, loader(kind), loader(kind), ckpt_path=ckpt_path)
    return model, cb


def attention_cuts(model, cb):
    """(spec before any cut, removed root channels) per attention cut in the history."""
    fresh = {s.root_name: s for s in attn.find_attention(Wrapper(model.hparams.kind))}
    return [(fresh[layer], channels) for event in cb.history for layer, channels in event["cuts"] if layer in fresh]


def assert_heads_whole_or_uniform(model, cb):
    first = len([c for c in cb.history[0]["cuts"] if c[0] in {s.root_name for s in attn.find_attention(model)}])
    for spec, channels in attention_cuts(model, cb)[:first]:  # the first event's cuts are against the original shape
        q = [c for c in channels if c < spec.q_width]
        heads, dims = attn._decode(spec, q)  # raises if heads are mixed
        assert heads or dims


def assert_attributes_synced(model):
    for spec in attn.find_attention(model):
        assert spec.num_heads * spec.head_dim == spec.q_width
        root = attn.out_width(spec.root)
        kv_width = spec.num_kv_heads * spec.head_dim
        assert root == (spec.q_width + 2 * kv_width if spec.qkv is not None else spec.q_width)
        m = spec.module
        for name in ("num_heads", "num_attention_heads", "n_head"):
            if hasattr(m, name):
                assert getattr(m, name) == spec.num_heads
        for name in ("head_dim", "attention_head_size"):
            if hasattr(m, name):
                assert getattr(m, name) == spec.head_dim
        if hasattr(m, "all_head_size"):
            assert m.all_head_size == spec.q_width
        if hasattr(m, "split_size"):
            assert m.split_size == spec.q_width
        if hasattr(m, "num_key_value_groups"):
            assert m.num_key_value_groups == spec.num_heads // spec.num_kv_heads


def tied(model):
    net = model.net
    if hasattr(net, "transformer"):
        return net.lm_head.weight is net.transformer.wte.weight
    if hasattr(net, "model") and net.config.tie_word_embeddings:
        return net.lm_head.weight is net.model.embed_tokens.weight
    return net.lm_head.weight is net.embed.weight


@pytest.mark.parametrize("kind", ["bert", "vit", "gpt2", "llama", "qwen2", "phi3", "vit_block"])
def test_fit_prunes_whole_heads(tmp_path, kind):
    before = count_params(Wrapper(kind))
    model, cb = fit(tmp_path, kind)
    assert count_params(model) <= 0.7 * before, (count_params(model), before)
    assert attention_cuts(model, cb), "no attention module was cut"
    assert_heads_whole_or_uniform(model, cb)
    assert_attributes_synced(model)
    losses_after = model.losses[-3:]
    assert all(math.isfinite(v) for v in losses_after)
    with torch.no_grad():
        out = model.eval()(model.example_input_array)
    assert out.shape[0] == 2 and out.shape[-1] == Wrapper(kind).eval()(model.example_input_array).shape[-1]
    if kind in ("gpt2", "llama"):
        assert tied(model)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "phi3"])
def test_hf_config_follows_the_cuts(tmp_path, kind):
    """Head counts and the MLP width in the HF config are the pruned ones (GPT-2: `n_inner`, None meant 4x)."""
    def mlp(net):
        return {
            "bert": lambda: net.bert.encoder.layer[0].intermediate.dense.out_features,
            "gpt2": lambda: net.transformer.h[0].mlp.c_fc.nf,
            "llama": lambda: net.model.layers[0].mlp.up_proj.out_features,
            "phi3": lambda: net.model.layers[0].mlp.gate_up_proj.out_features // 2,  # gate | up in one layer
        }[kind]()

    model, _ = fit(tmp_path, kind, epochs=2)
    net, config = model.net, model.net.config
    assert mlp(net) < mlp(Wrapper(kind).net)
    assert (config.n_inner if kind == "gpt2" else config.intermediate_size) == mlp(net)
    assert config.num_attention_heads == attn.find_attention(net)[0].num_heads < 4


def test_pruned_llama_saves_and_reloads_with_from_pretrained(tmp_path):
    """Llama's config can describe the pruned shapes (it has `head_dim`): `save_pretrained` -> `from_pretrained`.

    BERT and GPT-2 derive the head size from `hidden_size / num_heads`, so fewer heads cannot be written in their
    configs; they are reloaded with `load_pruned` (README, Transformers).
    """
    model, _ = fit(tmp_path, "llama", epochs=2)
    net = model.net.eval()
    net.save_pretrained(tmp_path / "pruned")
    reloaded = type(net).from_pretrained(tmp_path / "pruned").eval()
    ids = model.example_input_array
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, net(ids).logits)


def test_head_dim_mode_cuts_same_offsets_in_every_head(tmp_path):
    model, cb = fit(tmp_path, "vit_block", epochs=2, attention="head_dim")
    for spec, channels in attention_cuts(model, cb)[:2]:
        heads, dims = attn._decode(spec, [c for c in channels if c < spec.q_width])
        assert not heads and dims
    assert_attributes_synced(model)
    assert [s.num_heads for s in attn.find_attention(model)] == [4, 4]


def test_rotary_attention_falls_back_to_heads_and_gqa_groups_stay_whole(tmp_path):
    model, cb = fit(tmp_path, "llama", epochs=2, attention="both")
    for spec, channels in attention_cuts(model, cb):
        heads, dims = attn._decode(spec, channels)
        assert heads and not dims and len(heads) % spec.group_size == 0
    for spec in attn.find_attention(model):
        assert (spec.num_heads, spec.num_kv_heads) == (2, 1)
        assert spec.module.config.num_attention_heads == 2 and spec.module.config.num_key_value_heads == 1


@pytest.mark.parametrize("scorer", ["l1", "taylor"])
def test_scorers_score_heads(tmp_path, scorer):
    model, cb = fit(tmp_path, "bert", epochs=1, scorer=scorer)
    assert_heads_whole_or_uniform(model, cb)
    assert [s.num_heads for s in attn.find_attention(model)] == [3, 3]


def test_prune_hidden_size_keeps_tied_embedding_one_tensor(tmp_path):
    model, cb = fit(tmp_path, "gpt2", epochs=2, prune_hidden_size=True, optimizer="adamw")
    assert model.net.transformer.wte.weight.shape[1] < 64
    assert tied(model)
    optimizer = model.trainer.optimizers[0]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert sum(p is model.net.lm_head.weight for p in params) == 1
    assert optimizer.state[model.net.lm_head.weight]["exp_avg"].shape == model.net.lm_head.weight.shape


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_tied_weights_cut_as_one_with_optimizer_state(tmp_path, optimizer):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model, cb = fit(tmp_path, "tied", epochs=2, callbacks=[ckpt], optimizer=optimizer)
    assert model.net.embed.weight.shape == (64, 16)
    assert tied(model)
    opt = model.trainer.optimizers[0]
    params = [p for g in opt.param_groups for p in g["params"]]
    assert sum(p is model.net.embed.weight for p in params) == 1
    state = opt.state[model.net.embed.weight]
    assert all(v.shape == (64, 16) for v in state.values() if torch.is_tensor(v) and v.dim() == 2)
    loaded = load_pruned(Wrapper, ckpt.last_model_path)
    assert tied(loaded)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())


def test_resume_after_first_cut_and_load_pruned(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    model, cb = fit(tmp_path, "gpt2", epochs=3, callbacks=[ckpt])
    first = sorted((tmp_path / "ckpt").glob("epoch=0*.ckpt"))[0]
    resumed, cb2 = fit(tmp_path / "resume", "gpt2", epochs=3, ckpt_path=str(first), callbacks=[])
    assert [e["cuts"] for e in cb2.history] == [e["cuts"] for e in cb.history]
    assert resumed.losses == pytest.approx(model.losses[len(model.losses) - len(resumed.losses):], rel=1e-4)
    assert_attributes_synced(resumed)
    assert tied(resumed)
    last = sorted((tmp_path / "ckpt").glob("epoch=2*.ckpt"))[0]
    loaded = load_pruned(Wrapper, last)
    assert_attributes_synced(loaded)
    assert tied(loaded)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(model.example_input_array), model.eval()(model.example_input_array))


def test_mixer_token_mixing_left_alone_with_warning(tmp_path):
    with pytest.warns(UserWarning, match="mixes tokens"):
        model, cb = fit(tmp_path, "mixer", epochs=2)
    assert model.net.token_mlp[2].out_features == 16  # the token count never changes
    assert model.net.token_mlp[0].out_features < 32 and model.net.channel_mlp[0].out_features < 64
    assert model(model.example_input_array).shape == (2, 3)


def test_llama_graph_and_groups_ready_in_seconds():
    model = Wrapper("llama")
    start = time.perf_counter()
    surgeon = Surgeon(model, model.example_input_array)
    groups = surgeon.groups()
    assert time.perf_counter() - start < 10
    assert sum(g.attention is not None for g in groups) == 2


def test_a_cut_that_mixes_heads_is_refused_and_undone():
    model = Wrapper("bert")
    surgeon = Surgeon(model, model.example_input_array)
    layer = "net.bert.encoder.layer.0.attention.self.query"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SurgeryError, match="mix attention heads"):
        surgeon.cut([Cut(layer, [0, 1, 17])])
    assert_attributes_synced(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="`attention` must be one of"):
        HalfPrune(schedule={0: 0.5}, attention="rows")


def test_a_failed_cut_undoes_attention_attributes_and_config():
    model = Wrapper("llama")
    surgeon = Surgeon(model, model.example_input_array)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heads = Cut("net.model.layers.0.self_attn.q_proj", list(range(32)))  # the first KV group: query heads 0 and 1
    with pytest.raises(SurgeryError):
        surgeon.cut([heads, Cut("net.model.layers.0.mlp.up_proj", [999])])
    attention = model.net.model.layers[0].self_attn
    assert model.net.config.num_attention_heads == 4 and model.net.config.num_key_value_heads == 2
    assert not hasattr(attention, "num_heads") and attention.num_key_value_groups == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    surgeon.cut([heads])
    assert attention.num_heads == 2 and attention.num_key_value_heads == 1 and model.net.config.num_attention_heads == 4
    assert model(model.example_input_array).shape == (2, 8, 64)


def test_gpt2_called_with_its_kv_cache_on_traces_and_cuts():
    # users call `model(input_ids=x)`; GPT-2 then builds a key/value cache whose torch.cat torch-pruning cannot follow
    import transformers as tf

    from lightning_halfprune.core.scoring import get_scorer

    torch.manual_seed(0)
    lm = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_head=4, n_layer=2, n_positions=32, vocab_size=64))

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = lm

        def forward(self, x):
            return self.net(input_ids=x).logits

    model, x = Plain(), torch.randint(0, 64, (2, 8))
    surgeon = Surgeon(model, x)
    before, macs_before = count_params(model), MacCounter()(model, x)
    assert macs_before > 8 * 64 * 64  # GPT-2's Conv1D layers are counted, not only the LM head
    surgeon.cut(surgeon.plan(0.5, get_scorer("l2")))
    assert lm.config.use_cache  # the user's setting is back
    assert count_params(model) < before and model(x).shape == (2, 8, 64)
    assert MacCounter()(model, x) < macs_before
    assert lm.lm_head.weight is lm.transformer.wte.weight


def test_kept_embeddings_that_cap_the_params_drop_are_announced(caplog):
    """A transformer whose embeddings hold most params: the user is told why params cannot fall by half."""
    import transformers as tf

    from lightning_halfprune.core.preflight import note_kept_embeddings

    net = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_head=4, n_layer=1, n_positions=32, vocab_size=2000))
    with caplog.at_level("INFO"):
        note_kept_embeddings(Surgeon(net, torch.ones(1, 8, dtype=torch.long)), 0.5)
    assert "keeps the embeddings (" in caplog.text and "`prune_hidden_size=True`" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        note_kept_embeddings(Surgeon(net, torch.ones(1, 8, dtype=torch.long), prune_hidden_size=True), 0.5)
    assert "keeps the embeddings" not in caplog.text


def test_fused_gate_up_and_fused_gqa_qkv_are_cut_in_pairs_at_every_event(tmp_path):
    """Phi-3: channel j of the gate goes with channel j of the up projection, at each event (the split offsets
    follow the cut), and its fused q|k|v with 2 key/value heads for 4 query heads loses whole key/value groups."""
    model, cb = fit(tmp_path, "phi3")
    assert cb.left_out == {} and len(cb.history) == 2
    original = Wrapper("phi3")
    first = [(layer, c) for layer, c in cb.history[0]["cuts"] if layer.endswith("mlp.gate_up_proj")]
    assert len(first) == 2  # one per layer
    for layer, channels in first:
        half = attn.out_width(_module(original, layer)) // 2
        gate = {c for c in channels if c < half}
        assert gate and {c - half for c in channels if c >= half} == gate
    assert all(m.weight.shape[0] == 128 for n, m in model.named_modules() if n.endswith("gate_up_proj"))  # 256 / 2
    for spec in attn.find_attention(model):
        assert (spec.num_heads, spec.num_kv_heads) == (2, 1)
    assert model.net.config.num_key_value_heads == 1 and model.net.config.hidden_size == 64


def _module(model, name):
    return dict(model.named_modules())[name]


def test_global_pruning_ranks_whole_heads_with_the_mlp_channels():
    """`global_pruning=True`: heads compete with MLP neurons for one budget, so the layers end up unequal, still in
    whole heads, and the model runs."""
    model = Wrapper("vit_block")
    spec = attn.find_attention(model)[0]
    with torch.no_grad():  # layer 0: 3 of 4 heads far below the layer's mean, where layer 1's heads are all alike
        d, qw = spec.head_dim, spec.q_width
        for part in range(3):  # q, k and v rows of heads 1-3
            spec.root.weight[part * qw + d : (part + 1) * qw].mul_(0.01)
    surgeon = Surgeon(model, model.example_input_array, global_pruning=True)
    before = {s.root_name: s.num_heads for s in attn.find_attention(model)}
    widths = {g.name: g.width for g in surgeon.groups()}
    from lightning_halfprune.core.scoring import get_scorer

    cuts = surgeon.plan(0.5, get_scorer("l2"))
    surgeon.cut(cuts)
    after = {s.root_name: s.num_heads for s in attn.find_attention(model)}
    first, second = list(before)
    assert after[first] < after[second] <= before[second]
    removed = sum(widths[g] for g in widths) - sum(g.width for g in surgeon.groups())
    assert removed > 0
    with torch.no_grad():
        assert model(model.example_input_array).shape[-1] == 3


def test_global_pruning_fit_of_llama_loads_back_with_load_pruned(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    model, cb = fit(tmp_path, "llama", epochs=2, callbacks=[ckpt], global_pruning=True)
    assert attention_cuts(model, cb) and cb.left_out == {}
    assert_heads_whole_or_uniform(model, cb)
    assert_attributes_synced(model)
    loaded = load_pruned(Wrapper, ckpt.last_model_path)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(model.example_input_array), model.eval()(model.example_input_array))


@pytest.mark.filterwarnings("ignore:Maximum recursive depth")  # torch-pruning's shape inference, 27k times
def test_swin_style_reshape_loop_is_bounded_and_named(tmp_path):
    # Unbounded, torch-pruning's group search on this net runs past 30 s growing its index lists (torchvision swin_t:
    # 24 GB in seconds); bounded, the roots behind the loop are named and everything else is pruned.
    start = time.perf_counter()
    with pytest.warns(UserWarning, match="does not terminate") as record:
        model, cb = fit(tmp_path, "swin")
    assert time.perf_counter() - start < 60
    named = next(str(w.message) for w in record if "does not terminate" in str(w.message))
    assert "merge" in named or "stage2" in named
    assert cb.history and count_params(model) < count_params(Wrapper("swin"))
    assert model(model.example_input_array).shape == (2, 3)
    assert math.isfinite(model.losses[-1])


def test_fit_cuts_codegen_heads_shard_by_shard_and_loads_back(tmp_path):
    """CodeGen's fused q|v|k is sharded in 4 blocks that must keep equal head counts: 8 heads (two per shard) lose
    whole shards, `embed_dim` (its query width) and `mp_num` follow, the hidden size stays."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    before = count_params(Wrapper("codegen"))
    model, cb = fit(tmp_path, "codegen", callbacks=[ckpt])
    assert count_params(model) <= 0.7 * before, (count_params(model), before)
    assert cb.left_out == {}
    fresh = {s.root_name: s for s in attn.find_attention(Wrapper("codegen"))}
    first = [(fresh[layer], c) for layer, c in cb.history[0]["cuts"] if layer in fresh]
    assert len(first) == 2
    for spec, channels in first:  # whole shards of two heads (raises if heads are mixed)
        heads = head_check.removed_heads(spec, channels)
        assert heads and all(h ^ 1 in heads for h in heads)
    assert_attributes_synced(model)
    for block in model.net.transformer.h:
        a = block.attn
        assert (a.num_attention_heads, a.head_dim, a.embed_dim, a.mp_num) == (4, 8, 32, 2)
        assert a.qkv_proj.weight.shape == (96, 64) and a.out_proj.weight.shape == (64, 32)
    assert (model.net.config.n_head, model.net.config.n_embd) == (4, 64)
    assert all(math.isfinite(v) for v in model.losses)
    loaded = load_pruned(Wrapper, ckpt.last_model_path)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(model.example_input_array), model.eval()(model.example_input_array))


def test_codegen_whose_heads_do_not_split_over_its_shards_is_left_uncut(tmp_path):
    """2 heads over CodeGen's 4 shards: a head spans two shards, so no head can go; the rest is pruned."""
    match = r"\(CodeGenAttention\) uncut: .* its 2 heads do not split evenly over its 4 shards"
    with pytest.warns(UserWarning, match=match):
        model, cb = fit(tmp_path, "codegen_2", epochs=2)
    assert cb.history and not attention_cuts(model, cb)
    for block in model.net.transformer.h:
        assert block.attn.qkv_proj.weight.shape == (192, 64) and block.attn.num_attention_heads == 2
        assert block.mlp.fc_in.out_features < 256
    assert all(math.isfinite(v) for v in model.losses)
