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
            size, AUC, fp32 vs fp16 / int8 embeddings (launch/benchmarks/serving.py).
    eval    Exact evaluation on W local gloo ranks: the sharded ExactAUCEvaluator.compute() vs
            compute_gathered() (every row on every rank), wall time and peak RSS per rank, the metrics'
            largest difference, an extrapolation to 100M rows on 8 ranks (launch/benchmarks/eval.py).

Examples:
    python launch/bench.py dense --preset rankmixer_small --batch-size 512 --steps 20 --device cpu
    python launch/bench.py moe --preset rankmixer_small_smoe --batch-size 512 --ratios 1,0.5,0.25,0.125
    python launch/bench.py longer --lengths 256,1024,2048 --batch-size 32
    python launch/bench.py serving --artifacts out/fp32,out/int8 --data datasets/synthetic/test
    python launch/bench.py eval --rows 10000000,50000000 --world 2 --json eval.json

`dense`, `moe` and `longer` import torch only, never torchrec, so they run on any GPU box with torch.
This file is the CLI; each subcommand lives in launch/benchmarks/ (dense.py: dense and moe, longer.py,
loader.py, serving.py, eval.py; timing.py: the shared timing utilities).
"""

from __future__ import annotations

import argparse
import os

import torch

from launch.benchmarks.dense import DTYPES, cmd_dense, cmd_moe
from launch.benchmarks.eval import add_arguments as add_eval_arguments
from launch.benchmarks.loader import add_arguments as add_loader_arguments
from launch.benchmarks.longer import cmd_longer
from launch.benchmarks.serving import add_arguments as add_serving_arguments


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

    # The loader's options live with it (launch/benchmarks/loader.py imports nothing heavy at module level).
    loader = sub.add_parser("loader", help="Parquet reader -> RecBatch throughput (rows/s) on one core")
    add_loader_arguments(loader)
    loader.set_defaults(func=cmd_loader)

    serving = sub.add_parser("serving", help="exported artifacts: rows/s, size, AUC (fp32 vs fp16 / int8)")
    add_serving_arguments(serving)
    serving.set_defaults(func=cmd_serving)

    # eval.py imports nothing heavy at module level; the evaluator comes with the run (cmd_eval).
    evaluation = sub.add_parser(
        "eval", help="exact evaluation: sharded vs gathered, time and peak RSS per rank"
    )
    add_eval_arguments(evaluation)
    evaluation.set_defaults(func=cmd_eval)
    return parser


def cmd_serving(args: argparse.Namespace) -> dict:
    from launch.benchmarks.serving import bench_serving  # pyarrow + the predictor: not needed by `dense`

    return bench_serving(args)


def cmd_loader(args: argparse.Namespace) -> dict:
    # Imported here: the reader needs TorchRec, which a torch-only GPU box running `dense` lacks.
    from launch.benchmarks.loader import bench_loader

    return bench_loader(args)


def cmd_eval(args: argparse.Namespace) -> dict:
    from launch.benchmarks.eval import bench_eval  # the evaluator's modules: only for this subcommand

    return bench_eval(args)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
