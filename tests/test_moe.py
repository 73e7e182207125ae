"""Tests for the Sparse-MoE per-token FFN (models/moe.py) and its wiring into RankMixer (ffn=smoe).

Tiny shapes only: the whole file runs in a few seconds on 2 CPU cores.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from launch.benchmarks.dense import load_preset
from models.moe import DTSI_MIXES, MoEConfig, SparseMoEFFN
from models.rankmixer import RankMixer, RankMixerConfig
from models.rankmixer_cost import expected_num_params, flops_breakdown

GROUP_DIMS = [24, 16, 13]
T, D, E, H, B = 3, 8, 4, 12, 6  # tokens, width, experts per token, expert hidden, batch


@pytest.fixture(autouse=True)
def _seed_and_one_thread() -> Iterator[None]:
    """Tiny shapes gain nothing from intra-op threads; on a loaded 2-core box threads make them 10x slower."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_ffn(**kwargs) -> SparseMoEFFN:
    return SparseMoEFFN(T, D, E, H, **kwargs)


def tiny_cfg(moe: dict | None = None, **overrides) -> RankMixerConfig:
    fields = dict(group_dims=GROUP_DIMS, num_tasks=2, num_tokens=4, dim=16, num_layers=2, ffn="smoe")
    experts = MoEConfig(**{"num_experts": 4, "expert_mult": 1.5, **(moe or {})})
    return RankMixerConfig(**{**fields, **overrides}, moe=experts)


def tiny_groups(batch: int = B, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, d, generator=gen) for d in GROUP_DIMS]


def _grads(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


# ---- DTSI router gradients ---------------------------------------------------------------------


@pytest.mark.parametrize("dtsi_mix", DTSI_MIXES)
def test_h_infer_gets_task_and_l_reg_gradient_h_train_only_task(dtsi_mix: str) -> None:
    ffn = tiny_ffn(dtsi_mix=dtsi_mix).train()
    x = torch.randn(T, B, D)
    lam = ffn.lambda_.item()  # the forward uses this lambda, then updates it
    with torch.no_grad():
        gates = F.relu(ffn.router_logits(x))  # (T, B, E), before the forward moves the controller bias
    v = ffn(x)  # (T, B, D)
    task_loss = (v * torch.randn_like(v)).sum()
    aux = ffn.aux_loss()
    assert aux is not None and aux.item() > 0
    infer, train = [ffn.router_w, ffn.router_b], [ffn.train_router_w, ffn.train_router_b]
    task_infer, task_train = _grads(task_loss, infer), _grads(task_loss, train)
    reg_infer, reg_train = _grads(aux, infer), _grads(aux, train)
    assert all(g.abs().sum() > 0 for g in task_infer), "h_infer must get the task gradient"
    assert all(g.abs().sum() > 0 for g in reg_infer), "h_infer must get the L_reg gradient"
    assert all(g.abs().sum() > 0 for g in task_train), "h_train must get the task gradient"
    assert all(g.abs().sum() == 0 for g in reg_train), "h_train must get no L_reg gradient"
    assert all(g.abs().sum() == 0 for g in _grads(aux, [ffn.w1, ffn.w2])), "L_reg reaches routers only"
    # L_reg = eq. 11 per sample: d(lambda * L_reg)/d b_infer[t, j] = lambda * (active fraction of the slot)
    torch.testing.assert_close(reg_infer[1], lam * (gates > 0).float().mean(dim=1, keepdim=True))


@pytest.mark.parametrize("dtsi_mix", DTSI_MIXES)
def test_dtsi_trains_experts_that_h_infer_switched_off(dtsi_mix: str) -> None:
    """Dense training: an expert with G_infer = 0 everywhere but G_train > 0 still gets the task gradient."""
    ffn = tiny_ffn(dtsi_mix=dtsi_mix).train()
    with torch.no_grad():
        ffn.router_b[1, 0, 2] = -1e3  # token 1, expert 2: off under h_infer for every sample
        ffn.train_router_b[1, 0, 2] = 1e3  # ... and on under h_train
    v = ffn(torch.randn(T, B, D))
    (w1_grad,) = _grads((v * torch.randn_like(v)).sum(), [ffn.w1])
    assert w1_grad[1, 2].abs().sum() > 0


def test_infer_value_train_forward_equals_inference() -> None:
    """infer_value has no train/serve gap: the training forward value is the sparse inference output
    (bias_lr=0: the activation-bias controller would move h_infer between the two forwards)."""
    ffn = tiny_ffn(dtsi_mix="infer_value", bias_lr=0.0)
    x = torch.randn(T, B, D)
    train_out = ffn.train()(x)
    ffn.eval()
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), train_out.detach(), atol=1e-6, rtol=1e-5)


