"""Baseline dense archs of the paper's table 1, behind the same interface as RankMixer (issue 8).

Every arch maps the pipeline's semantic-group embeddings `list[(B, d_g)]` to `(B, num_tasks)` logits and
has `num_params()` (dense parameters) and `flops_per_sample()` (forward matmul FLOPs, multiply-add = 2;
elementwise ops left out, as in models/rankmixer.py). Selected with `model=<preset>` (`arch: dlrm` ...).

Design choices:
1. Same input as RankMixer. Archs that interact feature *vectors* (DLRM, AutoInt, Wukong) get them from
   RankMixer's own `SemanticTokenizer` (concat the groups, split into T chunks, project each to D), so the
   comparison isolates the interaction part; archs that work on one flat vector (DCNv2, MMoE) take the
   concatenated groups (B, W).
2. TorchRec's modules where they exist: DLRM's `DenseArch` / `InteractionArch` (torchrec.models.dlrm),
   DCNv2's `LowRankCrossNet` (torchrec.modules.crossnet) and TorchRec's `MLP`. AutoInt, Wukong and MMoE
   have no TorchRec module; they are written here in pure torch with batched matmuls (no loops over
   tokens or experts).
3. Heads are `MultiTaskHead` (one tower per task) for all but MMoE, whose per-task gates and towers are
   the model itself.
4. Every arch is a `DenseArch` (models/dense_arch.py); none has an auxiliary loss or inference modes, so
   they keep the interface's defaults. Each arch's registry entry (models/config.py) names one width
   field that `launch/experiment.py` solves for to hit a dense-parameter budget, so "matched budgets" are
   computed, not hand-picked.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.models.dlrm import DenseArch as BottomMLP  # DLRM's bottom MLP (not our DenseArch)
from torchrec.models.dlrm import InteractionArch
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.mlp import MLP

from models.baseline_configs import AutoIntConfig, DCNv2Config, DLRMConfig, MMoEConfig, WukongConfig
from models.dense_arch import DenseArch
from models.heads import MultiTaskHead, full_precision
from models.rankmixer import SemanticTokenizer


def _mlp_flops(widths: list[int]) -> float:
    return float(sum(2 * a * b for a, b in zip(widths[:-1], widths[1:])))


def _tokenizer_flops(group_dims: list[int], num_tokens: int, dim: int) -> float:
    return float(2 * num_tokens * math.ceil(sum(group_dims) / num_tokens) * dim)


# ---- DLRM ------------------------------------------------------------------------------------------


class DLRM(DenseArch):
    """Naumov et al. 2019: bottom MLP (flat input -> D) + F feature vectors, all pairwise dot products
    (TorchRec's InteractionArch), over MLP, per-task heads."""

    def __init__(self, cfg: DLRMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        width = sum(cfg.group_dims)
        self.tokenizer = SemanticTokenizer(cfg.group_dims, cfg.num_tokens, cfg.dim)
        self.bottom = BottomMLP(width, cfg.bottom_mlp)
        self.interaction = InteractionArch(num_sparse_features=cfg.num_tokens)
        F_ = cfg.num_tokens
        self.over = MLP(cfg.dim + F_ * (F_ + 1) // 2, cfg.over_mlp, activation="relu")
        self.head = MultiTaskHead(cfg.over_mlp[-1], cfg.num_tasks, cfg.head_hidden, cfg.head_dropout)

    def forward(self, groups: list[torch.Tensor]) -> torch.Tensor:
        dense = self.bottom(torch.cat(groups, dim=-1))  # (B, D)
        tokens = self.tokenizer(groups).transpose(0, 1)  # (T, B, D) -> (B, F, D)
        return self.head(self.over(self.interaction(dense, tokens)))  # (B, num_tasks)

    def flops_per_sample(self, active_ratio: float | None = None) -> float:
        c = self.cfg
        F_ = c.num_tokens
        interaction = 2 * (F_ + 1) ** 2 * c.dim  # the full (F+1)^2 Gram matrix is computed
        return (
            _tokenizer_flops(c.group_dims, F_, c.dim)
            + _mlp_flops([sum(c.group_dims), *c.bottom_mlp])
            + interaction
            + _mlp_flops([c.dim + F_ * (F_ + 1) // 2, *c.over_mlp])
            + self.head.flops_per_sample()
        )


# ---- DCNv2 -----------------------------------------------------------------------------------------


class DCNv2(DenseArch):
    """Wang et al. 2021, stacked structure: x_{l+1} = x_0 * (U_l (V_l x_l) + b_l) + x_l (TorchRec's
    LowRankCrossNet) on the flat input, then a deep ReLU MLP, then per-task heads."""

    def __init__(self, cfg: DCNv2Config) -> None:
        super().__init__()
        self.cfg = cfg
        width = sum(cfg.group_dims)
        self.cross = LowRankCrossNet(width, cfg.cross_layers, cfg.low_rank)
        self.deep = MLP(width, cfg.deep_mlp, activation="relu")
        self.head = MultiTaskHead(cfg.deep_mlp[-1], cfg.num_tasks, cfg.head_hidden, cfg.head_dropout)

    def forward(self, groups: list[torch.Tensor]) -> torch.Tensor:
        x = self.cross(torch.cat(groups, dim=-1))  # (B, W)
        return self.head(self.deep(x))  # (B, num_tasks)

    def flops_per_sample(self, active_ratio: float | None = None) -> float:
        c = self.cfg
        width = sum(c.group_dims)
        cross = c.cross_layers * 2 * (2 * width * c.low_rank)
        return cross + _mlp_flops([width, *c.deep_mlp]) + self.head.flops_per_sample()


# ---- AutoInt ---------------------------------------------------------------------------------------


class AutoIntLayer(nn.Module):
    """Song et al. 2019: y = ReLU(MultiHeadSelfAttention(x) + W_res x) over feature tokens. (B, T, D)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.res = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, T, D/H)
        return F.relu(attn.transpose(1, 2).reshape(B, T, D) + self.res(x))  # (B, T, D)


class AutoInt(DenseArch):
    """Feature tokens -> L AutoInt layers -> flatten (B, T*D) -> per-task heads."""

    def __init__(self, cfg: AutoIntConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = SemanticTokenizer(cfg.group_dims, cfg.num_tokens, cfg.dim)
        self.layers = nn.ModuleList(AutoIntLayer(cfg.dim, cfg.num_heads) for _ in range(cfg.num_layers))
        self.head = MultiTaskHead(cfg.num_tokens * cfg.dim, cfg.num_tasks, cfg.head_hidden, cfg.head_dropout)

    def forward(self, groups: list[torch.Tensor]) -> torch.Tensor:
        x = self.tokenizer(groups).transpose(0, 1)  # (B, T, D)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.flatten(1))  # (B, T*D) -> (B, num_tasks)

    def flops_per_sample(self, active_ratio: float | None = None) -> float:
        c = self.cfg
        T, D = c.num_tokens, c.dim
        per_layer = 2 * T * D * 4 * D + 2 * 2 * T * T * D  # qkv + residual projections, scores + mix
        return _tokenizer_flops(c.group_dims, T, D) + c.num_layers * per_layer + self.head.flops_per_sample()


# ---- Wukong ----------------------------------------------------------------------------------------


class WukongLayer(nn.Module):
    """Zhang et al. 2024: X' = LN(concat(FMB(X), LCB(X)) + X) on (B, n, D).
    FMB: optimized FM X (X^T Y) -> (n, k), flatten, MLP -> n_F tokens. LCB: W (n_L x n) X -> n_L tokens."""

    def __init__(self, cfg: WukongConfig) -> None:
        super().__init__()
        n, D = cfg.num_tokens, cfg.dim
        self.fm_tokens, self.dim = cfg.fm_tokens, D
        self.fm_proj = nn.Parameter(torch.randn(n, cfg.fm_rank) / math.sqrt(n))  # Y: (n, k)
        self.fm_norm = nn.LayerNorm(n * cfg.fm_rank)
        self.fm_mlp = MLP(n * cfg.fm_rank, [*cfg.fm_mlp, cfg.fm_tokens * D], activation="relu")
        self.lc = nn.Parameter(torch.randn(n - cfg.fm_tokens, n) / math.sqrt(n))  # (n_L, n)
        self.norm = nn.LayerNorm(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        xy = torch.einsum("bnd,nk->bdk", x, self.fm_proj)  # X^T Y: (B, D, k)
        fm = torch.bmm(x, xy).flatten(1)  # X (X^T Y): (B, n, k) -> (B, n*k)
        fm_tokens = self.fm_mlp(self.fm_norm(fm)).view(B, self.fm_tokens, self.dim)  # (B, n_F, D)
        lc_tokens = torch.einsum("mn,bnd->bmd", self.lc, x)  # (B, n_L, D)
        return self.norm(torch.cat([fm_tokens, lc_tokens], dim=1) + x)  # (B, n, D)


class Wukong(DenseArch):
    """Feature tokens -> L Wukong layers -> flatten -> top MLP -> per-task heads."""

    def __init__(self, cfg: WukongConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenizer = SemanticTokenizer(cfg.group_dims, cfg.num_tokens, cfg.dim)
        self.layers = nn.ModuleList(WukongLayer(cfg) for _ in range(cfg.num_layers))
        self.top = MLP(cfg.num_tokens * cfg.dim, cfg.top_mlp, activation="relu")
        self.head = MultiTaskHead(cfg.top_mlp[-1], cfg.num_tasks, cfg.head_hidden, cfg.head_dropout)

    def forward(self, groups: list[torch.Tensor]) -> torch.Tensor:
        x = self.tokenizer(groups).transpose(0, 1)  # (B, n, D)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.top(x.flatten(1)))  # (B, num_tasks)

    def flops_per_sample(self, active_ratio: float | None = None) -> float:
        c = self.cfg
        n, D, k = c.num_tokens, c.dim, c.fm_rank
        per_layer = (
            2 * n * D * k  # X^T Y
            + 2 * n * D * k  # X (X^T Y)
            + _mlp_flops([n * k, *c.fm_mlp, c.fm_tokens * D])
            + 2 * (n - c.fm_tokens) * n * D  # linear compression
        )
        return (
            _tokenizer_flops(c.group_dims, n, D)
            + c.num_layers * per_layer
            + _mlp_flops([n * D, *c.top_mlp])
            + self.head.flops_per_sample()
        )


# ---- MMoE ------------------------------------------------------------------------------------------


class MMoE(DenseArch):
    """Ma et al. 2018: E shared expert MLPs on the flat input, one softmax gate per task, one tower per
    task. Experts and towers are stacked weights: one batched matmul per layer."""

    def __init__(self, cfg: MMoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        W, E, H, Out = sum(cfg.group_dims), cfg.num_experts, cfg.expert_hidden, cfg.expert_out
        K = cfg.num_tasks
        self.w1 = nn.Parameter(torch.randn(E, W, H) / math.sqrt(W))  # (E, W, H)
        self.b1 = nn.Parameter(torch.zeros(E, 1, H))
        self.w2 = nn.Parameter(torch.randn(E, H, Out) / math.sqrt(H))  # (E, H, O)
        self.b2 = nn.Parameter(torch.zeros(E, 1, Out))
        self.gates = nn.Linear(W, K * E)  # all task gates in one linear
        self.t1 = nn.Parameter(torch.randn(K, Out, cfg.tower_hidden) / math.sqrt(Out))  # (K, O, h)
        self.tb1 = nn.Parameter(torch.zeros(K, 1, cfg.tower_hidden))
        self.t2 = nn.Parameter(torch.randn(K, cfg.tower_hidden, 1) / math.sqrt(cfg.tower_hidden))  # (K, h, 1)
        self.tb2 = nn.Parameter(torch.zeros(K, 1, 1))
        self.dropout = nn.Dropout(cfg.head_dropout)

    def forward(self, groups: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(groups, dim=-1)  # (B, W)
        E, K = self.cfg.num_experts, self.cfg.num_tasks
        xe = x.unsqueeze(0).expand(E, -1, -1)  # (E, B, W)
        h = F.relu(torch.baddbmm(self.b1, xe, self.w1))  # (E, B, H)
        experts = F.relu(torch.baddbmm(self.b2, h, self.w2))  # (E, B, O)
        gates = torch.softmax(self.gates(x).view(-1, K, E), dim=-1)  # (B, K, E)
        mixed = self.dropout(torch.einsum("bke,ebo->kbo", gates, experts))  # (K, B, O)
        with full_precision(mixed):  # the towers are MMoE's heads: fp32 logits (models/heads.py)
            t = self.dropout(F.relu(torch.baddbmm(self.tb1, mixed.float(), self.t1)))  # (K, B, h)
            return torch.baddbmm(self.tb2, t, self.t2).squeeze(-1).transpose(0, 1)  # (B, K)

    def flops_per_sample(self, active_ratio: float | None = None) -> float:
        c = self.cfg
        W, E, H, Out, K = sum(c.group_dims), c.num_experts, c.expert_hidden, c.expert_out, c.num_tasks
        return float(
            E * (2 * W * H + 2 * H * Out)  # experts
            + 2 * W * K * E  # gates
            + 2 * K * E * Out  # mix
            + K * (2 * Out * c.tower_hidden + 2 * c.tower_hidden)  # towers
        )
