"""Benchmarks. Subcommands:

    dense   RankMixer dense arch vs a DLRM-style MLP of equal parameter count: training samples/s,
            achieved FLOP/s and MFU against a GEMM peak measured in the same run.
    moe     Sparse-MoE RankMixer inference: samples/s of sparse inference (inactive experts skipped) at
            each active-expert ratio vs dense inference (every expert computed) with the same gates.
    loader  Parquet reader -> RecBatch throughput.
    longer  LONGER sequence module: cost vs sequence length against full causal self-attention over the
            raw sequence (FLOPs, training samples/s, activation memory with/without recomputation), and
            KV-cache serving (candidates/s with and without the cache, 1/16/128 candidates per user).

Examples:
    python launch/bench.py dense --preset rankmixer_small --batch-size 512 --steps 20 --device cpu
    python launch/bench.py moe --preset rankmixer_small_smoe --batch-size 512 --ratios 1,0.5,0.25,0.125
    python launch/bench.py longer --lengths 256,1024,2048 --batch-size 32

Imports torch (+ yaml to read a preset) only, never torchrec, so it runs on any GPU box with torch.
Training FLOPs = 3 x forward FLOPs (backward = 2 x forward: grads w.r.t. inputs and weights).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

# allow `python launch/bench.py` from the repo root: the script dir, not the root, is on sys.path
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

from data.loader_bench import add_arguments as add_loader_arguments  # noqa: E402
from models.rankmixer import RankMixer, RankMixerConfig  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def load_preset(name: str) -> dict:
    path = Path(name) if name.endswith(".yaml") else REPO_ROOT / "conf" / "model" / f"{name}.yaml"
    fields = yaml.safe_load(path.read_text())
    fields.pop("defaults", None)  # Hydra's defaults list (the typed `rankmixer_base` the preset extends)
    if fields.pop("arch", None) != "rankmixer":
        raise ValueError(f"{path} is not a rankmixer preset")
    return fields


class MLPBaseline(nn.Module):
    """DLRM-style top MLP over the concatenated tokenizer input: W -> h -> ... -> h -> num_tasks, ReLU."""

    def __init__(self, in_dim: int, hidden: int, num_hidden: int, num_tasks: int) -> None:
        super().__init__()
        widths = [in_dim] + [hidden] * num_hidden
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_tasks))
        self.mlp = nn.Sequential(*layers)

    def forward(self, groups: list[torch.Tensor]) -> torch.Tensor:
        return self.mlp(torch.cat(groups, dim=-1))  # (B, W) -> (B, num_tasks)

    def flops_per_sample(self) -> float:
        return float(sum(2 * m.in_features * m.out_features for m in self.mlp if isinstance(m, nn.Linear)))

    @staticmethod
    def hidden_for_params(in_dim: int, num_hidden: int, num_tasks: int, target: int) -> int:
        # params = (in_dim + 1) h + (num_hidden - 1)(h^2 + h) + (h + 1) num_tasks; solve for h
        a = num_hidden - 1
        b = in_dim + 1 + (num_hidden - 1) + num_tasks
        c = num_tasks - target
        h = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a) if a else -c / b
        return max(1, round(h))


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

    fields = load_preset(args.preset)
    group_dims = [args.group_width] * (args.input_width // args.group_width)
    cfg = RankMixerConfig(group_dims=group_dims, num_tasks=args.num_tasks, **fields)
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


def write_json(path: str | None, result: dict) -> None:
    """The benchmark's figures as JSON, if a path was given (`--json`)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2))


def time_inference(model: nn.Module, groups: list[torch.Tensor], steps: int, warmup: int) -> list[float]:
    """Seconds per eval-mode forward, one per timed step."""
    with torch.inference_mode():
        return time_calls(lambda: model(groups), groups[0].device, steps, warmup)


