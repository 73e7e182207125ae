"""Streaming Parquet reader: row groups -> validated numpy chunks -> shuffled RecBatches.

Design choices, in the order the data meets them:

- Sharding. All (file, row group) pairs are listed in sorted order and dealt round-robin to ranks, so
  ranks read disjoint shards and each rank's row count is known from Parquet metadata alone.
- Equal step counts. Sharded embeddings run collectives every step, so every rank must yield the same
  number of batches, whatever its row count:
    * policy "drop_last" (training): every rank yields exactly floor(min_r rows_r / B) full batches; the
      rows after that (the tail of this epoch's row-group order) are dropped; every row is real (mask True).
    * policy "pad" (evaluation): every rank yields exactly ceil(max_r rows_r / B) batches of size B; each
      real row of the rank appears exactly once with mask=True, and the remaining slots repeat a real row
      with mask=False. Across ranks every real row appears exactly once with mask=True.
- Shuffling (shuffle=True). Row-group order is permuted per (seed, epoch, rank). The rank's rows, in that
  order, are cut into windows of `shuffle_buffer` rows (rounded to a multiple of B) and each window is
  permuted with its own RNG (seed, epoch, rank, window). Because window boundaries and permutations
  depend only on metadata, resuming at batch k needs no data before k's window: row groups wholly before
  it are skipped without decoding; the one straddling the window start is decoded and its head discarded.
- Validation. File schemas are checked when the reader is built (metadata only: a typo'd column fails
  before training starts); values (null labels, labels not 0/1, NaN dense with on_missing=error, ids out
  of range with hash=false) are checked per row group as it is decoded. Every problem raises DataError
  naming the file, row group, column and offending value.
- Conversion is vectorised: list columns become KJT values/lengths from Arrow offsets with numpy
  gathers, no per-row Python.
- Prefetch. Decoding and batch assembly run in a background thread (pyarrow and numpy release the GIL)
  feeding a bounded queue; an exception there is re-raised in the consumer; abandoning the iterator stops
  the thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import RecBatch
from data.hashing import hash_ids
from data.schema import Schema, SequenceFeature, SparseFeature

POLICIES = ("drop_last", "pad")


class DataError(ValueError):
    """Bad input data; the message names the file, row group, column and offending value."""


# ------------------------------------------------------------------------ columnar chunk
@dataclass
class _Chunk:
    """n decoded, validated rows; jagged features kept as (offsets, values) per KJT key."""

    dense: np.ndarray  # (n, Nd) float32
    labels: np.ndarray  # (n, T) float32
    user_id: np.ndarray  # (n,) int64
    offsets: list[np.ndarray]  # per key (n + 1,) int64, offsets[k][0] == 0
    values: list[np.ndarray]  # per key (offsets[k][-1],) int64

    @property
    def n(self) -> int:
        return len(self.user_id)

    def slice(self, a: int, b: int) -> _Chunk:
        """Rows [a, b) as views (no copy)."""
        return _Chunk(
            self.dense[a:b],
            self.labels[a:b],
            self.user_id[a:b],
            [o[a : b + 1] - o[a] for o in self.offsets],
            [v[o[a] : o[b]] for o, v in zip(self.offsets, self.values)],
        )

    def take(self, idx: np.ndarray) -> _Chunk:
        """Rows idx (any order, repeats allowed)."""
        offs, vals = [], []
        for o, v in zip(self.offsets, self.values):
            o2, gather = _jagged_gather(o[idx], o[idx + 1] - o[idx])
            offs.append(o2)
            vals.append(v[gather])
        return _Chunk(self.dense[idx], self.labels[idx], self.user_id[idx], offs, vals)

    @staticmethod
    def concat(chunks: Sequence[_Chunk]) -> _Chunk:
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
        return _Chunk(
            np.concatenate([c.dense for c in chunks]),
            np.concatenate([c.labels for c in chunks]),
            np.concatenate([c.user_id for c in chunks]),
            offs,
            vals,
        )

    def kjt(self, keys: Sequence[str], wanted: Sequence[str]) -> KeyedJaggedTensor:
        """The KJT of the `wanted` keys (in that order); `keys` names self.offsets / self.values."""
        index = [list(keys).index(k) for k in wanted]
        lengths = np.concatenate([np.diff(self.offsets[i]) for i in index])  # key-major, (K * B,)
        values = np.concatenate([self.values[i] for i in index])
        return KeyedJaggedTensor(
            keys=list(wanted), values=torch.from_numpy(values), lengths=torch.from_numpy(lengths)
        )

    def to_batch(
        self, keys: Sequence[str], mask: np.ndarray, split: tuple[Sequence[str], Sequence[str]] | None = None
    ) -> RecBatch:
        """`split` = (pooled keys, unpooled keys): two KJTs, `sparse` and `sequence`; None: one KJT."""
        sparse_keys, sequence_keys = split if split is not None else (keys, ())
        return RecBatch(
            dense=torch.from_numpy(np.ascontiguousarray(self.dense)),
            sparse=self.kjt(keys, sparse_keys),
            labels=torch.from_numpy(np.ascontiguousarray(self.labels)),
            user_id=torch.from_numpy(np.ascontiguousarray(self.user_id)),
            mask=torch.from_numpy(mask),
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


def _expected_types(schema: Schema) -> dict[str, tuple[str, Any]]:
    """column -> (description, predicate on the Arrow type)."""
    numeric = (
        "a number (int or float)",
        lambda t: _is_int(t) or pa.types.is_floating(t) or pa.types.is_boolean(t),
    )
    out: dict[str, tuple[str, Any]] = {}
    for lab in schema.labels:
        out[lab] = numeric
    out[schema.user_id] = ("an integer", _is_int)
    for f in schema.dense:
        out[f.column] = numeric
    for f in schema.sparse:
        out[f.column] = ("list<int64>", _is_int_list) if f.multi_hot else ("an integer", _is_int)
    for f in schema.sequence_features:
        out[f.column] = ("list<int64>", _is_int_list)
    return out


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file (corrupt or truncated?): {e}") from e


def _check_file(path: Path, pf: pq.ParquetFile, schema: Schema) -> None:
    md = pf.metadata
    if md.num_rows == 0 or md.num_row_groups == 0:
        raise DataError(f"{path}: empty Parquet file ({md.num_rows} rows, {md.num_row_groups} row groups)")
    arrow = pf.schema_arrow
    for col, (want, ok) in _expected_types(schema).items():
        idx = arrow.get_field_index(col)
        if idx < 0:
            raise DataError(
                f"{path}: column {col!r} missing (row group: all); file has {', '.join(arrow.names)}"
            )
        t = arrow.field(idx).type
        if not ok(t):
            raise DataError(f"{path}: column {col!r} (row group: all) has type {t}, expected {want}")


# ------------------------------------------------------------------------ row-group decoding
class _Decoder:
    """Validates one row group's Arrow table and turns it into a _Chunk."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.jagged: list[SparseFeature | SequenceFeature] = [*schema.sparse, *schema.sequence_features]

    def __call__(self, table: pa.Table, where: str) -> _Chunk:
        s = self.schema
        n = table.num_rows
        col = {name: table.column(name).combine_chunks() for name in s.columns()}

        labels = np.empty((n, len(s.labels)), dtype=np.float32)  # (n, T)
        for j, lab in enumerate(s.labels):
            arr = col[lab]
            self._no_nulls(arr, where, lab)
            v = arr.to_numpy(zero_copy_only=False).astype(np.float32)
            bad = np.flatnonzero((v != 0) & (v != 1))
            if len(bad):
                raise DataError(
                    f"{where}, column {lab!r}: label must be 0 or 1, got {v[bad[0]]!r} (row {bad[0]})"
                )
            labels[:, j] = v

        uid = col[s.user_id]
        self._no_nulls(uid, where, s.user_id)
        user_id = uid.to_numpy(zero_copy_only=False).astype(np.int64)

        dense = np.empty((n, s.dense_dim), dtype=np.float32)  # (n, Nd)
        j = 0
        for f in s.dense:
            v = col[f.column].to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> NaN
            missing = ~np.isfinite(v)
            if f.on_missing == "error":
                bad = np.flatnonzero(missing)
                if len(bad):
                    shown = "null" if not col[f.column][int(bad[0])].is_valid else repr(v[bad[0]])
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
        return _Chunk(dense, labels, user_id, offsets, values)

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
        if f.hash:
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

    @staticmethod
    def _no_nulls(arr: pa.Array, where: str, column: str) -> None:
        if arr.null_count:
            row = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{where}, column {column!r}: null value (row {row})")


