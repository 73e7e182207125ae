"""Loader worker processes: Parquet decoding and batch assembly off the training process (data.workers > 0).

Each rank's ParquetReader runs N worker processes (torch's DataLoader: it forks them, hands items back in
order, pins them on GPU jobs and reports a dead worker). The batches are exactly those of workers=0, and
every row group is decoded once:

- Windows. The epoch's stream (data/reader.py) is cut into shuffle windows; window w, counted from the
  resume point's window w0, goes to worker (w - w0) mod N, which shuffles it and builds its batches. The
  DataLoader asks the workers round-robin, so the training process receives the windows in order.
- Row groups. Row group q of the epoch's plan is decoded by worker q mod N and, with N > 1, published as
  one file in a shared-memory directory (/dev/shm); a worker whose window needs another's row group reads
  the rows it needs from that file (no decode). Before assembling window w, a worker
  decodes all its own row groups that windows <= w need, and after its last window the rest of its own:
  so a worker never waits for a row group whose owner is itself waiting, and the order of the items is
  what the DataLoader expects.
- Transfer. A window's batches are built straight into three shared-memory tensors (int64: user ids, KJT
  values and lengths; float32: dense, labels, weights; bool: masks), so sending one costs three file
  descriptors, whatever the batch size; the KJTs get their per-key lengths (no host sync). The buffers are
  a worker's few reused slots (SlotPool): the training process copies a window out on arrival (the
  DataLoader's pinned copy on a GPU job) and frees its slot, since fresh shared memory costs a page fault
  per page, more than the copy.
- Cleanup. The training process deletes a row group's file once every window that needs it has arrived,
  and the directory when the iteration ends or is abandoned; a new reader removes the directories of
  processes that died without doing so.
- Errors. A DataError in a worker travels as an item and is raised, as its one line, by the training
  process at that window; a worker waiting on a row group whose decode failed raises the same error.

Why not one DataLoader item per batch: the workers would then each need every window (every row group),
decoding each one N times; why not row groups as items: a window mixes rows of several row groups.
"""

from __future__ import annotations

import bisect
import os
import pickle
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.decode import Block, Chunk, DataError, kjt_of

if TYPE_CHECKING:
    from data.batch import RecBatch
    from data.reader import ParquetReader

_PREFIX = "rankmixer-loader-"
_ALIGN = 64
SLOTS = 3  # shared-memory buffer sets per worker (SlotPool)


