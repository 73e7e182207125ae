"""Reader throughput: rows/s from Parquet to RecBatch (with prefetch) on one core.

    python launch/bench.py loader --root datasets/synthetic --batch-size 512 [--split train] [--max-batches N]

`bench_loader(args)` is the entry point `launch/bench.py loader` calls; `args` needs root, batch_size and
optionally config, split, max_batches, threads, shuffle.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = "conf/data/synthetic.yaml"


def bench_loader(args: argparse.Namespace) -> dict[str, Any]:
    """Iterate the reader once over a split and return (and print) rows/s."""
    import pyarrow as pa
    import torch

    from data.reader import ParquetReader
    from data.schema import Schema

    threads = int(getattr(args, "threads", 1))
    # one core: torch, pyarrow's compute pool and its I/O pool all limited, so the figure is per core
    torch.set_num_threads(threads)
    pa.set_cpu_count(threads)
    pa.set_io_thread_count(threads)

    schema = Schema.load(getattr(args, "config", None) or DEFAULT_CONFIG)
    split = Path(args.root) / getattr(args, "split", "train")
    reader = ParquetReader(
        split, schema, batch_size=args.batch_size, shuffle=getattr(args, "shuffle", True), prefetch=4
    )
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
        "split": str(split),
        "batch_size": args.batch_size,
        "threads": threads,
        "batches": n,
        "rows": rows,
        "seconds": round(dt, 3),
        "rows_per_s": round(rows / dt, 1),
        "ids_per_s": round(values / dt, 1),
    }
    print(json.dumps(result))
    return result


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's options; shared with `launch/bench.py loader`."""
    ap.add_argument("--root", required=True, help="dataset root holding train/ valid/ test/")
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--split", default="train")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--max-batches", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-shuffle", dest="shuffle", action="store_false")
    return ap


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="ParquetReader throughput (rows/s) on one core")
    bench_loader(add_arguments(parser).parse_args())
