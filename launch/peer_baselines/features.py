"""Features of the non-neural peers (launch/peers.py): one split's Parquet files -> a numeric matrix and
a categorical id matrix, driven by the schema alone.

Reading: `<root>/<split>/*.parquet`, only the schema's columns (`Schema.columns()`: labels, user id,
dense, sparse and sequence columns; never e.g. the generator's `_p_*` oracle probabilities or ML's
`rating` / `timestamp`), decoded and validated by the neural reader's own `data.decode.Decoder`. So the
peers see exactly the model's inputs: dense values filled per `on_missing` with the `__missing`
indicator, hashed ids for `hash: true` features, ids range-checked, sequences cut to the last `max_len`
items. Labels and the UAUC user id are returned next to the features, never inside them.

Features (`build_features` reads only the decoded dense columns and sparse / sequence id lists):

- dense: every column of the model's dense tensor (`Schema.dense_names`), as is.
- categorical: every single-valued sparse feature's id (`<name>`), declared categorical.
- multi-hot sparse feature with num_embeddings <= 64: one 0/1 column per id (`<name>=<id>`); larger:
  its list length (`<name>__len`). If it shares a table with a single-valued sparse feature (e.g. a
  user's followed authors and the candidate's author): whether that candidate id is in the list
  (`<name>__has_<candidate>`).
- behaviour sequence: its length (`<group>__len`); for each sequence column with num_embeddings <= 8
  (e.g. ML's seq_label 0/1) the fraction of positions holding each id v in 1..num_embeddings-1 over
  the last 5 and over all positions (`<name>=<v>__last5`, `<name>=<v>__all`; for a 0/1 column this is
  the mean; NaN for an empty sequence); for each sequence column sharing a table with a single-valued
  sparse feature (e.g. seq_item and item_id): whether the candidate id occurs in the history
  (`<name>__has_<candidate>`).

Nothing else: no target / likelihood encoding, no counts or statistics over other rows, nothing
computed from labels or later rows. Every feature of a row is a function of that row's own columns,
which the datasets build from strictly earlier events (the ML history excludes the row itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from data.decode import Chunk, Decoder, check_file, open_parquet
from data.schema import Schema, SequenceFeature, SparseFeature

ONE_HOT_MAX_VOCAB = 64  # multi-hot lists with at most this many ids become 0/1 indicator columns
SEQ_SMALL_VOCAB = 8  # sequence columns with at most this many ids get per-id fractions
SEQ_RECENT = 5  # "last 5 positions"


@dataclass
class Features:
    """Per-row features: float64 numeric columns (NaN = missing) and int64 categorical id columns."""

    numeric: np.ndarray  # (n, Fn)
    numeric_names: list[str]
    categorical: np.ndarray  # (n, Fc)
    categorical_names: list[str]

    @property
    def names(self) -> list[str]:
        return [*self.numeric_names, *self.categorical_names]


@dataclass
class SplitData:
    """One split: features, labels (n, T) in schema label order, and the raw user id that groups UAUC."""

    features: Features
    labels: np.ndarray
    user_id: np.ndarray

    @property
    def n(self) -> int:
        return len(self.user_id)


def split_files(root: str | Path, split: str) -> list[Path]:
    files = sorted((Path(root) / split).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{Path(root) / split}: no *.parquet files")
    return files


def read_split_table(root: str | Path, split: str, schema: Schema) -> pa.Table:
    """The split's rows, with exactly the schema's columns (each file checked like the reader does)."""
    tables = []
    for path in split_files(root, split):
        pf = open_parquet(path)
        check_file(path, pf, schema)
        tables.append(pf.read(columns=schema.columns()))
    return pa.concat_tables(tables)


def load_split(root: str | Path, split: str, schema: Schema) -> SplitData:
    """Read, decode (the neural reader's Decoder) and featurize one split."""
    chunk = Decoder(schema)(read_split_table(root, split, schema), f"{Path(root) / split}")
    return SplitData(build_features(chunk, schema), chunk.labels.astype(np.float64), chunk.user_id)


def _row_index(offsets: np.ndarray) -> np.ndarray:
    """Row of every value of a jagged column."""
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


def _contains(offsets: np.ndarray, values: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per row: 1.0 when `candidate[row]` is among the row's values."""
    rows = _row_index(offsets)
    hit = values == candidate[rows]
    return (np.bincount(rows, weights=hit, minlength=len(candidate)) > 0).astype(np.float64)


def _fraction(offsets: np.ndarray, mask: np.ndarray, hits: np.ndarray) -> np.ndarray:
    """Per row: share of the masked positions where `hits`; NaN for rows without masked positions."""
    n = len(offsets) - 1
    rows = _row_index(offsets)
    den = np.bincount(rows, weights=mask, minlength=n)
    num = np.bincount(rows, weights=mask & hits, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def build_features(chunk: Chunk, schema: Schema) -> Features:
    """The peers' features of decoded rows (see the module docstring); never reads `chunk.labels`."""
    num: dict[str, np.ndarray] = {}
    cat: dict[str, np.ndarray] = {}
    for j, name in enumerate(schema.dense_names):
        num[name] = chunk.dense[:, j].astype(np.float64)

    jagged: list[SparseFeature | SequenceFeature] = [*schema.sparse, *schema.sequence_features]
    lists = {f.name: (chunk.key_offsets(k), chunk.key_values(k)) for k, f in enumerate(jagged)}
    # single-valued sparse features by table: the candidates a list on the same table is matched against
    candidates: dict[str, list[SparseFeature]] = {}
    for f in schema.sparse:
        if not f.multi_hot:
            cat[f.name] = lists[f.name][1]
            candidates.setdefault(f.table_name, []).append(f)

    def add_contains(f: SparseFeature | SequenceFeature) -> None:
        o, v = lists[f.name]
        for c in candidates.get(f.table_name, []):
            num[f"{f.name}__has_{c.name}"] = _contains(o, v, cat[c.name])

    for f in schema.sparse:
        if not f.multi_hot:
            continue
        o, v = lists[f.name]
        if f.num_embeddings <= ONE_HOT_MAX_VOCAB:
            counts = np.zeros((chunk.n, f.num_embeddings))
            np.add.at(counts, (_row_index(o), v), 1.0)
            for k in range(f.num_embeddings):
                num[f"{f.name}={k}"] = (counts[:, k] > 0).astype(np.float64)
        else:
            num[f"{f.name}__len"] = np.diff(o).astype(np.float64)
        add_contains(f)

    if schema.sequence is not None:
        seq = schema.sequence_features
        o0 = lists[seq[0].name][0]  # aligned: every sequence column has these offsets
        lens = np.diff(o0)
        num[f"{schema.sequence.group}__len"] = lens.astype(np.float64)
        rows = _row_index(o0)
        from_end = o0[rows + 1] - np.arange(len(rows)) - 1  # 0 = most recent
        windows = {"last5": from_end < SEQ_RECENT, "all": np.ones(len(rows), dtype=bool)}
        for f in seq:
            o, v = lists[f.name]
            if f.num_embeddings <= SEQ_SMALL_VOCAB:
                for k in range(1, f.num_embeddings):
                    for wname, mask in windows.items():
                        num[f"{f.name}={k}__{wname}"] = _fraction(o, mask, v == k)
            add_contains(f)

    return Features(
        numeric=np.column_stack(list(num.values())) if num else np.zeros((chunk.n, 0)),
        numeric_names=list(num),
        categorical=np.column_stack(list(cat.values())) if cat else np.zeros((chunk.n, 0), np.int64),
        categorical_names=list(cat),
    )