def shared_root() -> str:
    """/dev/shm (RAM-backed, so a published row group is a memory copy) where it is writable."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()


# ------------------------------------------------------------------------ decoded row groups in shared memory
class StoreClosed(Exception):
    """The training process removed the store: its iteration is over, the worker stops."""


class RowGroupStore:
    """Decoded row groups of one iteration, one file each: `<q>.rg` (a header, then the arrays), or
    `<q>.err` holding the DataError that decoding it raised. Files appear whole (written, then renamed)."""

    def __init__(self, path: str) -> None:
        self.path = path

    @classmethod
    def create(cls) -> RowGroupStore:
        _remove_stale(shared_root())
        return cls(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=shared_root()))

    def _file(self, q: int, suffix: str = "rg") -> str:
        return os.path.join(self.path, f"{q}.{suffix}")

    def put(self, q: int, chunk: Chunk) -> None:
        arrays = [chunk.dense, chunk.labels, chunk.user_id, chunk.weight]
        blocks = []
        for b in chunk.blocks:
            blocks.append((b.keys, b.offsets is not None, len(b.values)))
            arrays += ([b.offsets] if b.offsets is not None else []) + b.values
        specs, offset = [], 0
        for a in arrays:
            specs.append((a.dtype.str, a.shape, offset))
            offset += -(-a.nbytes // _ALIGN) * _ALIGN
        header = pickle.dumps((blocks, specs))
        start = -(-(8 + len(header)) // _ALIGN) * _ALIGN
        tmp = self._file(q, "tmp")
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            for a, (_, _, at) in zip(arrays, specs):
                f.seek(start + at)
                f.write(np.ascontiguousarray(a).data)
        os.rename(tmp, self._file(q))

    def put_error(self, q: int, message: str) -> None:
        tmp = self._file(q, "tmp")
        with open(tmp, "w") as f:
            f.write(message)
        os.rename(tmp, self._file(q, "err"))

    def get(self, q: int, a: int, b: int) -> Chunk:
        """Rows [a, b) of row group q, waiting until its owner has published it. Read with pread, not
        mapped: only the rows asked for are read, into the allocator's (reused) memory, where a mapping
        page-faults in every page it touches (several times the copy, reports/throughput.md)."""
        path, error = self._file(q), self._file(q, "err")

        def published() -> bool:
            if os.path.exists(error):
                with open(error) as f:
                    raise DataError(f.read())
            if not os.path.isdir(self.path):  # the iteration ended: the owner will never publish it
                raise StoreClosed(self.path)
            return os.path.exists(path)

        _poll(published)
        fd = os.open(path, os.O_RDONLY)
        try:
            (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            blocks, specs = pickle.loads(os.pread(fd, length, 8))
            start = -(-(8 + length) // _ALIGN) * _ALIGN
            specs = iter(specs)

            def read(lo: int, hi: int) -> np.ndarray:
                """Elements [lo, hi) of the next array along its first axis."""
                dtype, shape, at = next(specs)
                row = np.dtype(dtype).itemsize * int(np.prod(shape[1:]))
                out = np.empty((hi - lo, *shape[1:]), dtype=dtype)
                os.preadv(fd, [memoryview(out).cast("B")], start + at + lo * row)
                return out

            dense, labels, user_id, weight = (read(a, b) for _ in range(4))
            out = []
            for keys, jagged, k in blocks:
                if not jagged:
                    out.append(Block(keys, None, [read(a, b) for _ in range(k)]))
                    continue
                offsets = read(a, b + 1)
                lo, hi = int(offsets[0]), int(offsets[-1])
                out.append(Block(keys, offsets - lo, [read(lo, hi) for _ in range(k)]))
            return Chunk(dense, labels, user_id, weight, out)
        finally:
            os.close(fd)

    def drop(self, q: int) -> None:
        for suffix in ("rg", "err"):
            try:
                os.unlink(self._file(q, suffix))
            except FileNotFoundError:
                pass

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _poll(ready: Callable[[], Any]) -> Any:
    """`ready()`'s first value that is not None or False, calling it with a growing sleep (0.1 to 1 ms)
    between calls: what another process publishes through shared memory comes without a notification."""
    delay = 1e-4
    while (value := ready()) is None or value is False:
        time.sleep(delay)
        delay = min(delay * 2, 1e-3)
    return value


def _remove_stale(root: str) -> None:
    """Remove the stores of processes that no longer run (killed before their cleanup)."""
    for name in os.listdir(root):
        if not name.startswith(_PREFIX):
            continue
        pid = name[len(_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


# ------------------------------------------------------------------------ one window's batches, packed
@dataclass
class _BatchLayout:
    batch_size: int
    sparse: list[int]  # length per key of the pooled KJT
    sequence: list[int] | None  # and of the unpooled one


@dataclass
class WindowItem:
    """A window's batches in three flat tensors (see `pack`)."""

    window: int
    slot: int  # its SlotPool slot: the tensors are views of that slot's buffers until copied out
    ints: torch.Tensor  # per batch: user_id, sparse values, sparse lengths[, sequence values, lengths]
    floats: torch.Tensor  # per batch: dense, labels, weight
    flags: torch.Tensor  # per batch: mask
    dense_dim: int
    num_tasks: int
    sparse_keys: list[str]
    sequence_keys: list[str] | None
    layout: list[_BatchLayout]
    # the item as received, its tensors mapping the slot, when this one is a (pinned) copy of it
    shared: WindowItem | None = None

    def copy(self) -> WindowItem:
        return replace(self, ints=self.ints.clone(), floats=self.floats.clone(), flags=self.flags.clone(),
                       shared=self)  # fmt: skip

    def pin_memory(self) -> WindowItem:  # called by the DataLoader's pin-memory thread: a pinned copy
        return replace(self, ints=self.ints.pin_memory(), floats=self.floats.pin_memory(),
                       flags=self.flags.pin_memory(), shared=self)  # fmt: skip


