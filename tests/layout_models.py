"""Tiny Hugging Face models with fused q/k/v layouts and per-head parameters, built from configs (no download)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

VOCAB, SEQ, HIDDEN, HEADS = 64, 8, 64, 4
ENCODER_DECODER = {"whisper", "t5"}
KINDS = ("neox", "falcon_mqa", "falcon_grouped", "falcon_alibi", "bloom", "modernbert", "deberta_v2", "whisper", "t5",
         "codegen", "codegen_16")


def build(kind: str) -> nn.Module:
    """A 2-layer model of ``kind`` (hidden 64, 4 heads but CodeGen), eval-deterministic (no dropout)."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "neox":  # per-head interleaved q|k|v, partial rotary
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
            hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=128, num_hidden_layers=2,
            vocab_size=VOCAB, max_position_embeddings=32, partial_rotary_factor=0.5, bos_token_id=0, eos_token_id=0))
    if kind.startswith("falcon"):
        extra = {
            "falcon_mqa": dict(multi_query=True, new_decoder_architecture=False),  # blocked, one shared KV head
            "falcon_grouped": dict(new_decoder_architecture=True, num_kv_heads=2),  # [q q k v] per KV group
            "falcon_alibi": dict(multi_query=False, new_decoder_architecture=False, alibi=True),  # interleaved, ALiBi
        }[kind]
        return tf.FalconForCausalLM(tf.FalconConfig(
            hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=2, vocab_size=VOCAB,
            bos_token_id=0, eos_token_id=0, hidden_dropout=0.0, attention_dropout=0.0, **extra))
    if kind == "bloom":  # interleaved per head, ALiBi slopes from n_head
        return tf.BloomForCausalLM(tf.BloomConfig(
            hidden_size=HIDDEN, n_head=HEADS, n_layer=2, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0,
            hidden_dropout=0.0, attention_dropout=0.0))
    if kind == "modernbert":  # blocked Wqkv, output Wo
        return tf.ModernBertForMaskedLM(tf.ModernBertConfig(
            hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=128, num_hidden_layers=2,
            vocab_size=VOCAB, max_position_embeddings=32, pad_token_id=0, bos_token_id=0, eos_token_id=0,
            cls_token_id=0, sep_token_id=0, local_attention=8, global_attn_every_n_layers=1))
    if kind == "deberta_v2":  # query/key/value_proj, per-head position projections
        return tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(
            hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=128, num_hidden_layers=2,
            vocab_size=VOCAB, max_position_embeddings=32, relative_attention=True, pos_att_type=["p2c", "c2p"],
            share_att_key=False, position_buckets=8, max_relative_positions=16, num_labels=3,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    if kind == "whisper":  # encoder and decoder head counts in the config
        return tf.WhisperForConditionalGeneration(tf.WhisperConfig(
            d_model=HIDDEN, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_layers=1,
            decoder_layers=1, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=8, max_source_positions=8,
            max_target_positions=16, vocab_size=VOCAB, pad_token_id=0, bos_token_id=0, eos_token_id=0,
            decoder_start_token_id=0, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0))
    if kind == "t5":  # a per-head relative position bias shared by the layers
        return tf.T5ForConditionalGeneration(tf.T5Config(
            d_model=HIDDEN, d_kv=16, d_ff=128, num_layers=2, num_heads=HEADS, vocab_size=VOCAB,
            relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=0,
            decoder_start_token_id=0))
    if kind.startswith("codegen"):  # q|v|k in 4 shards: 8 heads lose whole shards, 16 one head of every shard
        return tf.CodeGenForCausalLM(tf.CodeGenConfig(
            n_embd=HIDDEN, n_head=int(kind.partition("_")[2] or 8), n_layer=2, n_positions=32, n_ctx=32, rotary_dim=4,
            vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    raise ValueError(kind)


def example(kind: str, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """One batch of inputs for ``kind`` (a dict of keyword arguments)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, SEQ), generator=g)
    if kind == "whisper":
        return {"input_features": torch.randn(batch, 8, 16, generator=g), "decoder_input_ids": ids}
    if kind == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids.flip(1)}
    return {"input_ids": ids}


def logits(net: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    extra = {} if type(net).__name__.startswith(("ModernBert", "DebertaV2")) else {"use_cache": False}
    return net(**x, **extra).logits


class Batches(Dataset):
    def __init__(self, kind: str, n: int = 16) -> None:
        self.items = [{k: v[0] for k, v in example(kind, 1, seed=i).items()} for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


def loader(kind: str) -> DataLoader:
    return DataLoader(Batches(kind), batch_size=4)


class LayoutModule(pl.LightningModule):
    """Any model above, trained to predict its first input token from its logits (a loss that reaches every head)."""

    def __init__(self, kind: str = "neox") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build(kind)
        self.example_input_array = (example(kind),)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return logits(self.net, x)

    def training_step(self, batch, batch_idx):
        out = self(batch)
        if out.dim() == 3:
            out = out[:, -1]
        target = next(iter(batch.values()))
        target = target[:, 0].long() % out.shape[-1] if target.dtype == torch.long else torch.zeros_like(out[:, 0])
        return F.cross_entropy(out, target.long())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)