# ------------------------------------------------------------------------ the reader
@dataclass(frozen=True)
class _RowGroup:
    file: int  # index into reader.files
    index: int  # row group index in the file
    rows: int


_END = object()


class ParquetReader:
    """Iterable of RecBatch over Parquet files, sharded by rank (see the module docstring for policies).

    `len(reader)` is the number of batches every rank yields per epoch. Call `set_epoch(e)` before each
    epoch; `state_dict()` / `load_state_dict()` resume mid-epoch with exactly the batches an uninterrupted
    reader would have yielded.
    """

    def __init__(
        self,
        files_or_dir: str | Path | Sequence[str | Path],
        schema: Schema,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        shuffle_buffer: int = 65536,
        seed: int = 0,
        policy: str = "drop_last",
        prefetch: int = 4,
        split_keys: tuple[Sequence[str], Sequence[str]] | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r} not one of {POLICIES}")
        self.schema, self.batch_size, self.rank, self.world_size = schema, batch_size, rank, world_size
        self.shuffle, self.seed, self.policy, self.prefetch = shuffle, seed, policy, prefetch
        if split_keys is not None:  # (pooled keys, unpooled keys): which KJT each schema feature goes to
            unknown = sorted((set(split_keys[0]) | set(split_keys[1])) - set(schema.sparse_keys))
            if unknown:
                raise ValueError(f"split_keys: unknown feature(s) {unknown}")
        self.split_keys = split_keys
        # windows are whole batches so that batch k always lies in window k * B // window
        self.window = max(1, shuffle_buffer // batch_size) * batch_size if shuffle else batch_size
        self.files = _list_files(files_or_dir)
        self._decode = _Decoder(schema)

        pairs: list[_RowGroup] = []
        for i, path in enumerate(self.files):
            pf = _open(path)
            _check_file(path, pf, schema)
            md = pf.metadata
            pairs += [_RowGroup(i, g, md.row_group(g).num_rows) for g in range(md.num_row_groups)]
        self._all_pairs = pairs  # sorted: files sorted, row groups in file order
        self._pairs = pairs[rank::world_size]
        rows = [sum(p.rows for p in pairs[r::world_size]) for r in range(world_size)]
        self.rows_per_rank = rows
        self.num_rows = rows[rank]
        if policy == "drop_last":
            self._num_batches = min(rows) // batch_size
            self._stream_rows = self._num_batches * batch_size
        else:
            self._num_batches = -(-max(rows) // batch_size)
            self._stream_rows = self.num_rows

        self._epoch = 0
        self._yielded = 0  # batches handed to the consumer this epoch
        self._resume_from = 0

    # ---------------------------------------------------------------- state
    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        self._epoch, self._yielded, self._resume_from = int(epoch), 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches_yielded": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._epoch = int(state["epoch"])
        self._yielded = self._resume_from = int(state["batches_yielded"])

    # ---------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[RecBatch]:
        start, self._resume_from = self._resume_from, 0
        self._yielded = start
        source = self._batches(self._epoch, start)
        if self.prefetch <= 0:
            for b in source:
                self._yielded += 1
                yield b
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        thread = threading.Thread(
            target=_produce, args=(source, q, stop), daemon=True, name=f"ParquetReader-rank{self.rank}"
        )
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                self._yielded += 1
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            thread.join()

    def _epoch_pairs(self, epoch: int) -> list[_RowGroup]:
        if not self.shuffle:
            return list(self._pairs)
        order = np.random.default_rng([self.seed, epoch, self.rank]).permutation(len(self._pairs))
        return [self._pairs[i] for i in order]

    def _read(self, pair: _RowGroup, handles: dict[int, pq.ParquetFile]) -> _Chunk:
        path = self.files[pair.file]
        where = f"{path}: row group {pair.index}"
        if pair.file not in handles:
            handles[pair.file] = _open(path)
        try:
            table = handles[pair.file].read_row_group(pair.index, columns=self.schema.columns())
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{where}: cannot decode (corrupt or truncated file?): {e}") from e
        return self._decode(table, where)

    def _chunks(self, epoch: int, start_row: int) -> Iterator[_Chunk]:
        """This epoch's stream rows [start_row, stream_rows), as decoded chunks in order."""
        handles: dict[int, pq.ParquetFile] = {}
        pos = 0  # stream row index at the start of the current row group
        for pair in self._epoch_pairs(epoch):
            lo, hi = pos, min(pos + pair.rows, self._stream_rows)
            pos += pair.rows
            if hi <= start_row:
                continue  # wholly before the resume point: skipped without decoding
            if lo >= self._stream_rows:
                break
            chunk = self._read(pair, handles)
            yield chunk.slice(max(start_row - lo, 0), hi - lo)

    def _batches(self, epoch: int, start_batch: int) -> Iterator[RecBatch]:
        B, W, keys = self.batch_size, self.window, self.schema.sparse_keys
        batch_no = start_batch
        w = start_batch * B // W  # first window to build
        pending: list[_Chunk] = []
        have = 0
        chunks = self._chunks(epoch, w * W)
        exhausted = False
        while w * W < self._stream_rows:
            size = min(W, self._stream_rows - w * W)
            while have < size and not exhausted:
                c = next(chunks, None)
                if c is None:
                    exhausted = True
                else:
                    pending.append(c)
                    have += c.n
            rows = _Chunk.concat(pending)
            window, rest = rows.slice(0, size), rows.slice(size, rows.n)
            pending, have = ([rest], rest.n) if rest.n else ([], 0)
            perm = (
                np.random.default_rng([self.seed, epoch, self.rank, w]).permutation(size)
                if self.shuffle
                else np.arange(size)
            )
            for b in range(-(-size // B)):
                if w * W + b * B < batch_no * B:
                    continue  # before the resume point inside the first window
                idx = perm[b * B : (b + 1) * B]
                real = len(idx)
                mask = np.ones(B, dtype=bool)
                if real < B:  # pad policy only: repeat a real row, masked out
                    idx = np.concatenate([idx, np.full(B - real, idx[0])])
                    mask[real:] = False
                yield window.take(idx).to_batch(keys, mask, self.split_keys)
                batch_no += 1
            w += 1
        if batch_no < self._num_batches:  # pad policy: this rank ran out of rows before the others
            pad = self._pad_row()
            mask = np.zeros(B, dtype=bool)
            for _ in range(batch_no, self._num_batches):
                yield pad.take(np.zeros(B, dtype=np.int64)).to_batch(keys, mask, self.split_keys)

    def _pad_row(self) -> _Chunk:
        """A real row to repeat in all-padding batches: the first row of this rank's (or any) shard."""
        pair = (self._pairs or self._all_pairs)[0]
        return self._read(pair, {}).slice(0, 1)


def _produce(source: Iterator[RecBatch], q: queue.Queue, stop: threading.Event) -> None:
    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    try:
        for batch in source:
            if not put(batch):
                return
        put(_END)
    except BaseException as e:  # re-raised in the consumer
        put(e)


def _list_files(files_or_dir: str | Path | Sequence[str | Path]) -> list[Path]:
    items = [files_or_dir] if isinstance(files_or_dir, str | Path) else list(files_or_dir)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("*.parquet"))
            if not found:
                raise DataError(f"{p}: no *.parquet files in directory")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    if not files:
        raise DataError("no Parquet files given")
    return sorted(set(files))
