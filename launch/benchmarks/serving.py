"""`python launch/bench.py serving`: exported inference artifacts (launch/export.py) scoring a Parquet
split in one process: rows/s end to end (Arrow decode + checks, embedding lookups, the exported dense
program), artifact size, test AUC per task and the largest probability difference to the first artifact
(e.g. int8 vs fp32 embeddings). Needs torch, pyarrow and this repo's pipeline/predictor.py, no TorchRec.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

# pyarrow and the predictor are imported in bench_serving: `bench.py dense` on a torch-only box imports
# this module for its arguments.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifacts", required=True, help="comma-separated artifact dirs (first: reference)")
    parser.add_argument("--data", required=True, help="a split dir (or file) of Parquet rows to score")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows per Predictor call")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes (the best is kept)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")


def bench_serving(args: argparse.Namespace) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    from data.metrics.auc import binary_auc
    from launch.benchmarks.timing import write_json
    from pipeline.predictor import Predictor

    def score(p: Predictor, files: list[Path]) -> np.ndarray:
        return np.concatenate([b for f in files for b in p.predict_parquet(f, batch_size=args.batch_size)])

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    files = sorted(data.glob("*.parquet")) if data.is_dir() else [data]
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    results, reference = [], None
    for art in args.artifacts.split(","):
        p = Predictor(art)
        score(p, files[:1])  # warm-up: first-call allocations
        seconds = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            probs = score(p, files)
            seconds.append(time.perf_counter() - t0)
        reference = probs if reference is None else reference
        aucs = {}
        if set(p.tasks) <= set(pq.read_schema(files[0]).names):  # labelled rows: AUC per task
            labels = pq.read_table(files, columns=p.tasks)
            for j, t in enumerate(p.tasks):
                y = torch.from_numpy(labels[t].to_numpy().astype(np.float32))
                aucs[t] = binary_auc(torch.from_numpy(probs[:, j]), y)
        sizes = {f.name: f.stat().st_size for f in Path(art).iterdir()}
        results.append(
            {
                "artifact": art,
                "quantize": p.manifest["quantize"],
                "rows": rows,
                "rows_per_s": rows / min(seconds),
                "size_mib": sum(sizes.values()) / 2**20,
                "embeddings_mib": sizes["embeddings.pt"] / 2**20,
                "auc": aucs,
                "max_abs_prob_diff_vs_first": float(np.abs(probs - reference).max()),
                "parity_vs_training_model": p.manifest["parity"],
            }
        )
    print(f"{'artifact':<40}{'quantize':>9}{'MiB':>8}{'emb MiB':>9}{'rows/s':>10}  AUC  max|dp| vs first")
    for r in results:
        auc = " ".join(f"{t} {a:.4f}" for t, a in r["auc"].items())
        print(
            f"{r['artifact']:<40}{r['quantize']:>9}{r['size_mib']:>8.1f}{r['embeddings_mib']:>9.1f}"
            f"{r['rows_per_s']:>10.0f}  {auc}  {r['max_abs_prob_diff_vs_first']:.2e}"
        )
    out = {"threads": args.threads, "batch_size": args.batch_size, "data": str(data), "results": results}
    write_json(args.json, out)
    return out
