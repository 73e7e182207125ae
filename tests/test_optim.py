"""Dense optimizer wiring: parameter groups the model names (`lr_scales()`: Sparse-MoE routers, the LONGER
module) step at their own lr through warmup, clipping stays global, and resume is exact."""

import copy

import pytest
import torch
from torchrec.optim.keyed import CombinedOptimizer

from data.schema import Schema
from models.config import ModelConfig
from models.longer import LongerConfig
from models.moe import MoEConfig, SparseMoEFFN, router_lr_scales
from models.ranking import RankingModel
from models.rankmixer import RankMixerConfig
from pipeline.config import DenseOptimConfig
from pipeline.job import lr_scales_by_param
from pipeline.optim import build_dense_optimizer, lr_multiplier


def router_scales(moe: SparseMoEFFN, scale: float) -> dict[int, float]:
    return {id(moe.get_parameter(n)): s for n, s in router_lr_scales(moe, scale).items()}


def _lrs(opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, float]:
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    return {name: lr_of[id(p)] for name, p in model.named_parameters()}


def _step(opt: torch.optim.Optimizer, model: SparseMoEFFN, seed: int = 0) -> None:
    x = torch.randn(model.num_tokens, 8, model.dim, generator=torch.Generator().manual_seed(seed))
    loss = model(x).square().mean() + model.aux_loss()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_router_parameters_get_the_scaled_lr_after_warmup_and_the_rest_the_full_lr():
    torch.manual_seed(0)
    moe = SparseMoEFFN(num_tokens=2, dim=8, num_experts=4, expert_hidden=16)
    cfg = DenseOptimConfig(lr=0.01, warmup_steps=4)
    opt = build_dense_optimizer(dict(moe.named_parameters()), cfg, router_scales(moe, 0.1))
    for _ in range(6):
        _step(opt, moe)
    lrs = _lrs(opt, moe)
    routers = {n for n in lrs if "router_" in n}
    assert routers == {"router_w", "router_b", "train_router_w", "train_router_b"}
    for name, lr in lrs.items():
        assert lr == pytest.approx(0.001 if name in routers else 0.01), name


def test_router_lr_scale_one_keeps_a_single_group_and_warmup_ramps_it():
    moe = SparseMoEFFN(num_tokens=2, dim=8, num_experts=4, expert_hidden=16)
    cfg = DenseOptimConfig(lr=0.01, warmup_steps=10)
    opt = build_dense_optimizer(dict(moe.named_parameters()), cfg, router_scales(moe, 1.0))
    _step(opt, moe)
    assert _lrs(opt, moe) == {n: pytest.approx(0.0019) for n, _ in moe.named_parameters()}  # 0.1 + 0.9/10


def test_the_model_names_its_scaled_groups_longer_and_routers_and_the_optimizer_applies_them(
    two_table_schema: Schema,
):
    dense = RankMixerConfig(
        num_tokens=2, dim=8, ffn="smoe", moe=MoEConfig(num_experts=4, router_lr_scale=0.1)
    )
    longer = LongerConfig(dim=8, max_len=8, candidate_groups=["item"], lr_scale=0.5)
    cfg = ModelConfig(sequence="longer", longer=longer, dense=dense)
    model = RankingModel(two_table_schema, cfg, device=torch.device("meta"))
    scales = model.lr_scales()
    routers = {n for n in scales if n.startswith("dense_arch.")}
    assert routers == {f"dense_arch.blocks.{i}.ffn.{p}" for i in (0, 1) for p in ("router_w", "router_b",
                       "train_router_w", "train_router_b")}  # fmt: skip
    assert {n for n in scales if n.startswith("sequence_arch.")} == {
        f"sequence_arch.{n}" for n, _ in model.sequence_arch.named_parameters()
    }
    wrapped = torch.nn.ModuleDict({"model": torch.nn.ModuleDict({"dense_arch": model.dense_arch,
                                   "sequence_arch": model.sequence_arch})})  # fmt: skip  # a DMP-like prefix
    opt = build_dense_optimizer(dict(wrapped.named_parameters()), DenseOptimConfig(lr=0.01, warmup_steps=0),
                                lr_scales_by_param(model))  # fmt: skip
    lrs = _lrs(opt, wrapped)
    for name, lr in lrs.items():
        expect = 0.005 if ".sequence_arch." in name else 0.001 if "router_" in name else 0.01
        assert lr == pytest.approx(expect), name
    assert sum(".sequence_arch." in n for n in lrs) > 10


