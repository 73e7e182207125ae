"""Infer a schema from Parquet: `python -m data.infer_schema <dataset root> > conf/data/<name>.yaml`.

Reads the Parquet metadata of every file (types, row-group min / max / null counts) and a sample of rows
(`--sample-rows`, from the train split if the root has one), and writes a data config whose schema guesses
each column's role, with a comment on every guess the user should check:

- `_`-prefixed columns (bookkeeping, oracle probabilities) and timestamp-named integers are skipped.
- Labels: 0/1-valued columns (bool, int or float), e.g. `click`, `like`, `finish`.
- Leaks: a float column that separates a label almost perfectly on the sample (AUC >= 0.99, e.g. the
  rating a like-label was derived from) is left out, with its AUC in a comment.
- The user id: `user_id` / `uid` / `userid`, else the first integer column named like `user*id`.
- Integer columns are ID features: `num_embeddings` = max + 1 over all files' statistics; negative ids or a
  vocabulary above `--hash-threshold` get `hash: true` and a table sized from the sample's distinct count.
- List<int> columns: those whose row lengths are equal on every sampled row form the behaviour sequence
  (aligned columns, e.g. item ids and actions), the others are multi-hot bags. A sequence column shares the
  table of the scalar ID column it names (`seq_item_id` -> `item_id`, `seq_category` -> `item_category`),
  so the candidate and its history use one embedding.
- Float columns are dense features; `on_missing: fill` where the sample or the statistics have nulls/NaN.
- Groups: the name's prefix before the first `_` (`user_age` -> user); `roles:` declares the candidate
  groups (item-like prefixes) and the user group, which model.sequence=longer needs.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from data.auc import binary_auc
from data.decode import DataError, open_parquet
from data.schema import Schema

LABEL_HINT = re.compile(r"(label|click|like|convert|conversion|purchase|finish|skip|target|is_)", re.I)
TIME_HINT = re.compile(r"(^|_)(ts|time|timestamp|date|datetime|epoch)($|_)", re.I)
SEQUENCE_HINT = re.compile(r"^(seq|hist|history|behavior|behaviour|click_seq)_", re.I)
CANDIDATE_GROUPS = ("item", "author", "video", "ad", "product", "creative", "doc", "goods", "movie", "song")
LEAK_AUC = 0.99
SEQUENCE_DIM = 16  # one dim for every table looked up unpooled (sequence=longer: TorchRec's rule)


@dataclass
class Inferred:
    labels: list[str] = field(default_factory=list)
    user_id: str = ""
    dense: list[dict] = field(default_factory=list)
    sparse: list[dict] = field(default_factory=list)
    sequence: list[dict] = field(default_factory=list)
    max_len: int = 0
    notes: dict[str, str] = field(default_factory=dict)  # column -> comment
    skipped: dict[str, str] = field(default_factory=dict)  # column -> why


def _files(root: Path) -> tuple[list[Path], list[Path]]:
    """(every Parquet file, the files to sample from: the train split's if there is one)."""
    if not root.exists():
        raise DataError(f"{root}: no such directory")
    files = sorted(root.rglob("*.parquet"))
    if not files:
        raise DataError(f"{root}: no *.parquet files (looked in subdirectories too)")
    train = sorted((root / "train").glob("*.parquet"))
    return files, train or files


def _stats(files: Sequence[Path], column: str) -> tuple[float | None, float | None, int]:
    """(min, max, null count) of a column over every row group of every file (list columns: elements)."""
    lo, hi, nulls = None, None, 0
    for path in files:
        md = open_parquet(path).metadata
        names = [md.schema.column(i).path for i in range(md.num_columns)]
        for want in (column, f"{column}.list.element", f"{column}.list.item"):
            if want in names:
                idx = names.index(want)
                break
        else:
            continue
        for g in range(md.num_row_groups):
            s = md.row_group(g).column(idx).statistics
            if s is None or not s.has_min_max:
                return None, None, nulls
            lo = s.min if lo is None else min(lo, s.min)
            hi = s.max if hi is None else max(hi, s.max)
            nulls += s.null_count or 0
    return lo, hi, nulls


def _sample(files: Sequence[Path], rows: int) -> pa.Table:
    tables, have = [], 0
    for path in files:
        pf = open_parquet(path)
        for g in range(pf.metadata.num_row_groups):
            tables.append(pf.read_row_group(g))
            have += tables[-1].num_rows
            if have >= rows:
                return pa.concat_tables(tables).slice(0, rows)
    return pa.concat_tables(tables)


def _is_binary(arr: pa.ChunkedArray) -> bool:
    values = arr.drop_null().to_numpy(zero_copy_only=False).astype(np.float64)
    return len(values) > 0 and bool(np.isin(values, (0.0, 1.0)).all())


def _group(column: str) -> str:
    return column.split("_", 1)[0].lower() if "_" in column.strip("_") else "other"


def _dim(num_embeddings: int) -> int:
    return 8 if num_embeddings <= 64 else 16


def _hashed_size(values: np.ndarray, threshold: int) -> int:
    """Buckets for a hashed id column: a power of two >= 2x the sample's distinct ids, <= threshold."""
    distinct = len(np.unique(values)) if len(values) else 1
    return int(min(threshold, 2 ** math.ceil(math.log2(max(2 * distinct, 16)))))


def infer(root: Path, sample_rows: int = 100_000, hash_threshold: int = 1 << 20) -> Inferred:
    files, sample_files = _files(root)
    sample = _sample(sample_files, sample_rows)
    schema = pq.read_schema(files[0])
    out = Inferred()

    columns = []
    for f in schema:
        if f.name.startswith("_"):
            out.skipped[f.name] = "a _-prefixed column (bookkeeping or an oracle)"
        else:
            columns.append(f)

    # labels first: every 0/1 column
    for f in columns:
        t = f.type
        if (pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_floating(t)) and _is_binary(
            sample.column(f.name)
        ):
            out.labels.append(f.name)
            out.notes[f.name] = "0/1 values" + ("" if LABEL_HINT.search(f.name) else ": a binary feature?")
    label_set = set(out.labels)
    out.user_id = _user_id([f for f in columns if f.name not in label_set and pa.types.is_integer(f.type)])

    lists = [f for f in columns if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)]
    sequence_cols = _aligned_lists(sample, lists)
    for f in columns:
        name, t = f.name, f.type
        if name in label_set:
            continue
        if pa.types.is_floating(t):
            leak = _leak(sample, name, out.labels)
            if leak:
                out.skipped[name] = leak
                continue
            lo, hi, nulls = _stats(files, name)
            values = sample.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
            missing = bool(nulls) or bool(np.isnan(values).any())
            d: dict = {"name": name, "group": _group(name)}
            if missing:
                d.update(on_missing="fill", fill_value=0.0)
                out.notes[name] = "has nulls/NaN: filled with 0 plus a missing indicator"
            out.dense.append(d)
        elif pa.types.is_integer(t):
            if TIME_HINT.search(name):
                out.skipped[name] = "a timestamp: derive hour / weekday ID features from it instead"
                continue
            out.sparse.append(_id_feature(files, sample, name, hash_threshold, out.notes))
        elif name in sequence_cols:
            out.sequence.append(_id_feature(files, sample, name, hash_threshold, out.notes, multi=True))
        elif f in lists and pa.types.is_integer(f.type.value_type):
            d = _id_feature(files, sample, name, hash_threshold, out.notes, multi=True)
            out.sparse.append({**d, "multi_hot": True, "pooling": "mean"})
        else:
            out.skipped[name] = f"type {t} is not a label, id, id list or float"
    if out.sequence:
        lengths = pc.list_value_length(sample.column(sequence_cols[0])).to_numpy(zero_copy_only=False)
        longest = int(np.nan_to_num(lengths.astype(np.float64)).max()) if len(lengths) else 1
        out.max_len = max(1, min(longest, 256))
        out.notes["__sequence__"] = f"longest in the sample: {longest} (kept: the last max_len items)"
        _share_tables(out)
    return out


