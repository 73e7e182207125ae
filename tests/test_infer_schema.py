"""`python -m data.infer_schema`: a schema inferred from Parquet metadata and a sample loads, trains, and
finds the roles a hand-written schema declares (labels, user id, aligned sequence, shared tables, leaks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from data.infer_schema import main
from data.schema import Schema

ROOT = Path(__file__).resolve().parents[1]


def inferred(root: Path, capsys: pytest.CaptureFixture, *args: str) -> tuple[str, dict]:
    assert main([str(root), *args]) == 0
    text = capsys.readouterr().out
    return text, yaml.safe_load(text)


def test_inferred_schema_of_the_built_in_data_finds_its_roles_and_trains(
    small_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    text, cfg = inferred(small_dataset, capsys, "--name", "inferred")
    schema = Schema.from_dict(cfg["schema"])
    assert schema.labels == ("finish", "skip") and schema.user_id == "user_id"
    assert [f.name for f in schema.sequence_features] == [
        "seq_item_id",
        "seq_author_id",
        "seq_category",
        "seq_action",
    ]
    tables = {f.name: f.table_name for f in schema.sequence_features}
    assert tables == {
        "seq_item_id": "item_id",
        "seq_author_id": "author_id",
        "seq_category": "item_category",
        "seq_action": "seq_action",
    }
    assert (schema.candidate_groups, schema.user_groups) == (("item", "author"), ("user",))
    assert schema.feature("user_id").hash  # raw user ids are ~1e9..1e13
    assert schema.feature("user_hist_finish").on_missing == "fill"  # the generator leaves NaNs there
    assert "_p_finish: a _-prefixed column" in text  # the oracle is never a feature
    assert schema.feature("item_tags").multi_hot

    conf = tmp_path / "conf" / "data"
    conf.mkdir(parents=True)
    (conf / "inferred.yaml").write_text(text)
    cmd = [sys.executable, "launch/train.py", "--config-dir", str(tmp_path / "conf"), "data=inferred"]
    cmd += [f"data.root={small_dataset}", f"trainer.run_dir={tmp_path / 'run'}", "trainer.max_steps=6"]
    cmd += [
        "trainer.eval_every=0",
        "trainer.progress_bar=false",
        "model.sequence=longer",
        "model.longer.dim=16",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test metrics" in proc.stdout


def movielens_like(root: Path, rows: int = 2000) -> Path:
    rng = np.random.default_rng(0)
    rating = rng.integers(1, 6, rows).astype(np.float32)
    lens = rng.integers(0, 12, rows)
    hist_items = [rng.integers(1, 500, n).tolist() for n in lens]
    cols = {
        "user_id": pa.array(rng.integers(1, 300, rows)),
        "item_id": pa.array(rng.integers(1, 500, rows)),
        "item_genres": pa.array([rng.integers(0, 19, rng.integers(1, 4)).tolist() for _ in range(rows)]),
        "like": pa.array((rating >= 4).astype(np.int64)),
        "rating": pa.array(rating),
        "timestamp": pa.array(rng.integers(874_000_000, 893_000_000, rows)),
        "ctx_hour": pa.array(rng.integers(0, 24, rows)),
        "seq_item": pa.array(hist_items, pa.list_(pa.int64())),
        "seq_label": pa.array([rng.integers(0, 2, n).tolist() for n in lens], pa.list_(pa.int64())),
        "user_avg_gap": pa.array(np.where(rng.random(rows) < 0.1, np.nan, rng.random(rows))),
    }
    (root / "train").mkdir(parents=True)
    pq.write_table(pa.table(cols), root / "train" / "part-0.parquet", row_group_size=500)
    return root


def test_movielens_style_data_gets_its_sequence_and_its_leak_left_out(tmp_path: Path, capsys):
    text, cfg = inferred(movielens_like(tmp_path / "ml"), capsys)
    schema = Schema.from_dict(cfg["schema"])
    assert schema.labels == ("like",)
    assert [(f.name, f.table_name) for f in schema.sequence_features] == [
        ("seq_item", "item_id"),
        ("seq_label", "seq_label"),
    ]
    assert schema.sequence.max_len == 11
    assert "rating: separates label 'like' almost perfectly" in text  # derived from the label: left out
    assert "timestamp: a timestamp" in text
    assert schema.feature("user_avg_gap").on_missing == "fill"
    assert {f.name for f in schema.sparse} == {"user_id", "item_id", "item_genres", "ctx_hour"}
    assert schema.candidate_groups == ("item",)


def test_data_without_a_user_id_is_one_clear_line(tmp_path: Path, capsys):
    root = tmp_path / "d"
    root.mkdir()
    pq.write_table(pa.table({"click": [0, 1], "item_id": [1, 2]}), root / "a.parquet")
    assert main([str(root)]) == 2
    assert (
        capsys.readouterr().err
        == "infer_schema: no user id column found among the integer columns ['item_id']; rename it user_id\n"
    )
