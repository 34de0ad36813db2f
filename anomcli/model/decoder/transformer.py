"""Transformer decoder of Dinomaly (Guo et al., CVPR 2025) with linear or softmax attention.

Linear attention (Katharopoulos et al., 2020) cannot focus sharply on one token,
which is why Dinomaly uses it: the decoder cannot copy an anomalous patch
through, so the anomaly shows up as disagreement with the encoder.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import init_vit_weights


class _HeadedAttention(nn.Module):
    """Shared parts of both attentions: one qkv projection split into heads, one output projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, N, C] -> q, k, v, each [B, heads, N, head_dim]."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        return q, k, v

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        """[B, heads, N, head_dim] -> projected [B, N, C]."""
        B, H, N, D = out.shape
        return self.proj(out.transpose(1, 2).reshape(B, N, H * D))


class LinearAttention(_HeadedAttention):
    """out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i) . sum_j phi(k_j) + eps), phi = elu + 1."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, eps: float = 1e-6):
        super().__init__(dim, num_heads, qkv_bias)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(x)
        q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
        kv = torch.einsum("bhnd,bhne->bhde", k, v)  # [B, heads, head_dim, head_dim]
        normaliser = torch.einsum("bhnd,bhd->bhn", q, k.sum(dim=2)) + self.eps  # [B, heads, N]
        return self.merge(torch.einsum("bhnd,bhde->bhne", q, kv) / normaliser.unsqueeze(-1))


class SoftmaxAttention(_HeadedAttention):
    """Standard multi-head softmax attention, for comparison with the linear variant."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, eps: float = 1e-6):
        super().__init__(dim, num_heads, qkv_bias)
        del eps  # same signature as LinearAttention; softmax needs no epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(F.scaled_dot_product_attention(*self.heads(x)))


ATTENTIONS = {"linear": LinearAttention, "softmax": SoftmaxAttention}


class DecoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, attention: Literal["linear", "softmax"] = "linear",
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-8)
        self.attn = ATTENTIONS[attention](dim, num_heads, qkv_bias=qkv_bias, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=1e-8)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerDecoder(nn.Module):
    """`depth` decoder blocks of width `dim`; `forward` returns every block's output, in order."""

    def __init__(self, dim: int, num_heads: int, depth: int = 8,
                 attention: Literal["linear", "softmax"] = "linear", mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, eps: float = 1e-6):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {sorted(ATTENTIONS)}, got {attention!r}")
        self.blocks = nn.ModuleList(
            DecoderBlock(dim, num_heads, attention, mlp_ratio, qkv_bias, eps) for _ in range(depth))
        self.apply(init_vit_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs

