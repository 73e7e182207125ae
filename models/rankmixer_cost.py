"""RankMixer's cost from its config alone: forward FLOPs per sample and parameters, by part.

Matmul FLOPs only (multiply-add = 2); LayerNorm, GELU, bias adds and softmax are elementwise and left out
(< 1% of the total at D >= 64). `blocks_ffn` is the term eq. 12 of the paper covers: 2kLTD^2 parameters,
4kLTD^2 forward FLOPs. Tests check both against the built module and torch's FLOP counter.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from models.heads import MultiTaskHead

if TYPE_CHECKING:
    from models.rankmixer import RankMixerConfig


def flops_breakdown(cfg: RankMixerConfig, active_ratio: float | None = None) -> dict[str, float]:
    """Forward matmul FLOPs per sample by part. `blocks_ffn` is the term eq. 12 covers (4kLTD^2). For
    ffn=smoe, `blocks_ffn` is 4 k_e N_e L T D^2 times the active ratio (None = 1: dense-activated), plus the
    inference router (2 L T D N_e) and the gate mix (2 L T N_e D times the ratio): inference FLOPs, the
    training forward also runs h_train (relu_dtsi) and a second mix."""
    T, D, L, kD = cfg.num_tokens, cfg.dim, cfg.num_layers, cfg.ffn_hidden
    W = cfg.input_width
    chunk = math.ceil(W / T)
    tokenizer = 2 * T * chunk * D if cfg.token_mixing != "all_share" else 2 * W * D
    mixing = 0.0
    if cfg.token_mixing == "self_attention":
        # Q, K, V, O projections for T tokens + scores (T x T x D) + weighted sum (T x T x D)
        mixing = L * (2 * T * D * 4 * D + 2 * 2 * T * T * D)
    # per-token, shared and concat FFNs all do 2 * (D x kD) matmuls per token: 4kTD^2 per layer
    blocks_ffn = L * 4 * kD * T * D
    head = MultiTaskHead.flops_per_sample_for(D, cfg.num_tasks, cfg.head_hidden)
    parts = {"tokenizer": float(tokenizer), "mixing": float(mixing), "blocks_ffn": float(blocks_ffn),
             "head": float(head)}  # fmt: skip
    if cfg.ffn == "smoe":
        ratio = 1.0 if active_ratio is None else active_ratio
        E, H = cfg.moe.num_experts, cfg.moe.expert_hidden(cfg.dim)
        parts["blocks_ffn"] = L * 4 * T * E * D * H * ratio
        parts["moe_router"] = float(L * 2 * T * D * E)
        parts["moe_gate_mix"] = L * 2 * T * E * D * ratio
    return parts


def expected_num_params(cfg: RankMixerConfig) -> dict[str, int]:
    """Parameter count by part, from the config alone. `blocks_ffn` is the term eq. 12 covers (2kLTD^2)."""
    T, D, L, kD = cfg.num_tokens, cfg.dim, cfg.num_layers, cfg.ffn_hidden
    W = cfg.input_width
    if cfg.token_mixing == "all_share":
        tokenizer = W * D + D
    else:
        tokenizer = T * math.ceil(W / T) * D + T * D
    if cfg.token_mixing == "all_concat_mlp":
        ffn = 2 * kD * T * D + kD + T * D
    elif cfg.ffn == "shared":
        ffn = 2 * kD * D + kD + D
    elif cfg.ffn == "smoe":
        E, H = cfg.moe.num_experts, cfg.moe.expert_hidden(cfg.dim)
        num_routers = 2 if cfg.moe.router == "relu_dtsi" else 1  # h_infer (+ h_train)
        ffn = T * E * (2 * D * H + H + D) + num_routers * T * (D * E + E)
    else:
        ffn = 2 * kD * T * D + T * kD + T * D
    mixing = 4 * D * D + 4 * D if cfg.token_mixing == "self_attention" else 0
    has_mixing = cfg.token_mixing in ("multi_head", "self_attention")
    norms = (2 * D) * (int(has_mixing) + 1) if cfg.layer_norm else 0
    head = MultiTaskHead.num_params_for(D, cfg.num_tasks, cfg.head_hidden)
    return {"tokenizer": tokenizer, "mixing": L * mixing, "blocks_ffn": L * ffn, "norms": L * norms,
            "head": head}  # fmt: skip
