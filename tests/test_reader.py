from __future__ import annotations

import dataclasses
import multiprocessing
import os
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.batch import RecBatch
from data.hashing import hash_ids
from data.reader import DataError, ParquetReader
from data.schema import Schema
from data.workers import shared_root
from models.sparse_arch import input_keys


@pytest.fixture(scope="module")
def row_id_schema(synthetic_schema: Schema) -> Schema:
    """The synthetic schema with user_id read from the hidden `_row_id`: batches then name their rows."""
    return dataclasses.replace(synthetic_schema, user_id="_row_id")


def _train(root: Path) -> Path:
    return root / "train"


def _all(reader: ParquetReader) -> list[RecBatch]:
    return list(reader)


def _rows_in_files(root: Path, columns: list[str]) -> pa.Table:
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in sorted(root.glob("*.parquet"))])


def _same(a: RecBatch, b: RecBatch) -> bool:
    return (
        torch.equal(a.dense, b.dense)
        and torch.equal(a.labels, b.labels)
        and torch.equal(a.user_id, b.user_id)
        and torch.equal(a.mask, b.mask)
        and a.sparse.keys() == b.sparse.keys()
        and torch.equal(a.sparse.values(), b.sparse.values())
        and torch.equal(a.sparse.lengths(), b.sparse.lengths())
    )


# ------------------------------------------------------------------ sharding and policies
@pytest.mark.parametrize("shuffle", [False, True])
def test_pad_policy_covers_every_row_exactly_once_across_two_ranks(small_dataset, row_id_schema, shuffle):
    split = small_dataset / "valid"
    n_rows = pq.ParquetDataset(split).read(columns=["_row_id"]).num_rows
    readers = [
        ParquetReader(
            split,
            row_id_schema,
            batch_size=128,
            rank=r,
            world_size=2,
            shuffle=shuffle,
            shuffle_buffer=512,
            policy="pad",
        )
        for r in range(2)
    ]
    assert len(readers[0]) == len(readers[1]) == -(-max(r.num_rows for r in readers) // 128)
    seen = []
    for reader in readers:
        batches = _all(reader)
        assert len(batches) == len(reader)
        assert all(b.batch_size == 128 for b in batches)
        rank_ids = torch.cat([b.user_id[b.mask] for b in batches])
        seen.append(set(rank_ids.tolist()))
        assert len(rank_ids) == reader.num_rows == len(seen[-1])  # no real row twice on a rank
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(n_rows))


