"""RankMixer dense arch (Zhu et al., CIKM'25, section 3), pure torch.

Design choices:
1. Token-major layout. Inside the arch activations are (T, B, D), not (B, T, D): the per-token
   tokenizer projection and per-token FFN are then batched matmuls over a contiguous leading T axis
   (`torch.baddbmm`, bias fused), LayerNorm works on the last axis in place, and the head regroup of
   token mixing, which has to move data anyway, is written by the residual add itself (`TokenMixing`):
   a block makes no copy of its own. The public forward takes the pipeline's list of (B, d_g) group
   embeddings and returns (B, num_tasks) logits.
2. One batched matmul per linear for all T tokens: weights are stored stacked, (T, D, kD) and
   (T, kD, D), never as T modules in a loop.
3. Token mixing is parameter free with H = T (eq. 3-5): a view + permute, summed with the residual.
4. The FFN is a swappable module with the contract (T, B, D) -> (T, B, D); the Sparse-MoE FFN
   (models/moe.py, ffn="smoe") plugs in through `build_ffn`. For it, `flops_per_sample()` is the
   dense-activated count (every expert) and `flops_per_sample(active_ratio)` the expected activated count.
5. Post-LN blocks exactly as eq. 1: S = LN(TM(X) + X); X' = LN(PFFN(S) + S).
6. Init: every weight ~ N(0, 1/fan_in) so a sublayer maps unit-variance inputs to unit-variance
   outputs; the second FFN linear is further scaled by 1/sqrt(2L) (GPT-2 style) so that even the
   no-LayerNorm ablation's residual stream grows like O(1) instead of O(L) with depth; biases start
   at 0. With LayerNorm on (the default) activations are renormalised after every sublayer anyway.
   Without LayerNorm, X + TM(X) (a parameter-free permutation of X added to X) doubles the variance
   per block whatever the init, so the no-LN ablation is only sane at the paper's depth (L = 2).
7. Ablations of tables 2-3 are config switches on one block, not copies of it (see RankMixerConfig).
8. `flops_per_sample` counts matmul FLOPs only (multiply-add = 2), from the config
   (`models/rankmixer_cost.py`); the ablation sublayers live in `models/rankmixer_ablations.py`.
9. It is a `DenseArch`: everything Sparse-MoE adds (aux loss, routing stats, router lr, sparse vs
   all-experts inference) reaches the pipeline through the DenseArch hooks, computed in models/moe.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.choice import Choice
from models.dense_arch import DenseArch
from models.heads import MultiTaskHead
from models.init import init_linear_
from models.moe import (
    ACTIVE_RATIO,
    MoEConfig,
    SparseMoEFFN,
    moe_aux_loss,
    moe_eval_stats,
    moe_stats,
    moe_stats_summary,
    router_lr_scales,
    set_sparse_inference,
)
from models.rankmixer_ablations import ConcatMLP, SelfAttentionMixing, SharedFFN
from models.rankmixer_cost import flops_breakdown


class TokenMixingKind(Choice):
    multi_head = "multi_head"  # the paper (eq. 3-5)
    none = "none"  # table 2: w/o token mixing
    self_attention = "self_attention"  # table 3: routing strategies
    all_concat_mlp = "all_concat_mlp"
    all_share = "all_share"


class FFNKind(Choice):
    per_token = "per_token"  # the paper (eq. 6-9)
    shared = "shared"  # table 2: one FFN for all tokens
    smoe = "smoe"  # section 3.4, models/moe.py


@dataclass
class RankMixerConfig:
    # widths of the semantic-group embeddings, in group order (tokenizer input); filled in by the pipeline
    group_dims: list[int] = field(default_factory=list)
    num_tasks: int = 2  # filled in by the pipeline from the schema's labels
    num_tokens: int = 16  # T
    dim: int = 768  # D
    num_layers: int = 2  # L
    ffn_mult: float = 2  # k: FFN hidden width is k * D (k * D must be an integer)
    token_mixing: TokenMixingKind = TokenMixingKind.multi_head
    ffn: FFNKind = FFNKind.per_token
    residual: bool = True  # table 2: "w/o skip connections" when False
    layer_norm: bool = True  # table 2: "w/o layer normalization" when False
    head_hidden: list[int] = field(default_factory=list)  # per-task tower hidden sizes ([] = one linear)
    head_dropout: float = 0.0  # on the pooled tokens entering the towers and their hidden activations
    dropout: float = 0.0  # on the FFN hidden activation and the FFN output
    attention_heads: int = 0  # heads for token_mixing=self_attention; 0 means T (must divide D)
    moe: MoEConfig = field(default_factory=MoEConfig)  # the Sparse-MoE FFN (ffn=smoe)

    def __post_init__(self) -> None:
        self.token_mixing = TokenMixingKind.parse(self.token_mixing, "token_mixing")
        self.ffn = FFNKind.parse(self.ffn, "ffn")
        if self.token_mixing == "multi_head" and self.dim % self.num_tokens:
            raise ValueError(f"multi-head token mixing uses H = T heads: D={self.dim} % T={self.num_tokens}")
        if self.token_mixing == "self_attention" and self.dim % self.num_attention_heads:
            raise ValueError(f"D={self.dim} not divisible by {self.num_attention_heads} attention heads")
        if abs(self.ffn_mult * self.dim - self.ffn_hidden) > 1e-6 or self.ffn_hidden < 1:
            raise ValueError(f"ffn_mult * dim = {self.ffn_mult * self.dim}: not a positive integer")
        if self.ffn == FFNKind.smoe:
            if self.token_mixing == TokenMixingKind.all_concat_mlp:
                raise ValueError("ffn=smoe replaces the per-token FFN; all_concat_mlp has none")
            if abs(self.moe.expert_mult * self.dim - self.moe.expert_hidden(self.dim)) > 1e-6:
                raise ValueError(f"moe.expert_mult * dim = {self.moe.expert_mult * self.dim}: not an integer")

    @property
    def num_attention_heads(self) -> int:
        return self.attention_heads or self.num_tokens

    @property
    def input_width(self) -> int:
        return sum(self.group_dims)

    @property
    def ffn_hidden(self) -> int:
        return round(self.ffn_mult * self.dim)


class SemanticTokenizer(nn.Module):
    """Eq. 2: concat the group embeddings in group order, split into T equal chunks, project each chunk
    to D with its own weights (one batched matmul).

    groups: list of (B, d_g) -> (T, B, D). The concatenation (width W) is zero-padded at the end to
    T * ceil(W / T), so the last chunk is the short one. With split=False (the all-share ablation) the
    whole vector goes through one (W, D) projection and every token is that same vector.
    """

    def __init__(self, group_dims: list[int], num_tokens: int, dim: int, split: bool = True) -> None:
        super().__init__()
        if not group_dims:
            raise ValueError("group_dims is empty: the pipeline must fill it from the data schema")
        self.group_dims = list(group_dims)
        self.num_tokens = num_tokens
        self.split = split
        self.input_width = sum(group_dims)
        if split:
            self.chunk = math.ceil(self.input_width / num_tokens)  # d of eq. 2
            self.pad = num_tokens * self.chunk - self.input_width
            self.weight = nn.Parameter(torch.empty(num_tokens, self.chunk, dim))  # (T, d, D)
            self.bias = nn.Parameter(torch.zeros(num_tokens, 1, dim))  # (T, 1, D)
            init_linear_(self.weight, self.chunk)
        else:
            self.chunk, self.pad = self.input_width, 0
            self.weight = nn.Parameter(torch.empty(self.input_width, dim))  # (W, D)
            self.bias = nn.Parameter(torch.zeros(dim))  # (D,)
            init_linear_(self.weight, self.input_width)

    def forward(self, groups: list[torch.Tensor]) -> torch.Tensor:
        if len(groups) != len(self.group_dims):
            raise ValueError(f"expected {len(self.group_dims)} groups, got {len(groups)}")
        widths = [g.shape[-1] for g in groups]
        # under fx symbolic tracing the widths are proxies and cannot be compared
        if not any(isinstance(g, torch.fx.Proxy) for g in groups) and widths != self.group_dims:
            raise ValueError(f"group widths {widths} != schema group_dims {self.group_dims}")
        e_input = torch.cat(groups, dim=-1)  # (B, W)
        batch = e_input.shape[0]
        if not self.split:
            token = torch.addmm(self.bias, e_input, self.weight)  # (B, D)
            return token.unsqueeze(0).expand(self.num_tokens, -1, -1).contiguous()  # (T, B, D)
        if self.pad:
            e_input = F.pad(e_input, (0, self.pad))  # (B, T*d)
        chunks = e_input.view(batch, self.num_tokens, self.chunk).transpose(0, 1)  # (T, B, d)
        return torch.baddbmm(self.bias, chunks, self.weight)  # (T, B, d) @ (T, d, D) -> (T, B, D)


class TokenMixing(nn.Module):
    """Eq. 3-5, parameter free, H = T heads: head h of the output is the concatenation over tokens of
    head h of every input token. (T, B, D) -> (H, B, T * D/H) = (T, B, D)."""

    def __init__(self, num_tokens: int) -> None:
        super().__init__()
        self.num_heads = num_tokens  # H = T keeps the token count for the residual

    def forward(self, x: torch.Tensor, residual: bool = False) -> torch.Tensor:
        """TM(x), or with `residual` TM(x) + x in one pass: the regroup is then the add's output instead of a
        copy of its own, and in the backward both gradients reach the same (T, B, H, D/H) view of x, so
        their sum is the un-permute (no copy back through a non-contiguous reshape either)."""
        T, B, D = x.shape
        H = self.num_heads
        heads = x.view(T, B, H, D // H)  # (T, B, H, D/H): SplitHead, eq. 3
        mixed = heads.permute(2, 1, 0, 3)  # (H, B, T, D/H): regroup by head, eq. 4
        if residual:
            # H = T: `heads` is also x as (H, B, T, D/H); the contiguous operand first gives the output
            # its layout, so the view back to (H, B, D) is free
            return (heads + mixed).view(H, B, D)  # (H, B, D) = (T, B, D)
        return mixed.reshape(H, B, T * (D // H))  # (H, B, T*D/H): s^h = [x_1^h || ... || x_T^h]


class PerTokenFFN(nn.Module):
    """Eq. 6-9: token t has its own two-layer GELU MLP, D -> kD -> D. Stacked weights (T, D, kD) and
    (T, kD, D); one baddbmm (bias fused) per layer for all tokens. (T, B, D) -> (T, B, D)."""

    def __init__(self, num_tokens: int, dim: int, mult: float, dropout: float = 0.0, num_layers: int = 1):
        super().__init__()
        hidden = round(mult * dim)
        self.w1 = nn.Parameter(torch.empty(num_tokens, dim, hidden))  # (T, D, kD)
        self.b1 = nn.Parameter(torch.zeros(num_tokens, 1, hidden))  # (T, 1, kD)
        self.w2 = nn.Parameter(torch.empty(num_tokens, hidden, dim))  # (T, kD, D)
        self.b2 = nn.Parameter(torch.zeros(num_tokens, 1, dim))  # (T, 1, D)
        self.dropout = nn.Dropout(dropout)
        init_linear_(self.w1, dim)
        init_linear_(self.w2, hidden, scale=1.0 / math.sqrt(2 * num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.baddbmm(self.b1, x, self.w1)  # (T, B, D) @ (T, D, kD) -> (T, B, kD)
        h = self.dropout(F.gelu(h))
        return self.dropout(torch.baddbmm(self.b2, h, self.w2))  # (T, B, kD) @ (T, kD, D) -> (T, B, D)


def build_token_mixing(cfg: RankMixerConfig) -> nn.Module | None:
    """The routing sublayer of a block; None means the block has no routing sublayer: "none" (table 2),
    all_concat_mlp (the concat MLP itself mixes all tokens) and all_share (every FFN already gets the
    whole input vector from the non-splitting tokenizer, as MoE experts share their input)."""
    if cfg.token_mixing == "multi_head":
        return TokenMixing(cfg.num_tokens)
    if cfg.token_mixing == "self_attention":
        return SelfAttentionMixing(cfg.dim, cfg.num_attention_heads)
    return None


def build_ffn(cfg: RankMixerConfig) -> nn.Module:
    """The FFN sublayer, contract (T, B, D) -> (T, B, D); the Sparse-MoE FFN plugs in here."""
    args = dict(dropout=cfg.dropout, num_layers=cfg.num_layers)
    if cfg.ffn == "smoe":
        return SparseMoEFFN(
            cfg.num_tokens,
            cfg.dim,
            cfg.moe.num_experts,
            cfg.moe.expert_hidden(cfg.dim),
            router=cfg.moe.router,
            active_ratio=cfg.moe.active_ratio,
            top_k=cfg.moe.top_k,
            lambda_init=cfg.moe.lambda_init,
            lambda_lr=cfg.moe.lambda_lr,
            bias_lr=cfg.moe.bias_lr,
            balance_coef=cfg.moe.balance_coef,
            dtsi_mix=cfg.moe.dtsi_mix,
            **args,
        )
    if cfg.token_mixing == "all_concat_mlp":
        return ConcatMLP(cfg.num_tokens, cfg.dim, cfg.ffn_mult, **args)
    if cfg.ffn == "shared":
        return SharedFFN(cfg.dim, cfg.ffn_mult, **args)
    return PerTokenFFN(cfg.num_tokens, cfg.dim, cfg.ffn_mult, **args)


class RankMixerBlock(nn.Module):
    """Eq. 1: S = LN(TM(X) + X); X' = LN(FFN(S) + S). (T, B, D) -> (T, B, D)."""

    def __init__(self, cfg: RankMixerConfig) -> None:
        super().__init__()
        self.residual = cfg.residual
        self.token_mixing = build_token_mixing(cfg)
        self.ffn = build_ffn(cfg)
        has_mixing = self.token_mixing is not None
        self.norm1 = nn.LayerNorm(cfg.dim) if cfg.layer_norm and has_mixing else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.dim) if cfg.layer_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x  # (T, B, D)
        if isinstance(self.token_mixing, TokenMixing) and self.residual:
            s = self.norm1(self.token_mixing(x, residual=True))  # (T, B, D): TM(x) + x in one pass
        elif self.token_mixing is not None:
            mixed = self.token_mixing(x)  # (T, B, D)
            s = self.norm1(mixed + x if self.residual else mixed)  # (T, B, D)
        v = self.ffn(s)  # (T, B, D)
        return self.norm2(v + s if self.residual else v)  # (T, B, D)