def cmd_moe(args: argparse.Namespace) -> dict:
    """Per ratio r, the gates are forced to exactly k = round(N_e * r) active experts per (token, sample)
    (top-k of h_infer's logits, ReLU gate values: `SparseMoEFFN.inference_top_k`), then the same model is
    timed with sparse inference and with dense inference. Dense and sparse runs alternate per ratio so both
    see the same load on a shared machine."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fields = load_preset(args.preset)
    if fields.get("ffn") != "smoe":
        raise ValueError(f"{args.preset}: the moe benchmark needs a preset with ffn: smoe")
    group_dims = [args.group_width] * (args.input_width // args.group_width)
    cfg = RankMixerConfig(group_dims=group_dims, num_tasks=args.num_tasks, **fields)
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
    return parser


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


def cmd_longer(args: argparse.Namespace) -> dict:
    """Per length: LONGER (token merge + hybrid attention) vs full causal self-attention over the raw
    sequence (the same module with merge=1 and every token a query), training step time and activation
    memory with and without recomputation; then KV-cache serving at the longest length."""
    from models.longer import Longer, LongerConfig

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    item_dim, cand_dim, user_dim = args.item_dim, args.item_dim, args.item_dim
    max_len = max(args.lengths)

    def build(full: bool, recompute: bool, length: int) -> Longer:
        cfg = LongerConfig(
            item_dim=item_dim, candidate_dim=cand_dim, user_dim=user_dim, dim=args.dim,
            num_heads=args.heads, num_layers=args.layers, merge=1 if full else args.merge,
            merge_mode=args.merge_mode, recent_queries=length if full else args.recent,
            max_len=length, recompute=(recompute,) * args.layers,
        )  # fmt: skip
        return Longer(cfg).to(device)

    def inputs(batch: int, length: int):
        """Every user with `length` items: jagged items (batch * length, d_item), lengths, cand, user."""
        return (
            torch.randn(batch * length, item_dim, device=device),
            torch.full((batch,), length, device=device),
            torch.randn(batch, cand_dim, device=device),
            torch.randn(batch, user_dim, device=device),
        )

    rows = []
    for length in args.lengths:
        x = inputs(args.batch_size, length)
        for name, full in (("longer", False), ("full_attention", True)):
            row = {"length": length, "model": name}
            for recompute in (False, True):
                model = build(full, recompute, length).train()
                opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)

                def step() -> None:
                    model(*x).square().mean().backward()  # noqa: B023 - called inside this iteration
                    opt.step()  # noqa: B023
                    opt.zero_grad(set_to_none=True)  # noqa: B023

                mem = saved_activation_bytes(lambda: model(*x).square().mean())  # noqa: B023
                if not recompute:
                    sec = statistics.median(time_calls(step, device, args.steps, args.warmup))
                    row["fwd_mflop_per_sample"] = model.flops_per_sample(length) / 1e6
                    row["train_samples_per_s"] = args.batch_size / sec
                row["activation_mib_recompute" if recompute else "activation_mib"] = mem / 2**20
            rows.append(row)
            print(
                f"L={length:5d} {name:15s} {row['fwd_mflop_per_sample']:10.1f} MFLOP/sample "
                f"{row['train_samples_per_s']:9.1f} samples/s  activations {row['activation_mib']:8.1f} MiB "
                f"({row['activation_mib_recompute']:.1f} MiB with recomputation)",
                flush=True,
            )

    model = build(False, False, max_len).eval()
    serving = []
    for per_user in args.candidates:
        users = max(1, args.serving_candidates // per_user)
        items, lengths, _, user = inputs(users, max_len)
        n = users * per_user
        index = torch.arange(users, device=device).repeat_interleave(per_user)
        cand = torch.randn(n, cand_dim, device=device)

        def cached() -> torch.Tensor:
            return model.score_candidates(model.encode_user(items, lengths), index, cand, user)  # noqa: B023

        def uncached() -> torch.Tensor:
            with torch.no_grad():  # every candidate's row carries its user's whole sequence
                per_candidate = items.view(users, max_len, -1)[index].flatten(0, 1)  # noqa: B023
                return model(per_candidate, lengths[index], cand, user[index])  # noqa: B023

        timing = {}
        for mode, fn in (("cached", cached), ("uncached", uncached)):
            timing[mode] = n / statistics.median(time_calls(fn, device, args.steps, args.warmup))
        rates = {f"{k}_candidates_per_s": v for k, v in timing.items()}
        speedup = timing["cached"] / timing["uncached"]
        serving.append({"candidates_per_user": per_user, "users": users, **rates, "speedup": speedup})
        print(
            f"serving L={max_len} {per_user:4d} candidates/user: cached {timing['cached']:9.1f} "
            f"uncached {timing['uncached']:9.1f} candidates/s, speedup {serving[-1]['speedup']:.2f}x",
            flush=True,
        )
    result = {"device": str(device), "threads": torch.get_num_threads(), "config": vars(args).copy(),
              "cost": rows, "serving": serving}  # fmt: skip
    result["config"].pop("func", None)
    write_json(args.json, result)
    return result


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def cmd_loader(args: argparse.Namespace) -> dict:
    # Imported here: the reader needs TorchRec, which a torch-only GPU box running `dense` lacks.
    from data.loader_bench import bench_loader

    return bench_loader(args)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
