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
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
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


ROUTER_PARAM_MARK = "router_"  # SparseMoEFFN's router_w/_b (h_infer) and train_router_w/_b (h_train)


def _dense_optimizer_factory(cfg: DenseOptimConfig, lr: float):  # noqa: ANN202 - params -> Optimizer
    name = cfg.name.lower()
    if name == "rmsprop":
        return lambda p: torch.optim.RMSprop(
            p, lr=lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if name == "adam":
        return lambda p: torch.optim.Adam(p, lr=lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if name == "adagrad":
        return lambda p: torch.optim.Adagrad(p, lr=lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if name == "sgd":
        return lambda p: torch.optim.SGD(p, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.dense.name: unknown optimizer {cfg.name!r} (rmsprop | adam | adagrad | sgd)")


def _warmed_up(params: dict[str, torch.Tensor], cfg: DenseOptimConfig, lr: float) -> KeyedOptimizer:
    """One keyed optimizer at peak lr `lr` with its own linear warmup. TorchRec's `WarmupOptimizer` writes
    one lr into every param group it wraps, so a group with another lr needs its own warmup."""
    opt: KeyedOptimizer = KeyedOptimizerWrapper(params, _dense_optimizer_factory(cfg, lr))
    if cfg.warmup_steps > 0:
        opt = WarmupOptimizer(
            opt,
            stages=[
                WarmupStage(WarmupPolicy.LINEAR, max_iters=cfg.warmup_steps, value=1.0 / cfg.warmup_steps)
            ],
            lr=lr,
        )
    return opt


def build_dense_optimizer(named_params: dict[str, torch.Tensor], cfg: DenseOptimConfig) -> KeyedOptimizer:
    """clip -> warmup -> RMSProp over the dense parameters. Router parameters get
    `cfg.lr * cfg.router_lr_scale`; the clipping norm stays global over all dense grads."""
    router = {k: p for k, p in named_params.items() if ROUTER_PARAM_MARK in k.rsplit(".", 1)[-1]}
    dense: KeyedOptimizer
    if router and cfg.router_lr_scale != 1.0:
        rest = {k: p for k, p in named_params.items() if k not in router}
        dense = CombinedOptimizer(
            [
                ("main", _warmed_up(rest, cfg, cfg.lr)),
                ("router", _warmed_up(router, cfg, cfg.lr * cfg.router_lr_scale)),
            ]
        )
    else:
        dense = _warmed_up(named_params, cfg, cfg.lr)
    if cfg.grad_clip_norm > 0:
        dense = GradientClippingOptimizer(
            dense, clipping=GradientClipping.NORM, max_gradient=cfg.grad_clip_norm
        )
    return dense


def build_optimizer(dmp: DistributedModelParallel, cfg: DenseOptimConfig) -> CombinedOptimizer:
    """sparse (fused, already stepping inside backward) + dense (`build_dense_optimizer`)."""
    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    return CombinedOptimizer(
        [("sparse", dmp.fused_optimizer), ("dense", build_dense_optimizer(dense_params, cfg))]
    )
