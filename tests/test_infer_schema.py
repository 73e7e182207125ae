"""`python -m data.infer_schema`: a schema inferred from Parquet metadata and a sample loads, trains, and
finds the roles a hand-written schema declares (labels, user id, groups, aligned sequence, shared tables,
leaks), on prefixed data (`user_*`, `item_*`) and on flat data (one row per rating, no prefixes)."""

from __future__ import annotations

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


@pytest.mark.slow
def test_inferred_schema_of_the_built_in_data_finds_its_roles_and_trains(
    small_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture, launch_in_process
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
    assert schema.feature("user_id").zch is not None  # raw user ids are ~1e9..1e13: managed collisions
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
    proc = launch_in_process(cmd)  # launch/train.py's code on 1 rank, in this process
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


def flat_ratings(root: Path, rows: int = 2000) -> Path:
    """The issue's shape: one row per rating, no name prefixes. User attributes are constant per user,
    item attributes per item, hour / weekday vary per row, `hist_items` holds item ids (of a name that
    names no column), `gender` is a 0/1 attribute and `like` the one label. User ids (1..150) span more
    than item ids (1..100), so the history's values fit both id ranges but overlap only the items'."""
    rng = np.random.default_rng(1)
    users, items = rng.integers(1, 151, rows), rng.integers(1, 101, rows)
    per_user = {"age": 7, "gender": 2, "occupation": 21}
    per_item = {"n_genres": 4, "release_year": 80, "primary_genre": 19}
    user_attr = {k: rng.integers(0, n, 151) for k, n in per_user.items()}  # index: the user id
    item_attr = {k: rng.integers(0, n, 101) for k, n in per_item.items()}  # index: the item id
    other_genres = [rng.integers(0, 19, n).tolist() for n in item_attr["n_genres"]]  # a multi-hot bag
    title_len = rng.uniform(5, 60, 101).astype(np.float32)
    cols = {
        "user_id": pa.array(users),
        "item_id": pa.array(items),
        **{k: pa.array(v[users]) for k, v in user_attr.items()},
        "n_genres": pa.array(item_attr["n_genres"][items]),
        "release_year": pa.array(item_attr["release_year"][items]),
        "movie_title_len": pa.array(title_len[items]),
        "primary_genre": pa.array(item_attr["primary_genre"][items]),
        "other_genres": pa.array([other_genres[i] for i in items], pa.list_(pa.int64())),
        "hour": pa.array(rng.integers(0, 24, rows)),
        "weekday": pa.array(rng.integers(0, 7, rows)),
        "hist_items": pa.array(
            [rng.integers(1, 101, n).tolist() for n in rng.integers(0, 9, rows)], pa.list_(pa.int64())
        ),
        "like": pa.array((rng.random(rows) < 0.3 + 0.4 * user_attr["gender"][users]).astype(np.int64)),
    }
    table = pa.table(cols)
    bounds = {"train": (0, rows // 2), "valid": (rows // 2, rows * 3 // 4), "test": (rows * 3 // 4, rows)}
    for split, (a, b) in bounds.items():
        (root / split).mkdir(parents=True)
        pq.write_table(table.slice(a, b - a), root / split / "part-0.parquet", row_group_size=250)
    return root


@pytest.fixture
def flat(tmp_path: Path, capsys: pytest.CaptureFixture) -> tuple[str, Schema, Path]:
    root = flat_ratings(tmp_path / "flat")
    text, cfg = inferred(root, capsys)
    return text, Schema.from_dict(cfg["schema"]), root


def test_flat_data_is_grouped_by_what_each_column_describes(flat: tuple[str, Schema, Path]):
    text, schema, _ = flat
    assert schema.groups == ("user", "item", "context", "sequence")
    features = (*schema.dense, *schema.sparse)
    assert {g: sorted(f.name for f in features if f.group == g) for g in schema.groups} == {
        "user": ["age", "gender", "occupation", "user_id"],
        "item": ["item_id", "movie_title_len", "n_genres", "other_genres", "primary_genre", "release_year"],
        "context": ["hour", "weekday"],
        "sequence": [],  # the sequence group holds the history alone
    }
    assert schema.sequence.group == "sequence"
    assert [f.name for f in schema.sequence_features] == ["hist_items"]
    assert (schema.candidate_groups, schema.user_groups) == (("item",), ("user",))
    assert "#   user: user_id and the columns with one value per user_id on the sample" in text


def test_a_history_named_after_no_column_shares_the_id_table_its_values_fall_in(
    flat: tuple[str, Schema, Path],
):
    text, schema, _ = flat
    assert schema.feature("hist_items").table_name == "item_id"  # not user_id, whose range holds them too
    assert schema.tables()["item_id"]["feature_names"] == ["item_id", "hist_items"]
    note = "shares the table of 'item_id' (a guess from its values: all in item_id's range [1, 100]"
    assert f"hist_items, num_embeddings: 101, embedding_dim: 16, table: item_id}}  # {note}" in text


def test_a_0_1_attribute_stays_a_feature_and_only_the_label_named_column_is_a_label(
    flat: tuple[str, Schema, Path],
):
    text, schema, _ = flat
    assert schema.labels == ("like",)
    assert schema.feature("gender").group == "user"
    labels_line = next(line for line in text.splitlines() if line.strip().startswith("labels:"))
    assert "0/1 columns: gender, like" in labels_line and "features: gender" in labels_line


def test_without_a_label_like_name_the_first_0_1_column_is_the_only_label(tmp_path: Path, capsys):
    root = tmp_path / "d"
    root.mkdir()
    table = pa.table(
        {"user_id": [1, 2, 1, 2], "y": [0, 1, 1, 0], "flag": [1, 1, 0, 0], "item_id": [3, 4, 4, 3]}
    )
    pq.write_table(table, root / "a.parquet")
    text, cfg = inferred(root, capsys)
    assert Schema.from_dict(cfg["schema"]).labels == ("y",)
    assert "none is named like a task: the first is the label; features: flag" in text


@pytest.mark.slow
def test_inferred_schema_of_flat_data_trains(
    flat: tuple[str, Schema, Path], tmp_path: Path, launch_in_process
):
    text, _, root = flat
    conf = tmp_path / "conf" / "data"
    conf.mkdir(parents=True)
    (conf / "flat.yaml").write_text(text)
    cmd = [sys.executable, "launch/train.py", "--config-dir", str(tmp_path / "conf"), "data=flat"]
    cmd += [f"data.root={root}", f"trainer.run_dir={tmp_path / 'run'}", "trainer.max_steps=4"]
    cmd += ["data.batch_size=128", "trainer.eval_every=0", "trainer.progress_bar=false"]
    cmd += ["model.sequence=longer", "model.longer.dim=16"]
    proc = launch_in_process(cmd)  # launch/train.py's code on 1 rank, in this process
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test metrics" in proc.stdout
    # a user's data has no recipe of its own: it trained with conf/recipe/default.yaml
    trained = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    default = yaml.safe_load((ROOT / "conf" / "recipe" / "default.yaml").read_text())
    assert trained["optim"]["dense"]["schedule"] == default["optim"]["dense"]["schedule"] == "cosine"
    assert trained["trainer"]["early_stop"]["patience"] == default["trainer"]["early_stop"]["patience"] > 0
