"""Per-task output towers shared by RankMixer and the baseline dense archs.

Pure torch: one small MLP tower per task over a pooled representation, outputs raw logits (the loss
applies the sigmoid). Towers are separate modules rather than one wide matmul because they are tiny
(D -> hidden -> 1) and separate towers keep each task's parameters isolated, as in the paper's
"one head per task".
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def full_precision(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context that turns autocast off on `x`'s device: task heads run in fp32 whatever the body's
    precision. A bf16 logit has 8 significant bits, ~128 distinct values per power of two, so millions of
    scores tie in exact AUC / UAUC at the 1e-3 level models are compared at; the loss wants fp32 too.
    Under TrainPipelineSparseDist's fx tracing (`x` a Proxy, no device) it is a no-op: the tracer only
    reads the graph to find the input dists; the module's own forward is what runs."""
    if isinstance(x, torch.fx.Proxy):
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)


class MultiTaskHead(nn.Module):
    """(B, in_dim) -> (B, num_tasks) logits; hidden = [] gives one linear layer per task. `dropout` is
    applied to the towers' input and to every hidden activation (training only)."""

    def __init__(self, in_dim: int, num_tasks: int, hidden: list[int], dropout: float = 0.0) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"head dropout must be in [0, 1), got {dropout}")
        self.in_dim = in_dim
        self.num_tasks = num_tasks
        self.hidden = list(hidden)
        self.dropout = nn.Dropout(dropout)
        self.towers = nn.ModuleList(self._tower(in_dim, self.hidden, dropout) for _ in range(num_tasks))

    @staticmethod
    def _tower(in_dim: int, hidden: list[int], dropout: float) -> nn.Sequential:
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        return nn.Sequential(*layers)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        # pooled: (B, in_dim); a loop over tasks (2-3 of them), not over tokens or samples
        with full_precision(pooled):
            pooled = self.dropout(pooled.float())
            return torch.cat([tower(pooled) for tower in self.towers], dim=-1)  # (B, num_tasks) fp32

    def num_params(self) -> int:
        return self.num_params_for(self.in_dim, self.num_tasks, self.hidden)

    def flops_per_sample(self) -> float:
        return self.flops_per_sample_for(self.in_dim, self.num_tasks, self.hidden)

    @staticmethod
    def num_params_for(in_dim: int, num_tasks: int, hidden: list[int]) -> int:
        """Parameter count of the towers, from their sizes alone."""
        widths = [in_dim, *hidden, 1]
        return num_tasks * sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))

    @staticmethod
    def flops_per_sample_for(in_dim: int, num_tasks: int, hidden: list[int]) -> float:
        """Matmul FLOPs (multiply-add = 2) of all towers for one sample."""
        widths = [in_dim, *hidden, 1]
        return float(num_tasks * sum(2 * a * b for a, b in zip(widths[:-1], widths[1:])))
