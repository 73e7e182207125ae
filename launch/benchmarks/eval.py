"""Exact evaluation at scale: the sharded ``ExactAUCEvaluator.compute()`` against ``compute_gathered()``
(every rank's rows gathered to every rank), wall time and peak RSS per rank, in one run.

    python launch/bench.py eval --rows 10000000,50000000 --world 2 [--paths gathered,distributed]
        [--json out.json] [--seed 0]
    python launch/bench.py eval --rows 2000000 --world 1,2   # the distributed path's 1 / world scaling

For each (rows R, world W, path) it spawns W local gloo processes (OMP_NUM_THREADS=1 each, so a rank is one
core, as on a node whose other cores feed other ranks). Each rank builds its share of R rows (2 tasks,
float32 logits rounded to 1e-3 / 1e-2 so scores tie as real models' do, ~10% positives, ~R/50 users, weight
1), deterministically: rows come in 2^16-row blocks seeded by block index, rank r owning blocks r, r + W,
..., so the split is the same for every W and every W gives the same metrics. Once the rows are built the
rank resets its RSS high-water mark (writes "5" to /proc/self/clear_refs), runs the path once, and reads
VmHWM from /proc/self/status. Each path runs in its own processes, so its peak is its own.

One JSON line per (path, rows, world): wall time (the slowest rank), peak RSS per rank, the rows' own
bytes per rank, and the compute's memory beyond them. Then the largest metric difference between the paths
(and between worlds) of each row count, which must be <= 1e-9 (else the run fails), and a summary with
the extrapolation to 100M rows on 8 ranks (`_extrapolate`: the measured bytes per row, scaled).

`bench_eval(args)` is the entry point `launch/bench.py eval` calls; `args` needs rows, world, paths, seed
and optionally json.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

PATHS = ("gathered", "distributed")
TASKS = ("click", "like")
BLOCK_ROWS = 1 << 16
ROWS_PER_USER = 50
TOLERANCE = 1e-9
TARGET_ROWS, TARGET_WORLD = 100_000_000, 8  # the extrapolation's


# --------------------------------------------------------------------------------------------------
# One rank (spawned)
# --------------------------------------------------------------------------------------------------


def _owned_blocks(rank: int, world: int, rows: int) -> list[tuple[int, int]]:
    """(block index, rows in it) of the blocks `rank` builds: every world-th block from `rank`."""
    n_blocks = math.ceil(rows / BLOCK_ROWS)
    return [(b, min(BLOCK_ROWS, rows - b * BLOCK_ROWS)) for b in range(rank, n_blocks, world)]


def _fill_block(block: int, seed: int, n_users: int, logits: Any, labels: Any, users: Any) -> None:
    """Write block `block`'s rows into the (n, 2) / (n, 2) / (n,) views given; a function of block, seed."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + block)
    n = users.shape[0]
    users.copy_(torch.randint(0, n_users, (n,), generator=gen))
    signal = torch.randn(n, len(TASKS), generator=gen)
    labels.copy_(torch.rand(n, len(TASKS), generator=gen) < torch.sigmoid(1.5 * signal - 2.8))  # ~10%
    noisy = (signal + 0.8 * torch.randn(n, len(TASKS), generator=gen)) * 1.2 - 2.5
    logits[:, 0] = noisy[:, 0].round(decimals=3)  # ~10^4 distinct values: ties, as a real model has
    logits[:, 1] = noisy[:, 1].round(decimals=2)  # ~10^3: heavy ties


