"""Infer a schema from Parquet: `python -m data.infer_schema <dataset root> > conf/data/<name>.yaml`.

Reads the Parquet metadata of every file (types, row-group min / max / null counts) and a sample of rows
(`--sample-rows`, from the train split if the root has one), and writes a data config whose schema guesses
each column's role, with a comment on every guess the user should check:

- `_`-prefixed columns (bookkeeping, oracle probabilities) and timestamp-named integers are skipped.
- Labels: among the 0/1-valued columns (bool, int or float), those named like a task (`click`, `like`,
  `finish`, `skip`, `label`, `convert`, `is_*`...: LABEL_HINT); if no name says so, the first one. The
  other 0/1 columns (`gender`) stay features: a 0/1 attribute is more common than an unnamed second task.
  The labels' comment lists every 0/1 column.
- Leaks: a float column that separates a label almost perfectly on the sample (AUC >= 0.99, e.g. the
  rating a like-label was derived from) is left out, with its AUC in a comment.
- The user id: `user_id` / `uid` / `userid`, else the first integer column named like `user*id`. The item
  id (the candidate's): the integer column named like a candidate group's id (`item_id`, `movieId`,
  `video_id`: CANDIDATE_GROUPS, in that order), else the first other id-named one (`*_id`, `iid`).
- Integer columns are ID features: `num_embeddings` = max + 1 over all files' statistics. Negative ids or a
  vocabulary above `--hash-threshold` get a table sized from the sample's distinct count: a single-valued
  column (raw 64-bit ids, say) managed collisions (`zch: {eviction: lfu}`: each id its own row while it is
  in use), a list column `hash: true` (zch needs a bound on a batch's ids); a sequence sharing a zch
  table is zch too.
- List<int> columns: those whose row lengths are equal on every sampled row form the behaviour sequence
  (aligned columns, e.g. item ids and actions), the others are multi-hot bags. A sequence column shares the
  table of the scalar ID column it names (`seq_item_id` -> `item_id`, `seq_category` -> `item_category`),
  so the candidate and its history use one embedding; one that names none shares the table of an id
  column whose range holds its values and whose sampled values overlap them (`hist_items` -> `item_id`).
- Float (and non-label bool) columns are dense features; `on_missing: fill` where the sample or the
  statistics have nulls/NaN.
- Groups follow what a column describes. Data that names its user columns `user_*` (the user id's prefix
  is shared by other columns, as in the built-in data) keeps the name prefixes shared by several columns
  (`user_age` -> user, `item_tags` -> item). Every other column (all of them in flat data such as
  `user_id, item_id, age, hour`) goes by the sample: one value per user id -> the user group, else one
  value per item id -> the item group, else context. `roles:` declares the candidate groups (the item's,
  item-like prefixes) and the user group, which model.sequence=longer needs.
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

from data.decode import DataError, open_parquet
from data.metrics.auc import binary_auc
from data.schema import Schema

# `is_` only as a prefix (`is_click`): inside a word it is noise (`this_`, `analysis_`)
LABEL_HINT = re.compile(r"(^is_|label|click|like|convert|conversion|purchase|finish|skip|target)", re.I)
TIME_HINT = re.compile(r"(^|_)(ts|time|timestamp|date|datetime|epoch)($|_)", re.I)
SEQUENCE_HINT = re.compile(r"^(seq|hist|history|behavior|behaviour|click_seq)_", re.I)
ID_NAME = re.compile(r"(^[a-z]?id|_id|_ID|Id|ID)$")  # item_id, movieId, ITEM_ID, iid; not `valid`
CANDIDATE_GROUPS = ("item", "author", "video", "ad", "product", "creative", "doc", "goods", "movie", "song")
LEAK_AUC = 0.99
SEQUENCE_DIM = 16  # one dim for every table looked up unpooled (sequence=longer: TorchRec's rule)
# "one value per key" says something only where keys repeat: with every user once in the sample, every
# column would be a user attribute. Below this share of repeated rows the key is not used for grouping.
MIN_REPEATED_ROWS = 0.1
# A sequence column shares an id column's table by values when at least this share of its distinct ids
# are sampled values of the id column and they make up at least this share of the id column's: a 0/1 or
# action-code list inside a user id's range covers a negligible share of the user ids.
MIN_OVERLAP = 0.2
CONTEXT = "context"


@dataclass
class Inferred:
    labels: list[str] = field(default_factory=list)
    user_id: str = ""
    item_id: str = ""  # "" when no column looks like the candidate's id
    dense: list[dict] = field(default_factory=list)
    sparse: list[dict] = field(default_factory=list)
    sequence: list[dict] = field(default_factory=list)
    sequence_group: str = ""
    max_len: int = 0
    by_prefix: bool = False  # groups from name prefixes (the user id's prefix is shared), else by values
    roles: dict[str, str] = field(default_factory=dict)  # "user" / "item" -> the group it describes
    notes: dict[str, str] = field(default_factory=dict)  # column -> comment
    group_notes: dict[str, str] = field(default_factory=dict)  # group -> how it was found
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


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _floats(arr: pa.ChunkedArray) -> np.ndarray:
    """float64 values, null -> NaN (a cast first: a nullable bool column's to_numpy is an object array)."""
    return pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)


