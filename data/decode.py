"""Decoding and validation of the reader's Parquet input: Arrow row groups -> checked numpy chunks.

- File checks (metadata only, run when the reader is built): `open_parquet` and `check_file` reject an
  unreadable or empty file and a missing or mistyped column, so a typo'd column fails before training starts.
- Value checks (`Decoder`, per row group as it is decoded): null labels, labels not 0/1, NaN dense with
  on_missing=error, ids out of range with hash=false, misaligned sequence columns. Every problem raises
  DataError naming the file, row group, column and offending value.
- TorchRec is imported only where a KJT / RecBatch is built, so the TorchRec-free serving Predictor
  (pipeline/predictor.py) decodes with exactly the training checks.
- Conversion is vectorised: list columns become KJT values/lengths from Arrow offsets with numpy
  gathers, no per-row Python. A decoded row group is a `Chunk`, which the reader slices, permutes,
  concatenates and turns into RecBatches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from data.hashing import hash_ids
from data.schema import Schema, SequenceFeature, SparseFeature
from data.storage import display, is_uri, resolve

if TYPE_CHECKING:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from data.batch import RecBatch


# TorchRec's managed-collision modules mark an empty slot with the largest int64
ZCH_EMPTY_ID = 2**63 - 1


class DataError(ValueError):
    """Bad input data; the message names the file, row group, column and offending value."""


# ------------------------------------------------------------------------ columnar chunk
@dataclass
class Chunk:
    """n decoded, validated rows; jagged features kept as (offsets, values) per KJT key."""

    dense: np.ndarray  # (n, Nd) float32
    labels: np.ndarray  # (n, T) float32
    user_id: np.ndarray  # (n,) int64
    weight: np.ndarray  # (n,) float32, the schema's sample-weight column (1 without one)
    offsets: list[np.ndarray]  # per key (n + 1,) int64, offsets[k][0] == 0
    values: list[np.ndarray]  # per key (offsets[k][-1],) int64

    @property
    def n(self) -> int:
        return len(self.user_id)

    def slice(self, a: int, b: int) -> Chunk:
        """Rows [a, b) as views (no copy)."""
        return Chunk(
            self.dense[a:b],
            self.labels[a:b],
            self.user_id[a:b],
            self.weight[a:b],
            [o[a : b + 1] - o[a] for o in self.offsets],
            [v[o[a] : o[b]] for o, v in zip(self.offsets, self.values)],
        )

    def take(self, idx: np.ndarray) -> Chunk:
        """Rows idx (any order, repeats allowed)."""
        offs, vals = [], []
        for o, v in zip(self.offsets, self.values):
            o2, gather = _jagged_gather(o[idx], o[idx + 1] - o[idx])
            offs.append(o2)
            vals.append(v[gather])
        return Chunk(self.dense[idx], self.labels[idx], self.user_id[idx], self.weight[idx], offs, vals)

    @staticmethod
    def concat(chunks: Sequence[Chunk]) -> Chunk:
        if len(chunks) == 1:
            return chunks[0]
        offs, vals = [], []
        for k in range(len(chunks[0].offsets)):
            base = np.cumsum([0] + [int(c.offsets[k][-1]) for c in chunks[:-1]])
            offs.append(
                np.concatenate(
                    [chunks[0].offsets[k][:1]] + [c.offsets[k][1:] + b for c, b in zip(chunks, base)]
                )
            )
            vals.append(np.concatenate([c.values[k] for c in chunks]))
        return Chunk(
            np.concatenate([c.dense for c in chunks]),
            np.concatenate([c.labels for c in chunks]),
            np.concatenate([c.user_id for c in chunks]),
            np.concatenate([c.weight for c in chunks]),
            offs,
            vals,
        )

    def kjt(self, keys: Sequence[str], wanted: Sequence[str]) -> KeyedJaggedTensor:
        """The KJT of the `wanted` keys (in that order); `keys` names self.offsets / self.values."""
        # imported here, not at the top: the serving Predictor decodes without TorchRec
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        index = [list(keys).index(k) for k in wanted]
        lengths = np.concatenate([np.diff(self.offsets[i]) for i in index])  # key-major, (K * B,)
        values = np.concatenate([self.values[i] for i in index])
        return KeyedJaggedTensor(
            keys=list(wanted), values=torch.from_numpy(values), lengths=torch.from_numpy(lengths)
        )

    def to_batch(
        self, keys: Sequence[str], mask: np.ndarray, split: tuple[Sequence[str], Sequence[str]] | None = None
    ) -> RecBatch:
        """`split` = (pooled keys, unpooled keys): two KJTs, `sparse` and `sequence`; None: one KJT. Rows
        with mask False (padding) get weight 0."""
        from data.batch import RecBatch  # not at import: serving (pipeline/predictor.py) needs no TorchRec

        sparse_keys, sequence_keys = split if split is not None else (keys, ())
        return RecBatch(
            dense=torch.from_numpy(np.ascontiguousarray(self.dense)),
            sparse=self.kjt(keys, sparse_keys),
            labels=torch.from_numpy(np.ascontiguousarray(self.labels)),
            user_id=torch.from_numpy(np.ascontiguousarray(self.user_id)),
            mask=torch.from_numpy(mask),
            weight=torch.from_numpy(np.where(mask, self.weight, np.float32(0))),
            sequence=self.kjt(keys, sequence_keys) if sequence_keys else None,
        )


def _jagged_gather(starts: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows with value ranges [starts, starts + lens): new offsets (m + 1,) and source value indices."""
    out_off = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=out_off[1:])
    gather = np.repeat(starts - out_off[:-1], lens) + np.arange(out_off[-1], dtype=np.int64)
    return out_off, gather


