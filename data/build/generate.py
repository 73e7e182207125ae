"""Synthetic short-video impressions with known true probabilities (the oracle).

    python -m data.build.generate --config conf/data/synthetic.yaml [--root DIR] [--rows N] [--seed S]
        [--days N] [--start-date YYYY-MM-DD] [--overwrite]

Writes <root>/{train,valid,test}/part-*.parquet with the schema's columns plus hidden `_row_id` and
`_p_<task>` (the true probabilities), and <root>/dataset.json with each split's oracle AUC / UAUC. How
the truth is built: data.build.world. With --days N (the daily mode) it writes N partitions
<root>/dt=<date>/part-*.parquet of --rows rows each instead, from a world that drifts day by day (new
items and authors launch, popularity moves to the newest items, tastes and interests drift), with each
day's oracle.

Raw ids: a feature with managed collisions (`zch:` in the schema, e.g. conf/data/synthetic_raw.yaml) gets
its ids written as 64-bit hashes (splitmix64 of the table and the id), as production logs carry them: any
int64, unbounded, and as skewed as the world draws them (popular items, active users). Features of one table
hash alike, so a shared table still sees one id space; a `user_id` column read by a zch feature is raw too.

Determinism: the world (users, items, authors, factor tables) comes from rng(seed), each file from
rng(seed, split, file); same seed -> byte-identical files. Writing is atomic: everything goes to a sibling
temp directory that is renamed into place at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import yaml

from data.build.world import GenParams, World
from data.dataset_dir import SPLITS, atomic_dir, part_sizes, write_parts
from data.hashing import splitmix64
from data.metrics.auc import binary_auc, user_auc
from data.schema import Schema, SequenceFeature, SparseFeature


# ------------------------------------------------------------------------ tables and files
def to_table(rows: dict[str, Any], schema: Schema) -> pa.Table:
    """Columns named by the schema (+ hidden `_row_id`, `_p_*`), checked against table ranges."""
    cols: dict[str, pa.Array] = {"_row_id": pa.array(rows["_row_id"])}
    for lab in schema.labels:
        cols[lab] = pa.array(rows[lab])
        cols[f"_p_{lab}"] = pa.array(rows[f"_p_{lab}"])
    raw = {f.column: f.table_name for f in (*schema.sparse, *schema.sequence_features) if f.zch is not None}
    cols[schema.user_id] = pa.array(_ids(rows["user_id"], raw.get(schema.user_id)))
    for f in schema.dense:
        # from_pandas: NaN -> null, the way real logs mark a missing value
        cols[f.column] = pa.array(_known(rows, f.name, f.column), type=pa.float32(), from_pandas=True)
    for f in (*schema.sparse, *schema.sequence_features):
        v = _known(rows, f.name, f.column)
        if isinstance(v, tuple):
            off, vals = v
            _check_range(f, vals)
            vals = _ids(vals, raw.get(f.column))
            cols[f.column] = pa.ListArray.from_arrays(pa.array(off.astype(np.int32)), pa.array(vals))
        else:
            _check_range(f, v)
            cols[f.column] = pa.array(_ids(v, raw.get(f.column)))
    return pa.table(cols)


def raw_ids(ids: np.ndarray, table: str) -> np.ndarray:
    """The world's ids of a table as 64-bit hashes: splitmix64 of the id salted with the table's name, so
    different tables' ids do not coincide. Never TorchRec's empty-slot id (2^63 - 1)."""
    salt = np.uint64(int.from_bytes(hashlib.blake2b(table.encode(), digest_size=8).digest(), "little"))
    out = splitmix64(ids.view(np.uint64) ^ salt).view(np.int64)
    return np.where(out == np.iinfo(np.int64).max, np.int64(0), out)


def _ids(ids: np.ndarray, raw_table: str | None) -> np.ndarray:
    """int64 ids as written: a zch table's raw (`raw_ids`), any other's as drawn."""
    ids = ids.astype(np.int64)
    return ids if raw_table is None else raw_ids(ids, raw_table)


def _known(rows: dict[str, Any], name: str, column: str) -> Any:
    """The generated values for a feature, looked up by feature name, else by column name."""
    if name in rows:
        return rows[name]
    if column in rows:
        return rows[column]
    raise ValueError(
        f"generator: schema feature {name!r} is not one the synthetic generator produces "
        f"(known: {', '.join(k for k in rows if not k.startswith('_'))})"
    )


def _check_range(f: SparseFeature | SequenceFeature, v: np.ndarray) -> None:
    if not f.hash and f.zch is None and len(v) and (v.min() < 0 or v.max() >= f.num_embeddings):
        raise ValueError(
            f"generator: feature {f.name!r} produces ids up to {int(v.max())} but "
            f"num_embeddings is {f.num_embeddings}; raise it or set hash: true"
        )


def _write_files(
    world: World, schema: Schema, out: Path, name: str, rows: int, files: int, stream: int, first_row: int
) -> dict[str, Any]:
    """`rows` impressions as `out/<name>/part-*.parquet` (`files` files), file f from rng(seed, stream, f),
    row ids from `first_row`; returns the json entry: files, positive rates and the oracle."""
    p = world.p
    oracle_parts: list[pa.Table] = []

    def tables() -> Iterator[pa.Table]:
        start = first_row
        for f, n in enumerate(part_sizes(rows, files)):
            table = to_table(world.rows(n, np.random.default_rng([p.seed, stream, f]), start), schema)
            oracle_parts.append(table.select(oracle_columns(schema)))
            start += n
            yield table

    parts = write_parts(out, name, tables(), p.row_groups_per_file)
    oracle = pa.concat_tables(oracle_parts)
    return {
        "rows": rows,
        **parts,
        "positive_rate": {t: float(np.mean(oracle.column(t).to_numpy())) for t in schema.labels},
        "oracle": oracle_metrics(oracle, schema),
    }


def _write_split(world: World, schema: Schema, split_no: int, split: str, out: Path) -> dict[str, Any]:
    """One split's part files under `out`, file f from rng(seed, split_no, f); returns its json entry."""
    p = world.p
    rows, files = getattr(p, f"rows_{split}"), getattr(p, f"files_{split}")
    return _write_files(world, schema, out, split, rows, files, stream=split_no, first_row=0)