def _prefix(column: str) -> str:
    """The name's prefix before the first `_` (`user_age` -> user); "" for a name without one."""
    return column.split("_", 1)[0].lower() if "_" in column.strip("_") else ""


def _note(notes: dict[str, str], key: str, text: str) -> None:
    """Add a comment to a column's (a column can carry several guesses: hashed, and a 0/1 feature)."""
    notes[key] = f"{notes[key]}; {text}" if key in notes else text


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

    # labels first: the leak check and the id columns depend on them
    binary = [
        f.name
        for f in columns
        if (pa.types.is_integer(f.type) or pa.types.is_boolean(f.type) or pa.types.is_floating(f.type))
        and _is_binary(sample.column(f.name))
    ]
    out.labels = _labels(binary, out.notes)
    label_set = set(out.labels)
    ints = [f for f in columns if f.name not in label_set and pa.types.is_integer(f.type)]
    out.user_id = _user_id(ints)
    out.item_id = _item_id([f.name for f in ints if not TIME_HINT.search(f.name)], out.user_id)

    lists = [f for f in columns if _is_list(f.type)]
    sequence_cols = _aligned_lists(sample, lists)
    for f in columns:
        name, t = f.name, f.type
        if name in label_set:
            continue
        if pa.types.is_floating(t) or pa.types.is_boolean(t):  # a bool here is a 0/1 feature
            leak = _leak(sample, name, out.labels)
            if leak:
                out.skipped[name] = leak
                continue
            _, _, nulls = _stats(files, name)
            missing = bool(nulls) or bool(np.isnan(_floats(sample.column(name))).any())
            d: dict = {"name": name, "group": ""}  # groups: _assign_groups, once every feature is known
            if missing:
                d.update(on_missing="fill", fill_value=0.0)
                _note(out.notes, name, "has nulls/NaN: filled with 0 plus a missing indicator")
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
    _assign_groups(out, sample)
    if out.sequence:
        lengths = pc.list_value_length(sample.column(sequence_cols[0])).to_numpy(zero_copy_only=False)
        longest = int(np.nan_to_num(lengths.astype(np.float64)).max()) if len(lengths) else 1
        out.max_len = max(1, min(longest, 256))
        out.notes["__sequence__"] = f"longest in the sample: {longest} (kept: the last max_len items)"
        _share_tables(out, files, sample)
    return out


def _labels(binary: list[str], notes: dict[str, str]) -> list[str]:
    """The tasks among the 0/1 columns: those named like one (LABEL_HINT), else the first. The others
    stay features, each with a note: a 0/1 attribute (gender, a flag) is far more common than a second
    task nobody named, and a wrong label also hides a feature from the model."""
    named = [c for c in binary if LABEL_HINT.search(c)]
    labels = named or binary[:1]
    rest = [c for c in binary if c not in labels]
    if binary:
        rule = (
            "labels: the ones named like a task"
            if named
            else "none is named like a task: the first is the label"
        )
        notes["__labels__"] = f"0/1 columns: {', '.join(binary)}; {rule}" + (
            f"; features: {', '.join(rest)} (move to labels if a task)" if rest else ""
        )
    for c in rest:
        _note(notes, c, "0/1 values: a feature, or a label? (its name does not say)")
    return labels


