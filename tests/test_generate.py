from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.build.generate import GenParams, generate, main, oracle_columns, oracle_metrics
from data.dataset_dir import atomic_dir, part_sizes
from data.schema import Schema

TINY = GenParams().scaled(3000)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def test_same_seed_gives_byte_identical_dataset_and_another_seed_differs(tmp_path, synthetic_schema):
    generate(synthetic_schema, TINY, tmp_path / "a")
    generate(synthetic_schema, TINY, tmp_path / "b")
    generate(synthetic_schema, GenParams(**{**TINY.__dict__, "seed": 1}), tmp_path / "c")
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert a == b and len(a) == 16  # 8 train + 4 valid + 4 test files
    assert (tmp_path / "a" / "dataset.json").read_bytes() == (tmp_path / "b" / "dataset.json").read_bytes()
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def test_oracle_figures_in_dataset_json_match_recomputation_from_files(small_dataset, synthetic_schema):
    info = json.loads((small_dataset / "dataset.json").read_text())
    for split in ("train", "valid", "test"):
        table = pa.concat_tables(
            [
                pq.read_table(f, columns=oracle_columns(synthetic_schema))
                for f in sorted((small_dataset / split).glob("part-*.parquet"))
            ]
        )
        assert info["splits"][split]["rows"] == table.num_rows
        assert info["splits"][split]["oracle"] == oracle_metrics(table, synthetic_schema)
    # the labels are noisy draws from the truth: informative, but far from separable
    for task, m in info["splits"]["train"]["oracle"].items():
        assert 0.7 < m["auc"] < 0.9, task


def test_dataset_has_the_promised_layout(small_dataset, synthetic_schema):
    info = json.loads((small_dataset / "dataset.json").read_text())
    for split, n_files in (("train", 8), ("valid", 4), ("test", 4)):
        files = sorted((small_dataset / split).glob("part-*.parquet"))
        assert len(files) == n_files == len(info["splits"][split]["files"])
        assert all(pq.ParquetFile(f).num_row_groups == 4 for f in files)
    schema = pq.read_schema(files[0])
    assert set(synthetic_schema.columns()) | {"_row_id", "_p_finish", "_p_skip"} == set(schema.names)
    seq = pq.read_table(files[0], columns=["seq_item_id", "seq_author_id", "seq_category"])
    lens = [pa.compute.list_value_length(seq.column(c)) for c in seq.column_names]
    assert lens[0].equals(lens[1]) and lens[0].equals(lens[2])  # aligned by position
    assert pa.compute.max(lens[0]).as_py() <= 256
    assert not list(small_dataset.parent.glob(".synthetic.*"))  # no temp dirs left behind


def test_refuses_to_overwrite_without_the_flag(tmp_path, synthetic_schema):
    root = tmp_path / "d"
    generate(synthetic_schema, GenParams().scaled(500), root)
    before = _files(root)
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate(synthetic_schema, GenParams().scaled(500), root)
    assert _files(root) == before
    main(["--root", str(root), "--rows", "500", "--seed", "4", "--overwrite"])
    assert json.loads((root / "dataset.json").read_text())["seed"] == 4


def test_schema_feature_unknown_to_the_generator_is_rejected(tmp_path, synthetic_schema: Schema):
    d = synthetic_schema.to_dict()
    d["sparse"][0]["name"], d["sparse"][0]["column"] = "mystery", "mystery"
    with pytest.raises(ValueError, match="'mystery' is not one the synthetic generator produces"):
        generate(Schema.from_dict(d), GenParams().scaled(500), tmp_path / "x")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_atomic_dataset_dir_replaces_whole_or_leaves_root_untouched(tmp_path):
    root = tmp_path / "ds"
    with atomic_dir(root) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(root) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temp / old dirs left behind
    assert [p.name for p in root.iterdir()] == ["a"]
    with atomic_dir(root) as tmp:
        (tmp / "c").write_text("3")
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]
    assert [p.name for p in root.iterdir()] == ["c"]  # replaced whole, not merged


def test_part_sizes_spread_rows_larger_first():
    assert part_sizes(10, 4) == [3, 3, 2, 2]
    assert part_sizes(2, 4) == [1, 1]
    assert part_sizes(0, 4) == [0]
