"""Fused q/k/v layouts and per-head parameters: heads really removed, exactly, configs follow, hidden size kept."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

pytest.importorskip("transformers")

from attention_modules import (  # noqa: E402
    BeitNet,
    ConvAttention,
    HeadDimFromInput,
    HeadFirstAttention,
    HieraAttention,
)
from layout_models import HEADS, KINDS, LayoutModule, example, loader  # noqa: E402
from lightning_halfprune import HalfPrune, load_pruned  # noqa: E402
from lightning_halfprune.core import attention as attn  # noqa: E402
from lightning_halfprune.core import attention_layouts as layouts  # noqa: E402
from lightning_halfprune.core import head_check  # noqa: E402
from lightning_halfprune.core.errors import SurgeryError  # noqa: E402
from lightning_halfprune.core.plan import Cut  # noqa: E402
from lightning_halfprune.core.scoring import get_scorer  # noqa: E402
from lightning_halfprune.core.surgeon import Surgeon  # noqa: E402

HIDDEN_FIELDS = ("hidden_size", "d_model", "n_embd")


# ------------------------------------------------------------------ the layouts themselves
@pytest.mark.parametrize(("heads", "kv"), [(4, 4), (4, 2), (6, 3), (4, 1)])
def test_grouped_rows_match_falcons_own_split(heads, kv):
    """Falcon's new decoder architecture splits [kv][group + 2][head_dim]: q rows first, then k, then v."""
    d, g = 3, heads // kv
    fused = torch.arange((heads + 2 * kv) * d).view(kv, g + 2, d)
    q, k, v = fused[:, :-2].reshape(-1), fused[:, -2].reshape(-1), fused[:, -1].reshape(-1)
    assert layouts.rows(layouts.GROUPED, heads, kv, d) == torch.cat([q, k, v]).tolist()


def test_interleaved_rows_match_neox_and_bloom_split():
    """GPT-NeoX/Bloom: view(heads, 3, head_dim) -> q, k, v: the grouped layout with one query head per group."""
    heads, d = 4, 2
    fused = torch.arange(3 * heads * d).view(heads, 3, d)
    expected = torch.cat([fused[:, i].reshape(-1) for i in range(3)]).tolist()
    assert layouts.rows(layouts.GROUPED, heads, heads, d) == expected
    assert layouts.rows(layouts.BLOCKED, heads, heads, d) == list(range(3 * heads * d))


@pytest.mark.parametrize(("heads", "shards"), [(4, 4), (8, 4), (16, 4), (6, 3), (4, 1)])
def test_sharded_rows_match_codegens_own_split(heads, shards):
    """CodeGen: view(shards, 3 * local) -> split(local) gives query, *value*, key; then reshape(heads, head_dim)."""
    d = 2
    local = heads * d // shards
    query, value, key = torch.arange(3 * heads * d).view(shards, 3 * local).split(local, dim=-1)
    expected = torch.cat([t.reshape(-1) for t in (query, key, value)]).tolist()
    assert layouts.rows(layouts.SHARDED, heads, heads, d, shards) == expected