def test_drop_last_gives_every_rank_the_same_number_of_full_batches(small_dataset, synthetic_schema):
    readers = [
        ParquetReader(_train(small_dataset), synthetic_schema, batch_size=256, rank=r, world_size=3)
        for r in range(3)
    ]
    rows = readers[0].rows_per_rank
    assert len(set(rows)) > 1  # the shards really are unequal, so the policy matters
    counts = [len(_all(r)) for r in readers]
    assert counts == [min(rows) // 256] * 3 == [len(r) for r in readers]
    assert all(b.mask.all() for b in _all(readers[0]))


def test_rank_without_row_groups_still_runs_the_common_step_count(small_dataset, row_id_schema):
    files = sorted((small_dataset / "test").glob("*.parquet"))[:1]  # 4 row groups, 6 ranks
    readers = [
        ParquetReader(files, row_id_schema, batch_size=64, rank=r, world_size=6, shuffle=False, policy="pad")
        for r in range(6)
    ]
    counts = {len(_all(r)) for r in readers}
    assert counts == {len(readers[0])}
    empty = _all(readers[5])
    assert not any(b.mask.any() for b in empty)


# ------------------------------------------------------------------ conversion
def test_batches_match_parquet_rows_including_multi_hot_and_sequence_truncation(small_dataset, row_id_schema):
    max_len = 8
    schema = dataclasses.replace(
        row_id_schema, sequence=dataclasses.replace(row_id_schema.sequence, max_len=max_len)
    )
    split = small_dataset / "valid"
    cols = [
        "_row_id",
        "finish",
        "skip",
        "user_interests",
        "item_id",
        "seq_item_id",
        "seq_action",
        "item_duration",
        "user_hist_finish",
    ]
    truth = _rows_in_files(split, cols).to_pydict()
    by_id = {rid: i for i, rid in enumerate(truth["_row_id"])}
    reader = ParquetReader(split, schema, batch_size=100, shuffle=True, shuffle_buffer=300, policy="pad")
    names = schema.dense_names
    truncated = 0
    for batch in reader:
        per_key = {k: jt.to_dense() for k, jt in batch.sparse.to_dict().items()}
        assert batch.dense.shape == (100, schema.dense_dim) and batch.dense.dtype == torch.float32
        for j in torch.nonzero(batch.mask).flatten().tolist():
            i = by_id[int(batch.user_id[j])]
            assert batch.labels[j].tolist() == [truth["finish"][i], truth["skip"][i]]
            assert per_key["user_interests"][j].tolist() == truth["user_interests"][i]
            assert per_key["item_id"][j].tolist() == [truth["item_id"][i]]
            seq = truth["seq_item_id"][i]
            assert per_key["seq_item_id"][j].tolist() == seq[-max_len:]  # most recent last
            assert per_key["seq_action"][j].tolist() == truth["seq_action"][i][-max_len:]
            truncated += len(seq) > max_len
            dur = batch.dense[j, names.index("item_duration")].item()
            assert dur == pytest.approx(truth["item_duration"][i])
            hist = truth["user_hist_finish"][i]
            assert batch.dense[j, names.index("user_hist_finish__missing")].item() == (hist is None)
            assert batch.dense[j, names.index("user_hist_finish")].item() == pytest.approx(hist or 0.0)
    assert truncated > 100  # the truncation path was exercised


def test_hashed_feature_is_in_range_and_deterministic(small_dataset, synthetic_schema):
    feat = synthetic_schema.feature("user_id_emb")
    assert feat.hash
    batch = next(iter(ParquetReader(_train(small_dataset), synthetic_schema, batch_size=512)))
    ids = batch.sparse["user_id_emb"].values()
    assert ids.min() >= 0 and ids.max() < feat.num_embeddings
    assert torch.equal(ids, torch.from_numpy(hash_ids(batch.user_id.numpy(), feat.num_embeddings)))
    raw = np.array([0, 1, -1, 2**62, -(2**63)], dtype=np.int64)
    assert np.array_equal(hash_ids(raw, 1000), hash_ids(raw.copy(), 1000))
    assert hash_ids(raw, 1000).min() >= 0 and hash_ids(raw, 1000).max() < 1000
    # a fixed value pins the hash itself (splitmix64 of 0 is 0xE220A8397B1DCDAF)
    assert hash_ids(np.array([0]), 2**62)[0] == 0xE220A8397B1DCDAF % 2**62


# ------------------------------------------------------------------ order, epochs, resume
def test_epoch_changes_the_order_and_the_same_epoch_repeats_it(small_dataset, row_id_schema):
    def order(epoch: int) -> list[int]:
        r = ParquetReader(_train(small_dataset), row_id_schema, batch_size=256, shuffle_buffer=2048, seed=3)
        r.set_epoch(epoch)
        return torch.cat([b.user_id for b in r]).tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) != order(0)


def _rank1_epoch2_reader(dataset: Path, schema: Schema, **options) -> ParquetReader:
    """Rank 1 of 2, epoch 2 of a seeded reader with windows of 5 batches of 200 rows, each window across
    row groups of ~625 rows; `options` add or replace ParquetReader arguments."""
    r = ParquetReader(
        _train(dataset),
        schema,
        **{"batch_size": 200, "rank": 1, "world_size": 2, "shuffle_buffer": 1000, "seed": 7, **options},
    )
    r.set_epoch(2)
    return r


@pytest.mark.parametrize(
    ("policy", "stop_at", "negative_rate"),
    [("drop_last", 1, 1.0), ("drop_last", 13, 1.0), ("pad", 9, 1.0), ("pad", 0, 1.0), ("drop_last", 5, 0.3)],
)
def test_resume_from_state_dict_reproduces_the_remaining_batches(
    small_dataset, row_id_schema, policy, stop_at, negative_rate
):
    def reader() -> ParquetReader:
        return _rank1_epoch2_reader(small_dataset, row_id_schema, policy=policy, negative_rate=negative_rate)

    full = _all(reader())
    first = reader()
    it = iter(first)
    for _ in range(stop_at):
        next(it)
    state = first.state_dict()
    assert state == {"epoch": 2, "batches_yielded": stop_at}
    it.close()

    resumed = reader()
    resumed.load_state_dict(state)
    rest = _all(resumed)
    assert len(rest) == len(full) - stop_at
    assert all(_same(a, b) for a, b in zip(rest, full[stop_at:]))
    assert resumed.state_dict()["batches_yielded"] == len(full)


def _kept_rows(split: Path, schema: Schema, world_size: int, seed: int, rate: float) -> dict[int, float]:
    """{row id: its largest label} of every real row the ranks' down-sampled pad readers yield."""
    kept: dict[int, float] = {}
    for rank in range(world_size):
        reader = ParquetReader(
            split,
            schema,
            256,
            rank,
            world_size,
            shuffle=rank == 1,
            seed=seed,
            policy="pad",
            negative_rate=rate,
        )
        assert reader.num_rows == sum(len(b.user_id[b.mask]) for b in reader)
        for b in reader:
            ids = b.user_id[b.mask].tolist()
            assert not set(ids) & set(kept)  # each kept row once, on one rank
            kept.update(zip(ids, b.labels[b.mask].amax(1).tolist()))
    return kept


def test_negative_down_sampling_keeps_every_positive_and_a_seeded_share_of_negatives_on_any_ranks(
    small_dataset, row_id_schema
):
    split = _train(small_dataset)
    table = _rows_in_files(split, ["_row_id", *row_id_schema.labels])
    labels = np.stack([table[t].to_numpy() for t in row_id_schema.labels], 1)
    positive = set(table["_row_id"].to_numpy()[labels.max(1) > 0].tolist())
    negatives = table.num_rows - len(positive)
    kept = _kept_rows(split, row_id_schema, 1, seed=3, rate=0.25)
    assert positive <= set(kept)  # every positive row stays
    kept_negatives = len(kept) - len(positive)
    assert abs(kept_negatives / negatives - 0.25) < 0.03, (kept_negatives, negatives)
    # the same rows on 2 ranks (one shuffling) as on one: the draw belongs to the row, not to the reader
    assert _kept_rows(split, row_id_schema, 2, seed=3, rate=0.25) == kept
    assert set(_kept_rows(split, row_id_schema, 1, seed=4, rate=0.25)) != set(kept)  # seeded
    with pytest.raises(ValueError, match=r"negative_rate must be in \(0, 1\], got 0"):
        ParquetReader(split, row_id_schema, 256, negative_rate=0)


def test_abandoned_iterator_stops_its_prefetch_thread(small_dataset, synthetic_schema):
    reader = ParquetReader(_train(small_dataset), synthetic_schema, batch_size=64, prefetch=2)
    it = iter(reader)
    next(it)
    it.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("ParquetReader")]


# ------------------------------------------------------------------ worker processes (data/workers.py)
def _identical(a: RecBatch, b: RecBatch) -> bool:
    """Every tensor of the batches equal, KJTs with their per-key lengths."""
    kjts = [(a.sparse, b.sparse)] + ([(a.sequence, b.sequence)] if a.sequence is not None else [])
    return (
        all(
            torch.equal(getattr(a, f), getattr(b, f))
            for f in ("dense", "labels", "user_id", "mask", "weight")
        )
        and (a.sequence is None) == (b.sequence is None)
        and all(
            x.keys() == y.keys()
            and torch.equal(x.values(), y.values())
            and torch.equal(x.lengths(), y.lengths())
            and x.length_per_key() == y.length_per_key()
            for x, y in kjts
        )
    )


def _stores() -> list[str]:
    """This process's loader stores in shared memory (data/workers.py)."""
    return [p.name for p in Path(shared_root()).glob(f"rankmixer-loader-{os.getpid()}-*")]


@pytest.mark.parametrize(
    ("workers", "policy", "negative_rate", "sequence"),
    [(1, "drop_last", 1.0, "mean_pool"), (3, "pad", 1.0, "longer"), (2, "drop_last", 0.3, "mean_pool")],
)
def test_worker_processes_yield_the_threads_batches_and_resume_inside_a_window(
    small_dataset, row_id_schema, workers, policy, negative_rate, sequence
):
    def reader(n: int) -> ParquetReader:
        return _rank1_epoch2_reader(
            small_dataset,
            row_id_schema,
            policy=policy,
            negative_rate=negative_rate,
            split_keys=input_keys(row_id_schema, sequence),
            workers=n,
        )

    full = _all(reader(0))
    streamed = _all(reader(workers))
    assert len(streamed) == len(full) and all(_identical(a, b) for a, b in zip(streamed, full))
    resumed = reader(workers)
    resumed.load_state_dict({"epoch": 2, "batches_yielded": 7})  # inside the second window
    rest = _all(resumed)
    assert len(rest) == len(full) - 7 and all(_identical(a, b) for a, b in zip(rest, full[7:]))
    assert resumed.state_dict()["batches_yielded"] == len(full)
    assert not _stores()


def test_abandoned_worker_iterator_stops_its_processes_and_removes_its_shared_memory(
    small_dataset, synthetic_schema
):
    reader = ParquetReader(
        _train(small_dataset), synthetic_schema, batch_size=64, shuffle_buffer=640, workers=2
    )
    it = iter(reader)
    next(it)
    assert len(_stores()) == 1 and len(multiprocessing.active_children()) == 2
    it.close()
    assert not _stores() and not multiprocessing.active_children()


# ------------------------------------------------------------------ bad input
MINI = Schema.from_dict(
    {
        "name": "mini",
        "labels": ["y"],
        "user_id": "uid",
        "groups": ["g", "s"],
        "dense": [{"name": "d", "group": "g"}],
        "sparse": [
            {"name": "a", "num_embeddings": 10, "embedding_dim": 4, "group": "g"},
            {"name": "m", "num_embeddings": 10, "embedding_dim": 4, "group": "g", "multi_hot": True},
        ],
        "sequence": {
            "group": "s",
            "max_len": 4,
            "features": [{"name": "q", "num_embeddings": 10, "embedding_dim": 4}],
        },
    }
)


def _mini_columns(**override) -> dict:
    cols = {
        "y": pa.array([0, 1, 1], pa.int8()),
        "uid": pa.array([5, 6, 7], pa.int64()),
        "d": pa.array([0.5, 1.5, 2.5], pa.float32()),
        "a": pa.array([1, 2, 3], pa.int64()),
        "m": pa.array([[1], [], [2, 3]], pa.list_(pa.int64())),
        "q": pa.array([[1, 2], [3], []], pa.list_(pa.int64())),
    }
    cols.update(override)
    return {k: v for k, v in cols.items() if v is not None}


def _write(tmp_path: Path, **override) -> Path:
    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table(_mini_columns(**override)), path)
    return path


def test_well_formed_mini_file_reads(tmp_path):
    (batch,) = ParquetReader(_write(tmp_path), MINI, batch_size=3, shuffle=False)
    assert batch.sparse["m"].lengths().tolist() == [1, 0, 2]
    assert batch.sparse["q"].values().tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"a": None}, ["column 'a' missing"]),
        (
            {"q": pa.array([[1.0], [2.0], []], pa.list_(pa.float64()))},
            ["column 'q'", "double", "expected list<int64>"],
        ),
        ({"a": pa.array([1.0, 2.0, 3.0])}, ["column 'a'", "type double", "expected an integer"]),
    ],
)
def test_schema_mismatch_fails_when_the_reader_is_built(tmp_path, override, expected):
    path = _write(tmp_path, **override)
    with pytest.raises(DataError) as err:
        ParquetReader(path, MINI, batch_size=2)
    for part in [str(path), *expected]:
        assert part in str(err.value)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"d": pa.array([0.5, float("nan"), 2.5], pa.float32())}, ["column 'd'", "nan", "row 1"]),
        ({"d": pa.array([0.5, None, 2.5], pa.float32())}, ["column 'd'", "null", "row 1"]),
        ({"y": pa.array([0, None, 1], pa.int8())}, ["column 'y'", "null value", "row 1"]),
        ({"y": pa.array([0, 2, 1], pa.int8())}, ["column 'y'", "0 or 1", "2.0", "row 1"]),
        ({"a": pa.array([1, -4, 3], pa.int64())}, ["column 'a'", "id -4 outside [0, 10)", "row 1"]),
        ({"m": pa.array([[1], [], [2, 30]], pa.list_(pa.int64()))}, ["column 'm'", "id 30 outside", "row 2"]),
        ({"q": pa.array([[1, 2], [99], []], pa.list_(pa.int64()))}, ["column 'q'", "id 99 outside", "row 1"]),
        ({"m": pa.array([[1], [None], [2]], pa.list_(pa.int64()))}, ["column 'm'", "null id", "row 1"]),
    ],
)
def test_bad_values_raise_data_error_naming_file_row_group_column_and_value(tmp_path, override, expected):
    path = _write(tmp_path, **override)
    reader = ParquetReader(path, MINI, batch_size=2, policy="pad", prefetch=2)
    with pytest.raises(DataError) as err:
        list(reader)
    for part in [str(path), "row group 0", *expected]:
        assert part in str(err.value)


