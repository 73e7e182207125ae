"""The baseline dense archs' configs (models/baselines.py), apart from the modules: pure dataclasses that
import neither torch nor TorchRec, so Hydra can type-check a baseline preset anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DLRMConfig:
    group_dims: list[int] = field(default_factory=list)
    num_tasks: int = 2
    num_tokens: int = 8  # F sparse-feature vectors for the dot interaction
    dim: int = 64  # D: width of every feature vector (the bottom MLP ends at D too)
    mlp_width: int = 256  # hidden width of the bottom and over MLPs
    bottom_layers: int = 1  # bottom MLP on the flat input: [mlp_width] * bottom_layers, then -> D
    over_layers: int = 2  # over MLP on [bottom output, pairwise dots]: [mlp_width] * over_layers
    head_hidden: list[int] = field(default_factory=list)
    head_dropout: float = 0.0  # MultiTaskHead: on the towers' input and hidden activations

    @property
    def bottom_mlp(self) -> list[int]:
        return [self.mlp_width] * self.bottom_layers + [self.dim]

    @property
    def over_mlp(self) -> list[int]:
        return [self.mlp_width] * self.over_layers


@dataclass
class DCNv2Config:
    group_dims: list[int] = field(default_factory=list)
    num_tasks: int = 2
    cross_layers: int = 3
    low_rank: int = 64  # r of W = U V^T in every cross layer (DCN-Mix without experts)
    deep_width: int = 256  # deep ReLU MLP stacked after the cross net: [deep_width] * deep_layers
    deep_layers: int = 2
    head_hidden: list[int] = field(default_factory=list)
    head_dropout: float = 0.0  # MultiTaskHead: on the towers' input and hidden activations

    @property
    def deep_mlp(self) -> list[int]:
        return [self.deep_width] * self.deep_layers


@dataclass
class AutoIntConfig:
    group_dims: list[int] = field(default_factory=list)
    num_tasks: int = 2
    num_tokens: int = 8  # feature vectors attended over
    dim: int = 64  # D
    num_layers: int = 3
    num_heads: int = 2
    head_hidden: list[int] = field(default_factory=list)
    head_dropout: float = 0.0  # MultiTaskHead: on the towers' input and hidden activations

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"autoint: dim={self.dim} not divisible by num_heads={self.num_heads}")


@dataclass
class WukongConfig:
    group_dims: list[int] = field(default_factory=list)
    num_tasks: int = 2
    num_tokens: int = 8  # n feature vectors in every layer (= fm_tokens + lc_tokens)
    dim: int = 64  # D
    num_layers: int = 2
    fm_tokens: int = 4  # n_F: tokens the factorization machine block emits
    fm_rank: int = 8  # k: optimized FM X (X^T Y) with Y (n, k) learnt, instead of the full n x n
    mlp_mult: int = 4  # FMB's MLP (on the flattened interactions) and the top MLP: one layer of mult * D
    head_hidden: list[int] = field(default_factory=list)
    head_dropout: float = 0.0  # MultiTaskHead: on the towers' input and hidden activations

    @property
    def fm_mlp(self) -> list[int]:
        return [self.mlp_mult * self.dim]

    @property
    def top_mlp(self) -> list[int]:
        return [self.mlp_mult * self.dim]

    def __post_init__(self) -> None:
        if not 0 < self.fm_tokens < self.num_tokens:
            raise ValueError(f"wukong: fm_tokens={self.fm_tokens} not in (0, num_tokens={self.num_tokens})")


@dataclass
class MMoEConfig:
    group_dims: list[int] = field(default_factory=list)
    num_tasks: int = 2
    num_experts: int = 4
    expert_hidden: int = 256  # every expert: W -> hidden -> out, ReLU
    expert_out: int = 128
    tower_hidden: int = 64  # per-task tower: out -> hidden -> 1
    head_dropout: float = 0.0  # on each task's mixed expert output and its tower's hidden activation
