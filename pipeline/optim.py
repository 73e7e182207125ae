"""Hybrid optimisation (paper s4.1, DESIGN s4): embedding tables on Adagrad fused into the backward by
TorchRec/FBGEMM; dense parameters (DDP-replicated) on RMSProp with linear warmup and global-norm clipping.
Both live behind one `CombinedOptimizer`, whose `state_dict()` is what the checkpoint saves -- the fused
Adagrad state included, so a resume does not silently restart Adagrad.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.clipping import GradientClipping, GradientClippingOptimizer
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.warmup import WarmupOptimizer, WarmupPolicy, WarmupStage

from pipeline.config import DenseOptimConfig, SparseOptimConfig


def fuse_sparse_optimizer(sparse_module: nn.Module, cfg: SparseOptimConfig) -> None:
    """Mark the embedding tables for Adagrad-in-backward; the sharder turns this into FBGEMM's fused kernel.
    Call before `DistributedModelParallel`."""
    apply_optimizer_in_backward(
        torch.optim.Adagrad, sparse_module.parameters(), {"lr": cfg.lr, "eps": cfg.eps}
    )


def set_initial_accumulator(dmp: DistributedModelParallel, value: float) -> None:
    """FBGEMM's fused Adagrad starts its accumulators at 0 and takes no initial value, so set it here (once,
    before training; a resume overwrites it with the saved state)."""
    if value == 0.0:
        return
    for state in dmp.fused_optimizer.state.values():
        for tensor in state.values():
            local = tensor.local_shards() if hasattr(tensor, "local_shards") else None
            for t in [s.tensor for s in local] if local is not None else [tensor]:
                t.fill_(value)


def _dense_optimizer_factory(cfg: DenseOptimConfig):  # noqa: ANN202 - returns a params -> Optimizer callable
    name = cfg.name.lower()
    if name == "rmsprop":
        return lambda p: torch.optim.RMSprop(
            p, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if name == "adam":
        return lambda p: torch.optim.Adam(p, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if name == "adagrad":
        return lambda p: torch.optim.Adagrad(p, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if name == "sgd":
        return lambda p: torch.optim.SGD(p, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.dense.name: unknown optimizer {cfg.name!r} (rmsprop | adam | adagrad | sgd)")


def build_optimizer(dmp: DistributedModelParallel, cfg: DenseOptimConfig) -> CombinedOptimizer:
    """sparse (fused, already stepping inside backward) + dense (clip -> warmup -> RMSProp)."""
    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    dense: torch.optim.Optimizer = KeyedOptimizerWrapper(dense_params, _dense_optimizer_factory(cfg))
    if cfg.grad_clip_norm > 0:
        dense = GradientClippingOptimizer(
            dense, clipping=GradientClipping.NORM, max_gradient=cfg.grad_clip_norm
        )
    if cfg.warmup_steps > 0:
        dense = WarmupOptimizer(
            dense,
            stages=[
                WarmupStage(WarmupPolicy.LINEAR, max_iters=cfg.warmup_steps, value=1.0 / cfg.warmup_steps)
            ],
            lr=cfg.lr,
        )
    return CombinedOptimizer([("sparse", dmp.fused_optimizer), ("dense", dense)])
