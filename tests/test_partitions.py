"""Splits as Hive partition selections (data/partitions.py), paths and URIs (data/storage.py), and the
generator's daily mode with drift."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.build.generate import GenParams, generate
from data.build.world import World
from data.decode import DataError
from data.partitions import split_files, split_label
from data.storage import join, list_files


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """dt=2026-01-0{1..4}/hour={9,10}/part-0.parquet, a legacy train/ dir and hidden debris."""
    for d in range(1, 5):
        for h in (9, 10):
            path = tmp_path / f"dt=2026-01-0{d}" / f"hour={h}" / "part-0.parquet"
            path.parent.mkdir(parents=True)
            pq.write_table(pa.table({"x": [d, h]}), path)
    (tmp_path / "train").mkdir()
    pq.write_table(pa.table({"x": [0]}), tmp_path / "train" / "part-0.parquet")
    (tmp_path / ".dt=2026-01-05.tmp-1").mkdir()  # a writer's temp dir: never data
    pq.write_table(pa.table({"x": [0]}), tmp_path / ".dt=2026-01-05.tmp-1" / "part-0.parquet")
    (tmp_path / "dt=2026-01-01" / "_SUCCESS").write_text("")
    return tmp_path


def rel(root: Path, files: list[str]) -> list[str]:
    return [str(Path(f).relative_to(root)) for f in files]


def test_a_selection_picks_partitions_by_range_list_and_any_key_level(tree: Path):
    assert rel(tree, split_files(str(tree), "dt>=2026-01-02,dt<=2026-01-03")) == [
        "dt=2026-01-02/hour=10/part-0.parquet",
        "dt=2026-01-02/hour=9/part-0.parquet",
        "dt=2026-01-03/hour=10/part-0.parquet",
        "dt=2026-01-03/hour=9/part-0.parquet",
    ]
    assert rel(tree, split_files(str(tree), "dt=2026-01-01|2026-01-04, hour>9")) == [
        "dt=2026-01-01/hour=10/part-0.parquet",  # numbers compare as numbers: 10 > 9
        "dt=2026-01-04/hour=10/part-0.parquet",
    ]
    assert len(split_files(str(tree), "dt!=2026-01-01")) == 6
    assert rel(tree, split_files(str(tree), "train")) == ["train/part-0.parquet"]  # the directory layout


def test_a_selection_that_matches_nothing_or_names_no_key_is_one_line_naming_what_is_there(tree: Path):
    with pytest.raises(
        DataError, match=r"selects no partition under .* \(dt: 2026-01-01 \.\. 2026-01-04 \(4\)\)"
    ):
        split_files(str(tree), "dt>=2027-01-01")
    with pytest.raises(DataError, match=r"no partition key 'date' under .* \(keys: dt, hour\)"):
        split_files(str(tree), "date=2026-01-01")
    with pytest.raises(ValueError, match=r"'dt>>3' is not a condition like dt>=2026-01-01"):
        split_files(str(tree), "dt>>3")
    with pytest.raises(DataError, match="split directory .*/valid does not exist"):
        split_files(str(tree), "valid")


def test_split_labels_are_file_name_safe():
    assert split_label("dt>=2026-01-01,dt<=2026-01-07") == "dt_ge_2026-01-01_dt_le_2026-01-07"
    assert split_label("test") == "test"


def test_paths_and_uris_join_and_list_alike(tree: Path):
    assert join("s3://bucket/data?endpoint_override=x", "dt=1", "p.parquet") == (
        "s3://bucket/data/dt=1/p.parquet?endpoint_override=x"
    )
    assert list_files(f"file://{tree}", ".parquet") == list_files(str(tree), ".parquet")
    assert len(list_files(str(tree), ".parquet")) == 9  # hidden temp dir and marker left out


def test_the_daily_mode_writes_one_partition_a_day_deterministically_with_drift(tmp_path, synthetic_schema):
    params = GenParams(rows_train=3000, files_train=2, row_groups_per_file=2, days=4, seed=5)
    a = generate(synthetic_schema, params, tmp_path / "a")
    b = generate(synthetic_schema, params, tmp_path / "b")
    days = [f"dt=2026-01-0{d}" for d in range(1, 5)]
    a.pop("generation_seconds"), b.pop("generation_seconds")
    assert list(a["splits"]) == days and a == b
    for d in days:  # byte-identical files for the same seed
        assert (tmp_path / "a" / d / "part-00000.parquet").read_bytes() == (
            tmp_path / "b" / d / "part-00000.parquet"
        ).read_bytes()
    offer = [a["splits"][d]["items_on_offer"] for d in days]
    assert offer == sorted(offer) and offer[-1] > offer[0]  # items launch day by day
    world = World(params)
    launched_later = set(np.flatnonzero(world.item_launch > 0).tolist())
    seen = [set(pq.read_table(tmp_path / "a" / d, columns=["item_id"]).column(0).to_pylist()) for d in days]
    assert not seen[0] & launched_later  # day 1 shows no item before its launch
    assert seen[-1] & launched_later  # the last day shows new ones
    taste = world.seg_cat.copy()
    world.advance(3)
    assert np.corrcoef(taste.ravel(), world.seg_cat.ravel())[0, 1] < 0.9  # tastes drifted
    for d in days:
        assert 0.6 < a["splits"][d]["oracle"]["finish"]["auc"] < 0.95


def test_a_partitioned_split_reads_shards_shuffles_and_resumes_as_the_same_files_in_one_directory(
    small_dataset: Path, synthetic_schema, tmp_path: Path
):
    from data.reader import ParquetReader
    from tests.test_reader import _same

    files = sorted((small_dataset / "train").glob("*.parquet"))
    for i, f in enumerate(files):  # the same files, in the same order, over two day partitions
        day = tmp_path / f"dt=2026-01-0{1 + i * 2 // len(files)}"
        day.mkdir(exist_ok=True)
        (day / f.name).write_bytes(f.read_bytes())

    def batches(source, rank: int, start: int = 0) -> list:
        r = ParquetReader(source, synthetic_schema, batch_size=200, rank=rank, world_size=2, seed=3)
        r.set_epoch(1)
        r.load_state_dict({"epoch": 1, "batches_yielded": start})
        return list(r)

    selection = split_files(str(tmp_path), "dt>=2026-01-01,dt<=2026-01-02")
    assert len(selection) == len(files)
    for rank in (0, 1):
        directory, partitioned = batches(small_dataset / "train", rank), batches(selection, rank)
        assert len(directory) == len(partitioned) > 5
        assert all(_same(a, b) for a, b in zip(directory, partitioned))
        resumed = batches(selection, rank, start=5)  # resume mid-epoch on the partitioned split
        assert all(_same(a, b) for a, b in zip(resumed, directory[5:])) and len(resumed) == len(directory) - 5