def _user_id(ints: list[pa.Field]) -> str:
    names = [f.name for f in ints]
    for exact in ("user_id", "uid", "userid", "user"):
        if exact in names:
            return exact
    for n in names:
        if "user" in n.lower() and n.lower().endswith("id"):
            return n
    raise DataError(f"no user id column found among the integer columns {names}; rename it user_id")


def _aligned_lists(sample: pa.Table, lists: list[pa.Field]) -> list[str]:
    """The behaviour sequence: the largest set of list columns with equal lengths on every sampled row
    (ties: the one with sequence-like names); a single list column only if its name says sequence."""
    by_lengths: dict[bytes, list[str]] = {}
    for f in lists:
        lengths = pc.list_value_length(sample.column(f.name)).fill_null(0).to_numpy(zero_copy_only=False)
        by_lengths.setdefault(np.asarray(lengths, dtype=np.int64).tobytes(), []).append(f.name)
    candidates = [cols for cols in by_lengths.values() if len(cols) > 1]
    candidates += [cols for cols in by_lengths.values() if len(cols) == 1 and SEQUENCE_HINT.match(cols[0])]
    if not candidates:
        return []
    return max(candidates, key=lambda cols: (len(cols), sum(bool(SEQUENCE_HINT.match(c)) for c in cols)))


