"""Tiny mixture-of-experts language models: Hugging Face Mixtral, Qwen2-MoE, Qwen3-MoE from configs, and a
Switch-style block of our own (top-1 routing over a ``ModuleList`` of expert MLPs)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from transformer_models import SEQ, VOCAB, Attention, Wrapper

HF_MOE = ("mixtral", "qwen2_moe", "qwen3_moe")


def hf_moe(kind: str) -> nn.Module:
    """A 2-layer Hugging Face MoE model with 4 experts (2 per token), hidden 64, experts 64-128 wide."""
    import transformers as tf

    small = dict(num_hidden_layers=2, hidden_size=64, vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0, num_experts_per_tok=2)
    if kind == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=4, intermediate_size=128, **small))
    if kind == "qwen2_moe":  # routed experts plus a gated shared expert
        config = tf.Qwen2MoeConfig(num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=128,
                                   intermediate_size=128, **small)
        return tf.Qwen2MoeForCausalLM(config)
    if kind == "qwen3_moe":
        config = tf.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=64, intermediate_size=128, head_dim=16, **small)
        return tf.Qwen3MoeForCausalLM(config)
    raise ValueError(kind)


class ExpertMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwitchMoE(nn.Module):
    """Switch Transformer feed-forward: a router picks one expert per token, scaled by its probability."""

    def __init__(self, dim: int, hidden: int, num_experts: int = 4) -> None:
        super().__init__()
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(ExpertMLP(dim, hidden) for _ in range(num_experts))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weight, choice = self.router(flat).softmax(-1).max(-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            tokens = (choice == e).nonzero().squeeze(1)
            if len(tokens):
                out = out.index_add(0, tokens, expert(flat[tokens]) * weight[tokens, None])
        return out.view_as(x)


class SwitchLM(nn.Module):
    """Embedding -> 2 pre-norm blocks (attention, Switch MoE) -> LM head."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(norm1=nn.LayerNorm(dim), attn=Attention(dim, 4), norm2=nn.LayerNorm(dim),
                               moe=SwitchMoE(dim, 64)))
            for _ in range(2)
        )
        self.lm_head = nn.Linear(dim, VOCAB)

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = h + b["attn"](b["norm1"](h))
            h = h + b["moe"](b["norm2"](h))
        return self.lm_head(h)


class MoEWrapper(Wrapper):
    """Language modelling around any model above (AdamW by default, so Adam moments must follow the cuts)."""

    def __init__(self, kind: str = "mixtral", lr: float = 0.01, optimizer: str = "adamw") -> None:
        pl.LightningModule.__init__(self)
        self.save_hyperparameters({"kind": kind, "lr": lr, "optimizer": optimizer})
        torch.manual_seed(0)
        self.net = SwitchLM() if kind == "switch" else hf_moe(kind)
        self.example_input_array = torch.randint(1, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
        self.losses: list[float] = []

    def forward(self, x):
        return self.net(x) if self.hparams.kind == "switch" else self.net(input_ids=x, use_cache=False).logits

    def loss(self, batch):
        x, _ = batch
        logits = self(x)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
