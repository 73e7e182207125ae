"""Streaming Parquet reader: row groups -> validated numpy chunks (data.decode) -> shuffled RecBatches.

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
- Validation (data.decode). File schemas are checked when the reader is built (metadata only: a typo'd
  column fails before training starts); values are checked per row group as it is decoded. Every problem
  raises DataError naming the file, row group, column and offending value.
- Negative down-sampling (negative_rate r < 1, training). A row whose labels are all 0 is kept when
  splitmix64(seed, its position in the split) falls below r; every other row is kept. The choice depends on
  the row and the seed only (not on rank, epoch or resume point), and the kept counts per row group are
  read from the label columns when the reader is built, so batch counts and exact resume work as without.
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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.batch import RecBatch
from data.decode import BatchArrays, Chunk, DataError, Decoder, check_file, open_parquet
from data.hashing import splitmix64
from data.schema import Schema
from data.storage import display, exists, is_dir, join, list_files
from data.workers import worker_batches

POLICIES = ("drop_last", "pad")


# ------------------------------------------------------------------------ the reader
@dataclass(frozen=True)
class _RowGroup:
    file: int  # index into reader.files
    index: int  # row group index in the file
    rows: int
    first_row: int  # position of its first row in the split (files in name order, row groups in order)


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
        labels: bool = True,
        extra_columns: Sequence[str] = (),
        pin_memory: bool = False,
        negative_rate: float = 1.0,
        workers: int = 0,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r} not one of {POLICIES}")
        if not 0 < negative_rate <= 1:
            raise ValueError(f"data.negative_rate must be in (0, 1], got {negative_rate}")
        if negative_rate < 1 and not labels:
            raise ValueError("negative down-sampling needs the label columns")
        self.negative_rate = negative_rate
        if workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {workers}")
        self.workers = workers  # decoding processes (data/workers.py); 0: a thread of this process
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
        self.labels = labels
        # GPU jobs: batches in page-locked memory, so the pipeline's non_blocking copy to the device is
        # asynchronous (from pageable memory CUDA stages it and the host waits); pinned by the prefetch thread
        self.pin_memory = pin_memory
        self._decode = Decoder(schema, labels)

        pairs: list[_RowGroup] = []
        first_row = 0
        negatives = np.zeros(len(schema.labels), dtype=np.int64)  # per task, over the whole split
        kept_negatives = np.zeros(len(schema.labels), dtype=np.int64)
        for i, path in enumerate(self.files):
            pf = open_parquet(path)
            check_file(path, pf, schema, labels, extra_columns)
            md = pf.metadata
            for g in range(md.num_row_groups):
                rows = md.row_group(g).num_rows
                if negative_rate < 1:  # the rows the down-sampling keeps, from the labels alone
                    group_labels = self._labels_of(pf, path, g)  # (n, T)
                    kept = self._kept(group_labels, first_row)
                    rows = int(kept.sum())
                    task_negative = group_labels < 0.5  # (n, T)
                    negatives += task_negative.sum(0)
                    kept_negatives += (task_negative & kept[:, None]).sum(0)
                pairs.append(_RowGroup(i, g, rows, first_row))
                first_row += md.row_group(g).num_rows
        # Per task, the share of its negatives (label 0) the down-sampling keeps: r for a row whose labels are
        # all 0, 1 for one that is positive for another task. Over the whole split, so equal on every rank.
        self.negative_keep_rates = tuple(
            float(k / n) if n else 1.0 for k, n in zip(kept_negatives, negatives)
        )
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

    def shard_row_groups(self) -> list[tuple[str, int, int, int]]:
        """This rank's row groups as (file, row group index, rows, first row's position in the split), in
        the order an unshuffled reader yields their rows."""
        return [(self.files[p.file], p.index, p.rows, p.first_row) for p in self._pairs]

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
        if self.workers > 0:
            for b in worker_batches(self, self._epoch, start):
                self._yielded += 1
                yield b
            return
        source = (b.to_batch() for b in self._batches(self._epoch, start))
        if self.pin_memory:
            source = (b.pin_memory() for b in source)
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

    def _read(self, pair: _RowGroup, handles: dict[int, pq.ParquetFile]) -> Chunk:
        path = self.files[pair.file]
        where = f"{display(path)}: row group {pair.index}"
        if pair.file not in handles:
            handles[pair.file] = open_parquet(path)
        try:
            table = handles[pair.file].read_row_group(pair.index, columns=self.schema.columns(self.labels))
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{where}: cannot decode (corrupt or truncated file?): {e}") from e
        chunk = self._decode(table, where)
        if self.negative_rate == 1:
            return chunk
        return chunk.take(np.flatnonzero(self._kept(chunk.labels, pair.first_row)))

    def _labels_of(self, pf: pq.ParquetFile, path: str, group: int) -> np.ndarray:
        """(n, T) labels of one row group, for the down-sampled row counts (labels only: cheap to read)."""
        where = f"{display(path)}: row group {group}"
        try:
            table = pf.read_row_group(group, columns=list(self.schema.labels))
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{where}: cannot decode (corrupt or truncated file?): {e}") from e
        return self._decode.labels_of(table, where)

    def _kept(self, labels: np.ndarray, first_row: int) -> np.ndarray:
        """(n,) bool: which rows of a row group starting at split position `first_row` the down-sampling
        keeps: every row with a positive label, and a negative when its draw is below negative_rate."""
        position = np.arange(first_row, first_row + len(labels), dtype=np.int64)
        draw = splitmix64(splitmix64(position) ^ np.uint64(self.seed)) >> np.uint64(11)  # 53 bits
        return (labels > 0.5).any(axis=1) | (draw * 2.0**-53 < self.negative_rate)

    def _stream_plan(self, epoch: int, start_row: int) -> list[tuple[_RowGroup, int, int]]:
        """The row groups holding this epoch's stream rows [start_row, stream_rows), in order, each with
        the stream rows [lo, hi) it contributes (its first hi - lo kept rows)."""
        plan, pos = [], 0  # pos: stream row index at the start of the current row group
        for pair in self._epoch_pairs(epoch):
            lo, hi = pos, min(pos + pair.rows, self._stream_rows)
            pos += pair.rows
            if hi <= start_row:
                continue  # wholly before the resume point: skipped without decoding
            if lo >= self._stream_rows:
                break
            plan.append((pair, lo, hi))
        return plan

    def _chunks(self, epoch: int, start_row: int) -> Iterator[Chunk]:
        """This epoch's stream rows [start_row, stream_rows), as decoded chunks in order."""
        handles: dict[int, pq.ParquetFile] = {}
        for pair, lo, hi in self._stream_plan(epoch, start_row):
            yield self._read(pair, handles).slice(max(start_row - lo, 0), hi - lo)

    def _windows(self, start_batch: int) -> range:
        """The windows this epoch's stream from batch `start_batch` on is cut into (window w holds the
        stream rows [w * W, w * W + size(w)))."""
        return range(start_batch * self.batch_size // self.window, -(-self._stream_rows // self.window))

    def _window_size(self, w: int) -> int:
        return min(self.window, self._stream_rows - w * self.window)

    def _window_plan(
        self, size: int, epoch: int, w: int, start_batch: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row indices into the window, mask) of each batch of window w (`size` rows), shuffled, from
        batch `start_batch` of the epoch on."""
        B, W = self.batch_size, self.window
        perm = (
            np.random.default_rng([self.seed, epoch, self.rank, w]).permutation(size)
            if self.shuffle
            else np.arange(size)
        )
        for b in range(-(-size // B)):
            if w * W + b * B < start_batch * B:
                continue  # before the resume point inside the first window
            idx = perm[b * B : (b + 1) * B]
            real = len(idx)
            mask = np.ones(B, dtype=bool)
            if real < B:  # pad policy only: repeat a real row, masked out
                idx = np.concatenate([idx, np.full(B - real, idx[0])])
                mask[real:] = False
            yield idx, mask

    def _window_batches(self, window: Chunk, epoch: int, w: int, start_batch: int) -> Iterator[BatchArrays]:
        for idx, mask in self._window_plan(window.n, epoch, w, start_batch):
            yield window.batch_arrays(self.schema.sparse_keys, mask, self.split_keys, idx)

    def _pad_plan(self, batches_before: int) -> Iterator[tuple[Chunk, np.ndarray, np.ndarray]]:
        """Pad policy: (a real row, indices, mask) of the all-padding batches of a rank that ran out of
        rows before the others."""
        if batches_before >= self._num_batches:
            return
        pad, B = self._pad_row(), self.batch_size
        for _ in range(batches_before, self._num_batches):
            yield pad, np.zeros(B, dtype=np.int64), np.zeros(B, dtype=bool)

    def _batches(self, epoch: int, start_batch: int) -> Iterator[BatchArrays]:
        """This epoch's batches from `start_batch` on, decoded in this process (workers=0)."""
        W = self.window
        windows = self._windows(start_batch)
        pending: list[Chunk] = []
        have = 0
        chunks = self._chunks(epoch, windows.start * W)
        for w in windows:
            size = self._window_size(w)
            while have < size:
                c = next(chunks)
                pending.append(c)
                have += c.n
            rows = Chunk.concat(pending)
            window, rest = rows.slice(0, size), rows.slice(size, rows.n)
            pending, have = ([rest], rest.n) if rest.n else ([], 0)
            yield from self._window_batches(window, epoch, w, start_batch)
        for pad, idx, mask in self._pad_plan(max(start_batch, self._batches_in_windows())):
            yield pad.batch_arrays(self.schema.sparse_keys, mask, self.split_keys, idx)

    def _batches_in_windows(self) -> int:
        """Batches per epoch that hold stream rows (the pad policy adds all-padding ones after them)."""
        return -(-self._stream_rows // self.batch_size)

    def _pad_row(self) -> Chunk:
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


def _list_files(files_or_dir: str | Path | Sequence[str | Path]) -> list[str]:
    """Files (local paths or URIs) from files and directories (their *.parquet files, recursively)."""
    items = [files_or_dir] if isinstance(files_or_dir, str | Path) else list(files_or_dir)
    files: list[str] = []
    for item in items:
        if is_dir(item):
            found = list_files(item, ".parquet")
            if not found:
                raise DataError(f"{display(item)}: no *.parquet files in directory")
            files += [join(item, f) for f in found]
        elif exists(item):
            files.append(str(item))
        else:
            raise DataError(f"{display(item)}: no such file or directory")
    if not files:
        raise DataError("no Parquet files given")
    return sorted(set(files))