def _codegen(heads: int):
    import transformers as tf

    torch.manual_seed(0)
    return tf.CodeGenForCausalLM(tf.CodeGenConfig(
        n_embd=64, n_head=heads, n_layer=1, n_positions=32, n_ctx=32, rotary_dim=4, vocab_size=64, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()


@pytest.mark.parametrize(("heads", "removed", "kept_shards"), [
    (8, [2, 3, 6, 7], 2),  # whole shards 1 and 3 (two heads per shard, four shards)
    (16, [1, 5, 9, 13], 4),  # position 1 of every shard (four heads per shard)
    (16, [0, 3, 4, 7, 8, 11, 12, 15], 4),  # positions 0 and 3 of every shard
    (4, [0, 1, 2], 1),  # three whole shards of one head
])
def test_codegen_heads_cut_by_shard_compute_exactly_without_them(heads, removed, kept_shards):
    """Named heads cut from a real CodeGen's sharded `qkv_proj`: the same output as zeroing their out_proj columns."""
    net, x = _codegen(heads), torch.randint(1, 64, (2, 8))
    spec = attn.find_attention(net)[0]
    assert (spec.layout, spec.shards, spec.uncut, spec.units) == (layouts.SHARDED, 4, None, 4)
    cut = Cut(spec.root_name, layouts.to_physical(spec, [c for h in removed for c in _head_rows(spec, h)]))
    reference = head_check.without_heads(net, [cut])
    Surgeon(net, {"input_ids": x, "use_cache": False}).cut([cut])
    a = net.transformer.h[0].attn
    kept = heads - len(removed)
    assert (a.num_attention_heads, a.mp_num, a.embed_dim, a.head_dim) == (kept, kept_shards, kept * 64 // heads,
                                                                         64 // heads)
    assert a.qkv_proj.weight.shape == (3 * a.embed_dim, 64) and a.out_proj.weight.shape == (64, a.embed_dim)
    assert net.config.n_head == kept and net.config.n_embd == 64
    with torch.no_grad():
        torch.testing.assert_close(net(x).logits, reference(x).logits, rtol=1e-5, atol=1e-5)


def test_codegen_cut_that_unbalances_its_shards_is_refused():
    net = _codegen(8)
    spec = attn.find_attention(net)[0]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cut = Cut(spec.root_name, layouts.to_physical(spec, _head_rows(spec, 2)))  # one head of shard 1 only
    with pytest.raises(SurgeryError, match="unequal head counts"):
        Surgeon(net, {"input_ids": torch.ones(1, 8, dtype=torch.long), "use_cache": False}).cut([cut])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net.transformer.h[0].attn.mp_num == 4 and net.transformer.h[0].attn.embed_dim == 64


# ------------------------------------------------------------------ every family, through the Surgeon
def test_output_columns_are_scored_with_their_own_heads_query_rows():
    """GPT-NeoX interleaves q|k|v per head: column c of the output projection adds to query channel c's row, not
    to row c (a row of another head's key or value)."""
    model = LayoutModule("neox").eval()
    surgeon = Surgeon(model, (example("neox"),))
    group = next(g for g in surgeon.groups() if g.attention is not None)
    spec, o_roots = group.attention, group.group[len(group.group) - 1].root_idxs
    assert [layouts.from_physical(spec, [r]) for r in o_roots] == [[c] for c in range(spec.q_width)]


def _attention_cuts(surgeon: Surgeon, ratio: float = 0.5) -> list[Cut]:
    roots = {s.root_name for s in attn.find_attention(surgeon.model)}
    return [c for c in surgeon.plan(ratio, get_scorer("l2")) if c.layer in roots]


def _hidden(net: nn.Module) -> tuple:
    embeddings = net.get_input_embeddings().weight.shape[1]
    return embeddings, tuple(getattr(net.config, n, None) for n in HIDDEN_FIELDS)


@pytest.mark.parametrize("kind", KINDS)
def test_heads_removed_exactly_and_configs_follow(kind):
    model = LayoutModule(kind).eval()
    x = example(kind)
    specs = attn.find_attention(model)
    assert specs and all(s.uncut is None for s in specs)
    before_heads = {s.name: (s.num_heads, s.num_kv_heads, s.head_dim) for s in specs}
    hidden, out_shape = _hidden(model.net), model(x).shape
    surgeon = Surgeon(model, (x,))
    cuts = _attention_cuts(surgeon)
    assert len(cuts) == len(specs)
    reference = head_check.without_heads(model, cuts)
    surgeon.cut(cuts)
    after = {s.name: (s.num_heads, s.num_kv_heads, s.head_dim) for s in attn.find_attention(model)}
    for name, (h, _kv, d) in before_heads.items():
        assert after[name][0] == h // 2 and after[name][2] == d
    assert head_check.config_mismatches(model) == []
    assert _hidden(model.net) == hidden  # the residual stream is untouched with the default
    with torch.no_grad():
        out = model(x)
    assert out.shape == out_shape
    with torch.no_grad():  # exactly the computation without the removed heads (layout, ALiBi slopes, T5's bias)
        torch.testing.assert_close(out, reference.eval()(x), rtol=1e-5, atol=1e-5)
    model.train()
    model(x).float().sum().backward()  # train mode runs and back-propagates


def test_whisper_config_heads_follow_per_stack():
    model = LayoutModule("whisper").eval()
    surgeon = Surgeon(model, (example("whisper"),))
    encoder = [c for c in _attention_cuts(surgeon) if ".encoder." in c.layer]
    surgeon.cut(encoder)  # the encoder only: the two stacks now differ
    config = model.net.config
    assert (config.encoder_attention_heads, config.decoder_attention_heads) == (2, 4)
    assert head_check.config_mismatches(model) == []


def test_bloom_keeps_each_kept_heads_alibi_slope():
    """Bloom builds ALiBi slopes from its head count: a cut layer must get the slopes of the heads it kept."""
    model = LayoutModule("bloom").eval()
    x = example("bloom")
    surgeon = Surgeon(model, (x,))
    layer = "net.transformer.h.0.self_attention.query_key_value"
    spec = next(s for s in attn.find_attention(model) if s.root_name == layer)
    cut = Cut(layer, layouts.to_physical(spec, [c for h in (0, 2) for c in _head_rows(spec, h)]))  # heads 0 and 2
    reference = head_check.without_heads(model, [cut])
    surgeon.cut([cut])
    assert model.net.transformer.h[0].self_attention._halfprune_kept_heads == [1, 3]
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference.eval()(x), rtol=1e-5, atol=1e-5)


def _head_rows(spec, head):
    """Blocked (logical) channels of one head: its q, k and v rows (no GQA)."""
    d, qw = spec.head_dim, spec.q_width
    q = [head * d + j for j in range(d)]
    return q + [qw + c for c in q] + [2 * qw + c for c in q]


# ------------------------------------------------------------------ per-head parameters of a module of our own
def test_per_head_tables_biases_and_gates_travel_with_their_heads():
    torch.manual_seed(0)
    net, x = BeitNet().eval(), torch.randn(2, 5, 6)
    surgeon = Surgeon(net, x)
    cuts = _attention_cuts(surgeon)
    reference = head_check.without_heads(net, cuts)
    surgeon.cut(cuts)
    a = net.attn
    assert a.num_heads == 2 and a.relative_position_bias_table.shape == (25, 2) and a.head_gate.shape == (2,)
    assert a.q_bias.shape == (16,) and a.v_bias.shape == (16,) and a.k_bias.shape == (16,)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x), rtol=1e-5, atol=1e-5)