def _rank_rows(rank: int, world: int, rows: int, seed: int) -> tuple[Any, Any, Any]:
    """This rank's (logits (n, 2) float32, labels (n, 2) float32, user ids (n,) int64), built in place
    block by block (no concatenation: the rows are the only large allocation left)."""
    import torch

    blocks = _owned_blocks(rank, world, rows)
    n = sum(size for _, size in blocks)
    logits, labels = torch.empty(n, len(TASKS)), torch.empty(n, len(TASKS))
    users = torch.empty(n, dtype=torch.int64)
    at = 0
    for block, size in blocks:
        part = slice(at, at + size)
        _fill_block(block, seed, max(rows // ROWS_PER_USER, 1), logits[part], labels[part], users[part])
        at += size
    return logits, labels, users


def _status_kb(field: str) -> int:
    """A VmXXX field of /proc/self/status, in kB."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else -1


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where /proc/self/clear_refs refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _worker(rank: int, world: int, rows: int, path: str, seed: int, store: str, out_dir: str) -> None:
    """One rank: build its rows, reset the RSS peak, run `path` once, write its figures and metrics."""
    import torch
    import torch.distributed as dist

    from data.metrics.exact import ExactAUCEvaluator

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        evaluator = ExactAUCEvaluator(list(TASKS))
        evaluator.update(*_rank_rows(rank, world, rows, seed))  # one batch: stored as is, no copy
        rows_bytes = sum(t.numel() * t.element_size() for t in evaluator._local_rows())
        gc.collect()
        dist.barrier()
        peak_reset = _reset_peak_rss()
        rss_before = _status_kb("VmRSS") * 1024
        start = time.perf_counter()
        metrics = evaluator.compute() if path == "distributed" else evaluator.compute_gathered()
        seconds = time.perf_counter() - start
        peak = _status_kb("VmHWM") * 1024
        dist.barrier()
        figures = {"rank": rank, "local_rows": evaluator._local_rows()[0].shape[0], "seconds": seconds,
                   "peak_rss": peak, "rss_before": rss_before, "rows_bytes": rows_bytes,
                   "peak_reset": peak_reset, "metrics": metrics}  # fmt: skip
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(figures))
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def _run(path: str, rows: int, world: int, seed: int) -> list[dict[str, Any]]:
    """Spawn `world` ranks running `path` on `rows` rows; each rank's figures, rank order."""
    import torch.multiprocessing as mp

    os.environ["OMP_NUM_THREADS"] = "1"  # the spawned ranks inherit it before they import torch
    with tempfile.TemporaryDirectory() as tmp:
        args = (world, rows, path, seed, f"{tmp}/store", tmp)
        mp.start_processes(_worker, args=args, nprocs=world, start_method="spawn")
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world)]


def _max_difference(a: dict[str, float], b: dict[str, float]) -> float:
    """Largest |a - b| over the keys (NaN on both sides agrees; NaN on one side is inf)."""
    if a.keys() != b.keys():
        return math.inf
    diffs = [0.0 if math.isnan(x) and math.isnan(b[k]) else abs(x - b[k]) for k, x in a.items()]
    return max((math.inf if math.isnan(d) else d for d in diffs), default=0.0)


