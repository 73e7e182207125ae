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

from collections.abc import Callable, Sequence
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
class Block:
    """ID features that share one row layout: `values[i]` holds feature `keys[i]`'s ids of every row.
    `offsets` None: exactly one id per row, each values[i] (n,); else (n + 1,) int64 offsets with
    offsets[0] == 0 and each values[i] (offsets[-1],).

    One block holds every single-valued feature, one each multi-valued feature, and one the aligned
    sequence features, so a take computes one gather per block, not one per feature. The values are
    kept per feature (zero-copy views of the decoded Arrow columns), not stacked: stacking is a copy."""

    keys: tuple[int, ...]  # positions in the chunk's key order (schema.sparse_keys)
    offsets: np.ndarray | None
    values: list[np.ndarray]  # per key, int64

    def slice(self, a: int, b: int) -> Block:
        if self.offsets is None:
            return Block(self.keys, None, [v[a:b] for v in self.values])
        o = self.offsets
        return Block(self.keys, o[a : b + 1] - o[a], [v[o[a] : o[b]] for v in self.values])

    def gather(self, idx: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Rows idx: their (offsets, value indices), offsets None for one id per row (indices = idx)."""
        if self.offsets is None:
            return None, idx
        o = self.offsets
        return _jagged_gather(o[idx], o[idx + 1] - o[idx])

    def take(self, idx: np.ndarray) -> Block:
        offsets, gather = self.gather(idx)
        return Block(self.keys, offsets, [_take(v, gather) for v in self.values])

    def lengths(self, n: int) -> np.ndarray:
        """(n,) int64 ids per row (the same for every key of the block)."""
        return np.ones(n, dtype=np.int64) if self.offsets is None else np.diff(self.offsets)

    @staticmethod
    def concat(blocks: Sequence[Block]) -> Block:
        first = blocks[0]
        values = [np.concatenate(vs) for vs in zip(*(b.values for b in blocks))]
        if first.offsets is None:
            return Block(first.keys, None, values)
        offsets = [first.offsets]
        base = int(first.offsets[-1])
        for b in blocks[1:]:
            offsets.append(b.offsets[1:] + base)  # type: ignore[index]
            base += int(b.offsets[-1])  # type: ignore[index]
        return Block(first.keys, np.concatenate(offsets), values)


def _take(v: np.ndarray, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """v[idx] (rows of a 2-d v) for indices known to be in range: mode="clip" skips numpy's bounds pass
    and, with `out`, writes straight into it (mode="raise" buffers the output)."""
    return np.take(v, idx, axis=0, out=out, mode="clip")


# (shape, dtype) -> an uninitialised array to fill, np.empty's signature
Alloc = Callable[[tuple[int, ...], Any], np.ndarray]


@dataclass
class KJTArrays:
    """A KeyedJaggedTensor's parts as numpy arrays, with the per-key lengths that spare TorchRec a host
    sync (on a GPU, a KJT without `length_per_key` copies its lengths to the host to find them)."""

    keys: list[str]
    values: np.ndarray  # (sum of lengths,) int64, key-major
    lengths: np.ndarray  # (K * B,) int64, key-major
    length_per_key: list[int]

    def kjt(self) -> KeyedJaggedTensor:
        values, lengths = torch.from_numpy(self.values), torch.from_numpy(self.lengths)
        return kjt_of(self.keys, values, lengths, self.length_per_key)


def kjt_of(
    keys: list[str], values: torch.Tensor, lengths: torch.Tensor, length_per_key: list[int]
) -> KeyedJaggedTensor:
    """A KJT with its stride, lengths and offsets per key given, so TorchRec never derives them (a host
    sync on a GPU)."""
    # imported here, not at the top: the serving Predictor decodes without TorchRec
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    offset_per_key = [0]
    for n in length_per_key:
        offset_per_key.append(offset_per_key[-1] + n)
    return KeyedJaggedTensor(
        keys=keys,
        values=values,
        lengths=lengths,
        stride=len(lengths) // max(len(keys), 1),
        length_per_key=length_per_key,
        offset_per_key=offset_per_key,
    )


@dataclass
class BatchArrays:
    """A RecBatch as numpy arrays: what a loader worker process builds and ships (data.workers)."""

    dense: np.ndarray  # (B, Nd) float32
    labels: np.ndarray  # (B, T) float32
    user_id: np.ndarray  # (B,) int64
    mask: np.ndarray  # (B,) bool
    weight: np.ndarray  # (B,) float32
    sparse: KJTArrays
    sequence: KJTArrays | None

    def to_batch(self) -> RecBatch:
        from data.batch import RecBatch  # not at import: serving (pipeline/predictor.py) needs no TorchRec

        return RecBatch(
            dense=torch.from_numpy(self.dense),
            sparse=self.sparse.kjt(),
            labels=torch.from_numpy(self.labels),
            user_id=torch.from_numpy(self.user_id),
            mask=torch.from_numpy(self.mask),
            weight=torch.from_numpy(self.weight),
            sequence=None if self.sequence is None else self.sequence.kjt(),
        )


@dataclass
class Chunk:
    """n decoded, validated rows; the ID features as Blocks (key-major, jagged ones with offsets)."""

    dense: np.ndarray  # (n, Nd) float32
    labels: np.ndarray  # (n, T) float32
    user_id: np.ndarray  # (n,) int64
    weight: np.ndarray  # (n,) float32, the schema's sample-weight column (1 without one)
    blocks: list[Block]

    @property
    def n(self) -> int:
        return len(self.user_id)

    def _where(self, key: int) -> tuple[Block, int]:
        """The block holding key position `key`, and its row there."""
        for b in self.blocks:
            if key in b.keys:
                return b, b.keys.index(key)
        raise KeyError(f"no ID feature at key position {key}")

    def key_values(self, key: int) -> np.ndarray:
        """(nnz,) int64 ids of key position `key` (schema.sparse_keys order), all rows in order."""
        block, row = self._where(key)
        return block.values[row]

    def key_offsets(self, key: int) -> np.ndarray:
        """(n + 1,) int64 offsets of key position `key` into `key_values(key)`."""
        block, _ = self._where(key)
        if block.offsets is None:
            return np.arange(self.n + 1, dtype=np.int64)
        return block.offsets

    def slice(self, a: int, b: int) -> Chunk:
        """Rows [a, b) as views (no copy)."""
        return Chunk(self.dense[a:b], self.labels[a:b], self.user_id[a:b], self.weight[a:b],
                     [k.slice(a, b) for k in self.blocks])  # fmt: skip

    def take(self, idx: np.ndarray) -> Chunk:
        """Rows idx (any order, repeats allowed)."""
        return Chunk(self.dense[idx], self.labels[idx], self.user_id[idx], self.weight[idx],
                     [k.take(idx) for k in self.blocks])  # fmt: skip

    @staticmethod
    def concat(chunks: Sequence[Chunk]) -> Chunk:
        if len(chunks) == 1:
            return chunks[0]
        return Chunk(
            np.concatenate([c.dense for c in chunks]),
            np.concatenate([c.labels for c in chunks]),
            np.concatenate([c.user_id for c in chunks]),
            np.concatenate([c.weight for c in chunks]),
            [Block.concat(bs) for bs in zip(*(c.blocks for c in chunks))],
        )

    def kjt_arrays(
        self,
        keys: Sequence[str],
        wanted: Sequence[str],
        idx: np.ndarray | None = None,
        alloc: Alloc = np.empty,
    ) -> KJTArrays:
        """The KJT parts of the `wanted` keys (in that order) of rows `idx` (None: all rows, in order);
        `keys` names the key positions. Each id is copied once, from the chunk into the KJT's values;
        `alloc(shape, dtype)` gives the values' array, then the lengths'."""
        position = {k: i for i, k in enumerate(keys)}
        rows = np.arange(self.n) if idx is None else idx
        layout = []  # per wanted key: (its ids in the chunk, lengths and value indices of `rows`)
        gathered: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for k in wanted:
            block, row = self._where(position[k])
            if id(block) not in gathered:
                offsets, gather = block.gather(rows)
                lengths = np.ones(len(rows), np.int64) if offsets is None else np.diff(offsets)
                gathered[id(block)] = lengths, gather
            layout.append((block.values[row], *gathered[id(block)]))
        length_per_key = [len(gather) for _, _, gather in layout]
        values = alloc((sum(length_per_key),), np.int64)
        start = 0
        for v, _, gather in layout:
            _take(v, gather, out=values[start : start + len(gather)])
            start += len(gather)
        lengths = alloc((len(layout) * len(rows),), np.int64)
        np.concatenate([lengths for _, lengths, _ in layout], out=lengths)
        return KJTArrays(list(wanted), values, lengths, length_per_key)

    def batch_sizes(
        self, keys: Sequence[str], split: tuple[Sequence[str], Sequence[str]] | None, idx: np.ndarray,
        block_lengths: dict[int, np.ndarray],
    ) -> tuple[int, int, int]:  # fmt: skip
        """The (int64, float32, bool) elements `batch_arrays` allocates for rows `idx`; `block_lengths`
        caches each block's lengths per row across calls."""
        wanted = [*split[0], *split[1]] if split is not None else list(keys)
        position = {k: i for i, k in enumerate(keys)}
        ids = 0
        for k in wanted:
            block, _ = self._where(position[k])
            if block.offsets is None:
                ids += len(idx)
                continue
            if id(block) not in block_lengths:
                block_lengths[id(block)] = block.lengths(self.n)
            ids += int(block_lengths[id(block)][idx].sum())
        B = len(idx)
        return B + ids + len(wanted) * B, B * (self.dense.shape[1] + self.labels.shape[1] + 1), B

    def batch_arrays(
        self,
        keys: Sequence[str],
        mask: np.ndarray,
        split: tuple[Sequence[str], Sequence[str]] | None = None,
        idx: np.ndarray | None = None,
        alloc: Alloc = np.empty,
    ) -> BatchArrays:
        """The batch of rows `idx` (None: all rows, in order). `split` = (pooled keys, unpooled keys): two
        KJTs, `sparse` and `sequence`; None: one KJT. Rows with mask False (padding) get weight 0.
        `alloc(shape, dtype)` gives each output array, per dtype in this order: float32 dense, labels,
        weight; int64 user ids, then each KJT's values and lengths; bool mask (data/workers.py carves them
        out of shared memory in that order)."""
        sparse_keys, sequence_keys = split if split is not None else (keys, ())
        rows = np.arange(self.n) if idx is None else idx
        B = len(rows)
        dense = _take(self.dense, rows, alloc((B, self.dense.shape[1]), np.float32))
        labels = _take(self.labels, rows, alloc((B, self.labels.shape[1]), np.float32))
        weight = _take(self.weight, rows, alloc((B,), np.float32))
        weight[~mask] = 0
        user_id = _take(self.user_id, rows, alloc((B,), np.int64))
        sparse = self.kjt_arrays(keys, sparse_keys, rows, alloc)
        sequence = self.kjt_arrays(keys, sequence_keys, rows, alloc) if sequence_keys else None
        flags = alloc((B,), np.bool_)
        flags[:] = mask
        return BatchArrays(dense, labels, user_id, flags, weight, sparse, sequence)

    def to_batch(
        self,
        keys: Sequence[str],
        mask: np.ndarray,
        split: tuple[Sequence[str], Sequence[str]] | None = None,
        idx: np.ndarray | None = None,
    ) -> RecBatch:
        """The RecBatch of rows `idx` (see `batch_arrays`)."""
        return self.batch_arrays(keys, mask, split, idx).to_batch()


def _one_array(column: pa.ChunkedArray) -> pa.Array:
    """A column as one array: a row group's usually is one chunk already, and combining copies it."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _last_items(offsets: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Indices into a jagged array's values of each row's last `keep` items."""
    return _jagged_gather(offsets[1:] - keep, keep)[1]


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

    def __call__(self, table: pa.Table, where: str) -> Chunk:
        s = self.schema
        n = table.num_rows
        col = {name: _one_array(table.column(name)) for name in s.columns(self.labels)}

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

        singles = Block(tuple(i for i, f in enumerate(s.sparse) if not f.multi_hot), None, [])
        blocks = [singles]
        for i, f in enumerate(s.sparse):
            offsets, v = self._raw_ids(col[f.column], f, where)
            if offsets is None:
                singles.values.append(self._checked(v, None, f, where))
            else:
                blocks.append(Block((i,), offsets, [self._checked(v, offsets, f, where)]))
        if s.sequence_features:
            blocks.append(self._sequence_block(col, where))
        return Chunk(dense, labels, user_id, weight, blocks)

    def labels_of(self, table: pa.Table, where: str) -> np.ndarray:
        """(n, T) float32 0/1 labels of a table holding (at least) the label columns, checked."""
        labels = np.zeros((table.num_rows, len(self.schema.labels)), dtype=np.float32)  # (n, T)
        for j, lab in enumerate(self.schema.labels):
            arr = _one_array(table.column(lab))
            self._no_nulls(arr, where, lab)
            v = arr.to_numpy(zero_copy_only=False).astype(np.float32)
            bad = np.flatnonzero((v != 0) & (v != 1))
            if len(bad):
                raise DataError(
                    f"{where}, column {lab!r}: label must be 0 or 1, got {float(v[bad[0]])!r} (row {bad[0]})"
                )
            labels[:, j] = v
        return labels

    def _sequence_block(self, col: dict[str, pa.Array], where: str) -> Block:
        """The sequence features' block: each row's last min(len, max_len) items (most recent last), the
        features aligned by position (every row has the same length in each of them)."""
        features = self.schema.sequence_features
        max_len = self.schema.sequence.max_len  # type: ignore[union-attr]
        raw = [self._raw_ids(col[f.column], f, where) for f in features]
        kept = [np.minimum(np.diff(o), max_len) for o, _ in raw]  # type: ignore[arg-type]
        offsets = np.zeros(len(kept[0]) + 1, dtype=np.int64)
        np.cumsum(kept[0], out=offsets[1:])
        values = []
        for i, (f, (o, v)) in enumerate(zip(features, raw)):
            if len(v) != offsets[-1] or not np.array_equal(kept[i], kept[0]):
                if np.array_equal(kept[i], kept[0]):  # same kept lengths, longer raw rows
                    v = v[_last_items(o, kept[i])]  # type: ignore[arg-type]
                else:
                    row = int(np.flatnonzero(kept[i] != kept[0])[0])
                    raise DataError(
                        f"{where}, column {f.column!r}: {int(kept[i][row])} items in row {row}, but "
                        f"{features[0].column!r} has {int(kept[0][row])}; sequence columns must "
                        "be aligned by position"
                    )
            values.append(self._checked(v, offsets, f, where))
        return Block(tuple(range(len(self.schema.sparse), len(self.schema.sparse) + len(features))),
                     offsets, values)  # fmt: skip

    def _raw_ids(
        self, arr: pa.Array, f: SparseFeature | SequenceFeature, where: str
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """(offsets, int64 ids) of an ID column; offsets None for a single-valued feature (one id per
        row). A null list is an empty list; a null inside a list, or a null single id, is an error."""
        if isinstance(f, SparseFeature) and not f.multi_hot:
            self._no_nulls(arr, where, f.column)
            return None, arr.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        lens = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        offsets = np.zeros(len(arr) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        flat = arr.flatten()
        if flat.null_count:
            pos = int(np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0])
            row = int(np.searchsorted(offsets, pos, side="right") - 1)
            raise DataError(f"{where}, column {f.column!r}: null id inside a list (row {row})")
        return offsets, flat.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)

    @staticmethod
    def _checked(
        v: np.ndarray, offsets: np.ndarray | None, f: SparseFeature | SequenceFeature, where: str
    ) -> np.ndarray:
        """The ids a table is looked up with: raw (zch), hashed (hash: true), or range-checked."""

        def row_of(i: int) -> int:
            return i if offsets is None else int(np.searchsorted(offsets, i, side="right") - 1)

        if f.zch is not None:  # raw ids, remapped by the model's managed-collision module
            bad = np.flatnonzero(v == ZCH_EMPTY_ID)
            if len(bad):
                raise DataError(
                    f"{where}, column {f.column!r}: id {ZCH_EMPTY_ID} (row {row_of(bad[0])}) is reserved "
                    "by managed collisions (zch) for an empty slot"
                )
            return v
        if f.hash:
            return hash_ids(v, f.num_embeddings)
        if len(v) and (v.min() < 0 or v.max() >= f.num_embeddings):
            bad = np.flatnonzero((v < 0) | (v >= f.num_embeddings))
            raise DataError(
                f"{where}, column {f.column!r}: id {int(v[bad[0]])} outside "
                f"[0, {f.num_embeddings}) (row {row_of(bad[0])}); set hash: true to hash raw ids"
            )
        return v

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
