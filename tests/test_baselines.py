"""Baseline dense archs (models/baselines.py): one interface with RankMixer, honest params and FLOPs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.config import DENSE_ARCHS, ModelConfig, arch_classes, arch_config_class
from models.dense_arch import DenseArch

GROUP_DIMS = [20, 36, 12, 8, 28]
BASELINES = [a for a in DENSE_ARCHS if a != "rankmixer"]


def build_dense_arch(arch: str, group_dims: list[int], num_tasks: int, **dense) -> DenseArch:
    if arch == "rankmixer":
        dense = {"num_tokens": 4, "dim": 16, **dense}
    config = ModelConfig(arch=arch, dense=arch_config_class(arch)(**dense))
    return config.build_dense_arch(group_dims, num_tasks)


def groups(batch: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(batch, d) for d in GROUP_DIMS]


def test_every_dense_arch_is_a_dense_arch_with_a_typed_config_and_scale_fields():
    for arch, spec in DENSE_ARCHS.items():
        config_cls, arch_cls = arch_classes(arch)
        assert issubclass(arch_cls, DenseArch) and dataclasses.is_dataclass(config_cls)
        fields = {f.name for f in dataclasses.fields(config_cls)}
        assert spec.scale_field in fields and spec.scale_step in (None, *fields), arch


@pytest.mark.parametrize("arch", BASELINES)
def test_baseline_maps_groups_to_one_logit_per_task_and_learns(arch: str):
    model = build_dense_arch(arch, GROUP_DIMS, num_tasks=3)
    x = groups(64)
    labels = (x[0][:, :3] > 0).float()  # learnable from the input
    assert model(x).shape == (64, 3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), labels)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first, (arch, first, loss.item())


@pytest.mark.parametrize("arch", list(DENSE_ARCHS))
def test_flops_per_sample_matches_the_flop_counter(arch: str):
    model = build_dense_arch(arch, GROUP_DIMS, num_tasks=2)
    batch = 4
    with FlopCounterMode(display=False) as counter:
        model(groups(batch))
    counted = counter.get_total_flops() / batch
    if arch == "autoint":  # CPU scaled_dot_product_attention is not counted by FlopCounterMode
        cfg = model.cfg
        counted += cfg.num_layers * 2 * 2 * cfg.num_tokens**2 * cfg.dim
    assert model.flops_per_sample() == pytest.approx(counted, rel=1e-6)


@pytest.mark.parametrize("arch", BASELINES)
def test_num_params_counts_every_dense_parameter_and_grows_with_the_scale_field(arch: str):
    model = build_dense_arch(arch, GROUP_DIMS, num_tasks=2)
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    field = DENSE_ARCHS[arch].scale_field
    default = getattr(model.cfg, field)
    bigger = build_dense_arch(arch, GROUP_DIMS, num_tasks=2, **{field: 2 * default})
    assert bigger.num_params() > 1.5 * model.num_params()


class _GroupsAsArgs(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, g0: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, g3: torch.Tensor, g4: torch.Tensor
    ):
        return self.model([g0, g1, g2, g3, g4])  # symbolic_trace needs one tensor argument per group


@pytest.mark.parametrize("arch", BASELINES)
def test_baseline_forward_is_fx_traceable_for_the_sparse_dist_pipeline(arch: str):
    model = build_dense_arch(arch, GROUP_DIMS, num_tasks=2)
    traced = torch.fx.symbolic_trace(_GroupsAsArgs(model))
    x = groups()
    torch.testing.assert_close(traced(*x), model(x))


@pytest.mark.parametrize("arch", list(DENSE_ARCHS))
def test_heads_stay_fp32_under_bf16_autocast_so_exact_auc_sees_no_extra_ties(arch: str):
    """CPU bf16 autocast runs the GPU's code path. A bf16 logit has ~128 values per power of two: 4096
    rows of bf16 logits would share a few hundred values and exact AUC would average over the ties."""
    from data.metrics.auc import binary_auc

    torch.manual_seed(0)
    model = build_dense_arch(arch, GROUP_DIMS, num_tasks=2).eval()
    x = groups(batch=4096)
    labels = (torch.cat(x, -1)[:, :1] + 0.5 * torch.randn(4096, 1) > 0).float().squeeze(1)
    with torch.no_grad():
        fp32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(x)
    assert mixed.dtype == torch.float32
    distinct = [mixed[:, t].unique().numel() for t in range(2)]
    assert min(distinct) > 0.95 * fp32[:, 0].unique().numel(), distinct
    auc_fp32, auc_mixed = binary_auc(fp32[:, 0], labels), binary_auc(mixed[:, 0], labels)
    assert abs(auc_mixed - auc_fp32) < 0.01, (auc_fp32, auc_mixed)