def day_partitions(p: GenParams) -> list[str]:
    """The daily mode's partition names, dt=<start_date + d> for d < days."""
    start = date.fromisoformat(p.start_date)
    return [f"dt={start + timedelta(days=d)}" for d in range(p.days)]


def _write_day(world: World, schema: Schema, day: int, partition: str, out: Path) -> dict[str, Any]:
    """Day `day`'s impressions as `out/<partition>/part-*.parquet`, file f from rng(seed, 100 + day, f),
    after the world has drifted to that day; returns its json entry with the day's oracle."""
    p = world.p
    world.advance(day)
    entry = _write_files(
        world,
        schema,
        out,
        partition,
        p.rows_train,
        p.files_train,
        stream=100 + day,
        first_row=day * p.rows_train,
    )
    return {**entry, "items_on_offer": int((world.item_launch <= day).sum())}


def oracle_columns(schema: Schema) -> list[str]:
    return [schema.user_id, *schema.labels, *(f"_p_{t}" for t in schema.labels)]


def oracle_metrics(table: pa.Table, schema: Schema) -> dict[str, dict[str, float]]:
    """AUC / UAUC of the true probabilities `_p_<task>` against the drawn labels, per task."""
    users = torch.from_numpy(table.column(schema.user_id).to_numpy().astype(np.int64))
    out = {}
    for t in schema.labels:
        scores = torch.from_numpy(table.column(f"_p_{t}").to_numpy().astype(np.float32))
        labels = torch.from_numpy(table.column(t).to_numpy().astype(np.float32))
        u = user_auc(scores, labels, users)
        out[t] = {
            "auc": binary_auc(scores, labels),
            "uauc": u["uauc"],
            "uauc_weighted": u["uauc_weighted"],
            "uauc_users": u["uauc_users"],
        }
    return out


def generate(
    schema: Schema, params: GenParams, root: str | Path, overwrite: bool = False, verbose: bool = False
) -> dict[str, Any]:
    """Write <root>/{train,valid,test}/part-*.parquet (daily mode: <root>/dt=<date>/part-*.parquet) and
    <root>/dataset.json atomically; returns the json."""
    root = Path(root)
    if root.exists() and not overwrite:
        raise FileExistsError(f"{root} exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    with atomic_dir(root) as tmp:
        world = World(params)
        info: dict[str, Any] = {
            "schema": schema.name,
            "seed": params.seed,
            "generator": asdict(params),
            "splits": {},
        }
        names = day_partitions(params) if params.days else SPLITS
        for i, split in enumerate(names):
            if params.days:
                info["splits"][split] = _write_day(world, schema, i, split, tmp)
            else:
                info["splits"][split] = _write_split(world, schema, i, split, tmp)
            if verbose:
                print(
                    f"  {split}: {info['splits'][split]['rows']} rows ({time.perf_counter() - t0:.1f}s)",
                    file=sys.stderr,
                )
        info["generation_seconds"] = round(time.perf_counter() - t0, 2)
        # the timing differs run to run, so it goes in a side file to keep dataset.json reproducible
        stable = {k: v for k, v in info.items() if k != "generation_seconds"}
        (tmp / "dataset.json").write_text(json.dumps(stable, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_time.txt").write_text(f"{info['generation_seconds']}\n")
    return info


def summary(info: dict[str, Any]) -> str:
    lines = [f"dataset {info['schema']} seed={info['seed']}"]
    for split, s in info["splits"].items():
        parts = [f"{split:5s} {s['rows']:>9d} rows {len(s['files'])} files {s['row_groups']} row groups"]
        for t, m in s["oracle"].items():
            parts.append(
                f"{t}: pos {s['positive_rate'][t]:.3f} AUC {m['auc']:.4f} UAUC {m['uauc']:.4f}"
                f" wUAUC {m['uauc_weighted']:.4f}"
            )
        lines.append(" | ".join(parts))
    if "generation_seconds" in info:
        lines.append(f"generated in {info['generation_seconds']:.1f}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="conf/data/synthetic.yaml")
    ap.add_argument("--root", help="output directory (default: the config's root)")
    ap.add_argument("--rows", type=int, help="train rows; valid/test scale with it")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--days", type=int, help="daily mode: this many dt=<date> partitions of --rows rows each")
    ap.add_argument("--start-date", help="daily mode: the first partition's date (YYYY-MM-DD)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    cfg = yaml.safe_load(Path(args.config).read_text())
    schema = Schema.from_dict(cfg["schema"])
    params = GenParams.from_dict(cfg.get("generator"))
    if args.rows is not None:
        params = params.scaled(args.rows)
    overrides = {"seed": args.seed, "days": args.days, "start_date": args.start_date}
    params = GenParams(**{**asdict(params), **{k: v for k, v in overrides.items() if v is not None}})
    root = args.root or cfg.get("root")
    if not root:
        ap.error("no --root and no root in the config")
    try:
        info = generate(schema, params, root, overwrite=args.overwrite, verbose=True)
    except FileExistsError as e:
        ap.exit(2, f"error: {e}\n")
    print(summary(info))


if __name__ == "__main__":
    main()