def _user_id(ints: list[pa.Field]) -> str:
    names = [f.name for f in ints]
    for exact in ("user_id", "uid", "userid", "user"):
        if exact in names:
            return exact
    for n in names:
        if "user" in n.lower() and n.lower().endswith("id"):
            return n
    raise DataError(f"no user id column found among the integer columns {names}; rename it user_id")


def _item_id(ints: list[str], user_id: str) -> str:
    """The candidate's id column: one named like a candidate group's id (`item_id`, `movieId`, `video`;
    in CANDIDATE_GROUPS order, so item before author), else the first other id-named column; "" if none."""
    others = [n for n in ints if n != user_id]
    for g in CANDIDATE_GROUPS:
        named = [n for n in others if re.fullmatch(rf"{g}s?_?(id)?", n, re.I)]
        if named:
            return named[0]
    return next((n for n in others if ID_NAME.search(n)), "")


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
    values = _floats(sample.column(column)).astype(np.float32)
    ok = np.isfinite(values)
    for label in labels:
        y = _floats(sample.column(label)).astype(np.float32)
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
    d: dict = {"name": name, "group": ""}  # groups: _assign_groups, once every feature is known
    if lo < 0 or hi + 1 > threshold:
        n = _hashed_size(values, threshold)
        d.update(num_embeddings=n, embedding_dim=_dim(n))
        size = f"{n} rows (~2x the sample's distinct ids)"
        if multi:
            d["hash"] = True
            _note(notes, name, f"ids in [{lo}, {hi}]: hashed into {size}")
        else:
            d["zch"] = {"eviction": "lfu"}
            _note(notes, name, f"ids in [{lo}, {hi}]: managed collisions (zch) in {size}")
    else:
        d.update(num_embeddings=int(hi) + 1, embedding_dim=_dim(int(hi) + 1))
    return d


# ---------------------------------------------------------------- groups
def _assign_groups(out: Inferred, sample: pa.Table) -> None:
    """Each dense / sparse feature's group and the sequence's (module docstring), with a note per group
    saying how its columns were found."""
    features = [*out.sparse, *out.dense]
    prefixes = [_prefix(d["name"]) for d in (*features, *out.sequence)]
    shared = {p for p in prefixes if p and prefixes.count(p) > 1}
    # prefixes only where the data names its user columns so: in flat data a shared prefix is a word
    # (`n_genres`, `movie_title_len`), not a description
    out.by_prefix = _prefix(out.user_id) in shared
    user = _prefix(out.user_id) if out.by_prefix else "user"
    item = _prefix(out.item_id) if out.by_prefix and _prefix(out.item_id) in shared else "item"
    out.roles = {"user": user, **({"item": item} if out.item_id else {})}
    keys = []  # (group, key column, the key's codes on the sample), user first
    rare = []  # (group, key column) where the key repeats too rarely to say anything
    for group, key in ((user, out.user_id), (item, out.item_id)) if out.item_id else ((user, out.user_id),):
        codes = _key_codes(sample, key)
        if codes is None:
            rare.append((group, key))
        else:
            keys.append((group, key, codes))
    reasons: dict[str, list[str]] = {}
    for d in features:
        name = d["name"]
        if out.by_prefix and _prefix(name) in shared:
            d["group"], why = _prefix(name), f"the name prefix {_prefix(name)}_"
        elif name in (out.user_id, out.item_id):
            d["group"] = user if name == out.user_id else item
            grouped_by = any(key == name for _, key, _ in keys)
            why = f"{name} and the columns with one value per {name} on the sample" if grouped_by else name
        else:
            d["group"], why = _group_by_values(sample.column(name).combine_chunks(), keys, name, out.notes)
        reasons.setdefault(d["group"], []).append(why)
    for group, key in rare:
        reasons.setdefault(group, []).append(f"{key} repeats too rarely in the sample to group others by")
    if out.sequence:
        first = _prefix(out.sequence[0]["name"])
        out.sequence_group = first if out.by_prefix and first else "sequence"
        reasons.setdefault(out.sequence_group, []).append("the behaviour sequence below")
    out.group_notes = {g: "; ".join(dict.fromkeys(why)) for g, why in reasons.items()}