def test_resumed_optimizer_continues_exactly_like_the_uninterrupted_one():
    # Through a CombinedOptimizer, as the pipeline saves it: a wrapper that snapshots a combined
    # optimizer's (lazily built) state would save nothing, and resume would silently restart RMSProp.
    cfg = DenseOptimConfig(lr=0.01, warmup_steps=4)

    def build(moe: SparseMoEFFN) -> CombinedOptimizer:
        dense = build_dense_optimizer(dict(moe.named_parameters()), cfg, router_scales(moe, 0.1))
        return CombinedOptimizer([("dense", dense)])

    torch.manual_seed(0)
    moe = SparseMoEFFN(num_tokens=2, dim=8, num_experts=4, expert_hidden=16)
    opt = build(moe)
    for seed in range(3):
        _step(opt, moe, seed)
    saved_opt, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(moe.state_dict())
    assert any("router_w" in k for k in saved_opt["state"]) and any(
        "__warmup" in k for k in saved_opt["state"]
    )
    for seed in range(3, 6):
        _step(opt, moe, seed)

    resumed = SparseMoEFFN(num_tokens=2, dim=8, num_experts=4, expert_hidden=16)
    resumed.load_state_dict(saved_model)
    opt2 = build(resumed)
    opt2.init_state()  # as the checkpoint loader does: keyed optimizers load into existing state
    opt2.load_state_dict(saved_opt)
    for seed in range(3, 6):
        _step(opt2, resumed, seed)
    for (name, a), b in zip(moe.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert _lrs(opt2, resumed) == _lrs(opt, moe)


@pytest.mark.parametrize(
    "schedule, extra, expected",
    [
        # warmup 2 steps from lr/2 (torchrec's linear warmup from 1/warmup), then the schedule
        ("constant", {}, {0: 0.5, 1: 0.75, 2: 1.0, 6: 1.0, 12: 1.0}),
        # cosine from the end of warmup (step 2) to the run's end (step 10), floor 0.1
        ("cosine", {"min_lr_ratio": 0.1}, {2: 1.0, 6: 0.55, 10: 0.1, 12: 0.1}),
        ("step", {"step_size": 3, "step_gamma": 0.5}, {2: 1.0, 4: 1.0, 5: 0.5, 8: 0.25}),
    ],
)
def test_schedules_give_the_documented_lr_at_given_steps(schedule: str, extra: dict, expected: dict):
    cfg = DenseOptimConfig(lr=0.01, warmup_steps=2, schedule=schedule, **extra)
    assert {s: lr_multiplier(s, cfg, total_steps=10) for s in expected} == pytest.approx(expected)
    # and through the optimizer, with a router group at 0.1x: after k steps the lr is the one of step k
    torch.manual_seed(0)
    moe = SparseMoEFFN(num_tokens=2, dim=8, num_experts=4, expert_hidden=16)
    opt = build_dense_optimizer(dict(moe.named_parameters()), cfg, router_scales(moe, 0.1), total_steps=10)
    for step in range(max(expected) + 1):
        lrs = _lrs(opt, moe)
        if step in expected:
            assert lrs["w1"] == pytest.approx(0.01 * expected[step]), step
            assert lrs["router_w"] == pytest.approx(0.001 * expected[step]), step
        _step(opt, moe, step)


def test_unknown_schedule_is_named():
    moe = SparseMoEFFN(num_tokens=2, dim=8, num_experts=4, expert_hidden=16)
    with pytest.raises(ValueError, match="optim.dense.schedule: 'linear'"):
        build_dense_optimizer(dict(moe.named_parameters()), DenseOptimConfig(schedule="linear"))


def test_rowwise_adagrad_keeps_one_value_per_row_and_fp16_tables_store_half_precision(
    synthetic_schema: Schema, one_rank_group
):
    """optim.sparse.type=rowwise_adagrad: FBGEMM's state is one fp32 per table row, exact Adagrad's one
    per element; model.table_dtype=fp16 stores the tables' rows in fp16 (issue 23, defects 5 and 6)."""
    from models.sparse_arch import embedding_bag_configs
    from pipeline.config import TrainConfig
    from pipeline.job import build_model
    from pipeline.optim import sparse_state_bytes

    tables = embedding_bag_configs(synthetic_schema)
    rows = sum(t.num_embeddings for t in tables)
    elements = sum(t.num_embeddings * t.embedding_dim for t in tables)
    state, dtypes = {}, {}
    for kind, table_dtype in (("adagrad", "fp32"), ("rowwise_adagrad", "fp16")):
        cfg = TrainConfig()
        cfg.optim.sparse.type, cfg.model.table_dtype = kind, table_dtype
        dmp, _ = build_model(cfg, synthetic_schema, one_rank_group)
        state[kind] = sparse_state_bytes(dmp)
        dtypes[kind] = {v.dtype for k, v in dmp.state_dict().items() if "embedding_bags" in k}
    assert state == {"adagrad": 4 * elements, "rowwise_adagrad": 4 * rows}
    assert dtypes == {"adagrad": {torch.float32}, "rowwise_adagrad": {torch.float16}}
