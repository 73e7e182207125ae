"""MovieLens-100K as a one-task CTR dataset (label `like` = rating >= 4), converted from RecBole's copy.

    python -m pip download --no-deps recbole==1.2.1 -d datasets/.cache     # the only network step
    python -m data.build.ml100k --root datasets/ml100k [--wheel-dir datasets/.cache] [--config CONFIG]

Source: the atomic files `recbole/dataset_example/ml-100k/ml-100k.{inter,user,item}` inside the
`recbole==1.2.1` wheel, read straight out of the zip by data.build.ml100k_wheel. The conversion (dense ids,
features, the per-user time split, history without label leaks) is data.build.ml100k_tables, whose docstring
spells it out. This module writes the result and is the CLI.

Output: <root>/{train,valid,test}/part-*.parquet (several row groups per file, so that the reader's
round-robin of (file, row group) pairs gives every rank data) and <root>/dataset.json (row counts, positive
rates, user / item counts, vocabulary sizes, the wheel's sha256). Train rows are shuffled with a fixed
seed; valid / test rows stay in (user, time) order. The output is byte-identical on a rerun (no timestamps
in it). Writing is atomic (data.dataset_dir): everything goes to a sibling temp directory that replaces
<root> only once complete. Besides the schema's columns, each row carries `timestamp` (int64, seconds) and
`rating` (float): the model never reads them (they are not in the schema; `rating` is the label's source).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from itertools import accumulate
from pathlib import Path
from typing import Any

from data.build.ml100k_tables import LABEL, MAX_SEQ_LEN, Converted, check_against_schema, convert_tables
from data.build.ml100k_wheel import DEFAULT_WHEEL_DIR, PACKAGE, SourceError, find_wheel, read_wheel
from data.dataset_dir import atomic_dir, part_sizes, write_parts
from data.schema import Schema

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "conf" / "data" / "ml100k.yaml"
# per split: files, row groups per file (mirrors data/build/generate.py: 2 ranks each get several row groups)
FILES = {"train": 4, "valid": 2, "test": 2}
ROW_GROUPS_PER_FILE = 4


def write_dataset(conv: Converted, root: str | Path, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """<root>/{train,valid,test}/part-*.parquet + dataset.json, atomically; returns dataset.json's content."""
    info = {
        **conv.info,
        "source": source or {},
        "splits": {k: dict(v) for k, v in conv.info["splits"].items()},
    }
    with atomic_dir(root) as tmp:
        for split, table in conv.tables.items():
            sizes = part_sizes(table.num_rows, FILES[split])
            parts = [table.slice(start, n) for start, n in zip(accumulate(sizes, initial=0), sizes)]
            info["splits"][split].update(write_parts(tmp, split, parts, ROW_GROUPS_PER_FILE))
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def convert(
    root: str | Path,
    wheel_dir: str | Path = DEFAULT_WHEEL_DIR,
    schema: Schema | None = None,
    max_seq_len: int = MAX_SEQ_LEN,
) -> dict[str, Any]:
    """Wheel in `wheel_dir` -> dataset at `root`; returns dataset.json's content."""
    wheel = find_wheel(wheel_dir)
    conv = convert_tables(read_wheel(wheel), max_seq_len=max_seq_len)
    if schema is not None:
        check_against_schema(conv, schema)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    return write_dataset(conv, root, source={"package": PACKAGE, "wheel": wheel.name, "sha256": sha})


def summary(info: dict[str, Any]) -> str:
    lines = [f"ml100k: {info['interactions']} ratings, {info['users']} users, {info['items']} items"]
    for split, s in info["splits"].items():
        lines.append(
            f"{split:5s} {s['rows']:>7d} rows {len(s['files'])} files {s['row_groups']} row groups "
            f"{s['users']} users, {LABEL} positive rate {s['positive_rate'][LABEL]:.4f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="datasets/ml100k", help="output directory (replaced when complete)")
    ap.add_argument(
        "--wheel-dir", default=DEFAULT_WHEEL_DIR, help=f"where the {PACKAGE} wheel was downloaded"
    )
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="data config whose schema the ids must fit")
    args = ap.parse_args(argv)
    try:
        info = convert(args.root, args.wheel_dir, Schema.load(args.config))
    except SourceError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(summary(info))


if __name__ == "__main__":
    main()