def _group_by_values(
    col: pa.Array, keys: list[tuple[str, str, np.ndarray]], name: str, notes: dict[str, str]
) -> tuple[str, str]:
    """(group, why): the first key's group (user, then item) with one value of the column per key value
    on the sample, else context."""
    hits = [(group, key) for group, key, codes in keys if _one_per_key(codes, col)]
    if len(hits) > 1:  # a constant, or a tiny sample: the user's, by the rule's order
        _note(notes, name, f"one value per {' and per '.join(k for _, k in hits)} on the sample: a constant?")
    if hits:
        group, key = hits[0]
        return group, f"{key} and the columns with one value per {key} on the sample"
    if not keys:
        return CONTEXT, "every column but the ids"
    return CONTEXT, "the rest (several values per " + " and per ".join(k for _, k, _ in keys) + ")"


def _codes(arr: pa.Array) -> np.ndarray:
    """Equal values -> equal int64 codes (NaNs one code, nulls -1)."""
    return arr.dictionary_encode().indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def _key_codes(sample: pa.Table, key: str) -> np.ndarray | None:
    """The key column's codes, or None where too few sampled rows repeat a key (MIN_REPEATED_ROWS)."""
    codes = _codes(sample.column(key).combine_chunks())
    repeated = len(codes) - len(np.unique(codes))
    return codes if repeated >= max(2, MIN_REPEATED_ROWS * len(codes)) else None