def test_attention_reshaped_to_its_input_width_is_named_as_the_reason_heads_stay():
    """timm's BEiT/EVA reshape the heads' output to the input width: a head cut cannot run, and the error says why
    in words, not only torch's reshape message."""
    torch.manual_seed(0)
    net, x = BeitNet(to_heads=False).eval(), torch.randn(2, 5, 6)
    surgeon = Surgeon(net, x)
    with pytest.raises(SurgeryError, match=r"reshapes the attention output to its input width, 32"):
        surgeon.cut(_attention_cuts(surgeon))
    assert net.attn.num_heads == 4 and net(x).shape == (2, 3)


def test_heads_named_heads_and_a_width_named_dim_out_are_cut_and_follow():
    torch.manual_seed(0)
    net, x = nn.Sequential(HieraAttention(), nn.Linear(32, 3)).eval(), torch.randn(2, 5, 16)
    surgeon = Surgeon(net, x)
    cuts = _attention_cuts(surgeon)
    reference = head_check.without_heads(net, cuts)
    surgeon.cut(cuts)
    assert (net[0].heads, net[0].dim_out, net[0].head_dim) == (2, 16, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x), rtol=1e-5, atol=1e-5)


def test_head_first_qkv_and_a_bias_shape_follow_the_heads():
    """Heads of a `head_first` module are its interleaved rows, and the bias table's view shape follows the cut."""
    torch.manual_seed(0)
    net, x = nn.Sequential(HeadFirstAttention(), nn.Linear(16, 3)).eval(), torch.randn(2, 5, 16)
    assert attn.find_attention(net)[0].layout == layouts.GROUPED
    surgeon = Surgeon(net, x)
    cuts = _attention_cuts(surgeon)
    reference = head_check.without_heads(net, cuts)
    surgeon.cut(cuts)
    assert net[0].num_heads == 2 and net[0].rel_pos.bias_shape == (5, 5, 2)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x), rtol=1e-5, atol=1e-5)


def test_attention_with_pointwise_conv_projections_loses_whole_heads():
    torch.manual_seed(0)
    net = nn.Sequential(ConvAttention(), nn.Conv2d(16, 3, 1)).eval()
    x = torch.randn(2, 16, 3, 3)
    surgeon = Surgeon(net, x)
    cuts = _attention_cuts(surgeon)
    reference = head_check.without_heads(net, cuts)
    surgeon.cut(cuts)
    assert net[0].num_heads == 2 and net[0].qkv.weight.shape == (24, 16, 1, 1) and net[0].proj.in_channels == 8
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x), rtol=1e-5, atol=1e-5)