WEIGHTED = dataclasses.replace(MINI, weight="w")


def test_a_bad_value_a_worker_meets_is_the_threads_one_line_data_error(tmp_path):
    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table(_mini_columns(a=pa.array([1, -4, 3], pa.int64()))), path, row_group_size=1)

    def error(workers: int) -> str:
        # windows of 2 rows: worker 0's first window needs row group 1, whose decoding fails in worker 1
        reader = ParquetReader(path, MINI, batch_size=1, shuffle_buffer=2, workers=workers)
        with pytest.raises(DataError) as err:
            list(reader)
        return str(err.value)

    message = error(2)
    assert message == error(0) and "row group 1" in message and "\n" not in message
    assert not _stores()


def test_sample_weight_column_reads_and_padding_rows_weigh_zero(tmp_path):
    path = _write(tmp_path, w=pa.array([0.5, 2, 0], pa.float64()))
    (batch,) = ParquetReader(path, WEIGHTED, batch_size=4, shuffle=False, policy="pad")
    assert batch.weight.tolist() == [0.5, 2.0, 0.0, 0.0] and batch.mask.tolist() == [True] * 3 + [False]
    (plain,) = ParquetReader(path, MINI, batch_size=4, shuffle=False, policy="pad")
    assert plain.weight.tolist() == [1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        (pa.array([1.0, -2.0, 1.0]), ["column 'w'", "finite number >= 0", "-2.0", "row 1"]),
        (pa.array([1.0, 1.0, float("inf")]), ["column 'w'", "inf", "row 2"]),
        (pa.array([1.0, None, 1.0]), ["column 'w'", "null value", "row 1"]),
    ],
)
def test_bad_sample_weights_raise_one_data_error_line(tmp_path, weights, expected):
    path = _write(tmp_path, w=weights)
    with pytest.raises(DataError) as err:
        list(ParquetReader(path, WEIGHTED, batch_size=2, policy="pad", prefetch=2))
    for part in [str(path), "row group 0", *expected]:
        assert part in str(err.value)
    with pytest.raises(DataError, match="column 'w' missing"):
        ParquetReader(_write(tmp_path), WEIGHTED, batch_size=2)


def test_empty_file_is_rejected(tmp_path):
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table(_mini_columns()).slice(0, 0), path)
    with pytest.raises(DataError, match=r"empty\.parquet: empty Parquet file \(0 rows"):
        ParquetReader(path, MINI, batch_size=2)


def test_corrupt_and_truncated_files_are_rejected(tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"this is not parquet at all" * 10)
    good = _write(tmp_path)
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (junk, truncated):
        with pytest.raises(DataError, match=rf"{path.name}: not a readable Parquet file"):
            ParquetReader(path, MINI, batch_size=2)


def test_fill_policy_fills_and_flags_missing_dense(tmp_path):
    schema = dataclasses.replace(
        MINI, dense=(dataclasses.replace(MINI.dense[0], on_missing="fill", fill_value=-1.0),)
    )
    path = _write(tmp_path, d=pa.array([0.5, None, float("nan")], pa.float32()))
    (batch,) = ParquetReader(path, schema, batch_size=3, shuffle=False)
    assert batch.dense.tolist() == [[0.5, 0.0], [-1.0, 1.0], [-1.0, 1.0]]
