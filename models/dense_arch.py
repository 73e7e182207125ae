"""`DenseArch`: the one interface between the pipeline and every dense arch (RankMixer and the baselines).

A dense arch maps the semantic groups, `list[(B, d_g)]`, to logits `(B, num_tasks)`. Whatever an arch does
beyond that (Sparse-MoE's auxiliary loss, routing statistics, its routers' smaller lr, sparse vs
all-experts inference) reaches the pipeline only through the methods below, whose defaults describe a plain
arch with none of it. So `pipeline/` never asks which arch it is training, and a new arch with a feature of
its own overrides a method here instead of teaching the pipeline a new name.
"""

from __future__ import annotations

import torch
from torch import nn


class DenseArch(nn.Module):
    """Base of every dense arch: `forward(groups) -> (B, num_tasks)` logits, plus the hooks below."""

    def forward(self, groups: list[torch.Tensor]) -> torch.Tensor:  # list of (B, d_g) -> (B, num_tasks)
        raise NotImplementedError

    def num_params(self) -> int:
        """Dense parameters actually in the module (works on the meta device)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_sample(self, active_ratio: float | None = None) -> float:
        """Forward matmul FLOPs for one sample (multiply-add = 2). Archs with conditional computation take
        the fraction of it that is active (None: all of it); the others ignore `active_ratio`."""
        raise NotImplementedError

    def activated_flops_per_sample(self, eval_metrics: dict[str, float]) -> float:
        """FLOPs per sample at serving, given the metrics of an evaluation (which hold the measured
        `eval_stats()`): all of `flops_per_sample()` unless the arch computes only part of itself."""
        return self.flops_per_sample()

    def aux_loss(self) -> torch.Tensor | None:
        """The auxiliary loss term of the last training forward, added to the task loss; None if none."""
        return None

    def stats(self) -> dict[str, float]:
        """Statistics of the last training forward, logged with the train loss (metrics.jsonl, TensorBoard)
        under these keys."""
        return {}

    def stats_summary(self, stats: dict[str, float]) -> str:
        """One human-readable log line of `stats()` ("" logs nothing)."""
        return ""

    def eval_stats(self) -> dict[str, float]:
        """Statistics of the last evaluation forward; the evaluation reports their mean over batches and
        ranks with its metrics (every rank must return the same keys)."""
        return {}

    def lr_scales(self) -> dict[str, float]:
        """{parameter name (as in `named_parameters()`): lr multiplier} for parameters that step at a scaled
        dense lr; parameters not named step at the dense lr."""
        return {}

    def inference_modes(self) -> tuple[str, ...]:
        """Alternatives to the serving computation that evaluation also reports, each as
        `test_<mode>_inference` (e.g. Sparse-MoE's "dense": every expert computed with the same gates)."""
        return ()

    def use_inference_mode(self, mode: str | None) -> None:
        """Switch eval-mode forwards to one of `inference_modes()`; None: back to the serving computation."""
        if mode is not None:
            raise ValueError(f"{type(self).__name__} has no inference mode {mode!r}")