def test_attention_deriving_its_head_dim_from_its_input_width_is_named_as_the_reason():
    net, x = nn.Sequential(HeadDimFromInput(), nn.Linear(16, 3)).eval(), torch.randn(2, 5, 16)
    surgeon = Surgeon(net, x)
    with pytest.raises(SurgeryError, match=r"derives its head dim from its input width \(16 // num_heads\)"):
        surgeon.cut(_attention_cuts(surgeon))
    assert net[0].num_heads == 4 and net(x).shape == (2, 5, 3)


def test_hf_swin_bias_table_in_a_child_travels_with_its_heads():
    """Hugging Face Swin (5.x) keeps its relative position bias table in a `relative_position_bias` child."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4,
                           num_labels=3)
    net, x = tf.SwinForImageClassification(config).eval(), torch.randn(2, 3, 32, 32)
    surgeon = Surgeon(net, x)
    cuts = _attention_cuts(surgeon)
    assert len(cuts) == 2
    reference = head_check.without_heads(net, cuts)
    surgeon.cut(cuts)
    for layer, heads in zip(net.swin.encoder.layers, (2, 4), strict=True):
        a = layer.blocks[0].attention
        assert a.num_attention_heads == heads // 2
        assert a.relative_position_bias.relative_position_bias_table.shape[-1] == heads // 2
    with torch.no_grad():
        torch.testing.assert_close(net(x).logits, reference(x).logits, rtol=1e-5, atol=1e-5)


def test_t5_layers_sharing_a_position_bias_lose_the_same_heads_and_its_columns():
    """T5's first layer computes the per-head relative bias that every later layer of its stack adds: the stack's
    self-attentions (and, with their shared zero bias, its cross-attentions) lose the same heads, and the bias
    table (`relative_attention_bias`, one column per head) loses their columns."""
    model = LayoutModule("t5").eval()
    surgeon = Surgeon(model, (example("t5"),))
    cuts = {c.layer: c.channels for c in _attention_cuts(surgeon)}
    for stack, kind in (("encoder", "SelfAttention"), ("decoder", "SelfAttention"), ("decoder", "EncDecAttention")):
        tied = [channels for layer, channels in cuts.items() if f"{stack}." in layer and kind in layer]
        assert len(tied) == 2 and tied[0] == tied[1] and tied[0]
    first = model.net.encoder.block[0].layer[0].SelfAttention
    table = first.relative_attention_bias.weight.detach().clone()
    removed = sorted({c // first.key_value_proj_dim for c in cuts["net.encoder.block.0.layer.0.SelfAttention.q"]})
    surgeon.cut([Cut(layer, channels) for layer, channels in cuts.items()])
    kept = [h for h in range(HEADS) if h not in removed]
    torch.testing.assert_close(first.relative_attention_bias.weight, table[:, kept])
    assert first.relative_attention_bias.embedding_dim == first.n_heads == len(kept)


def test_a_tie_with_a_module_left_out_keeps_every_head():
    """When one module of a tie is ignored, losing heads in the others would break the shared bias: the tie's other
    modules keep their heads and lose head dims instead, and the model still runs."""
    model = LayoutModule("t5").eval()
    x = example("t5")
    ignored = model.net.decoder.block[1].layer[0].SelfAttention
    surgeon = Surgeon(model, (x,), ignored_layers=[ignored.q, ignored.k, ignored.v, ignored.o])
    surgeon.cut(_attention_cuts(surgeon))
    decoder = {s.name: (s.num_heads, s.head_dim) for s in attn.find_attention(model) if ".decoder." in s.name}
    assert decoder["net.decoder.block.0.layer.0.SelfAttention"] == (HEADS, 8)
    assert decoder["net.decoder.block.1.layer.0.SelfAttention"] == (HEADS, 16)
    assert decoder["net.decoder.block.0.layer.1.EncDecAttention"][0] == HEADS // 2  # its own tie is whole
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_hf_swinv2_continuous_position_bias_mlp_travels_with_its_heads():
    """Swin-v2 computes its per-head bias with an MLP (`continuous_position_bias_mlp`, last layer one output per head)
    and views it with the head count: left uncut, the kept heads silently read other heads' biases (the forward ran,
    4e-4 away from the model without those heads)."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                             window_size=4, num_labels=3)
    net, x = tf.Swinv2ForImageClassification(config).eval(), torch.randn(2, 3, 32, 32)
    surgeon = Surgeon(net, x)
    cuts = _attention_cuts(surgeon)
    reference = head_check.without_heads(net, cuts)
    surgeon.cut(cuts)
    for layer, heads in zip(net.swinv2.encoder.layers, (2, 4), strict=True):
        a = layer.blocks[0].attention.self
        assert a.num_attention_heads == heads // 2 and a.continuous_position_bias_mlp[-1].out_features == heads // 2
        assert a.logit_scale.shape[0] == heads // 2
    with torch.no_grad():
        torch.testing.assert_close(net(x).logits, reference(x).logits, rtol=1e-5, atol=1e-5)