def _line(path: str, rows: int, world: int, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """The printed figures of one run."""
    mb = 1 / 2**20
    extra = [r["peak_rss"] - r["rss_before"] for r in ranks]
    return {
        "path": path,
        "rows": rows,
        "world": world,
        "rows_per_rank": max(r["local_rows"] for r in ranks),
        "seconds": round(max(r["seconds"] for r in ranks), 3),
        "peak_rss_mb": [round(r["peak_rss"] * mb, 1) for r in ranks],
        "rows_mb": [round(r["rows_bytes"] * mb, 1) for r in ranks],
        "compute_extra_mb": [round(e * mb, 1) for e in extra],  # peak beyond the RSS with the rows built
        "process_base_mb": round(max(r["rss_before"] - r["rows_bytes"] for r in ranks) * mb, 1),
        "peak_reset": all(r["peak_reset"] for r in ranks),
    }


def _extrapolate(line: dict[str, Any]) -> dict[str, Any]:
    """Per-rank peak RSS and time of `line`'s path at TARGET_ROWS on TARGET_WORLD ranks.

    Memory: the process's base, plus the rows' bytes per row times the rows per rank, plus the compute's
    extra bytes per row times the rows it scales with: every row for the gathered path (each rank holds
    and sorts all of them), the rank's share for the distributed one. Time: the slowest rank's n log n
    over that same row count (sorts dominate; the collectives' cost is not modelled)."""
    rows, world = line["rows"], line["world"]
    scaled_rows = rows if line["path"] == "gathered" else rows / world
    target_rows = TARGET_ROWS if line["path"] == "gathered" else TARGET_ROWS / TARGET_WORLD
    rows_per_byte = (rows / world) / (max(line["rows_mb"]) * 2**20)
    peak_mb = (
        line["process_base_mb"]
        + (TARGET_ROWS / TARGET_WORLD) / rows_per_byte / 2**20
        + max(line["compute_extra_mb"]) * target_rows / scaled_rows
    )
    n_log_n = target_rows * math.log(target_rows) / (scaled_rows * math.log(scaled_rows))
    return {
        "from": {"rows": rows, "world": world},
        "peak_rss_gb_per_rank": round(peak_mb / 1024, 2),
        "seconds": round(line["seconds"] * n_log_n, 1),
    }


def bench_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Every (rows, world, path) run; prints one JSON line per run, the paths' agreement, a summary."""
    lines: list[dict[str, Any]] = []
    differences: dict[str, float] = {}
    for rows in args.rows:
        reference: dict[str, float] | None = None
        worst = 0.0
        for world in args.world:
            for path in args.paths:
                ranks = _run(path, rows, world, args.seed)
                line = _line(path, rows, world, ranks)
                print(json.dumps(line), flush=True)
                lines.append(line)
                reference = reference or ranks[0]["metrics"]
                worst = max(worst, *(_max_difference(r["metrics"], reference) for r in ranks))
        differences[str(rows)] = worst
        print(json.dumps({"rows": rows, "max_abs_metric_difference": worst}), flush=True)
    summary = _summary(lines, differences)
    print(json.dumps({"summary": summary}), flush=True)
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps({"runs": lines, "summary": summary}, indent=1))
    worst = max(differences.values(), default=0.0)
    if worst > TOLERANCE:
        raise SystemExit(f"the paths' metrics differ by {worst:.3g} > {TOLERANCE} (see above)")
    return {"runs": lines, "summary": summary}


def _summary(lines: list[dict[str, Any]], differences: dict[str, float]) -> dict[str, Any]:
    """The largest difference, each path's extra memory per world at the largest row count (the
    distributed path's falls as 1 / world), and the extrapolation from each path's largest run."""
    summary: dict[str, Any] = {"max_abs_metric_difference": max(differences.values(), default=0.0)}
    for path in PATHS:
        runs = [line for line in lines if line["path"] == path]
        if not runs:
            continue
        largest = max(line["rows"] for line in runs)
        at_largest = sorted(
            (line for line in runs if line["rows"] == largest), key=lambda line: line["world"]
        )
        summary[path] = {
            f"compute_extra_mb_per_rank_at_{largest}_rows": {
                line["world"]: max(line["compute_extra_mb"]) for line in at_largest
            },
            f"extrapolated_{TARGET_ROWS}_rows_{TARGET_WORLD}_ranks": _extrapolate(at_largest[-1]),
        }
    return summary


def _ints(text: str) -> list[int]:
    values = [int(float(v)) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _paths(text: str) -> list[str]:
    paths = [p.strip() for p in text.split(",") if p.strip()]
    if not paths or not set(paths) <= set(PATHS):
        raise argparse.ArgumentTypeError(f"expected some of {','.join(PATHS)}, got {text!r}")
    return paths


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options; shared with `launch/bench.py eval`."""
    ap.add_argument("--rows", type=_ints, default=[10_000_000, 50_000_000], help="e.g. 1000000,2000000")
    ap.add_argument("--world", type=_ints, default=[2], help="ranks, e.g. 1,2 (the 1/world scaling)")
    ap.add_argument("--paths", type=_paths, default=list(PATHS), help="gathered,distributed or one of them")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    return ap


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="exact evaluation: sharded vs gathered, time and memory")
    bench_eval(add_arguments(parser).parse_args())