def _leak(sample: pa.Table, column: str, labels: list[str]) -> str:
    values = sample.column(column).to_numpy(zero_copy_only=False).astype(np.float32)
    ok = np.isfinite(values)
    for label in labels:
        y = sample.column(label).to_numpy(zero_copy_only=False).astype(np.float32)
        if ok.sum() < 2 or len(np.unique(y[ok])) < 2:
            continue
        a = binary_auc(torch.from_numpy(values[ok]), torch.from_numpy(y[ok]))
        if max(a, 1 - a) >= LEAK_AUC:
            return f"separates label {label!r} almost perfectly (AUC {a:.3f} on the sample): a leak?"
    return ""


def _id_feature(
    files: Sequence[Path], sample: pa.Table, name: str, threshold: int, notes: dict, multi: bool = False
) -> dict:
    lo, hi, _ = _stats(files, name)
    col = sample.column(name)
    values = (pc.list_flatten(col) if multi else col).drop_null().to_numpy(zero_copy_only=False)
    if lo is None:  # no statistics: the sample's range
        lo, hi = (int(values.min()), int(values.max())) if len(values) else (0, 0)
    d: dict = {"name": name, "group": _group(name)}
    if lo < 0 or hi + 1 > threshold:
        n = _hashed_size(values, threshold)
        d.update(num_embeddings=n, embedding_dim=_dim(n), hash=True)
        notes[name] = f"ids in [{lo}, {hi}]: hashed into {n} buckets (~2x the sample's distinct ids)"
    else:
        d.update(num_embeddings=int(hi) + 1, embedding_dim=_dim(int(hi) + 1))
    return d


