"""launch/peers.py and launch/peer_baselines/: the non-neural peers (LightGBM, logistic regression).

A tiny MovieLens-style Parquet set with a learnable signal (user and item biases + the user's recent
like rate) drives the feature checks and one CLI run; the project's synthetic generator checks that the
generator's `_p_*` oracle columns and the labels never reach the features.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from data.decode import Decoder
from data.schema import Schema
from launch import peers
from launch.peer_baselines.features import build_features, load_split, read_split_table
from launch.peer_baselines.fit import METRICS

SCHEMA = {
    "name": "tiny_ml",
    "labels": ["like"],
    "user_id": "user_id",
    "groups": ["user", "item", "sequence"],
    "dense": [{"name": "hist_rate", "group": "user", "on_missing": "fill", "fill_value": 0.5}],
    "sparse": [
        {
            "name": "user_id_emb",
            "column": "user_id",
            "num_embeddings": 41,
            "embedding_dim": 4,
            "group": "user",
        },
        {"name": "item_id", "num_embeddings": 61, "embedding_dim": 4, "group": "item"},
        {"name": "genres", "num_embeddings": 5, "embedding_dim": 4, "group": "item", "multi_hot": True},
    ],
    "sequence": {
        "group": "sequence",
        "max_len": 10,
        "features": [
            {"name": "seq_item", "num_embeddings": 61, "embedding_dim": 4, "table": "item_id"},
            {"name": "seq_label", "num_embeddings": 2, "embedding_dim": 4},
        ],
    },
}
N_USERS, N_ITEMS, PER_USER = 40, 60, 50


def _write_tiny_ml(root: Path) -> None:
    """Per user: PER_USER rows in time order, first 80% train, then valid, then test; each row's history
    is the user's earlier rows (the last 10). Extra columns `_p_like` and `rating` are not in the schema."""
    rng = np.random.default_rng(0)
    ub, ib = rng.normal(0, 1.5, N_USERS + 1), rng.normal(0, 1.5, N_ITEMS + 1)
    genres = [sorted(rng.choice(np.arange(1, 5), rng.integers(0, 3), replace=False).tolist()) for _ in ib]
    rows: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    for u in range(1, N_USERS + 1):
        items, labels = [], []
        for k in range(PER_USER):
            i = int(rng.integers(1, N_ITEMS + 1))
            p = 1 / (1 + np.exp(-(ub[u] + ib[i])))
            y = int(rng.random() < p)
            split = "train" if k < 0.8 * PER_USER else "valid" if k < 0.9 * PER_USER else "test"
            rows[split].append(
                {
                    "like": y,
                    "_p_like": float(p),
                    "rating": float(4 * y + 1),
                    "user_id": u,
                    "item_id": i,
                    "genres": genres[i],
                    "hist_rate": float(np.mean(labels)) if labels else None,
                    "seq_item": items[-10:],
                    "seq_label": labels[-10:],
                }
            )
            items.append(i)
            labels.append(y)
    for split, rs in rows.items():
        (root / split).mkdir(parents=True)
        table = pa.Table.from_pylist(rs)
        half = len(rs) // 2
        pq.write_table(table.slice(0, half), root / split / "part-00000.parquet")
        pq.write_table(table.slice(half), root / split / "part-00001.parquet")


@pytest.fixture(scope="module")
def tiny_ml(tmp_path_factory: pytest.TempPathFactory) -> tuple[Schema, Path]:
    root = tmp_path_factory.mktemp("peers") / "tiny_ml"
    _write_tiny_ml(root)
    return Schema.from_dict(SCHEMA), root


def test_feature_values(tiny_ml: tuple[Schema, Path]) -> None:
    schema, root = tiny_ml
    d = load_split(root, "train", schema)
    f = d.features
    assert f.categorical_names == ["user_id_emb", "item_id"]
    assert f.numeric_names == [
        "hist_rate",
        "hist_rate__missing",
        *[f"genres={k}" for k in range(5)],
        "sequence__len",
        "seq_item__has_item_id",
        "seq_label=1__last5",
        "seq_label=1__all",
    ]
    raw = read_split_table(root, "train", schema).to_pylist()
    col = {name: f.numeric[:, j] for j, name in enumerate(f.numeric_names)}
    for r, row in enumerate(raw[:200]):
        seq, lab = row["seq_item"], row["seq_label"]
        assert col["hist_rate"][r] == (0.5 if row["hist_rate"] is None else np.float32(row["hist_rate"]))
        assert col["hist_rate__missing"][r] == (row["hist_rate"] is None)
        assert [col[f"genres={k}"][r] for k in range(5)] == [float(k in row["genres"]) for k in range(5)]
        assert col["sequence__len"][r] == len(seq)
        assert col["seq_item__has_item_id"][r] == float(row["item_id"] in seq)
        if seq:
            assert col["seq_label=1__all"][r] == pytest.approx(np.mean(lab))
            assert col["seq_label=1__last5"][r] == pytest.approx(np.mean(lab[-5:]))
        else:
            assert np.isnan(col["seq_label=1__all"][r]) and np.isnan(col["seq_label=1__last5"][r])
    assert (f.categorical[:, 1] == [row["item_id"] for row in raw]).all()
    assert (d.labels[:, 0] == [row["like"] for row in raw]).all()