# ------------------------------------------------------------------------ metadata checks
def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def _is_int_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_int(t.value_type)


def _expected_types(schema: Schema, labels: bool = True) -> dict[str, tuple[str, Any]]:
    """column -> (description, predicate on the Arrow type)."""
    numeric = (
        "a number (int or float)",
        lambda t: _is_int(t) or pa.types.is_floating(t) or pa.types.is_boolean(t),
    )
    out: dict[str, tuple[str, Any]] = {}
    for lab in schema.labels if labels else ():
        out[lab] = numeric
    out[schema.user_id] = ("an integer", _is_int)
    if labels and schema.weight is not None:
        out[schema.weight] = numeric
    for f in schema.dense:
        out[f.column] = numeric
    for f in schema.sparse:
        out[f.column] = ("list<int64>", _is_int_list) if f.multi_hot else ("an integer", _is_int)
    for f in schema.sequence_features:
        out[f.column] = ("list<int64>", _is_int_list)
    return out


def open_parquet(path: str | Path) -> pq.ParquetFile:
    """A Parquet file by local path or URI (data.storage); remote files pre-buffer each row group's column
    chunks in few large reads, since every request to an object store costs a round trip."""
    try:
        if not is_uri(path):
            return pq.ParquetFile(path)
        fs, inner = resolve(path)
        return pq.ParquetFile(fs.open_input_file(inner), pre_buffer=True)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{display(path)}: not a readable Parquet file (corrupt or truncated?): {e}") from e


def check_file(
    path: str | Path, pf: pq.ParquetFile, schema: Schema, labels: bool = True, extra: Sequence[str] = ()
) -> None:
    """Every column the schema reads (without the labels if `labels=False`) and the `extra` columns
    (any type) exist, with the expected types."""
    path = display(path)
    md = pf.metadata
    if md.num_rows == 0 or md.num_row_groups == 0:
        raise DataError(f"{path}: empty Parquet file ({md.num_rows} rows, {md.num_row_groups} row groups)")
    arrow = pf.schema_arrow
    anything = ("any type", lambda t: True)
    for col, (want, ok) in {**{c: anything for c in extra}, **_expected_types(schema, labels)}.items():
        idx = arrow.get_field_index(col)
        if idx < 0:
            raise DataError(
                f"{path}: column {col!r} missing (row group: all); file has {', '.join(arrow.names)}"
            )
        t = arrow.field(idx).type
        if not ok(t):
            raise DataError(f"{path}: column {col!r} (row group: all) has type {t}, expected {want}")


