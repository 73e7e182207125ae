"""Where a loader worker's CPU time goes, per row: Parquet decode (pyarrow + our checks), cutting windows out
of row groups, building the batches into shared memory (the shuffle's gathers, the KJTs), and in the
training process copying a window out of shared memory and making its RecBatches.

    python reports/throughput/loader_phases.py [--batch-size 4096] [--rows 600000]

One process runs the worker's own loop (data/workers.py `_worker_windows`, one worker) and consumes its
items as the training process does; process CPU time per phase, in microseconds per row.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import torch

import data.workers as workers
from data.decode import Chunk
from data.partitions import split_files
from data.reader import ParquetReader
from data.schema import Schema


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="datasets/synthetic")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--shuffle-buffer", type=int, default=16384)
    ap.add_argument("--rows", type=int, default=600_000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    schema = Schema.load("conf/data/synthetic.yaml")
    reader = ParquetReader(split_files(args.root, "train"), schema, batch_size=args.batch_size,
                           shuffle_buffer=args.shuffle_buffer, prefetch=0)  # fmt: skip
    spent: collections.Counter = collections.Counter()

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any, **k: Any) -> Any:
            t0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.process_time() - t0

        return run

    reader._read = timed("parquet decode + checks", reader._read)  # type: ignore[method-assign]
    concat = Chunk.concat
    Chunk.concat = staticmethod(timed("window cut", concat))  # type: ignore[method-assign]
    workers.pack = timed("batches into shared memory", workers.pack)
    busy = torch.zeros(workers.SLOTS, dtype=torch.int32)
    store = workers.RowGroupStore.create()
    rows, t0 = 0, time.process_time()
    try:
        items = workers._worker_windows(reader, 0, 0, store, workers.SlotPool(busy, 0, workers.SLOTS), 0, 1)
        for item in items:
            t1 = time.process_time()
            copied = item.copy()  # what worker_batches does on a CPU job
            busy[item.slot] = 0
            rows += sum(b.batch_size for b in workers.unpack(copied))
            spent["training process: copy out + RecBatches"] += time.process_time() - t1
            if rows >= args.rows:
                break
    finally:
        store.close()
    total = time.process_time() - t0
    per_row = {k: round(1e6 * v / rows, 3) for k, v in spent.items()}
    per_row["total"] = round(1e6 * total / rows, 3)
    print(json.dumps({"rows": rows, "batch_size": args.batch_size, "us_per_row": per_row,
                      "rows_per_cpu_second": round(rows / total)}))  # fmt: skip


if __name__ == "__main__":
    main()
