"""Dense optimizer wiring: router parameters step at their own lr through warmup, clipping stays global."""

import pytest
import torch

from models.moe import SparseMoEFFN
from pipeline.config import DenseOptimConfig
from pipeline.optim import build_dense_optimizer


def _lrs(opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, float]:
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    return {name: lr_of[id(p)] for name, p in model.named_parameters()}


def _step(opt: torch.optim.Optimizer, model: SparseMoEFFN) -> None:
    x = torch.randn(model.num_tokens, 8, model.dim)
    loss = model(x).square().mean() + model.aux_loss()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_router_parameters_get_the_scaled_lr_after_warmup_and_the_rest_the_full_lr():
    torch.manual_seed(0)
    moe = SparseMoEFFN(num_tokens=2, dim=8, num_experts=4, expert_hidden=16)
    cfg = DenseOptimConfig(lr=0.01, warmup_steps=4, router_lr_scale=0.1)
    opt = build_dense_optimizer(dict(moe.named_parameters()), cfg)
    for _ in range(6):
        _step(opt, moe)
    lrs = _lrs(opt, moe)
    routers = {n for n in lrs if "router_" in n}
    assert routers == {"router_w", "router_b", "train_router_w", "train_router_b"}
    for name, lr in lrs.items():
        assert lr == pytest.approx(0.001 if name in routers else 0.01), name


def test_router_lr_scale_one_keeps_a_single_group_and_warmup_ramps_it():
    moe = SparseMoEFFN(num_tokens=2, dim=8, num_experts=4, expert_hidden=16)
    cfg = DenseOptimConfig(lr=0.01, warmup_steps=10, router_lr_scale=1.0)
    opt = build_dense_optimizer(dict(moe.named_parameters()), cfg)
    _step(opt, moe)
    assert _lrs(opt, moe) == {n: pytest.approx(0.0019) for n, _ in moe.named_parameters()}  # 0.1 + 0.9/10


def test_router_group_state_round_trips_through_state_dict():
    torch.manual_seed(0)
    moe = SparseMoEFFN(num_tokens=2, dim=8, num_experts=4, expert_hidden=16)
    cfg = DenseOptimConfig(lr=0.01, warmup_steps=4, router_lr_scale=0.1)
    opt = build_dense_optimizer(dict(moe.named_parameters()), cfg)
    for _ in range(2):
        _step(opt, moe)
    state = opt.state_dict()
    fresh = build_dense_optimizer(dict(moe.named_parameters()), cfg)
    fresh.init_state()  # as the checkpoint loader does: keyed optimizers load into existing state
    fresh.load_state_dict(state)  # warmup iteration restored: the lrs continue, not restart
    assert _lrs(fresh, moe) == _lrs(opt, moe)
    assert _lrs(fresh, moe)["router_w"] == pytest.approx(
        0.001 * (0.25 + 0.75 * 2 / 4)
    )  # torchrec's linear ramp at step 2 of 4