def test_features_never_see_labels_or_oracle(synthetic_schema: Schema, small_dataset: Path) -> None:
    schema = synthetic_schema
    files = sorted((small_dataset / "train").glob("*.parquet"))
    assert "_p_finish" in pq.ParquetFile(files[0]).schema_arrow.names  # the oracle is in the files...
    table = read_split_table(small_dataset, "train", schema)
    assert table.column_names == schema.columns()  # ...but not read
    chunk = Decoder(schema)(table, "train")
    f = build_features(chunk, schema)
    names = set(f.names)
    assert not names & set(schema.labels) and not any(n.startswith("_p_") for n in names)
    assert len(names) == len(f.names) == f.numeric.shape[1] + f.categorical.shape[1]
    assert set(f.categorical_names) == {s.name for s in schema.sparse if not s.multi_hot}
    # by construction: features are a function of the non-label inputs only
    chunk.labels = np.random.default_rng(1).integers(0, 2, chunk.labels.shape).astype(np.float32)
    g = build_features(chunk, schema)
    np.testing.assert_array_equal(f.numeric, g.numeric)
    np.testing.assert_array_equal(f.categorical, g.categorical)


def test_cli_trains_selects_and_scores(tiny_ml: tuple[Schema, Path], tmp_path: Path, monkeypatch) -> None:
    schema, root = tiny_ml
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"root": "unused", "schema": SCHEMA}))
    monkeypatch.setattr(
        peers, "LGB_GRID", {"num_leaves": [7, 31], "learning_rate": [0.1], "min_child_samples": [20]}
    )
    monkeypatch.setattr(peers, "LOGREG_C", [0.01, 1.0])
    monkeypatch.setattr(peers, "MAX_ROUNDS", 200)
    out = tmp_path / "peers.json"
    peers.main(["--data", str(config), "--root", str(root), "--seeds", "0,1", "--out", str(out)])
    r = json.loads(out.read_text())

    assert set(r) >= {"dataset", "root", "rows", "features", "peers", "seconds"}
    assert r["dataset"] == "tiny_ml" and set(r["peers"]) == {"lightgbm", "logreg"}
    assert r["rows"] == {"train": 1600, "valid": 200, "test": 200}
    for name, peer in r["peers"].items():
        assert set(peer) >= {"settings", "seeds", "mean", "sd"}
        assert set(peer["seeds"]) == {"0", "1"}
        for res in peer["seeds"].values():
            for split in ("valid", "test"):
                assert 0.5 < res[split]["like/auc"] <= 1 and 0.5 < res[split]["like/uauc"] <= 1, name
        assert set(peer["mean"]["test"]) == {f"like/{m}" for m in METRICS}

    lr = r["peers"]["logreg"]
    chosen = lr["settings"]["chosen"]["like"]
    tried = chosen["grid_valid_auc"]
    assert chosen["C"] in [0.01, 1.0] and tried[f"C={chosen['C']}"] == max(tried.values())
    assert chosen["valid_auc"] == pytest.approx(lr["seeds"]["0"]["valid"]["like/auc"])
    assert lr["sd"]["test"]["like/auc"] == 0.0

    lg = r["peers"]["lightgbm"]
    for seed, per_task in lg["settings"]["chosen"].items():
        c = per_task["like"]
        assert c["num_leaves"] in (7, 31) and c["grid_valid_auc"]
        assert c["valid_auc"] == max(c["grid_valid_auc"].values())
        assert c["valid_auc"] == pytest.approx(lg["seeds"][seed]["valid"]["like/auc"])
        assert 1 <= c["best_iteration"] <= 200
