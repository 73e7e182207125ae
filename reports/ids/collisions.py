"""The id-level figures of reports/ids/README.md: per table, how often a test row's id shares its row with
another id (modulo hashing: the training split's distinct ids per bucket) or has no row of its own (managed
collisions: the reserved row, from the exported artifact's remapping), and the runs' test metrics.

    python reports/ids/collisions.py /tmp/ids
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from data.hashing import hash_ids
from pipeline.predictor import Predictor, zch_rows

TABLES = {"user_id_emb": ("user_id", 8000), "item_id": ("item_id", 16000)}


def main(out: Path) -> None:
    train = pq.read_table(out / "data" / "train", columns=["user_id", "item_id"])
    test = pq.read_table(out / "data" / "test", columns=["user_id", "item_id"])
    for table, (column, rows) in TABLES.items():
        ids = np.unique(train[column].to_numpy())
        buckets = hash_ids(ids, rows)
        shared = np.bincount(buckets, minlength=rows)[buckets] > 1  # (distinct ids,)
        test_ids = test[column].to_numpy()
        bucket_of = dict(zip(ids.tolist(), shared.tolist()))
        row_share = np.mean([bucket_of.get(i, True) for i in test_ids.tolist()])
        print(
            f"{table}: {len(ids)} distinct train ids for {rows} rows; modulo: {shared.mean():.4f} of them "
            f"share a row, {row_share:.4f} of test rows"
        )
        for v in ("lfu", "lru"):
            p = Predictor(out / f"export_{v}", load_programs=False)
            reserved = zch_rows(p.tables[table], torch.from_numpy(test_ids)) == rows - 1
            print(f"  zch {v}: {float(reserved.float().mean()):.4f} of test rows on the reserved row")
    for v in ("hash", "lfu", "lru"):
        m = json.loads((out / "runs" / v / "metrics.json").read_text())
        t = m["test"]
        print(
            v,
            {
                k: round(t[k], 4)
                for k in ("finish/auc", "finish/uauc", "skip/auc", "skip/uauc", "mean_auc", "mean_uauc")
            },
            "samples/s",
            round(m["train_samples_per_s"]),
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
