"""Tiny attention modules shaped like timm's (BEiT, MaxViT, CoAtNet, CaiT/XCiT, Hiera), for the layout tests."""

from __future__ import annotations

import torch
from torch import nn


class BeitAttention(nn.Module):
    """BEiT-style: qkv without bias plus q/v biases, a relative position bias table and a gate, one per head."""

    def __init__(self, dim: int = 32, num_heads: int = 4, tokens: int = 5) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)  # as timm's BEiT has it
        self.relative_position_bias_table = nn.Parameter(torch.randn(tokens * tokens, num_heads))
        self.head_gate = nn.Parameter(torch.rand(num_heads) + 0.5)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, self.k_bias, self.v_bias])
        qkv = nn.functional.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        rel = self.relative_position_bias_table.view(n, n, -1).permute(2, 0, 1)
        a = (q @ k.transpose(-2, -1) * self.head_dim**-0.5 + rel).softmax(-1) * self.head_gate.view(1, -1, 1, 1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, -1 if self.to_heads else c))


class BeitNet(nn.Module):
    def __init__(self, to_heads: bool = True) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 32)
        self.norm = nn.LayerNorm(32)
        self.attn = BeitAttention()
        self.attn.to_heads = to_heads  # False: timm's BEiT, the output reshaped to the input width
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(self.norm(h))
        return self.head((h + self.mlp(h)).mean(1))


class HieraAttention(nn.Module):
    """timm Hiera's `MaskUnitAttention`: `heads` and `dim_out` (the heads' width, read by its final reshape)."""

    def __init__(self, dim: int = 16, dim_out: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.dim_out, self.heads, self.head_dim = dim_out, heads, dim_out // heads
        self.qkv = nn.Linear(dim, 3 * dim_out)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, -1, self.dim_out))


class RelPosBias(nn.Module):
    """timm's `RelPosBias`: a table viewed as `bias_shape`, whose last entry is the head count."""

    def __init__(self, tokens: int, heads: int) -> None:
        super().__init__()
        self.bias_shape = (tokens, tokens, heads)
        self.relative_position_bias_table = nn.Parameter(torch.randn(tokens * tokens, heads))

    def get_bias(self):
        return self.relative_position_bias_table.view(self.bias_shape).permute(2, 0, 1).unsqueeze(0)


class HeadFirstAttention(nn.Module):
    """timm MaxViT's `AttentionCl` (`head_first=True`): qkv viewed as [head][q, k, v][head dim]."""

    def __init__(self, dim: int = 16, heads: int = 4, tokens: int = 5) -> None:
        super().__init__()
        self.num_heads, self.dim_head, self.head_first = heads, dim // heads, True
        self.qkv = nn.Linear(dim, 3 * dim)
        self.rel_pos = RelPosBias(tokens, heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b = x.shape[0]
        q, k, v = self.qkv(x).view(b, -1, self.num_heads, self.dim_head * 3).transpose(1, 2).chunk(3, dim=3)
        x = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.rel_pos.get_bias())
        return self.proj(x.transpose(1, 2).reshape(b, -1, self.num_heads * self.dim_head))


class ConvAttention(nn.Module):
    """timm CoAtNet's `Attention2d`: 1x1-conv projections over (B, C, H, W), heads first in `qkv`."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.dim_head, self.head_first = heads, dim // heads, True
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        q, k, v = self.qkv(x).view(b, self.num_heads, self.dim_head * 3, -1).chunk(3, dim=2)
        a = (q.transpose(-2, -1) @ k * self.dim_head**-0.5).softmax(-1)
        return self.proj((v @ a.transpose(-2, -1)).view(b, -1, h, w))


class HeadDimFromInput(nn.Module):
    """timm CaiT / XCiT: the heads of `qkv` are `C // num_heads` wide, `C` read from the input."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))