# ------------------------------------------------------------------------ row-group decoding
class Decoder:
    """Validates one row group's Arrow table and turns it into a Chunk."""

    def __init__(self, schema: Schema, labels: bool = True) -> None:
        self.schema = schema
        self.labels = labels  # False: scoring data without label columns; labels decode as 0
        self.jagged: list[SparseFeature | SequenceFeature] = [*schema.sparse, *schema.sequence_features]

    def __call__(self, table: pa.Table, where: str) -> Chunk:
        s = self.schema
        n = table.num_rows
        col = {name: table.column(name).combine_chunks() for name in s.columns(self.labels)}

        labels = self.labels_of(table, where) if self.labels else np.zeros((n, len(s.labels)), np.float32)

        uid = col[s.user_id]
        self._no_nulls(uid, where, s.user_id)
        user_id = uid.to_numpy(zero_copy_only=False).astype(np.int64)

        weight = np.ones(n, dtype=np.float32)
        if self.labels and s.weight is not None:
            weight = self._weights(col[s.weight], where, s.weight)

        dense = np.empty((n, s.dense_dim), dtype=np.float32)  # (n, Nd)
        j = 0
        for f in s.dense:
            v = col[f.column].to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> NaN
            missing = ~np.isfinite(v)
            if f.on_missing == "error":
                bad = np.flatnonzero(missing)
                if len(bad):
                    shown = "null" if not col[f.column][int(bad[0])].is_valid else repr(float(v[bad[0]]))
                    raise DataError(
                        f"{where}, column {f.column!r}: missing/non-finite dense value {shown} "
                        f"(row {bad[0]}); set on_missing: fill to allow it"
                    )
                dense[:, j] = v
                j += 1
            else:
                dense[:, j] = np.where(missing, f.fill_value, v)
                dense[:, j + 1] = missing
                j += 2

        offsets, values = [], []
        for f in self.jagged:
            o, v = self._ids(col[f.column], f, where)
            offsets.append(o)
            values.append(v)
        self._check_aligned(offsets[len(s.sparse) :], where)
        return Chunk(dense, labels, user_id, weight, offsets, values)

    def labels_of(self, table: pa.Table, where: str) -> np.ndarray:
        """(n, T) float32 0/1 labels of a table holding (at least) the label columns, checked."""
        labels = np.zeros((table.num_rows, len(self.schema.labels)), dtype=np.float32)  # (n, T)
        for j, lab in enumerate(self.schema.labels):
            arr = table.column(lab).combine_chunks()
            self._no_nulls(arr, where, lab)
            v = arr.to_numpy(zero_copy_only=False).astype(np.float32)
            bad = np.flatnonzero((v != 0) & (v != 1))
            if len(bad):
                raise DataError(
                    f"{where}, column {lab!r}: label must be 0 or 1, got {float(v[bad[0]])!r} (row {bad[0]})"
                )
            labels[:, j] = v
        return labels

    def _check_aligned(self, offsets: list[np.ndarray], where: str) -> None:
        """Sequence columns are aligned by position: every row has the same length in each of them."""
        features = self.schema.sequence_features
        for f, o in zip(features[1:], offsets[1:]):
            bad = np.flatnonzero(np.diff(o) != np.diff(offsets[0]))
            if len(bad):
                row = int(bad[0])
                raise DataError(
                    f"{where}, column {f.column!r}: {int(np.diff(o)[row])} items in row {row}, but "
                    f"{features[0].column!r} has {int(np.diff(offsets[0])[row])}; sequence columns must "
                    "be aligned by position"
                )

    def _ids(self, arr: pa.Array, f: SparseFeature | SequenceFeature, where: str) -> tuple[np.ndarray, ...]:
        n = len(arr)
        if isinstance(f, SparseFeature) and not f.multi_hot:
            self._no_nulls(arr, where, f.column)
            v = arr.to_numpy(zero_copy_only=False).astype(np.int64)
            offsets = np.arange(n + 1, dtype=np.int64)
        else:
            # a null list is an empty list; a null inside a list is an error
            lens = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
            offsets = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(lens, out=offsets[1:])
            flat = arr.flatten()
            if flat.null_count:
                pos = int(np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0])
                row = int(np.searchsorted(offsets, pos, side="right") - 1)
                raise DataError(f"{where}, column {f.column!r}: null id inside a list (row {row})")
            v = flat.to_numpy(zero_copy_only=False).astype(np.int64)
            if isinstance(f, SequenceFeature):
                offsets, v = self._keep_last(offsets, v, self.schema.sequence.max_len)
        if f.zch is not None:  # raw ids, remapped by the model's managed-collision module
            bad = np.flatnonzero(v == ZCH_EMPTY_ID)
            if len(bad):
                row = int(np.searchsorted(offsets, bad[0], side="right") - 1)
                raise DataError(
                    f"{where}, column {f.column!r}: id {ZCH_EMPTY_ID} (row {row}) is reserved by managed "
                    "collisions (zch) for an empty slot"
                )
        elif f.hash:
            v = hash_ids(v, f.num_embeddings)
        else:
            bad = np.flatnonzero((v < 0) | (v >= f.num_embeddings))
            if len(bad):
                row = int(np.searchsorted(offsets, bad[0], side="right") - 1)
                raise DataError(
                    f"{where}, column {f.column!r}: id {int(v[bad[0]])} outside "
                    f"[0, {f.num_embeddings}) (row {row}); set hash: true to hash raw ids"
                )
        return offsets, v

    @staticmethod
    def _keep_last(offsets: np.ndarray, v: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Keep the last min(len, max_len) items of each row (most recent last)."""
        lens = np.diff(offsets)
        if len(lens) == 0 or lens.max() <= max_len:
            return offsets, v
        keep = np.minimum(lens, max_len)
        new_off, gather = _jagged_gather(offsets[1:] - keep, keep)
        return new_off, v[gather]

    def _weights(self, arr: pa.Array, where: str, column: str) -> np.ndarray:
        """The sample weights: finite and >= 0 (a weight of 0 drops the row from loss and metrics)."""
        self._no_nulls(arr, where, column)
        v = arr.to_numpy(zero_copy_only=False).astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(v) | (v < 0))
        if len(bad):
            raise DataError(
                f"{where}, column {column!r}: sample weight must be a finite number >= 0, got "
                f"{float(v[bad[0]])!r} (row {bad[0]})"
            )
        return v

    @staticmethod
    def _no_nulls(arr: pa.Array, where: str, column: str) -> None:
        if arr.null_count:
            row = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{where}, column {column!r}: null value (row {row})")