def test_albert_layer_norm_inside_the_attention_module_keeps_its_width():
    """ALBERT's attention module holds the residual stream's LayerNorm (width = heads x head_dim): not a q norm."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.AlbertConfig(embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, vocab_size=64, max_position_embeddings=16, num_labels=3)
    net, x = tf.AlbertForSequenceClassification(config).eval(), torch.randint(0, 64, (2, 8))
    surgeon = Surgeon(net, (x,))
    cuts = _attention_cuts(surgeon)
    assert len(cuts) == 1  # one attention module, shared by the layers
    surgeon.cut(cuts)
    a = net.albert.encoder.albert_layer_groups[0].albert_layers[0].attention
    assert a.num_attention_heads == 2 and a.LayerNorm.weight.shape == (32,)
    assert net(x).logits.shape == (2, 3)


def test_albert_config_follows_its_ffn_cut():
    """ALBERT's MLP up-projection is called ``ffn``: ``intermediate_size`` follows it; ``hidden_size`` is not the
    embeddings' width (``embedding_size``), and was overwritten with it."""
    import transformers as tf

    config = tf.AlbertConfig(embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, vocab_size=64, max_position_embeddings=16, num_labels=3)
    net, x = tf.AlbertForSequenceClassification(config).eval(), torch.randint(0, 64, (2, 8))
    surgeon = Surgeon(net, (x,))
    surgeon.cut(surgeon.plan(0.5, get_scorer("l2")))
    assert net.albert.encoder.albert_layer_groups[0].albert_layers[0].ffn.out_features == 32
    assert net.config.intermediate_size == 32 and net.config.num_attention_heads == 2
    assert net.config.hidden_size == 32 and net.config.embedding_size == 16  # factorized embeddings: not the stream


# ------------------------------------------------------------------ ambiguous layouts, the residual-stream guard
class DisentangledSelfAttention(nn.Module):
    """Named like DeBERTa (v1)'s: a fused projection in a layout HalfPrune does not know."""

    def __init__(self, dim: int = 32, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv_proj(x).chunk(3, -1)
        return self.out_proj(torch.softmax(q @ k.transpose(-2, -1), -1) @ v)


class AmbiguousNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 32)
        self.attn = DisentangledSelfAttention()
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h)
        return self.head((h + self.mlp(h)).mean(1))


def test_an_ambiguous_fused_layout_is_left_uncut_with_a_warning():
    net, x = AmbiguousNet(), torch.randn(2, 5, 6)
    match = r"leaves the attention heads of 'attn' \(DisentangledSelfAttention\) uncut: .* a guessed layout"
    with pytest.warns(UserWarning, match=match):
        surgeon = Surgeon(net, x)
    assert "attn.qkv_proj" not in surgeon.widths and "attn.out_proj" not in surgeon.widths
    surgeon.cut(surgeon.plan(0.5, get_scorer("l2")))
    assert net.attn.qkv_proj.out_features == 96 and net.embed.out_features == 32
    assert net.mlp[0].out_features == 32


class FunctionalAttention(DisentangledSelfAttention):
    """Both projections used through ``F.linear`` on their weights: torch-pruning's trace never sees them."""

    def forward(self, x):
        q, k, v = nn.functional.linear(x, self.qkv_proj.weight, self.qkv_proj.bias).chunk(3, -1)
        return nn.functional.linear(torch.softmax(q @ k.transpose(-2, -1), -1) @ v, self.out_proj.weight)


def test_attention_the_trace_cannot_see_is_left_uncut_with_a_warning():
    net = AmbiguousNet()
    net.attn = FunctionalAttention()
    with pytest.warns(UserWarning, match=r"leaves the attention heads of 'attn' uncut: neither"):
        Surgeon(net, torch.randn(2, 5, 6)).groups()