class RankMixer(DenseArch):
    """Tokenizer -> L RankMixer blocks -> mean pool over tokens -> one head per task (logits)."""

    def __init__(self, cfg: RankMixerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        split = cfg.token_mixing != "all_share"
        self.tokenizer = SemanticTokenizer(cfg.group_dims, cfg.num_tokens, cfg.dim, split=split)
        self.blocks = nn.ModuleList(RankMixerBlock(cfg) for _ in range(cfg.num_layers))
        self.head = MultiTaskHead(cfg.dim, cfg.num_tasks, cfg.head_hidden, cfg.head_dropout)

    def forward(self, groups: list[torch.Tensor]) -> torch.Tensor:
        x = self.tokenizer(groups)  # list of (B, d_g) -> (T, B, D)
        for block in self.blocks:
            x = block(x)  # (T, B, D)
        pooled = x.mean(dim=0)  # (B, D): mean pooling over tokens
        return self.head(pooled)  # (B, num_tasks)

    def flops_per_sample(self, active_ratio: float | None = None) -> float:
        """Forward matmul FLOPs for one sample, from the config (multiply-add = 2). For ffn=smoe: None =
        dense-activated (every expert computed), a float = expected FLOPs with that fraction of experts
        active (`self.cfg.moe.expected_active_ratio` is the training target)."""
        return sum(flops_breakdown(self.cfg, active_ratio).values())

    # ---- DenseArch hooks: all Sparse-MoE (ffn=smoe); a dense FFN reports the defaults ---------------

    def moe_ffns(self) -> list[SparseMoEFFN]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, SparseMoEFFN)]

    def activated_flops_per_sample(self, eval_metrics: dict[str, float]) -> float:
        """At the active-expert ratio the evaluation measured (sparse inference skips the others)."""
        if self.moe_ffns() and ACTIVE_RATIO in eval_metrics:
            return self.flops_per_sample(eval_metrics[ACTIVE_RATIO])
        return self.flops_per_sample()

    def aux_loss(self) -> torch.Tensor | None:
        """lambda * L_reg (or the balance loss) summed over blocks; None for dense FFNs and plain top-k."""
        return moe_aux_loss(self.moe_ffns())

    def stats(self) -> dict[str, float]:
        return moe_stats(self.moe_ffns())

    def stats_summary(self, stats: dict[str, float]) -> str:
        return moe_stats_summary(stats)

    def eval_stats(self) -> dict[str, float]:
        return moe_eval_stats(self.moe_ffns())

    def lr_scales(self) -> dict[str, float]:
        """Sparse-MoE routers step at `moe.router_lr_scale` times the dense lr."""
        scales = {}
        for i, block in enumerate(self.blocks):
            if isinstance(block.ffn, SparseMoEFFN):
                routers = router_lr_scales(block.ffn, self.cfg.moe.router_lr_scale)
                scales.update({f"blocks.{i}.ffn.{name}": s for name, s in routers.items()})
        return scales

    def inference_modes(self) -> tuple[str, ...]:
        return ("dense",) if self.moe_ffns() else ()  # every expert computed, with the serving gates

    def use_inference_mode(self, mode: str | None) -> None:
        if mode not in (None, *self.inference_modes()):
            raise ValueError(f"RankMixer has no inference mode {mode!r} (modes: {self.inference_modes()})")
        set_sparse_inference(self.moe_ffns(), sparse=mode is None)
