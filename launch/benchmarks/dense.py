"""`launch/bench.py dense` and `moe`: the RankMixer dense arch alone.

    dense   RankMixer dense arch vs a DLRM-style MLP of equal parameter count: training samples/s,
            achieved FLOP/s and MFU against a GEMM peak measured in the same run.
    moe     Sparse-MoE RankMixer inference: samples/s of sparse inference (inactive experts skipped) at
            each active-expert ratio vs dense inference (every expert computed) with the same gates.

Imports torch only, never torchrec, so it runs on any GPU box with torch; a preset is composed by Hydra
(launch/configs.py), so a box without hydra-core / omegaconf / antlr4-python3-runtime needs their wheels.
Training FLOPs = 3 x forward FLOPs (backward = 2 x forward: grads w.r.t. inputs and weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from launch.benchmarks.timing import measure_gemm_peak, measure_training, time_inference, write_json
from models.mlp_baseline import MLPBaseline
from models.rankmixer import RankMixer, RankMixerConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_preset(name: str, group_dims: list[int], num_tasks: int) -> RankMixerConfig:
    """The RankMixerConfig of `model=<name>` (conf/model/<name>.yaml), composed by Hydra over its typed
    node exactly as a train job composes it, for semantic groups of these widths."""
    from launch.configs import compose_model  # Hydra, imported only to read a preset

    model = compose_model(name)
    if model.arch != "rankmixer":
        raise ValueError(f"conf/model/{name}.yaml is not a rankmixer preset (arch: {model.arch})")
    return model.dense_config(group_dims, num_tasks)


def cmd_dense(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    peak_n = args.peak_size or (8192 if device.type == "cuda" else 2048)
    peaks = {"fp32": measure_gemm_peak(device, torch.float32, peak_n, args.peak_iters)}
    if device.type == "cuda" or dtype != torch.float32:
        peaks["bf16"] = measure_gemm_peak(device, torch.bfloat16, peak_n, args.peak_iters)

    group_dims = [args.group_width] * (args.input_width // args.group_width)
    cfg = load_preset(args.preset, group_dims, args.num_tasks)
    groups = [torch.randn(args.batch_size, d, device=device) for d in group_dims]
    labels = torch.randint(0, 2, (args.batch_size, cfg.num_tasks), device=device).float()

    rankmixer = RankMixer(cfg).to(device)
    hidden = MLPBaseline.hidden_for_params(
        cfg.input_width, args.mlp_layers, cfg.num_tasks, rankmixer.num_params()
    )
    mlp = MLPBaseline(cfg.input_width, hidden, args.mlp_layers, cfg.num_tasks).to(device)

    rows = []
    for name, model, flops in (
        (args.preset, rankmixer, rankmixer.flops_per_sample()),
        (f"mlp_{args.mlp_layers}x{hidden}", mlp, mlp.flops_per_sample()),
    ):
        profile_path = args.profile if args.profile and model is rankmixer else None
        speed = measure_training(
            model, groups, labels, flops, args.steps, args.warmup, dtype, peak_n, profile_path
        )
        rows.append({"model": name, "params": sum(p.numel() for p in model.parameters()), **speed})
    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "gemm_peak_gflop_s": {k: v / 1e9 for k, v in peaks.items()},
        "gemm_peak_size": peak_n,
        "input_width": cfg.input_width,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "group_dims"},
        "rows": rows,
    }
    peak_text = ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in result["gemm_peak_gflop_s"].items())
    print(
        f"device={result['device']} threads={result['threads']} dtype={args.dtype} "
        f"GEMM peak {peak_n}^3: {peak_text}"
    )
    header = ("model", "params", "batch", "samples/s", "GFLOP/s", "MFU", "peak GFLOP/s")
    print(f"{header[0]:<24}" + "".join(f"{h:>13}" for h in header[1:]))
    for r in rows:
        cells = (
            f"{r['params']:,}",
            r["batch_size"],
            f"{r['samples_per_s']:.1f}",
            f"{r['achieved_gflop_s']:.1f}",
            f"{r['mfu']:.1%}",
            f"{r['interleaved_peak_gflop_s']:.1f}",
        )
        print(f"{r['model']:<24}" + "".join(f"{c:>13}" for c in cells))
    write_json(args.json, result)
    return result


def cmd_moe(args: argparse.Namespace) -> dict:
    """Per ratio r, the gates are forced to exactly k = round(N_e * r) active experts per (token, sample)
    (top-k of h_infer's logits, ReLU gate values: `SparseMoEFFN.inference_top_k`), then the same model is
    timed with sparse inference and with dense inference. Dense and sparse runs alternate per ratio so both
    see the same load on a shared machine."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    group_dims = [args.group_width] * (args.input_width // args.group_width)
    cfg = load_preset(args.preset, group_dims, args.num_tasks)
    if cfg.ffn != "smoe":
        raise ValueError(f"{args.preset}: the moe benchmark needs a preset with ffn: smoe")
    model = RankMixer(cfg).to(device).eval()
    ffns = model.moe_ffns()
    groups = [torch.randn(args.batch_size, d, device=device) for d in group_dims]
    num_experts = cfg.moe.num_experts
    dense_rows = cfg.num_tokens * num_experts * args.batch_size * len(ffns)
    rows = []
    for ratio in args.ratios:
        k = max(1, round(num_experts * ratio))
        for ffn in ffns:
            ffn.inference_top_k = k
        timings = {}
        for mode in ("sparse", "dense"):
            for ffn in ffns:
                ffn.sparse_inference = mode == "sparse"
            timings[mode] = statistics.median(time_inference(model, groups, args.steps, args.warmup))
            if mode == "sparse":
                computed_rows = sum(ffn.last_sparse_rows for ffn in ffns)
                active_pairs = sum(ffn.last_active_pairs for ffn in ffns)
        rows.append(
            {
                "target_ratio": ratio,
                "k": k,
                "active_ratio": active_pairs / dense_rows,
                "computed_row_frac": computed_rows / dense_rows,  # padding of capacity classes included
                "sparse_samples_per_s": args.batch_size / timings["sparse"],
                "dense_samples_per_s": args.batch_size / timings["dense"],
                "speedup": timings["dense"] / timings["sparse"],
                "sparse_gflop_per_sample": model.flops_per_sample(k / num_experts) / 1e9,
                "dense_gflop_per_sample": model.flops_per_sample() / 1e9,
            }
        )
    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "preset": args.preset,
        "batch_size": args.batch_size,
        "params": model.num_params(),
        "input_width": cfg.input_width,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "group_dims"},
        "rows": rows,
    }
    print(
        f"device={result['device']} threads={result['threads']} preset={args.preset} "
        f"params={result['params']:,} batch={args.batch_size} experts/token={num_experts}"
    )
    # active: active (slot, sample) pairs / all; rows: rows computed (capacity padding included) / all;
    # sparse GF / dense GF: forward GFLOP per sample, expected at k / N_e and dense-activated
    header = ("ratio", "k", "active", "rows", "sparse/s", "dense/s", "speedup", "sparse GF", "dense GF")
    print("".join(f"{h:>12}" for h in header))
    for r in rows:
        cells = (
            f"{r['target_ratio']:g}",
            r["k"],
            f"{r['active_ratio']:.3f}",
            f"{r['computed_row_frac']:.3f}",
            f"{r['sparse_samples_per_s']:.1f}",
            f"{r['dense_samples_per_s']:.1f}",
            f"{r['speedup']:.2f}x",
            f"{r['sparse_gflop_per_sample']:.4g}",
            f"{r['dense_gflop_per_sample']:.4g}",
        )
        print("".join(f"{c:>12}" for c in cells))
    write_json(args.json, result)
    return result