def _pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One int64 code per (a, b) pair of codes >= -1 (1-D, so np.unique sorts numbers, not rows; codes
    stay below the sample's element count, whose square fits int64 for any sample that fits memory)."""
    return (a + 1) * (int(b.max(initial=-1)) + 2) + (b + 1)


def _one_value_each(keys: np.ndarray, values: np.ndarray) -> bool:
    """Every key (int64 codes) has a single value (int64 codes, aligned with keys)."""
    return len(np.unique(_pairs(keys, values))) == len(np.unique(keys))


def _one_per_key(keys: np.ndarray, col: pa.Array) -> bool:
    """Whether every key value has a single value of `col` on the sample; for a list, the same list: the
    same length, and the same element at each position (compared flat, without a loop over rows)."""
    if not _is_list(col.type):
        return _one_value_each(keys, _codes(col))
    lengths = pc.list_value_length(col).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    counts = np.maximum(lengths, 0)  # list_flatten skips a null list's elements
    rows = np.repeat(np.arange(len(col)), counts)
    position = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    elements = _codes(pc.list_flatten(col))
    return _one_value_each(keys, lengths) and _one_value_each(_pairs(keys[rows], position), elements)


# ---------------------------------------------------------------- shared tables
def _share_tables(out: Inferred, files: Sequence[Path], sample: pa.Table) -> None:
    """A sequence column shares the table of the scalar id column it names, else (a guess) of the id
    column its values fit (_table_by_values); shared tables agree on rows, dim and hashing, and every
    table looked up unpooled with the sequence has one dim (SEQUENCE_DIM)."""
    scalars = {d["name"]: d for d in out.sparse if not d.get("multi_hot")}
    ids = [n for n in dict.fromkeys((out.item_id, *scalars, out.user_id)) if n in scalars]
    ids = [n for n in ids if n in (out.item_id, out.user_id) or ID_NAME.search(n)]
    tables: dict[str, list[dict]] = {}
    for s in out.sequence:
        s["embedding_dim"] = SEQUENCE_DIM
        target, why = _table_by_name(s["name"], scalars), "the candidate and its history"
        if not target:
            target, why = _table_by_values(files, sample, s["name"], ids)
        if target:
            s["table"] = target
            tables.setdefault(target, [scalars[target]]).append(s)
            out.notes[s["name"]] = f"shares the table of {target!r} ({why})"
    for members in tables.values():
        rows = max(d["num_embeddings"] for d in members)
        hashed = any(d.get("hash") for d in members)
        zch = next((d["zch"] for d in members if d.get("zch")), None)
        for d in members:
            d.update(num_embeddings=rows, embedding_dim=SEQUENCE_DIM)
            d.pop("hash", None)
            d.pop("zch", None)
            if zch:  # the scalar id's managed collisions: the history's ids are the same raw ids
                d["zch"] = dict(zch)
            elif hashed:
                d["hash"] = True
    for s in out.sequence:
        s.pop("group", None)


def _table_by_name(column: str, scalars: dict[str, dict]) -> str:
    """The scalar id column a sequence column names (`seq_item_id`, `seq_category` -> item_category)."""
    stem = SEQUENCE_HINT.sub("", column)
    matches = (
        [stem] if stem in scalars else [n for n in scalars if n == f"{stem}_id" or n.endswith(f"_{stem}")]
    )
    if len(matches) > 1:  # e.g. item_category and cross_segment_category: the candidate's own column
        matches = [n for n in matches if scalars[n]["group"] in CANDIDATE_GROUPS]
    return matches[0] if len(matches) == 1 else ""


def _table_by_values(files: Sequence[Path], sample: pa.Table, column: str, ids: list[str]) -> tuple[str, str]:
    """(id column, why) for a sequence column no name links: the id column whose range holds all its
    values and whose sampled values overlap its own most (at least MIN_OVERLAP of each side's distinct
    values; ties: the earlier in `ids`, the item id first); ("", "") if none does."""
    values = np.unique(pc.list_flatten(sample.column(column)).drop_null().to_numpy(zero_copy_only=False))
    best, best_overlap, why = "", 0.0, ""
    for name in ids if len(values) else ():
        seen = np.unique(sample.column(name).drop_null().to_numpy(zero_copy_only=False))
        lo, hi, _ = _stats(files, name)
        if lo is None:
            lo, hi = (seen.min(), seen.max()) if len(seen) else (0, -1)
        if values.min() < lo or values.max() > hi:
            continue
        common = len(np.intersect1d(values, seen, assume_unique=True))
        overlap = min(common / len(values), common / max(len(seen), 1))
        if overlap >= MIN_OVERLAP and overlap > best_overlap:
            best, best_overlap = name, overlap
            why = (
                f"a guess from its values: all in {name}'s range [{lo}, {hi}], and {common} of its "
                f"{len(values)} distinct sampled ids are sampled {name} values"
            )
    return best, why


# ---------------------------------------------------------------- YAML
def _flow(d: dict) -> str:
    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return str(v)

    return "{" + ", ".join(f"{k}: {value(v)}" for k, v in d.items()) + "}"


def to_yaml(inferred: Inferred, root: Path, name: str) -> str:
    notes = inferred.notes
    # sparse first: the user id usually leads, so the user group does
    groups = list(dict.fromkeys(d["group"] for d in (*inferred.sparse, *inferred.dense)))
    seq_group = inferred.sequence_group
    if inferred.sequence and seq_group not in groups:
        groups.append(seq_group)
    item = [inferred.roles["item"]] if inferred.roles.get("item") in groups else []
    candidate = list(dict.fromkeys([*item, *(g for g in CANDIDATE_GROUPS if g in groups)]))
    user = [inferred.roles["user"]] if inferred.roles.get("user") in groups else []
    how = "by name prefix, the rest by the sample" if inferred.by_prefix else "by the sample"

    lines = [
        f"# Inferred by `python -m data.infer_schema {root}`: check every commented guess before training.",
        f"root: {root}",
        "schema:",
        f"  name: {name}",
        f"  labels: [{', '.join(inferred.labels)}]"
        + (f"  # {notes['__labels__']}" if "__labels__" in notes else ""),
        f"  user_id: {inferred.user_id}",
        f"  groups: [{', '.join(groups)}]  # {how}: move a feature by editing its group",
        *(f"  #   {g}: {inferred.group_notes[g]}" for g in groups if g in inferred.group_notes),
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
