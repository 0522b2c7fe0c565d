"""Multi-head self-attention and MLP with timm's parameter names.

SparseFormer (Gao et al., ICLR 2024) mixes its N latent tokens with a standard transformer; the
official code used ``nn.MultiheadAttention`` (packed ``in_proj``), which the converter renames to
``qkv`` / ``proj``. Attention runs through ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from sparseformer.layers.linear import linear

__all__ = ["Attention", "Mlp"]


class Attention(nn.Module):
    """Self-attention over tokens with a packed qkv projection.

    Args:
        dim: token width D.
        num_heads: heads; the head width is ``D / num_heads``.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, N, D) -> (B, N, D)``."""
        B, N, D = x.shape
        qkv = linear(x, self.qkv).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, N, 3, h, d) -> 3 x (B, h, N, d)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        return linear(x.transpose(1, 2).reshape(B, N, D), self.proj)  # (B, h, N, d) -> (B, N, D)


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))`` with hidden width ``hidden_dim``."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu") -> None:
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, N, D) -> (B, N, D)``."""
        if self.activation == "gelu":
            x = linear(x, self.fc1, gelu=True)
        else:
            x = linear(x, self.fc1)
            x = x * (1.702 * x).sigmoid()
        return linear(x, self.fc2)
