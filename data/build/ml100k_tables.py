"""MovieLens-100K's raw atomic columns (data.build.ml100k_wheel) -> one Arrow table per split, label `like` =
rating >= 4: dense ids, user / item / context / history features, the per-user time split and the check
that every id fits the schema's tables. Writing the tables out and the CLI are data.build.ml100k.

IDs: every categorical value is mapped to a dense index by its rank among the sorted distinct raw values
(numeric tokens sort as numbers, before any non-numeric ones), starting at 1; 0 means unknown (a user or
item without a profile row, an unparseable year). So a vocabulary of n values needs num_embeddings n + 1.
The `user_id` column (UAUC's grouping and the `user_id_emb` feature) holds the dense user index.

Features: user (id, age bucket, gender, occupation, first 3 characters of the zip code), item (id, genres
as a multi-hot list, release-year bucket), context (hour and weekday of the rating, UTC), history (the
user's previous <= 50 items and their labels, most recent last; count and like rate of the user's whole
earlier history).

Ordering and split: each user's ratings are ordered by (timestamp, item index) - the item breaks the many
same-second ties, deterministically. A user with n ratings puts positions [0, a) in train, [a, b) in valid
and [b, n) in test, with a = round(0.8 n) and b = round(0.9 n), halves rounded up (integer arithmetic:
a = (8n + 5) // 10, b = (9n + 5) // 10). So n = 20 -> 16/2/2, n = 25 -> 20/3/2, n = 5 -> 4/1/0, n <= 2
-> all train: a user with few ratings keeps them in train rather than showing up cold in valid/test.
Every ML-100K user has >= 20 ratings, so every user is in all three splits. No row of a user in an earlier
split is later in time than a row of that user in a later split.

History: a row's sequence and history features use only the rows strictly before it in its user's
ordering, across splits (a test row sees the user's train and valid rows), never the row itself, so its
own label cannot leak. Ratings given in the same second as the row count as earlier when their item
index is smaller (ML-100K users often rate many movies in one second). The first row of a user has an
empty sequence and a missing like rate (null, filled by the schema's on_missing: fill).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from data.build.ml100k_wheel import SourceError
from data.dataset_dir import SPLITS
from data.schema import Schema

LABEL = "like"
LIKE_MIN_RATING = 4.0
MAX_SEQ_LEN = 50
SHUFFLE_SEED = 0
# age buckets (MovieLens-1M's): <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+ -> 1..7; 0 unknown
AGE_EDGES = (18, 25, 35, 45, 50, 56)


# ------------------------------------------------------------------------ vocabularies and buckets
def _natural(tok: str) -> tuple[int, int, str]:
    return (0, int(tok), "") if tok.isdigit() else (1, 0, tok)


def vocabulary(values: Sequence[str] | set[str]) -> dict[str, int]:
    """Sorted distinct non-empty raw values -> 1..n (0 stays free for unknown)."""
    return {v: i + 1 for i, v in enumerate(sorted({v for v in values if v}, key=_natural))}


def age_bucket(age: str) -> int:
    try:
        a = int(age)
    except ValueError:
        return 0
    return 1 + int(np.searchsorted(AGE_EDGES, a, side="right"))


def year_bucket(year: str) -> int:
    """0 unknown; 1 before 1930; 2..7 the decades 1930s..1980s; 8..17 each year 1990..1999; 18 from 2000."""
    try:
        y = int(year)
    except ValueError:
        return 0
    if y < 1930:
        return 1
    if y < 1990:
        return 2 + (y - 1930) // 10
    if y < 2000:
        return 8 + (y - 1990)
    return 18


YEAR_BUCKETS = 19


def split_bounds(n: np.ndarray | int) -> tuple[Any, Any]:
    """Per user with n rows: (a, b), train = positions [0, a), valid [a, b), test [b, n)."""
    n = np.asarray(n, dtype=np.int64)
    return (8 * n + 5) // 10, (9 * n + 5) // 10


# ------------------------------------------------------------------------ the conversion
@dataclass
class Converted:
    tables: dict[str, pa.Table]  # per split, rows in output order
    info: dict[str, Any]  # everything dataset.json says except per-file details


def convert_tables(
    raw: Mapping[str, Mapping[str, Sequence[str]]], max_seq_len: int = MAX_SEQ_LEN
) -> Converted:
    """The raw atomic columns (read_wheel's output) -> one Arrow table per split."""
    inter, users, items = raw["inter"], raw["user"], raw["item"]
    n = len(inter["user_id"])
    if n == 0:
        raise SourceError("ml-100k.inter: no interactions")

    # vocabularies: users / items from the profile files and the interactions together
    user_vocab = vocabulary(set(users["user_id"]) | set(inter["user_id"]))
    item_vocab = vocabulary(set(items["item_id"]) | set(inter["item_id"]))
    gender_vocab = vocabulary(users["gender"])
    occ_vocab = vocabulary(users["occupation"])
    zip_vocab = vocabulary([z[:3] for z in users["zip_code"]])
    genre_vocab = vocabulary({g for c in items["class"] for g in c.split()})

    # per-user / per-item attributes, indexed by dense id (row 0: unknown)
    nu, ni = len(user_vocab) + 1, len(item_vocab) + 1
    u_age, u_gender, u_occ, u_zip = (np.zeros(nu, np.int64) for _ in range(4))
    for uid, age, g, occ, z in zip(
        users["user_id"], users["age"], users["gender"], users["occupation"], users["zip_code"]
    ):
        u = user_vocab[uid]
        u_age[u], u_gender[u] = age_bucket(age), gender_vocab.get(g, 0)
        u_occ[u], u_zip[u] = occ_vocab.get(occ, 0), zip_vocab.get(z[:3], 0)
    i_year = np.zeros(ni, np.int64)
    i_genres: list[list[int]] = [[] for _ in range(ni)]
    for iid, year, cls in zip(items["item_id"], items["release_year"], items["class"]):
        i = item_vocab[iid]
        i_year[i] = year_bucket(year)
        i_genres[i] = sorted({genre_vocab[g] for g in cls.split()})

    # interactions, ordered by (user, timestamp, item)
    try:
        user = np.array([user_vocab[u] for u in inter["user_id"]], np.int64)
        item = np.array([item_vocab[i] for i in inter["item_id"]], np.int64)
        rating = np.array(inter["rating"], np.float64)
        ts = np.array([int(float(t)) for t in inter["timestamp"]], np.int64)
    except ValueError as e:
        raise SourceError(f"ml-100k.inter: bad rating or timestamp: {e}") from e
    order = np.lexsort((item, ts, user))
    user, item, rating, ts = user[order], item[order], rating[order], ts[order]
    label = (rating >= LIKE_MIN_RATING).astype(np.int64)

    # position of each row within its user, and the user's row count
    counts = np.bincount(user, minlength=nu)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(n, dtype=np.int64) - starts[user]
    a, b = split_bounds(counts[user])
    split_of = np.where(pos < a, 0, np.where(pos < b, 1, 2))

    # history: the previous min(pos, max_seq_len) rows of the same user (they are contiguous, just before)
    seq_len = np.minimum(pos, max_seq_len)
    seq_off = np.zeros(n + 1, np.int64)
    np.cumsum(seq_len, out=seq_off[1:])
    row = np.arange(n, dtype=np.int64)
    gather = np.repeat(row - seq_len - seq_off[:-1], seq_len) + np.arange(seq_off[-1])  # flat history rows
    likes_before = np.concatenate([[0], np.cumsum(label)])
    hist_likes = likes_before[:-1] - likes_before[starts[user]]
    hist_like_rate = np.where(pos > 0, hist_likes / np.maximum(pos, 1), np.nan)

    genre_off = np.zeros(ni + 1, np.int64)
    np.cumsum([len(g) for g in i_genres], out=genre_off[1:])
    genre_flat = np.array([g for gs in i_genres for g in gs], np.int64)

    columns = {
        LABEL: label,
        "user_id": user,
        "user_age": u_age[user],
        "user_gender": u_gender[user],
        "user_occupation": u_occ[user],
        "user_zip3": u_zip[user],
        "item_id": item,
        "item_year": i_year[item],
        "ctx_hour": (ts // 3600) % 24,
        "ctx_weekday": (ts // 86400 + 3) % 7,  # 1970-01-01 was a Thursday; Monday = 0
        "hist_len_log": np.log1p(pos).astype(np.float32),
        "hist_like_rate": hist_like_rate.astype(np.float32),
        "timestamp": ts,
        "rating": rating.astype(np.float32),
    }
    tables: dict[str, pa.Table] = {}
    split_info: dict[str, Any] = {}
    for s, name in enumerate(SPLITS):
        rows = np.flatnonzero(split_of == s)
        if name == "train":
            rows = rows[np.random.default_rng(SHUFFLE_SEED).permutation(len(rows))]
        cols: dict[str, pa.Array] = {}
        for k, v in columns.items():
            cols[k] = pa.array(v[rows], from_pandas=True)  # NaN -> null (a missing like rate)
            if k == "item_id":
                cols["item_genres"] = _lists(genre_off[item[rows]], genre_off[item[rows] + 1], genre_flat)
        cols["seq_item"] = _lists(seq_off[rows], seq_off[rows + 1], item[gather])
        cols["seq_label"] = _lists(seq_off[rows], seq_off[rows + 1], label[gather])
        tables[name] = pa.table(cols)
        split_info[name] = {
            "rows": len(rows),
            "positive_rate": {LABEL: float(label[rows].mean()) if len(rows) else None},
            "users": int(len(np.unique(user[rows]))),
            "items": int(len(np.unique(item[rows]))),
        }
    info = {
        "schema": "ml100k",
        "interactions": n,
        "users": int((counts > 0).sum()),
        "items": int(len(np.unique(item))),
        "label": f"{LABEL} = rating >= {LIKE_MIN_RATING:g}",
        "split": "per user by (timestamp, item): train [0, (8n+5)//10), valid [.., (9n+5)//10), test rest",
        "max_seq_len": max_seq_len,
        # num_embeddings each id feature needs (vocabulary + 1 for the unknown id 0)
        "num_embeddings": {
            "user_id": nu,
            "item_id": ni,
            "user_age": len(AGE_EDGES) + 2,
            "user_gender": len(gender_vocab) + 1,
            "user_occupation": len(occ_vocab) + 1,
            "user_zip3": len(zip_vocab) + 1,
            "item_genres": len(genre_vocab) + 1,
            "item_year": YEAR_BUCKETS,
            "ctx_hour": 24,
            "ctx_weekday": 7,
            "seq_label": 2,
        },
        "splits": split_info,
    }
    return Converted(tables, info)


def _lists(lo: np.ndarray, hi: np.ndarray, flat: np.ndarray) -> pa.ListArray:
    """Rows whose items are flat[lo:hi], as a list<int64> array (no per-row Python)."""
    lens = hi - lo
    off = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=off[1:])
    idx = np.repeat(lo - off[:-1], lens) + np.arange(off[-1], dtype=np.int64)
    return pa.ListArray.from_arrays(pa.array(off.astype(np.int32)), pa.array(flat[idx].astype(np.int64)))


def check_against_schema(conv: Converted, schema: Schema) -> None:
    """Every column the schema reads exists, and every id fits its table (unless the feature hashes)."""
    table = conv.tables["train"]
    missing = [c for c in schema.columns() if c not in table.column_names]
    if missing:
        raise ValueError(
            f"ml100k: schema {schema.name!r} reads column(s) {missing} the converter does not produce "
            f"(it produces {', '.join(table.column_names)})"
        )
    for f in (*schema.sparse, *schema.sequence_features):
        if f.hash:
            continue
        for name, t in conv.tables.items():
            col = t.column(f.column).combine_chunks()
            v = col.flatten() if pa.types.is_list(col.type) else col
            hi = int(np.max(v.to_numpy(), initial=-1))
            if hi >= f.num_embeddings:
                raise ValueError(
                    f"ml100k: feature {f.name!r} has id {hi} in {name} but num_embeddings is "
                    f"{f.num_embeddings}; raise it in the schema (dataset.json's num_embeddings lists "
                    "what each id column needs)"
                )
