"""Benchmarks. Subcommands:

    dense   RankMixer dense arch vs a DLRM-style MLP of equal parameter count: training samples/s,
            achieved FLOP/s and MFU against a GEMM peak measured in the same run.
    moe     Sparse-MoE RankMixer inference: samples/s of sparse inference (inactive experts skipped) at
            each active-expert ratio vs dense inference (every expert computed) with the same gates.
    loader  Parquet reader -> RecBatch throughput.
    longer  LONGER sequence module: cost vs sequence length against full causal self-attention over the
            raw sequence (FLOPs, training samples/s, activation memory with/without recomputation), and
            KV-cache serving (candidates/s with and without the cache, 1/16/128 candidates per user).
    serving Exported inference artifacts (launch/export.py) scoring a Parquet split in one process: rows/s,
            size, AUC, fp32 vs fp16 / int8 embeddings (launch/bench_serving.py).

Examples:
    python launch/bench.py dense --preset rankmixer_small --batch-size 512 --steps 20 --device cpu
    python launch/bench.py moe --preset rankmixer_small_smoe --batch-size 512 --ratios 1,0.5,0.25,0.125
    python launch/bench.py longer --lengths 256,1024,2048 --batch-size 32
    python launch/bench.py serving --artifacts out/fp32,out/int8 --data datasets/synthetic/test

Imports torch only, never torchrec, so it runs on any GPU box with torch; a preset is composed by Hydra
(launch/configs.py), so a box without hydra-core / omegaconf / antlr4-python3-runtime needs their wheels.
This file is the CLI (dense, moe); the timing utilities are in launch/timing.py, the MLP baseline in
models/mlp_baseline.py, the longer subcommand in launch/bench_longer.py, the loader's in data/loader_bench.py.
Training FLOPs = 3 x forward FLOPs (backward = 2 x forward: grads w.r.t. inputs and weights).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

# allow `python launch/bench.py` from the repo root: the script dir, not the root, is on sys.path
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from data.loader_bench import add_arguments as add_loader_arguments  # noqa: E402
from launch.bench_longer import cmd_longer  # noqa: E402
from launch.bench_serving import add_arguments as add_serving_arguments  # noqa: E402
from launch.timing import measure_gemm_peak, measure_training, time_inference, write_json  # noqa: E402
from models.mlp_baseline import MLPBaseline  # noqa: E402
from models.rankmixer import RankMixer, RankMixerConfig  # noqa: E402

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
        "config": {k: v for k, v in vars(cfg).items() if k != "group_dims"},
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
    num_experts = cfg.moe_num_experts
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
        "config": {k: v for k, v in vars(cfg).items() if k != "group_dims"},
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


def _ratios(text: str) -> list[float]:
    ratios = [float(r) for r in text.split(",") if r.strip()]
    if not ratios or not all(0.0 < r <= 1.0 for r in ratios):
        raise argparse.ArgumentTypeError(f"ratios must be in (0, 1], got {text!r}")
    return ratios


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    dense = sub.add_parser("dense", help="RankMixer dense arch vs equal-params MLP: samples/s, MFU")
    dense.add_argument("--preset", default="rankmixer_small", help="conf/model/<preset>.yaml or a path")
    dense.add_argument("--batch-size", type=int, default=512)
    dense.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    dense.add_argument("--warmup", type=int, default=3)
    dense.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    dense.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="bf16 = autocast")
    dense.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    dense.add_argument("--input-width", type=int, default=4096, help="tokenizer input width W")
    dense.add_argument("--group-width", type=int, default=256, help="width of each semantic group")
    dense.add_argument("--num-tasks", type=int, default=2)
    dense.add_argument("--mlp-layers", type=int, default=3, help="hidden layers of the MLP baseline")
    dense.add_argument("--peak-size", type=int, default=0, help="GEMM size for the peak (0 = auto)")
    dense.add_argument("--peak-iters", type=int, default=5)
    dense.add_argument(
        "--profile",
        nargs="?",
        const="runs/bench_dense_trace.json",
        default=None,
        help="write a torch profiler chrome trace (default path runs/bench_dense_trace.json)",
    )
    dense.add_argument("--json", default=None, help="write the figures to this JSON file")
    dense.set_defaults(func=cmd_dense)

    moe = sub.add_parser("moe", help="Sparse-MoE RankMixer: sparse vs dense inference samples/s per ratio")
    moe.add_argument("--preset", default="rankmixer_small_smoe", help="conf/model/<preset>.yaml or a path")
    moe.add_argument("--batch-size", type=int, default=512)
    moe.add_argument("--ratios", type=_ratios, default=[1.0, 0.5, 0.25, 0.125], help="e.g. 1,0.5,0.25")
    moe.add_argument("--steps", type=int, default=10, help="timed forwards per mode and ratio (median)")
    moe.add_argument("--warmup", type=int, default=2)
    moe.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    moe.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    moe.add_argument("--input-width", type=int, default=4096, help="tokenizer input width W")
    moe.add_argument("--group-width", type=int, default=256, help="width of each semantic group")
    moe.add_argument("--num-tasks", type=int, default=2)
    moe.add_argument("--json", default=None, help="write the figures to this JSON file")
    moe.set_defaults(func=cmd_moe)

    longer = sub.add_parser("longer", help="LONGER: cost vs length vs full attention; KV-cache serving")
    longer.add_argument("--lengths", type=_ints, default=[256, 1024, 2048])
    longer.add_argument("--batch-size", type=int, default=32, help="training batch of the cost table")
    longer.add_argument("--candidates", type=_ints, default=[1, 16, 128], help="candidates per user")
    longer.add_argument("--serving-candidates", type=int, default=256, help="candidates per serving call")
    longer.add_argument("--dim", type=int, default=64)
    longer.add_argument("--heads", type=int, default=2)
    longer.add_argument("--layers", type=int, default=2)
    longer.add_argument("--merge", type=int, default=8, help="K items per merged token")
    longer.add_argument("--merge-mode", choices=["concat", "inner"], default="inner")
    longer.add_argument("--recent", type=int, default=32, help="recent merged tokens that query")
    longer.add_argument("--item-dim", type=int, default=56, help="width of one sequence item")
    longer.add_argument("--steps", type=int, default=5)
    longer.add_argument("--warmup", type=int, default=1)
    longer.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    longer.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    longer.add_argument("--json", default=None, help="write the figures to this JSON file")
    longer.set_defaults(func=cmd_longer)

    # The loader's options live with it (data/loader_bench.py imports nothing heavy at module level).
    loader = sub.add_parser("loader", help="Parquet reader -> RecBatch throughput (rows/s) on one core")
    add_loader_arguments(loader)
    loader.set_defaults(func=cmd_loader)

    serving = sub.add_parser("serving", help="exported artifacts: rows/s, size, AUC (fp32 vs fp16 / int8)")
    add_serving_arguments(serving)
    serving.set_defaults(func=cmd_serving)
    return parser


def cmd_serving(args: argparse.Namespace) -> dict:
    from launch.bench_serving import bench_serving  # pyarrow + the predictor: not needed by `dense`

    return bench_serving(args)


def cmd_loader(args: argparse.Namespace) -> dict:
    # Imported here: the reader needs TorchRec, which a torch-only GPU box running `dense` lacks.
    from data.loader_bench import bench_loader

    return bench_loader(args)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
