"""The RankMixer ablation variants of the paper's tables 2-3, as drop-in sublayers of `RankMixerBlock`:
self-attention instead of token mixing, one FFN shared by all tokens, and the all-concat MLP. Selected by
`RankMixerConfig.token_mixing` / `ffn` in `models/rankmixer.py` (one block with switches, not copies of
it). Same contract as the sublayers they replace: (T, B, D) -> (T, B, D).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.init import init_linear_


class SelfAttentionMixing(nn.Module):
    """Table 3 ablation: multi-head self-attention across tokens instead of token mixing (shared Q/K/V/O
    projections, as in a Transformer). (T, B, D) -> (T, B, D)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        for lin in (self.qkv, self.out):
            init_linear_(lin.weight, dim)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, D = x.shape
        nh = self.num_heads
        qkv = self.qkv(x).view(T, B, 3, nh, D // nh)  # (T, B, 3, nh, hd)
        q, k, v = qkv.permute(2, 1, 3, 0, 4).unbind(0)  # 3 x (B, nh, T, hd)
        attn = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hd)
        return self.out(attn.permute(2, 0, 1, 3).reshape(T, B, D))  # (T, B, D)


class SharedFFN(nn.Module):
    """Table 2 ablation: one D -> kD -> D GELU MLP shared by all tokens. (T, B, D) -> (T, B, D)."""

    def __init__(self, dim: int, mult: float, dropout: float = 0.0, num_layers: int = 1) -> None:
        super().__init__()
        hidden = round(mult * dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)
        init_linear_(self.fc1.weight, dim)
        init_linear_(self.fc2.weight, hidden, scale=1.0 / math.sqrt(2 * num_layers))
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(F.gelu(self.fc1(x)))  # (T, B, kD)
        return self.dropout(self.fc2(h))  # (T, B, D)


class ConcatMLP(nn.Module):
    """Table 3 "All-Concat-MLP": concatenate all T tokens, one MLP TD -> kD -> TD, split back into T
    tokens. Hidden width kD keeps params and FLOPs equal to the per-token FFN (2kTD^2), matching the
    table's ~0% delta. (T, B, D) -> (T, B, D)."""

    def __init__(self, num_tokens: int, dim: int, mult: float, dropout: float = 0.0, num_layers: int = 1):
        super().__init__()
        hidden = round(mult * dim)
        self.fc1 = nn.Linear(num_tokens * dim, hidden)
        self.fc2 = nn.Linear(hidden, num_tokens * dim)
        self.dropout = nn.Dropout(dropout)
        init_linear_(self.fc1.weight, num_tokens * dim)
        init_linear_(self.fc2.weight, hidden, scale=1.0 / math.sqrt(2 * num_layers))
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B, D = x.shape
        flat = x.transpose(0, 1).reshape(B, T * D)  # (B, T*D): all tokens concatenated
        h = self.dropout(F.gelu(self.fc1(flat)))  # (B, kD)
        out = self.dropout(self.fc2(h))  # (B, T*D)
        return out.view(B, T, D).transpose(0, 1)  # (T, B, D): split back into T tokens
