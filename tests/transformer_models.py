"""Tiny transformers for the attention tests: Hugging Face models from configs (no download) and own blocks."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

VOCAB, SEQ, CLASSES = 64, 8, 3


def hf_model(kind: str) -> nn.Module:
    """A 2-layer Hugging Face model, hidden 32-64, built from a config."""
    import transformers as tf

    small = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, vocab_size=VOCAB)
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # resumed fits compare exactly
    if kind == "bert":
        config = tf.BertConfig(
            num_attention_heads=4, max_position_embeddings=32, num_labels=CLASSES, **small, **no_dropout
        )
        return tf.BertForSequenceClassification(config)
    if kind == "vit":
        config = tf.ViTConfig(
            num_attention_heads=4, image_size=16, patch_size=4, num_channels=3, num_labels=CLASSES, **no_dropout,
            **{k: v for k, v in small.items() if k != "vocab_size"},
        )
        return tf.ViTForImageClassification(config)
    if kind == "gpt2":
        config = tf.GPT2Config(n_embd=64, n_head=4, n_layer=2, n_positions=32, vocab_size=VOCAB, bos_token_id=0,
                               eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return tf.GPT2LMHeadModel(config)
    if kind == "llama":
        config = tf.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0, **small)
        return tf.LlamaForCausalLM(config)
    if kind == "qwen2":
        config = tf.Qwen2Config(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                bos_token_id=0, eos_token_id=0, pad_token_id=0, **small)
        return tf.Qwen2ForCausalLM(config)
    if kind == "phi3":  # fused q|k|v with GQA, fused gate|up projection
        config = tf.Phi3Config(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                               bos_token_id=0, eos_token_id=0, pad_token_id=0, **small)
        return tf.Phi3ForCausalLM(config)
    if kind.startswith("codegen"):  # fused q|v|k sharded in 4 blocks, partial rotary; "codegen_2": 2 heads
        heads = int(kind.partition("_")[2] or 8)
        config = tf.CodeGenConfig(n_embd=64, n_head=heads, n_layer=2, n_positions=64, n_ctx=64, rotary_dim=4,
                                  vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0)
        return tf.CodeGenForCausalLM(config)
    if kind == "mamba":  # selective state-space mixers (no attention): inner width 64, the mixers most of the params
        config = tf.MambaConfig(hidden_size=32, intermediate_size=64, state_size=8, num_hidden_layers=2,
                                vocab_size=VOCAB, use_cache=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return tf.MambaForCausalLM(config)
    if kind == "deepseek_v3":  # multi-head latent attention (4 heads), a dense MLP then routed + shared experts
        config = tf.DeepseekV3Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=16,
                                     n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                                     first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
                                     qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1, use_cache=False,
                                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return tf.DeepseekV3ForCausalLM(config)
    if kind == "mamba2":  # SSD mixers cut in whole heads: 8 heads of 8 channels in 2 groups
        config = tf.Mamba2Config(hidden_size=32, num_heads=8, head_dim=8, expand=2, n_groups=2, state_size=8,
                                 chunk_size=8, num_hidden_layers=2, vocab_size=VOCAB, use_cache=False, bos_token_id=0,
                                 eos_token_id=0, pad_token_id=0)
        return tf.Mamba2ForCausalLM(config)
    raise ValueError(kind)


class ViTBlockNet(nn.Module):
    """A timm-style ViT: patch embedding, cls token, position embedding, fused ``qkv`` with ``num_heads``."""

    def __init__(self, dim: int = 48, heads: int = 4, classes: int = CLASSES) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, Attention(dim, heads)) for _ in range(2)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], 1) + self.pos
        return self.head(self.norm(self.blocks(h))[:, 0])


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    """Pre-norm transformer block around any attention module."""

    def __init__(self, dim: int, attn: nn.Module) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = attn
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MixerNet(nn.Module):
    """MLP-Mixer: a token-mixing MLP (acts on the 16 patches) and a channel-mixing MLP."""

    def __init__(self, dim: int = 32, tokens: int = 16, classes: int = CLASSES) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, 32), nn.GELU(), nn.Linear(32, tokens))
        self.channel_mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = h + self.token_mlp(self.norm1(h).transpose(1, 2)).transpose(1, 2)
        h = h + self.channel_mlp(self.norm2(h))
        return self.head(h.mean(1))


class WindowAttention(nn.Module):
    """torchvision-style shifted-window attention: functional ``F.linear`` between window reshapes, a bias table."""

    def __init__(self, dim: int, num_heads: int = 2, window: int = 2, shift: int = 0) -> None:
        super().__init__()
        self.num_heads, self.window, self.shift = num_heads, window, shift
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("bias_index", torch.arange(window**4) % (2 * window - 1) ** 2)

    def forward(self, x):
        b, h, w, c = x.shape
        s, n = self.window, (h // self.window) * (w // self.window)
        x = torch.roll(x, (-self.shift, -self.shift), (1, 2)) if self.shift else x
        x = x.view(b, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b * n, s * s, c)
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.reshape(x.size(0), x.size(1), 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.bias_table[self.bias_index].view(s * s, s * s, -1).permute(2, 0, 1)
        attn = ((q * 0.5) @ k.transpose(-2, -1) + bias).softmax(-1)
        x = F.linear((attn @ v).transpose(1, 2).reshape(x.size(0), x.size(1), c), self.proj.weight, self.proj.bias)
        x = x.view(b, h // s, w // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        return torch.roll(x, (self.shift, self.shift), (1, 2)) if self.shift else x


class SwinNet(nn.Module):
    """Two Swin stages joined by patch merging (strided slices, concat, linear): a loop of reshapes when traced."""

    def __init__(self, dim: int = 8, classes: int = CLASSES) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 2, 2)
        self.stage1 = nn.Sequential(*[Block(dim, WindowAttention(dim, shift=shift)) for shift in (0, 1)])
        self.merge_norm, self.merge = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)
        self.stage2 = nn.Sequential(*[Block(2 * dim, WindowAttention(2 * dim, shift=shift)) for shift in (0, 1)])
        self.head = nn.Linear(2 * dim, classes)

    def forward(self, x):
        x = self.stage1(self.patch(x).permute(0, 2, 3, 1))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        x = self.stage2(self.merge(self.merge_norm(x)))
        return self.head(x.mean((1, 2)))


class TiedLM(nn.Module):
    """Embedding -> residual MLP -> LM head sharing the embedding matrix (no attention: its width is pruned)."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
        self.lm_head = nn.Linear(dim, VOCAB, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        return self.lm_head(h + self.mlp(h))


OWN = {"vit_block": ViTBlockNet, "mixer": MixerNet, "swin": SwinNet, "tied": TiedLM}  # called with the tensor


def build(kind: str) -> nn.Module:
    return OWN.get(kind, lambda: hf_model(kind))()


IMAGE = {"vit", "vit_block", "mixer", "swin"}
LM = {"gpt2", "llama", "qwen2", "phi3", "tied", "codegen", "codegen_2", "mamba", "mamba2", "deepseek_v3"}


class Wrapper(pl.LightningModule):
    """Sequence/image classification or language modelling around any model above."""

    def __init__(self, kind: str = "bert", lr: float = 0.01, optimizer: str = "sgd") -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = build(kind)
        self.example_input_array = torch.zeros(2, 3, 16, 16) if kind in IMAGE else torch.ones(2, SEQ, dtype=torch.long)
        self.losses: list[float] = []

    def forward(self, x):
        if self.hparams.kind in OWN:
            return self.net(x)
        out = self.net(pixel_values=x) if self.hparams.kind == "vit" else self.net(input_ids=x, use_cache=False)
        return out.logits

    def loss(self, batch):
        x, y = batch
        logits = self(x)
        if self.hparams.kind in LM:
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        return F.cross_entropy(logits, y)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        if self._current_fx_name == "training_step":
            self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self):
        if self.hparams.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def loader(kind: str, n: int = 32, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    if kind in IMAGE:
        x = torch.randn(n, 3, 16, 16, generator=g)
    else:
        x = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def assert_adam_state_follows(model) -> None:
    """Every Adam moment of the fit's optimizer has its (pruned) parameter's shape."""
    optimizer = model.trainer.optimizers[0]
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key in ("exp_avg", "exp_avg_sq"):
                if key in optimizer.state.get(p, {}):
                    assert optimizer.state[p][key].shape == p.shape


def short_trainer(tmp_path, epochs: int, halfprune: pl.Callback, callbacks=()) -> pl.Trainer:
    """A CPU Trainer of ``epochs`` epochs of 3 batches (1 validation batch) with ``halfprune`` and ``callbacks``;
    Lightning's own checkpointing only when ``callbacks`` are given (they bring their ``ModelCheckpoint``)."""
    return pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
        enable_checkpointing=bool(callbacks), callbacks=[halfprune, *callbacks], enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_train_batches=3, limit_val_batches=1,
    )
