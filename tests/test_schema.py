from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from data.schema import Schema, SchemaError
from tests.conftest import SYNTHETIC_CONFIG


@pytest.fixture()
def raw() -> dict:
    return copy.deepcopy(yaml.safe_load(SYNTHETIC_CONFIG.read_text())["schema"])


def _sparse(d: dict, name: str) -> dict:
    return next(f for f in d["sparse"] if f["name"] == name)


def test_synthetic_schema_derived_views_follow_schema_order(synthetic_schema: Schema) -> None:
    s = synthetic_schema
    assert s.task_names == ("finish", "skip")
    # 8 dense features, two with on_missing=fill -> one indicator each, right after the feature
    assert s.dense_dim == 10
    assert s.dense_names[:3] == ("user_active_days", "user_hist_finish", "user_hist_finish__missing")
    assert s.dense_groups[:3] == ("user", "user", "user") and len(s.dense_groups) == s.dense_dim
    assert s.sparse_keys[: len(s.sparse)] == tuple(f.name for f in s.sparse)
    assert s.sparse_keys[len(s.sparse) :] == ("seq_item_id", "seq_author_id", "seq_category", "seq_action")
    assert s.group_of("seq_action") == "sequence" and s.group_of("item_tags") == "item"
    assert s.columns()[:3] == ["finish", "skip", "user_id"]
    assert len(s.columns()) == len(set(s.columns()))


def test_tables_cover_sparse_and_sequence_features_and_merge_shared_tables(synthetic_schema: Schema) -> None:
    tables = synthetic_schema.tables()
    assert tables["category"] == {
        "num_embeddings": 200,
        "embedding_dim": 16,
        "feature_names": ["user_interests", "item_category", "seq_category"],
    }
    assert tables["item_id"]["feature_names"] == ["item_id", "seq_item_id"]
    assert tables["author_id"]["feature_names"] == ["author_id", "user_follows", "seq_author_id"]
    assert tables["seq_action"]["feature_names"] == ["seq_action"]
    named = [n for t in tables.values() for n in t["feature_names"]]
    assert sorted(named) == sorted(synthetic_schema.sparse_keys)


def test_to_dict_round_trips(synthetic_schema: Schema) -> None:
    assert Schema.from_dict(synthetic_schema.to_dict()) == synthetic_schema


def test_load_accepts_bare_schema_and_data_config(tmp_path: Path, raw: dict) -> None:
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump(raw))
    wrapped = tmp_path / "wrapped.yaml"
    wrapped.write_text(yaml.safe_dump({"root": "x", "schema": raw, "generator": {}}))
    assert Schema.load(bare) == Schema.load(wrapped)


def _set(path: list, value) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        node = d
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return edit


def _del_labels(d: dict) -> None:
    d["labels"] = []


def _dup_name(d: dict) -> None:
    d["sparse"][4]["name"] = d["sparse"][3]["name"]


def _column_clash(d: dict) -> None:
    d["dense"][0]["column"] = "item_id"  # an int64 id column read as dense


def _shared_table_disagrees(d: dict) -> None:
    _sparse(d, "user_interests")["embedding_dim"] = 8


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            _set(["sparse", 3, "group"], "itme"),
            "schema.sparse[3].group: unknown group 'itme' (groups: user, item",
        ),
        (_set(["sparse", 2, "num_embedding"], 7), "schema.sparse[2].num_embedding: unknown key"),
        (_set(["sequence", "max_lenn"], 7), "schema.sequence.max_lenn: unknown key"),
        (_set(["typo"], 1), "schema.typo: unknown key"),
        (
            _set(["sparse", 1, "embedding_dim"], 0),
            "schema.sparse[1].embedding_dim: expected a positive integer",
        ),
        (
            _set(["sequence", "features", 0, "num_embeddings"], -5),
            "schema.sequence.features[0].num_embeddings: expected a positive integer",
        ),
        (_set(["sparse", 1, "pooling"], "max"), "schema.sparse[1].pooling: 'max' is not one of sum, mean"),
        (_set(["dense", 0, "on_missing"], "drop"), "schema.dense[0].on_missing: 'drop' is not one of"),
        (_del_labels, "schema.labels: at least one label is required"),
        (_dup_name, "schema.sparse[4].name: duplicate feature name 'user_age' (first at schema.sparse[3])"),
        (_column_clash, "schema.sparse[8].column: column 'item_id' used as int64 id here but as dense"),
        (_shared_table_disagrees, "embedding_dim: table 'category' is shared with"),
        (
            _set(["groups"], ["user", "item", "author", "context", "cross", "sequence", "extra"]),
            "schema.groups[6]: group 'extra' has no features",
        ),
    ],
)
def test_invalid_schema_raises_schema_error_naming_the_key(raw: dict, edit, expected: str) -> None:
    edit(raw)
    with pytest.raises(SchemaError) as err:
        Schema.from_dict(raw)
    assert expected in str(err.value)


def test_missing_required_key_is_named(raw: dict) -> None:
    del raw["sparse"][0]["num_embeddings"]
    with pytest.raises(SchemaError, match=r"schema\.sparse\[0\]\.num_embeddings: required key missing"):
        Schema.from_dict(raw)