def test_residual_stream_is_refused_by_default_with_a_warning_and_cut_when_asked():
    model = LayoutModule("neox").eval()
    x = example("neox")
    with pytest.warns(UserWarning, match=r"would change the residual stream \(hidden size\)"):
        kept = Surgeon(model, (x,))
    stream = {"net.gpt_neox.embed_in", "net.gpt_neox.final_layer_norm"}
    for g in kept.groups():  # no group the default allows touches the embeddings or the final norm
        assert not stream & {kept.graph._module2name.get(dep.target.module) for dep, _ in g.group}
    kept.cut(kept.plan(0.5, get_scorer("l2")))
    assert model.net.gpt_neox.embed_in.embedding_dim == 64
    assert model.net.gpt_neox.final_layer_norm.weight.shape == (64,)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # asked for: no warning
        cut = Surgeon(LayoutModule("neox").eval(), (x,), prune_hidden_size=True)
    assert any(stream & {cut.graph._module2name.get(dep.target.module) for dep, _ in g.group} for g in cut.groups())


def test_a_state_space_lm_keeps_its_residual_stream_by_default():
    """Mamba has no attention: its embeddings and norms at the config's hidden size are its residual stream."""
    import transformers as tf

    def mamba():
        torch.manual_seed(0)
        return tf.MambaForCausalLM(tf.MambaConfig(
            hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=4, use_cache=False, pad_token_id=0,
            bos_token_id=0, eos_token_id=0)).eval()

    x = torch.randint(0, 64, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-pruning cannot search in_proj; the stream group is refused
        kept = mamba()
        surgeon = Surgeon(kept, (x,))  # only the mixers' inner widths (mamba.py)
        assert [g.name for g in surgeon.groups()] == [f"backbone.layers.{i}.mixer" for i in (0, 1)]
        surgeon.cut(surgeon.plan(0.5, get_scorer("l2")))
        net = mamba()
        surgeon = Surgeon(net, (x,), prune_hidden_size=True)  # asked for: the hidden size is cut too
        surgeon.cut(surgeon.plan(0.5, get_scorer("l2")))
    assert kept.backbone.embeddings.embedding_dim == 32 and kept.backbone.layers[0].mixer.D.shape == (32,)
    assert net.backbone.embeddings.embedding_dim == 16 and net(x).logits.shape == (2, 8, 64)
    assert net.backbone.layers[0].mixer.D.shape == (32,) and net.backbone.layers[0].mixer.in_proj.in_features == 16


# ------------------------------------------------------------------ real fits
def _fit(tmp_path, kind, ckpt=None):
    model = LayoutModule(kind)
    cb = HalfPrune(schedule={0: 0.5}, latency_batch_size=0, verbose=False)
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, max_epochs=2, logger=False,
        enable_checkpointing=ckpt is not None, callbacks=[cb] + ([ckpt] if ckpt else []), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_train_batches=2,
    )
    trainer.fit(model, loader(kind))
    return model, cb


def _check_fit(tmp_path, kind):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    fresh = LayoutModule(kind)
    heads = {s.name: s.num_heads for s in attn.find_attention(fresh)}
    hidden = _hidden(fresh.net)
    model, cb = _fit(tmp_path, kind, ckpt)
    assert cb.history, "no cut happened"
    after = {s.name: s.num_heads for s in attn.find_attention(model)}
    assert all(after[n] == h // 2 for n, h in heads.items())
    assert _hidden(model.net) == hidden
    assert head_check.config_mismatches(model) == []
    last = sorted((tmp_path / "ckpt").glob("epoch=1*.ckpt"))[0]
    loaded = load_pruned(LayoutModule, last)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
    x = example(kind)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    model.train()
    model(x).float().sum().backward()


def test_fit_cuts_neox_heads_and_loads_back(tmp_path):
    _check_fit(tmp_path, "neox")


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind", ["falcon_mqa", "falcon_grouped", "bloom", "modernbert", "deberta_v2", "whisper", "t5"]
)
def test_fit_cuts_heads_and_loads_back(tmp_path, kind):
    _check_fit(tmp_path, kind)


def test_a_q_norm_as_wide_as_the_hidden_size_is_not_taken_for_the_residual_stream():
    """OLMo-2/OLMoE normalise all query channels (heads x head dim, here equal to the hidden size): those norms lose
    the cut heads' channels, they are not the residual stream the default keeps."""
    import transformers as tf

    from lightning_halfprune.core import residual

    config = tf.Olmo2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
                            num_hidden_layers=1, vocab_size=64, use_cache=False, pad_token_id=0)
    net = tf.Olmo2ForCausalLM(config).eval()
    stream = residual.stream_modules(net, attn.find_attention(net))
    layer = net.model.layers[0]
    assert layer.self_attn.q_norm not in stream and layer.self_attn.k_norm not in stream
    assert layer.post_attention_layernorm in stream and net.model.norm in stream