# ---- sparse inference --------------------------------------------------------------------------


def _dense_and_sparse(ffn: SparseMoEFFN, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ffn.eval()
    with torch.no_grad():
        ffn.sparse_inference = False
        dense = ffn(x)
        ffn.sparse_inference = True
        sparse = ffn(x)
    return dense, sparse


def test_sparse_inference_equals_dense_with_the_same_gates() -> None:
    ffn = tiny_ffn()
    with torch.no_grad():
        ffn.b1.normal_()
        ffn.b2.normal_()
        ffn.router_b.normal_(std=0.5)
    x = torch.randn(T, 40, D)
    dense, sparse = _dense_and_sparse(ffn, x)
    gates, active = ffn.inference_gates(x)
    assert 0 < active.float().mean() < 1  # a real mix of active and inactive experts
    assert ffn.last_active_pairs == int(active.sum())
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    # and dense is eq. 10 written literally
    expected = torch.zeros(T, 40, D)
    for t in range(T):
        for j in range(E):
            h = F.gelu(x[t] @ ffn.w1[t, j] + ffn.b1[t, j])
            expected[t] += gates[t, :, j : j + 1] * (h @ ffn.w2[t, j] + ffn.b2[t, j])
    torch.testing.assert_close(dense, expected.detach(), atol=1e-5, rtol=1e-5)


def test_all_active_sparse_equals_dense_and_computes_every_row() -> None:
    ffn = tiny_ffn()
    with torch.no_grad():
        ffn.router_b.fill_(100.0)  # every gate > 0
    x = torch.randn(T, B, D)
    dense, sparse = _dense_and_sparse(ffn, x)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    assert ffn.last_active_pairs == ffn.last_sparse_rows == T * E * B


def test_sparse_inference_never_touches_inactive_experts() -> None:
    ffn = tiny_ffn()
    with torch.no_grad():
        ffn.router_b[:, :, 0] = 100.0  # expert 0 on for every token and sample, the others off
        ffn.router_b[:, :, 1:] = -100.0
        ffn.w1[:, 1:] = float("nan")  # computing any inactive expert would poison the output
    x = torch.randn(T, B, D)
    dense, sparse = _dense_and_sparse(ffn, x)
    assert torch.isnan(dense).all() and torch.isfinite(sparse).all()
    assert ffn.last_active_pairs == ffn.last_sparse_rows == T * B
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        ffn(x)
    router = 2 * T * B * D * E
    assert counter.get_total_flops() == router + T * B * 4 * D * H  # one expert per token and sample


def test_sparse_flops_fall_with_the_active_ratio() -> None:
    ffn = tiny_ffn().eval()
    x = torch.randn(T, 64, D)
    flops = {}
    for k in (4, 2, 1):
        ffn.inference_top_k = k
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            ffn(x)
        assert ffn.last_active_pairs == T * 64 * k
        # padding: each active slot is rounded up to a multiple of ceil(max_count / num_buckets)
        assert ffn.last_sparse_rows <= ffn.last_active_pairs + T * E * (64 // ffn.num_buckets)
        flops[k] = counter.get_total_flops() - 2 * T * 64 * D * E  # experts only
        assert flops[k] == ffn.last_sparse_rows * 4 * D * H
    assert flops[4] > flops[2] > flops[1]
    assert flops[1] < 0.4 * flops[4]


# ---- adaptive lambda ---------------------------------------------------------------------------


def test_lambda_controller_steers_the_active_ratio_to_the_target() -> None:
    cfg = tiny_cfg(
        moe=dict(
            num_experts=8,
            active_ratio=0.25,
            lambda_init=1e-3,
            lambda_lr=0.1,
            bias_lr=0.0,
            dtsi_mix="infer_value",  # lambda alone: no bias controller; a mix that keeps gates on
        )
    )
    model = RankMixer(cfg)
    groups = tiny_groups(batch=64, seed=1)
    labels = (torch.cat(groups, -1)[:, :2] > 0).float()
    opt = torch.optim.RMSprop(model.parameters(), lr=3e-3)
    ratios, max_lambda = [], 0.0
    for _ in range(250):
        loss = F.binary_cross_entropy_with_logits(model(groups), labels) + model.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ratios.append(model.stats()["moe/active_ratio"])
        max_lambda = max([max_lambda] + [ffn.lambda_.item() for ffn in model.moe_ffns()])
    start, end = ratios[0], sum(ratios[-50:]) / 50
    assert start > 0.4  # ReLU gates of zero-mean logits: about half active at init
    assert abs(end - 0.25) < 0.05, (start, end)
    assert max_lambda > 10 * cfg.moe.lambda_init  # lambda had to rise to push the ratio down
    # eval forwards leave lambda alone
    lambdas = [ffn.lambda_.clone() for ffn in model.moe_ffns()]
    model.eval()
    with torch.no_grad():
        model(groups)
    assert all(torch.equal(a, f.lambda_) for a, f in zip(lambdas, model.moe_ffns()))


def _train_ratio(cfg: RankMixerConfig, steps: int, lr: float = 1e-2) -> float:
    """Trains a RankMixer on a toy task; the mean active ratio of the last 50 steps."""
    torch.manual_seed(0)
    model = RankMixer(cfg)
    groups = tiny_groups(batch=64, seed=1)
    labels = (torch.cat(groups, -1)[:, :2] > 0).float()
    opt = torch.optim.RMSprop(model.parameters(), lr=lr)
    ratios = []
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(model(groups), labels) + model.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ratios.append(model.stats()["moe/active_ratio"])
    return sum(ratios[-50:]) / 50


def test_activation_bias_holds_a_target_above_where_the_task_gradient_drives_the_gates():
    # L1 can only push gates down: when the task gradient switches experts off (reports/moe.md), lambda
    # sits at its floor and the ratio stays under the target. The bias controller lifts it back.
    cfg = dict(num_experts=8, active_ratio=0.75, lambda_init=1e-3)
    without = _train_ratio(tiny_cfg(moe={**cfg, "bias_lr": 0.0}), 300)
    with_bias = _train_ratio(tiny_cfg(moe={**cfg, "bias_lr": 0.05}), 300)
    assert without < 0.65, without
    assert abs(with_bias - 0.75) < 0.05, (without, with_bias)


def test_lambda_steps_multiplicatively_in_both_directions_and_is_checkpointed() -> None:
    for target, direction in ((0.05, 1.0), (1.0, -1.0)):
        ffn = tiny_ffn(active_ratio=target, lambda_init=0.01, lambda_lr=0.5).train()
        ffn(torch.randn(T, B, D))
        active = ffn.stats()["active_ratio"]
        assert 0 < active < 1
        assert ffn.lambda_.item() == pytest.approx(0.01 * torch.exp(torch.tensor(0.5 * direction)).item())
    state = ffn.state_dict()
    assert "lambda_" in state and "last_active_ratio" not in state


# ---- top-k baselines ---------------------------------------------------------------------------


@pytest.mark.parametrize("router", ["topk", "topk_balanced"])
def test_top_k_baselines_select_exactly_k_experts(router: str) -> None:
    ffn = SparseMoEFFN(T, D, 8, H, router=router, active_ratio=0.25)
    assert ffn.top_k == 2  # k = N_e * ratio
    x = torch.randn(T, B, D)
    gates, active = ffn.inference_gates(x)
    assert (active.sum(-1) == 2).all() and ((gates > 0) == active).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(T, B))  # softmax over the selected k
    v = ffn.train()(x)
    assert ffn.stats()["active_ratio"] == pytest.approx(0.25)
    if router == "topk":
        assert ffn.aux_loss() is None
    else:
        balance = ffn.aux_loss()
        assert balance is not None and balance.item() > 0
        assert _grads(balance, [ffn.router_w])[0].abs().sum() > 0
    assert _grads(v.sum(), [ffn.router_w])[0].abs().sum() > 0  # the softmax weights carry the task gradient
    dense, sparse = _dense_and_sparse(ffn, x)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    assert ffn.last_active_pairs == T * B * 2


# ---- RankMixer wiring --------------------------------------------------------------------------


class _GroupsAsArgs(torch.nn.Module):
    """symbolic_trace needs tensor arguments; the pipeline passes the groups list built inside forward."""

    def __init__(self, model: RankMixer) -> None:
        super().__init__()
        self.model = model

    def forward(self, g0: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        return self.model([g0, g1, g2])


@pytest.mark.parametrize("router", ["relu_dtsi", "topk_balanced"])
def test_train_forward_is_fx_symbolically_traceable(router: str) -> None:
    model = RankMixer(tiny_cfg(moe=dict(router=router))).train()
    traced = torch.fx.symbolic_trace(_GroupsAsArgs(model))
    groups = tiny_groups()
    torch.testing.assert_close(traced(*groups), model(groups))
    # the FFN alone as well: its graph computes what its eager forward computes from the same state
    ffn = RankMixer(tiny_cfg(moe=dict(router=router))).train().blocks[0].ffn  # fresh: no forward run yet
    state = copy.deepcopy(ffn.state_dict())
    traced_ffn = torch.fx.symbolic_trace(ffn)  # shares ffn's tensors
    ffn.load_state_dict(state)  # tracing ran the controllers' in-place updates once, eagerly: undo them
    x = torch.randn(ffn.num_tokens, B, ffn.dim)
    out = traced_ffn(x)
    ffn.load_state_dict(state)
    torch.testing.assert_close(out, ffn(x))


def test_rankmixer_aux_loss_and_stats() -> None:
    model = RankMixer(tiny_cfg())
    model(tiny_groups())
    aux = model.aux_loss()
    torch.testing.assert_close(aux, sum(f.aux_loss() for f in model.moe_ffns()))
    stats = model.stats()
    keys = {"block0/lambda", "block1/active_ratio", "block0/expert_freq_min", "block0/train_gate_mean"}
    assert {f"moe/{k}" for k in keys} | {"moe/active_ratio"} <= set(stats)
    assert stats["moe/active_ratio"] == pytest.approx(
        (stats["moe/block0/active_ratio"] + stats["moe/block1/active_ratio"]) / 2
    )
    assert "block0/lambda" in model.stats_summary(stats)
    dense = RankMixer(tiny_cfg(ffn="per_token"))
    assert dense.aux_loss() is None and dense.stats() == {} and dense.stats_summary({}) == ""
    assert dense.eval_stats() == {} and dense.inference_modes() == () and dense.lr_scales() == {}
    with pytest.raises(ValueError, match="smoe"):
        tiny_cfg(token_mixing="all_concat_mlp")


@pytest.mark.parametrize("router", ["relu_dtsi", "topk"])
def test_counts_match_real_params_and_a_flop_counter(router: str) -> None:
    cfg = tiny_cfg(moe=dict(router=router), head_hidden=[8])
    model = RankMixer(cfg).eval()
    assert model.num_params() == sum(expected_num_params(cfg).values())
    model.use_inference_mode("dense")  # every expert computed: the dense-activated count
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(tiny_groups())
    assert counter.get_total_flops() == pytest.approx(B * model.flops_per_sample(), rel=1e-9)
    # expected activated FLOPs: the expert and gate-mix terms scale with the ratio, nothing else
    full, half = flops_breakdown(cfg), flops_breakdown(cfg, 0.5)
    assert half["blocks_ffn"] == 0.5 * full["blocks_ffn"] and half["moe_router"] == full["moe_router"]


# ---- presets -----------------------------------------------------------------------------------


def _preset_cfg(name: str, group_dims: list[int]) -> RankMixerConfig:
    return load_preset(name, group_dims, num_tasks=2)  # checks arch


def _eq12_experts(cfg: RankMixerConfig) -> float:
    """Eq. 12 with N_e experts of width k_e: #expert params ~ 2 k_e N_e L T D^2."""
    return 2 * cfg.moe.expert_mult * cfg.moe.num_experts * cfg.num_layers * cfg.num_tokens * cfg.dim**2


def test_small_smoe_preset_builds_on_meta_with_stated_counts() -> None:
    cfg = _preset_cfg("rankmixer_small_smoe", [256] * 16)  # bench default input: W = 4096
    with torch.device("meta"):
        model = RankMixer(cfg)
    assert model.num_params() == sum(expected_num_params(cfg).values()) == 34_872_322
    assert _eq12_experts(cfg) == pytest.approx(33.55e6, rel=0.01)  # 4x a dense k=2 per-token FFN (8.4M)
    dense_k2 = 4 * 2 * cfg.num_layers * cfg.num_tokens * cfg.dim**2
    activated = flops_breakdown(cfg, cfg.moe.expected_active_ratio)["blocks_ffn"]
    assert activated == dense_k2  # at the target 1/4 the activated FFN compute equals the dense k=2 FFN


def test_1b_smoe_preset_builds_on_meta_with_stated_counts() -> None:
    cfg = _preset_cfg("rankmixer_1b_smoe", [4096] * 10)  # the paper presets' assumed 40,960-wide input
    with torch.device("meta"):
        model = RankMixer(cfg)
    assert model.num_params() == sum(expected_num_params(cfg).values())
    assert model.num_params() == pytest.approx(4.90e9, rel=0.01)  # 8 x 0.604B experts + 63M tokenizer
    assert _eq12_experts(cfg) == pytest.approx(8 * 0.604e9, rel=0.01)
    dense_1b = 4 * 2 * cfg.num_layers * cfg.num_tokens * cfg.dim**2  # the 1B preset's FFN FLOPs (eq. 12)
    assert flops_breakdown(cfg, cfg.moe.expected_active_ratio)["blocks_ffn"] == dense_1b
    assert model.flops_per_sample() == pytest.approx(8 * dense_1b, rel=0.05)  # dense-activated


# ---- multi-rank lambda -------------------------------------------------------------------------


def _lambda_sync_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        ffn = tiny_ffn(active_ratio=0.45, lambda_init=0.01, lambda_lr=0.5).train()
        with torch.no_grad():  # rank 0 sees ~90% active gates, rank 1 ~10%: the mean is above 0.45
            ffn.router_b.fill_(2.0 if rank == 0 else -2.0)
        for _ in range(3):
            ffn(torch.randn(T, B, D))
        torch.save({"lambda": ffn.lambda_, "local": ffn.last_active_ratio}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_lambda_follows_the_active_ratio_averaged_over_ranks(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(
        _lambda_sync_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["local"] > 0.45 > r1["local"]  # alone, rank 1 would lower its lambda
    assert (
        r0["lambda"].item()
        == r1["lambda"].item()
        == pytest.approx(0.01 * torch.exp(torch.tensor(1.5)).item())
    )