@dataclass
class _Failure:
    message: str


class SlotPool:
    """A worker's reusable shared-memory buffers: `count` slots of three flat tensors (int64, float32, bool),
    grown when a window needs more. Fresh shared memory costs a page fault per 4 KiB page at its first
    write, several times the copy into it (reports/throughput.md), so the buffers are reused: the training
    process copies a window out when it arrives (the pinned copy on a GPU job) and clears its slot's flag in
    `busy`, one shared int32 tensor for all workers, inherited at fork."""

    def __init__(self, busy: torch.Tensor, first: int, count: int) -> None:
        self.busy, self.slots = busy, range(first, first + count)
        self.buffers: dict[int, list[torch.Tensor]] = {}

    def acquire(self, sizes: list[int]) -> tuple[int, list[torch.Tensor]]:
        """A free slot, waiting for the training process to free one, with buffers of exactly `sizes`."""
        slot = _poll(lambda: next((s for s in self.slots if int(self.busy[s]) == 0), None))
        have = self.buffers.get(slot)
        if have is None or any(len(t) < n for t, n in zip(have, sizes)):
            self.buffers[slot] = [_shared_empty(n + n // 4, d) for n, d in zip(sizes, _DTYPES)]
        self.busy[slot] = 1
        return slot, [t[:n] for t, n in zip(self.buffers[slot], sizes)]


_DTYPES = (torch.int64, torch.float32, torch.bool)


def _shared_empty(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat tensor in fresh shared memory, as DataLoader's own collate allocates one (`share_memory_()` on
    a new tensor would first fault in private pages, then copy them over)."""
    storage = torch.UntypedStorage._new_shared(n * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, (n,), (1,))


class _Carver:
    """An `Alloc` (data/decode.py) that hands out consecutive pieces of one flat array per dtype."""

    def __init__(self, flats: dict[Any, np.ndarray]) -> None:
        self.flats, self.at = flats, dict.fromkeys(flats, 0)

    def __call__(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        n, at = int(np.prod(shape)), self.at[dtype]
        self.at[dtype] = at + n
        return self.flats[dtype][at : at + n].reshape(shape)


def pack(
    pool: SlotPool,
    window: int,
    parts: list[tuple[Chunk, np.ndarray, np.ndarray]],
    keys: Sequence[str],
    split: tuple[Sequence[str], Sequence[str]] | None,
) -> WindowItem:
    """The batches (chunk, row indices, mask) of a window, built straight into three shared-memory tensors
    (sent as file descriptors: the training process maps them, no copy): their sizes first, then each
    batch's arrays carved out of them in `Chunk.batch_arrays`' allocation order."""
    block_lengths: dict[int, np.ndarray] = {}
    sizes = np.array([chunk.batch_sizes(keys, split, idx, block_lengths) for chunk, idx, _ in parts])
    slot, tensors = pool.acquire([int(n) for n in sizes.sum(0)])
    carve = _Carver({np.dtype(np.int64): tensors[0].numpy(), np.dtype(np.float32): tensors[1].numpy(),
                     np.dtype(np.bool_): tensors[2].numpy()})  # fmt: skip
    batches = [chunk.batch_arrays(keys, mask, split, idx, carve) for chunk, idx, mask in parts]
    first = batches[0]
    return WindowItem(
        window=window,
        slot=slot,
        ints=tensors[0],
        floats=tensors[1],
        flags=tensors[2],
        dense_dim=first.dense.shape[1],
        num_tasks=first.labels.shape[1],
        sparse_keys=first.sparse.keys,
        sequence_keys=None if first.sequence is None else first.sequence.keys,
        layout=[
            _BatchLayout(
                len(b.user_id),
                b.sparse.length_per_key,
                None if b.sequence is None else b.sequence.length_per_key,
            )
            for b in batches
        ],
    )


def unpack(item: WindowItem) -> Iterator[RecBatch]:
    """The RecBatches of a window item: views of its tensors, no copy."""
    from data.batch import RecBatch

    i = f = m = 0

    def take(flat: torch.Tensor, at: int, n: int) -> torch.Tensor:
        return flat[at : at + n]

    for lay in item.layout:
        B = lay.batch_size
        user_id = take(item.ints, i, B)
        i += B
        kjts = []
        for keys, lpk in ((item.sparse_keys, lay.sparse), (item.sequence_keys, lay.sequence)):
            if keys is None or lpk is None:
                kjts.append(None)
                continue
            values = take(item.ints, i, sum(lpk))
            i += sum(lpk)
            lengths = take(item.ints, i, len(keys) * B)
            i += len(keys) * B
            kjts.append(kjt_of(keys, values, lengths, lpk))
        dense = take(item.floats, f, B * item.dense_dim).view(B, item.dense_dim)
        f += B * item.dense_dim
        labels = take(item.floats, f, B * item.num_tasks).view(B, item.num_tasks)
        f += B * item.num_tasks
        weight = take(item.floats, f, B)
        f += B
        mask = take(item.flags, m, B)
        m += B
        yield RecBatch(dense=dense, sparse=kjts[0], labels=labels, user_id=user_id, mask=mask, weight=weight,
                       sequence=kjts[1])  # fmt: skip


# ------------------------------------------------------------------------ the worker side
class _WindowStream(IterableDataset):
    """What each DataLoader worker iterates: its windows of one epoch, from batch `start_batch` on."""

    def __init__(
        self, reader: ParquetReader, epoch: int, start_batch: int, store: str, busy: torch.Tensor
    ) -> None:
        self.reader, self.epoch, self.start_batch, self.store = reader, epoch, start_batch, store
        self.busy = busy  # SlotPool flags, SLOTS per worker

    def __iter__(self) -> Iterator[WindowItem | _Failure]:
        info = get_worker_info()
        assert info is not None, "iterated by DataLoader workers only"
        store, pool = RowGroupStore(self.store), SlotPool(self.busy, info.id * SLOTS, SLOTS)
        try:
            yield from _worker_windows(
                self.reader, self.epoch, self.start_batch, store, pool, info.id, info.num_workers
            )
        except DataError as e:  # raised by the training process, as the reader's one line
            yield _Failure(str(e))
        except (StoreClosed, FileNotFoundError):  # the store went away under a put or a wait
            if os.path.isdir(self.store):
                raise


def _worker_windows(
    reader: ParquetReader,
    epoch: int,
    start_batch: int,
    store: RowGroupStore,
    pool: SlotPool,
    worker: int,
    workers: int,
) -> Iterator[WindowItem]:
    W = reader.window
    windows = reader._windows(start_batch)
    plan = reader._stream_plan(epoch, windows.start * W)  # [(row group, stream lo, stream hi)]
    ends = [hi for _, _, hi in plan]
    keys = reader.schema.sparse_keys
    own: dict[int, Chunk] = {}  # this worker's decoded row groups that its later windows may need
    handles: dict = {}
    next_own = worker  # the next of this worker's row groups (q = worker mod workers) to decode

    def decode_own(until: int) -> None:
        nonlocal next_own
        while next_own <= until and next_own < len(plan):
            q, next_own = next_own, next_own + workers
            try:
                chunk = reader._read(plan[q][0], handles)
            except DataError as e:
                store.put_error(q, str(e))
                raise
            if workers > 1:
                store.put(q, chunk)
            own[q] = chunk

    def last_row_group(w: int) -> int:
        """The last row group window w needs."""
        return bisect.bisect_left(ends, w * W + reader._window_size(w))

    mine = [w for i, w in enumerate(windows) if i % workers == worker]
    for w in mine:
        lo, hi = w * W, w * W + reader._window_size(w)
        first, last = bisect.bisect_right(ends, lo), last_row_group(w)  # row groups [first, last]
        # Also the own row groups of the windows the other workers build meanwhile (up to w + workers - 1):
        # decoded only when this worker's own windows reach them, they would make the others wait.
        decode_own(last_row_group(min(w + workers - 1, windows[-1])))
        pieces = []
        for q in range(first, last + 1):
            start = plan[q][1]
            rows = max(lo - start, 0), min(hi, plan[q][2]) - start
            pieces.append(own[q].slice(*rows) if q in own else store.get(q, *rows))
        for q in [q for q in own if ends[q] <= hi]:  # later windows start at hi or after
            del own[q]
        window = Chunk.concat(pieces)
        parts = [(window, idx, mask) for idx, mask in reader._window_plan(window.n, epoch, w, start_batch)]
        if w == windows[-1]:
            parts += reader._pad_plan(max(start_batch, reader._batches_in_windows()))
        yield pack(pool, w, parts, keys, reader.split_keys)
    if not windows and worker == 0:  # pad policy: this rank has no rows left, only padding batches
        pad = list(reader._pad_plan(max(start_batch, reader._batches_in_windows())))
        if pad:
            yield pack(pool, windows.start, pad, keys, reader.split_keys)
    decode_own(len(plan))  # the windows of other workers may still need them


def _init_worker(_: int) -> None:
    import pyarrow as pa

    pa.set_cpu_count(1)  # one decoding core per worker (the DataLoader sets torch's threads to 1)
    pa.set_io_thread_count(1)


# ------------------------------------------------------------------------ the training process side
def worker_batches(reader: ParquetReader, epoch: int, start_batch: int) -> Iterator[RecBatch]:
    """The reader's batches of `epoch` from `start_batch` on, decoded and assembled by its workers."""
    store = RowGroupStore.create()
    W = reader.window
    plan_ends = [hi for _, _, hi in reader._stream_plan(epoch, reader._windows(start_batch).start * W)]
    busy = torch.zeros(reader.workers * SLOTS, dtype=torch.int32).share_memory_()
    loader = DataLoader(
        _WindowStream(reader, epoch, start_batch, store.path, busy),
        batch_size=None,
        num_workers=reader.workers,
        pin_memory=reader.pin_memory,
        worker_init_fn=_init_worker,
        # fork: the workers inherit the reader (no pickling) and start in milliseconds
        multiprocessing_context="fork",
        prefetch_factor=SLOTS - 1,  # windows in flight per worker; one more slot is being filled
    )
    items = iter(loader)
    released = 0
    # Each slot's received tensors, kept alive: torch maps a received shared storage once and hands out the
    # same mapping while it lives (its shared_cache), so a reused slot costs no new mapping and no page
    # faults here.
    mapped: dict[int, WindowItem] = {}
    try:
        for item in items:
            if isinstance(item, _Failure):
                raise DataError(item.message)
            if not reader.pin_memory:  # pinning copied it already
                item = item.copy()
            mapped[item.slot] = item.shared  # type: ignore[assignment]
            item = replace(item, shared=None)
            busy[item.slot] = 0  # the worker may refill it
            yield from unpack(item)
            done = (item.window + 1) * W  # stream rows no later window holds
            while released < len(plan_ends) and plan_ends[released] <= done:
                store.drop(released)
                released += 1
    finally:
        store.close()  # first: a worker waiting on a row group then stops at once instead of at a timeout
        del items  # shuts the workers down (DataLoader's iterator does so when it is dropped)
