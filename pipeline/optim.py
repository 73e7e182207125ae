"""Hybrid optimisation (paper s4.1, DESIGN s4): embedding tables on (exact or row-wise) Adagrad fused into
the backward by TorchRec/FBGEMM; dense parameters (DDP-replicated) on RMSProp with linear warmup, then a
constant, cosine or step schedule, and global-norm clipping.
Both live behind one `CombinedOptimizer`, whose `state_dict()` is what the checkpoint saves -- the fused
Adagrad state included, so a resume does not silently restart Adagrad.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.clipping import GradientClipping, GradientClippingOptimizer
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from torchrec.optim.warmup import WarmupOptimizer

from pipeline.config import (
    DenseOptimConfig,
    DenseOptimizer,
    LrSchedule,
    SparseOptimConfig,
    SparseOptimizer,
)


def fuse_sparse_optimizer(sparse_module: nn.Module, cfg: SparseOptimConfig) -> None:
    """Mark the embedding tables for `optim.sparse.type` in the backward; the sharder turns this into
    FBGEMM's fused kernel (exact Adagrad: EXACT_ADAGRAD, row-wise: EXACT_ROWWISE_ADAGRAD). Call before
    `DistributedModelParallel`."""
    kind = SparseOptimizer.parse(cfg.type, "optim.sparse.type")
    optimizer_class = RowWiseAdagrad if kind == SparseOptimizer.rowwise_adagrad else torch.optim.Adagrad
    apply_optimizer_in_backward(optimizer_class, sparse_module.parameters(), {"lr": cfg.lr, "eps": cfg.eps})


def sparse_state_bytes(dmp: DistributedModelParallel) -> int:
    """Bytes of the fused sparse optimizer's state on this rank (exact Adagrad: one value per table
    element; row-wise: one per row)."""
    return sum(t.numel() * t.element_size() for t in _sparse_state_tensors(dmp))


def _sparse_state_tensors(dmp: DistributedModelParallel) -> list[torch.Tensor]:
    """This rank's local tensors of the fused sparse optimizer's state (sharded tensors: their shards)."""
    tensors = []
    for state in dmp.fused_optimizer.state.values():
        for tensor in state.values():
            local = tensor.local_shards() if hasattr(tensor, "local_shards") else None
            tensors += [s.tensor for s in local] if local is not None else [tensor]
    return tensors


def set_initial_accumulator(dmp: DistributedModelParallel, value: float) -> None:
    """FBGEMM's fused Adagrad starts its accumulators at 0 and takes no initial value, so set it here (once,
    before training; a resume overwrites it with the saved state)."""
    if value == 0.0:
        return
    for t in _sparse_state_tensors(dmp):
        t.fill_(value)


def _dense_optimizer_factory(cfg: DenseOptimConfig, scale_of: dict[int, float]):  # noqa: ANN202
    """params -> Optimizer with one param group per lr multiplier (`lr_scale`, keyed by parameter id).
    Every group's lr is cfg.lr * lr_scale.

    foreach=True, which torch picks by itself only for CUDA tensors: on CPU its default is a Python loop of
    ~6 ops per parameter, while the foreach ops run the same per-tensor arithmetic from one call each, so
    the update is bitwise the same (tests/test_step_overhead.py)."""
    common = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "foreach": True}
    makers = {
        "rmsprop": lambda g: torch.optim.RMSprop(
            g, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum, **common
        ),
        "adam": lambda g: torch.optim.Adam(g, eps=cfg.eps, **common),
        "adagrad": lambda g: torch.optim.Adagrad(g, eps=cfg.eps, **common),
        "sgd": lambda g: torch.optim.SGD(g, momentum=cfg.momentum, **common),
    }

    def factory(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        by_scale: dict[float, list[torch.Tensor]] = {}
        for p in params:  # first-seen order of the scales: the full-lr group first, as before
            by_scale.setdefault(scale_of[id(p)], []).append(p)
        groups = [{"params": ps, "lr_scale": s, "lr": cfg.lr * s} for s, ps in by_scale.items()]
        return makers[DenseOptimizer.parse(cfg.name, "optim.dense.name")](groups)

    return factory


def lr_multiplier(step: int, cfg: DenseOptimConfig, total_steps: int = 0) -> float:
    """The dense lr at `step` (steps done) as a fraction of `cfg.lr`: linear warmup from 1/warmup_steps
    to 1 over warmup_steps, then the schedule, counted from the end of warmup."""
    warmup = max(cfg.warmup_steps, 0)
    if warmup and step <= warmup:
        return 1.0 / warmup + (1.0 - 1.0 / warmup) * step / warmup
    after = step - warmup
    if cfg.schedule == "step":
        return cfg.step_gamma ** (after // cfg.step_size)
    if cfg.schedule == "cosine":
        length = cfg.decay_steps if cfg.decay_steps > 0 else total_steps - warmup
        t = min(1.0, after / max(length, 1))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0


class ScheduledOptimizer(WarmupOptimizer):
    """The dense lr schedule (`lr_multiplier`), times each param group's `lr_scale`.

    Why TorchRec's WarmupOptimizer and not torch.optim.lr_scheduler: a torch LRScheduler keeps its step
    count in its own state_dict, outside the CombinedOptimizer's, which is what the DCP checkpoint saves;
    WarmupOptimizer keeps it in the optimizer state ("__warmup"), so resume restores the schedule with
    everything else. Its own policies count steps from 0, not from the end of warmup, so they cannot say
    "cosine from warmup to step T": the multiplier is ours."""

    def __init__(self, optimizer: KeyedOptimizer, cfg: DenseOptimConfig, total_steps: int) -> None:
        self._cfg, self._total_steps = cfg, total_steps  # read by _set_lr, which the base init calls
        super().__init__(optimizer, stages=[], lr=cfg.lr)

    def _set_lr(self, iter_: int, stage_id: int) -> None:
        lr = self._cfg.lr * lr_multiplier(iter_, self._cfg, self._total_steps)
        for group in self.param_groups:
            group[self._lr_param] = lr * group.get("lr_scale", 1.0)


def build_dense_optimizer(
    named_params: dict[str, torch.Tensor],
    cfg: DenseOptimConfig,
    lr_scales: dict[int, float] | None = None,
    total_steps: int = 0,
) -> KeyedOptimizer:
    """lr schedule -> clip -> RMSProp over the dense parameters. Parameters in `lr_scales` (keyed by
    parameter id: the model's `lr_scales()`) step at that multiple of the scheduled lr, the rest at the
    scheduled lr; the clipping norm is global. `total_steps` (the run's) ends a cosine schedule."""
    LrSchedule.parse(cfg.schedule, "optim.dense.schedule")
    scale_of = {id(p): (lr_scales or {}).get(id(p), 1.0) for p in named_params.values()}
    dense: KeyedOptimizer = KeyedOptimizerWrapper(named_params, _dense_optimizer_factory(cfg, scale_of))
    if cfg.grad_clip_norm > 0:
        dense = GradientClippingOptimizer(
            dense, clipping=GradientClipping.NORM, max_gradient=cfg.grad_clip_norm
        )
    if cfg.warmup_steps > 0 or cfg.schedule != "constant":
        dense = ScheduledOptimizer(dense, cfg, total_steps)
    return dense


def build_optimizer(
    dmp: DistributedModelParallel,
    cfg: DenseOptimConfig,
    lr_scales: dict[int, float] | None = None,
    total_steps: int = 0,
) -> CombinedOptimizer:
    """sparse (fused, already stepping inside backward) + dense (`build_dense_optimizer`)."""
    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    dense = build_dense_optimizer(dense_params, cfg, lr_scales, total_steps)
    return CombinedOptimizer([("sparse", dmp.fused_optimizer), ("dense", dense)])
