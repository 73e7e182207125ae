"""Reader throughput: rows/s from Parquet to RecBatch (with prefetch) on one core.

    python launch/bench.py loader --root datasets/synthetic --batch-size 4096 [--workers 0,1,2]
        [--split train] [--max-batches N] [--against-s3]
    torchrun --nproc_per_node R launch/bench.py loader --root datasets/synthetic --in-training --workers 0,1
        (launch/benchmarks/loader_step.py: the training step time, streamed vs pre-loaded batches)

`--workers` lists the reader's decoding processes to measure in one run (0: the prefetch thread of this
process); each figure is one pass over the split after a warm-up pass (the page cache holds the files), and
the summary gives each count's rows/s per decoding core and its speed-up over one worker.

`--root` is a path or a URI and `--split` a directory or a partition selection (data/partitions.py).
`--against-s3` measures the same split twice in one run: from local disk, then from a local S3-compatible
server (moto's, started here, the files uploaded to it), and reports the ratio.

`bench_loader(args)` is the entry point `launch/bench.py loader` calls; `args` needs root, batch_size and
optionally config, split, max_batches, threads, shuffle, against_s3.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from data.storage import display

DEFAULT_CONFIG = "conf/data/synthetic.yaml"


def bench_loader(args: argparse.Namespace) -> dict[str, Any]:
    """Iterate the reader once over a split and return (and print) rows/s."""
    import pyarrow as pa
    import torch

    from data.schema import Schema

    threads = int(getattr(args, "threads", 1))
    # one core: torch, pyarrow's compute pool and its I/O pool all limited, so the figure is per core
    torch.set_num_threads(threads)
    pa.set_cpu_count(threads)
    pa.set_io_thread_count(threads)

    if getattr(args, "in_training", False):
        from launch.benchmarks.loader_step import bench_in_training

        return {"in_training": bench_in_training(args)}
    schema = Schema.load(getattr(args, "config", None) or DEFAULT_CONFIG)
    split = getattr(args, "split", "train")
    if getattr(args, "against_s3", False):
        return _against_s3(args, schema, split)
    counts = getattr(args, "workers", None) or [0]
    results = [_measure(args, schema, args.root, split, threads, workers=n) for n in counts]
    if len(results) == 1:
        return results[0]
    one = next((r["rows_per_s"] for r in results if r["workers"] == 1), None)
    summary = {
        f"workers={r['workers']}": {
            "rows_per_s": r["rows_per_s"],
            "rows_per_s_per_decoding_core": round(r["rows_per_s"] / max(r["workers"], 1), 1),
            **({"over_one_worker": round(r["rows_per_s"] / one, 3)} if one else {}),
        }
        for r in results
    }
    print(json.dumps({"summary": summary}))
    return {"runs": results, "summary": summary}


def _measure(
    args: argparse.Namespace, schema: Any, root: str, split: str, threads: int, workers: int = 0
) -> dict[str, Any]:
    from data.partitions import split_files
    from data.reader import ParquetReader

    files = split_files(root, split)
    shuffle_buffer = getattr(args, "shuffle_buffer", 16384)
    reader = ParquetReader(files, schema, batch_size=args.batch_size, shuffle=getattr(args, "shuffle", True),
                           shuffle_buffer=shuffle_buffer, prefetch=4, workers=workers)  # fmt: skip
    for n, _ in enumerate(reader):  # warm-up: the page cache, the allocator
        if n >= 20:
            break
    max_batches = getattr(args, "max_batches", None) or len(reader)
    rows = values = n = 0
    t0 = time.perf_counter()
    for batch in reader:
        rows += batch.batch_size
        values += batch.sparse.values().numel()
        n += 1
        if n >= max_batches:
            break
    dt = time.perf_counter() - t0
    result = {
        "root": display(root),
        "split": split,
        "batch_size": args.batch_size,
        "threads": threads,
        "workers": workers,
        "shuffle_buffer": shuffle_buffer,
        "batches": n,
        "rows": rows,
        "seconds": round(dt, 3),
        "rows_per_s": round(rows / dt, 1),
        "ids_per_s": round(values / dt, 1),
    }
    print(json.dumps(result))
    return result


def _against_s3(args: argparse.Namespace, schema: Any, split: str) -> dict[str, Any]:
    """The split from local disk, then from moto's S3 server on localhost (this process's threads serve
    it, as a nearby object store would: every read is an HTTP range request)."""
    import logging
    import os

    import boto3
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    from data.partitions import split_files

    threads = int(getattr(args, "threads", 1))
    local = _measure(args, schema, args.root, split, threads)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the server's line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                          AWS_ENDPOINT_URL=f"http://{host}:{port}")  # fmt: skip
        boto3.client("s3").create_bucket(Bucket="bench")
        fs, _ = pafs.FileSystem.from_uri("s3://bench/")
        root = os.path.abspath(args.root)
        for f in split_files(args.root, split):
            rel = os.path.relpath(f, root)
            pafs.copy_files(f, f"bench/data/{rel}", destination_filesystem=fs)
        remote = _measure(args, schema, "s3://bench/data", split, threads)
    finally:
        server.stop()
    result = {
        "local": local,
        "s3": remote,
        "s3_over_local": round(remote["rows_per_s"] / local["rows_per_s"], 3),
    }
    print(json.dumps({"s3_over_local": result["s3_over_local"]}))
    return result


def _counts(text: str) -> list[int]:
    counts = [int(v) for v in text.split(",") if v.strip()]
    if not counts or min(counts) < 0:
        raise argparse.ArgumentTypeError(f"expected counts >= 0, got {text!r}")
    return counts


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options; shared with `launch/bench.py loader`."""
    ap.add_argument("--root", required=True, help="dataset root (a path or URI)")
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--split", default="train")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--max-batches", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=_counts, default=[0], help="decoding processes, e.g. 0,1,2")
    ap.add_argument("--no-shuffle", dest="shuffle", action="store_false")
    ap.add_argument(
        "--shuffle-buffer", type=int, default=16384, help="rows per shuffle window (data.shuffle_buffer)"
    )
    ap.add_argument("--against-s3", action="store_true", help="also from a local S3 server; the ratio")
    ap.add_argument(
        "--in-training",
        action="store_true",
        help="step time of the make-train job, streamed vs one pre-loaded batch (under torchrun)",
    )
    ap.add_argument("--steps", type=int, default=150, help="--in-training: timed steps per mode")
    ap.add_argument("--override", action="append", default=[], help="--in-training: a train config override")
    return ap


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="ParquetReader throughput (rows/s) on one core")
    bench_loader(add_arguments(parser).parse_args())
