"""The training step's overhead fixes compute exactly what they replaced (bitwise: same seed, same AUC), and
the step profiler splits a step into its parts (reports/step_profile.md)."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from models.feature_groups import regroup
from models.rankmixer import RankMixerBlock, RankMixerConfig, TokenMixing
from models.sparse_arch import mean_pool
from pipeline.config import DenseOptimConfig
from pipeline.optim import build_dense_optimizer
from pipeline.profiler import format_breakdown, step_breakdown

SHAPES = [(8, 51, 64), (8, 1, 64), (64,), (8, 64, 128), (2, 64), (2,)]


@pytest.mark.parametrize("name", ["rmsprop", "adam", "adagrad", "sgd"])
def test_the_dense_optimizer_runs_foreach_and_updates_bitwise_as_the_per_parameter_loop(name: str):
    def run(make) -> list[torch.Tensor]:  # noqa: ANN001
        torch.manual_seed(0)
        params = {f"p{i}": torch.nn.Parameter(torch.randn(s)) for i, s in enumerate(SHAPES)}
        opt = make(params)
        for step in range(5):
            for p in params.values():
                p.grad = torch.randn_like(p) * 10 ** (step - 2)
            opt.step()
        return [p.detach() for p in params.values()]

    cfg = DenseOptimConfig(name=name, lr=0.01, momentum=0.9 if name != "adam" else 0.0, weight_decay=1e-4,
                           warmup_steps=0, grad_clip_norm=0.0)  # fmt: skip
    ours = build_dense_optimizer
    loop = {
        "rmsprop": lambda ps: torch.optim.RMSprop(
            ps, lr=0.01, alpha=cfg.alpha, eps=cfg.eps, momentum=0.9, weight_decay=1e-4, foreach=False
        ),
        "adam": lambda ps: torch.optim.Adam(ps, lr=0.01, eps=cfg.eps, weight_decay=1e-4, foreach=False),
        "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.01, eps=cfg.eps, weight_decay=1e-4, foreach=False),
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, weight_decay=1e-4, foreach=False),
    }[name]
    a = run(lambda ps: ours(ps, cfg))
    b = run(lambda ps: loop(list(ps.values())))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    opt = ours({"w": torch.nn.Parameter(torch.zeros(2))}, cfg)
    assert all(g["foreach"] for g in opt.param_groups)


def test_token_mixing_with_the_residual_is_bitwise_tm_plus_x_forward_and_backward():
    T, B, D = 4, 5, 8
    x = torch.randn(T, B, D, requires_grad=True)
    g = torch.randn(T, B, D)
    tm = TokenMixing(T)
    ref = tm(x) + x
    fused = tm(x, residual=True)
    assert fused.is_contiguous() and torch.equal(fused, ref)
    assert torch.equal(torch.autograd.grad(fused, x, g)[0], torch.autograd.grad(ref, x, g)[0])
    # the block takes the fused path only with a residual; without one it keeps TM(x)
    block = RankMixerBlock(RankMixerConfig(group_dims=[8], num_tokens=T, dim=D, residual=False))
    s = block.norm1(tm(x))
    torch.testing.assert_close(block(x), block.norm2(block.ffn(s)), rtol=0, atol=0)


def _keyed(keys: list[str], dims: list[int], batch: int = 3) -> KeyedTensor:
    values = torch.randn(batch, sum(dims), requires_grad=True)
    return KeyedTensor(keys=keys, length_per_key=dims, values=values)


@pytest.mark.parametrize("groups", [(("c", "a"), ("d",), ("b",)), (("c",), ("a", "b"))])  # all keys; a subset
def test_regroup_is_keyed_tensor_regroup_forward_and_backward(groups: tuple[tuple[str, ...], ...]):
    kt = _keyed(["a", "b", "c", "d"], [4, 2, 8, 4])
    ref = KeyedTensor.regroup([kt], [list(g) for g in groups])
    ours = regroup([kt], groups)
    assert all(torch.equal(x, y) for x, y in zip(ours, ref, strict=True))
    grads = [torch.randn_like(r) for r in ref]
    (ga,) = torch.autograd.grad(ours, kt.values(), grads)
    (gb,) = torch.autograd.grad(ref, kt.values(), grads)
    assert torch.equal(ga, gb)


def test_regroup_takes_keys_across_several_keyed_tensors():
    a, b = _keyed(["a", "b"], [4, 2]), _keyed(["c"], [8])
    ref = KeyedTensor.regroup([a, b], [["c", "a"], ["b"]])
    assert all(torch.equal(x, y) for x, y in zip(regroup([a, b], (("c", "a"), ("b",))), ref, strict=True))


def test_mean_pool_divides_exactly_the_mean_keys_by_their_bag_sizes():
    kt = _keyed(["a", "b", "c"], [4, 2, 8], batch=5)
    lengths = torch.tensor([1, 0, 3, 2, 7, 2, 2, 2, 2, 2, 0, 4, 1, 9, 3])  # KJT key order b, a, c
    kjt = KeyedJaggedTensor(keys=["b", "a", "c"], values=torch.zeros(int(lengths.sum()), dtype=torch.long),
                            lengths=lengths)  # fmt: skip
    out = mean_pool(kt, kjt, ("a", "c")).values()
    size = lengths.view(3, 5).clamp_min(1).float()  # (F, B)
    v = kt.values()
    expected = torch.cat([v[:, :4] / size[1][:, None], v[:, 4:6], v[:, 6:] / size[2][:, None]], dim=1)
    assert torch.equal(out, expected)


def test_step_breakdown_charges_backward_ops_to_the_forward_range_that_made_them():
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64)
    with torch.profiler.profile() as prof:
        for i in range(2):
            with torch.profiler.record_function(f"## forward {i} ##"):
                with torch.profiler.record_function("## dense_arch ##"):
                    loss = torch.tanh(x @ w).sum()
            with torch.profiler.record_function(f"## backward {i} ##"):
                loss.backward()
            with torch.profiler.record_function(f"## optimizer {i} ##"):
                w.data.add_(w.grad, alpha=-0.1)
    rows = step_breakdown(prof.events(), steps=2)
    parts = {p: ms for p, ms, _ in rows}
    assert {"dense forward", "dense backward", "dense optimizer (zero_grad, clip, RMSProp)"} <= set(parts)
    assert sum(pct for _, _, pct in rows) == pytest.approx(100.0)
    assert "step" in format_breakdown(rows)
