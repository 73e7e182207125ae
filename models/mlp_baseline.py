"""DLRM-style MLP over the concatenated tokenizer input, pure torch: the equal-parameter baseline that
`launch/bench.py dense` times against the RankMixer dense arch. `hidden_for_params` solves the hidden
width for a parameter budget; `flops_per_sample` counts matmul FLOPs (multiply-add = 2), as RankMixer's."""

from __future__ import annotations

import math

import torch
from torch import nn

from models.dense_arch import DenseArch


class MLPBaseline(DenseArch):
    """DLRM-style top MLP over the concatenated tokenizer input: W -> h -> ... -> h -> num_tasks, ReLU."""

    def __init__(self, in_dim: int, hidden: int, num_hidden: int, num_tasks: int) -> None:
        super().__init__()
        widths = [in_dim] + [hidden] * num_hidden
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_tasks))
        self.mlp = nn.Sequential(*layers)

    def forward(self, groups: list[torch.Tensor]) -> torch.Tensor:
        return self.mlp(torch.cat(groups, dim=-1))  # (B, W) -> (B, num_tasks)

    def flops_per_sample(self, active_ratio: float | None = None) -> float:
        return float(sum(2 * m.in_features * m.out_features for m in self.mlp if isinstance(m, nn.Linear)))

    @staticmethod
    def hidden_for_params(in_dim: int, num_hidden: int, num_tasks: int, target: int) -> int:
        # params = (in_dim + 1) h + (num_hidden - 1)(h^2 + h) + (h + 1) num_tasks; solve for h
        a = num_hidden - 1
        b = in_dim + 1 + (num_hidden - 1) + num_tasks
        c = num_tasks - target
        h = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a) if a else -c / b
        return max(1, round(h))
