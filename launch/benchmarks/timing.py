"""Timing utilities shared by the benchmarks (`launch/bench.py`, `launch/benchmarks/`) and the sweep
runner's dense-arch speed (`launch/sweep/runner.py`): device-synchronised call timing, the GEMM peak that MFU
is measured against, a dense arch's training speed (samples/s, FLOP/s, MFU), saved-activation bytes and
the `--json` writer. Imports torch only.

Training FLOPs = 3 x forward FLOPs (backward = 2 x forward: grads w.r.t. inputs and weights).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, steps: int, warmup: int) -> list[float]:  # noqa: ANN001
    """Seconds per call of `fn()` (device-synchronised), one per timed call after `warmup` untimed ones."""
    times = []
    for i in range(warmup + steps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def measure_gemm_peak(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """Achieved FLOP/s of a square n x n x n matmul, best of `iters` after warm-up: the machine's
    practical GEMM peak that MFU is measured against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)
    synchronize(device)
    best = math.inf
    for _ in range(iters):
        t0 = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def gemm_probe(device: torch.device, dtype: torch.dtype, n: int):
    """A callable timing one n^3 GEMM, returning its FLOP/s. Interleaved with the training steps, so a
    model step and the peak it is divided by see the same load on a shared machine."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def probe() -> float:
        synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        return 2.0 * n**3 / (time.perf_counter() - t0)

    return probe


def time_training(
    model: nn.Module,
    groups: list[torch.Tensor],
    labels: torch.Tensor,
    steps: int,
    warmup: int,
    dtype: torch.dtype,
    probe,
    profile_path: str | None = None,
) -> list[tuple[float, float]]:
    """(seconds, GEMM peak FLOP/s right after) for each timed training step (forward + backward +
    RMSProp step)."""
    device = labels.device
    # the paper's dense optimizer (4.1); foreach = one multi-tensor kernel per op instead of one per param
    optimizer = torch.optim.RMSprop(model.parameters(), lr=0.01, foreach=True)
    use_autocast = dtype != torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
            logits = model(groups)
        loss = F.binary_cross_entropy_with_logits(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append((time.perf_counter() - t0, probe()))
    if profile_path:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            for _ in range(3):
                step()
            synchronize(device)
        Path(profile_path).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(profile_path)
        sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort_by, row_limit=12))
        print(f"profiler trace written to {profile_path}")
    return times


def measure_training(
    model: nn.Module,
    groups: list[torch.Tensor],
    labels: torch.Tensor,
    flops_per_sample: float,
    steps: int,
    warmup: int,
    dtype: torch.dtype = torch.float32,
    peak_n: int = 2048,
    profile_path: str | None = None,
) -> dict:
    """Training speed of a dense arch on one batch: samples/s, achieved FLOP/s and MFU. MFU is taken per
    step against a GEMM timed right after it, then the median: robust to other load on a shared machine."""
    batch_size = labels.shape[0]
    probe = gemm_probe(labels.device, dtype, peak_n)
    timed = time_training(model, groups, labels, steps, warmup, dtype, probe, profile_path)
    train_flops = 3.0 * flops_per_sample * batch_size
    sec = statistics.median(t for t, _ in timed)
    return {
        "batch_size": batch_size,
        "step_s": sec,
        "samples_per_s": batch_size / sec,
        "train_gflop_per_step": train_flops / 1e9,
        "achieved_gflop_s": train_flops / sec / 1e9,
        "mfu": statistics.median(train_flops / t / peak_now for t, peak_now in timed),
        "interleaved_peak_gflop_s": statistics.median(p for _, p in timed) / 1e9,
    }


def time_inference(model: nn.Module, groups: list[torch.Tensor], steps: int, warmup: int) -> list[float]:
    """Seconds per eval-mode forward, one per timed step."""
    with torch.inference_mode():
        return time_calls(lambda: model(groups), groups[0].device, steps, warmup)


def saved_activation_bytes(fn) -> int:  # noqa: ANN001 - a zero-argument callable running a forward
    """Bytes of the tensors autograd saves for backward during `fn()`: the activation memory of a training
    step, device independent (recomputed layers save only their inputs)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def write_json(path: str | None, result: dict) -> None:
    """The benchmark's figures as JSON, if a path was given (`--json`)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2))