def _share_tables(out: Inferred) -> None:
    """A sequence column shares the table of the scalar id column it names; shared tables agree on rows,
    dim and hashing, and every table looked up unpooled with the sequence has one dim (SEQUENCE_DIM)."""
    scalars = {d["name"]: d for d in out.sparse if not d.get("multi_hot")}
    for s in out.sequence:
        s["embedding_dim"] = SEQUENCE_DIM
        stem = SEQUENCE_HINT.sub("", s["name"])
        matches = (
            [stem] if stem in scalars else [n for n in scalars if n == f"{stem}_id" or n.endswith(f"_{stem}")]
        )
        if len(matches) > 1:  # e.g. item_category and cross_segment_category: the candidate's own column
            matches = [n for n in matches if scalars[n]["group"] in CANDIDATE_GROUPS]
        if len(matches) != 1:
            continue
        target = scalars[matches[0]]
        rows = max(s["num_embeddings"], target["num_embeddings"])
        hashed = bool(s.get("hash") or target.get("hash"))
        for d in (s, target):
            d.update(num_embeddings=rows, embedding_dim=SEQUENCE_DIM)
            d.pop("hash", None)
            if hashed:
                d["hash"] = True
        s["table"] = target["name"]
        out.notes[s["name"]] = f"shares the table of {target['name']!r} (the candidate and its history)"
    for s in out.sequence:
        s.pop("group", None)


# ---------------------------------------------------------------- YAML
def _flow(d: dict) -> str:
    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return str(v)

    return "{" + ", ".join(f"{k}: {value(v)}" for k, v in d.items()) + "}"


def to_yaml(inferred: Inferred, root: Path, name: str) -> str:
    notes = inferred.notes
    groups: list[str] = []
    for d in (*inferred.dense, *inferred.sparse):
        if d["group"] not in groups:
            groups.append(d["group"])
    seq_group = ""
    if inferred.sequence:
        seq_group = _group(inferred.sequence[0]["name"])
        if seq_group not in groups:
            groups.append(seq_group)
    candidate = [g for g in CANDIDATE_GROUPS if g in groups]
    user = ["user"] if "user" in groups else []

    lines = [
        f"# Inferred by `python -m data.infer_schema {root}`: check every commented guess before training.",
        f"root: {root}",
        "schema:",
        f"  name: {name}",
        f"  labels: [{', '.join(inferred.labels)}]"
        + (f"  # {'; '.join(f'{c}: {notes[c]}' for c in inferred.labels)}" if inferred.labels else ""),
        f"  user_id: {inferred.user_id}",
        f"  groups: [{', '.join(groups)}]  # by name prefix",
        "  roles:  # model.sequence=longer builds its candidate / user tokens from these groups: decide",
        f"    candidate: [{', '.join(candidate)}]",
        f"    user: [{', '.join(user)}]",
    ]
    if inferred.dense:
        lines.append("  dense:")
        lines += [
            f"    - {_flow(d)}" + (f"  # {notes[d['name']]}" if d["name"] in notes else "")
            for d in inferred.dense
        ]
    if inferred.sparse:
        lines.append("  sparse:")
        for d in inferred.sparse:
            lines.append(f"    - {_flow(d)}" + (f"  # {notes[d['name']]}" if d["name"] in notes else ""))
    if inferred.sequence:
        lines += [
            "  sequence:",
            f"    group: {seq_group}",
            f"    max_len: {inferred.max_len}  # {notes['__sequence__']}",
            "    pooling: mean",
            "    features:  # aligned list columns (equal lengths on every sampled row), most recent last?",
        ]
        for d in inferred.sequence:
            lines.append(f"      - {_flow(d)}" + (f"  # {notes[d['name']]}" if d["name"] in notes else ""))
    if inferred.skipped:
        lines.append("# left out:")
        lines += [f"#   {c}: {why}" for c, why in inferred.skipped.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "root", type=Path, help="a dataset root (<root>/<split>/*.parquet) or a directory of files"
    )
    parser.add_argument("--name", help="schema name (default: the directory's name)")
    parser.add_argument("--sample-rows", type=int, default=100_000)
    parser.add_argument("--hash-threshold", type=int, default=1 << 20, help="hash ids above this vocabulary")
    args = parser.parse_args(argv)
    try:
        inferred = infer(args.root, args.sample_rows, args.hash_threshold)
        text = to_yaml(inferred, args.root, args.name or args.root.resolve().name)
        import yaml

        Schema.from_dict(yaml.safe_load(text)["schema"])  # what we print must load
    except (DataError, ValueError) as e:
        print(f"infer_schema: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
