"""Sequence arch wiring (`model.sequence=none|mean_pool|longer`): which KJT each feature goes to, the
unpooled EmbeddingCollection path, jagged pooling, and the LONGER output as a group."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor

from data.reader import DataError, ParquetReader
from data.schema import Schema, SchemaError
from models.config import ModelConfig
from models.longer import LongerConfig
from models.ranking import RankingModel, RankingTrainWrapper, pool_jagged
from models.rankmixer import RankMixerConfig
from models.sparse_arch import embedding_configs, input_keys
from pipeline.job import place_dense_modules

SCHEMA = Schema.from_dict(
    {
        "name": "seq",
        "labels": ["y"],
        "user_id": "uid",
        "groups": ["user", "item", "sequence"],
        "dense": [{"name": "d", "group": "user"}],
        "sparse": [
            {"name": "u", "num_embeddings": 10, "embedding_dim": 8, "group": "user"},
            {"name": "item", "num_embeddings": 20, "embedding_dim": 8, "group": "item"},
        ],
        "sequence": {
            "group": "sequence",
            "max_len": 6,
            "features": [
                {"name": "s_item", "num_embeddings": 20, "embedding_dim": 8, "table": "item"},
                {"name": "s_act", "num_embeddings": 4, "embedding_dim": 8},
            ],
        },
    }
)
LONGER = {"dim": 8, "num_heads": 2, "num_layers": 2, "merge": 2, "recent_queries": 2,
          "candidate_groups": ["item"], "user_groups": ["user"]}  # fmt: skip


def model_cfg(sequence: str) -> ModelConfig:
    return ModelConfig(
        sequence=sequence, longer=LongerConfig(**LONGER), dense=RankMixerConfig(num_tokens=2, dim=8)
    )


def write(tmp_path: Path, s_act: list | None = None) -> Path:
    cols = {
        "y": pa.array([0, 1, 1, 0], pa.int8()),
        "uid": pa.array([5, 6, 7, 8], pa.int64()),
        "d": pa.array([0.5, 1.5, 2.5, 3.5], pa.float32()),
        "u": pa.array([1, 2, 3, 4], pa.int64()),
        "item": pa.array([3, 4, 5, 6], pa.int64()),
        "s_item": pa.array([[1, 2, 3], [4], [], [5, 6, 7, 8, 9, 10, 11]], pa.list_(pa.int64())),
        "s_act": pa.array(s_act or [[0, 1, 2], [3], [], [0, 1, 2, 3, 0, 1, 2]], pa.list_(pa.int64())),
    }
    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table(cols), path)
    return path


def read(path: Path, mode: str) -> list:
    return list(ParquetReader(path, SCHEMA, batch_size=4, shuffle=False, split_keys=input_keys(SCHEMA, mode)))


def test_input_keys_route_features_to_the_bag_or_the_embedding_collection():
    assert input_keys(SCHEMA, "mean_pool") == (["u", "item", "s_item", "s_act"], [])
    assert input_keys(SCHEMA, "none") == (["u", "item"], [])
    # the candidate item shares the item table with the sequence: one table, looked up unpooled
    assert input_keys(SCHEMA, "longer") == (["u"], ["item", "s_item", "s_act"])
    with pytest.raises(ValueError, match="model.sequence"):
        input_keys(SCHEMA, "pooled")


def test_unpooled_tables_of_different_dims_are_a_schema_error():
    d = SCHEMA.to_dict()
    d["sequence"]["features"][1]["embedding_dim"] = 4
    with pytest.raises(SchemaError, match="one embedding_dim"):
        embedding_configs(Schema.from_dict(d), input_keys(Schema.from_dict(d), "longer")[1])


def test_reader_splits_the_kjts_and_keeps_the_last_items(tmp_path: Path):
    reader = ParquetReader(
        write(tmp_path), SCHEMA, batch_size=4, shuffle=False, split_keys=input_keys(SCHEMA, "longer")
    )
    (batch,) = list(reader)
    assert batch.sparse.keys() == ["u"] and batch.sequence.keys() == ["item", "s_item", "s_act"]
    assert batch.sequence["s_item"].lengths().tolist() == [3, 1, 0, 6]  # max_len 6: the last 6 kept
    assert batch.sequence["s_item"].values()[-6:].tolist() == [6, 7, 8, 9, 10, 11]


def test_misaligned_sequence_columns_are_rejected_naming_column_and_row(tmp_path: Path):
    path = write(tmp_path, s_act=[[0, 1, 2], [3, 3], [], [0, 1, 2, 3, 0, 1, 2]])
    with pytest.raises(DataError, match=r"column 's_act': 2 items in row 1, but 's_item' has 1"):
        list(ParquetReader(path, SCHEMA, batch_size=4, shuffle=False))


def test_jagged_pooling_matches_a_per_row_reference():
    lengths = torch.tensor([3, 0, 1, 2])
    values = torch.arange(6 * 2, dtype=torch.float32).view(6, 2)
    start = 0
    for b, n in enumerate(lengths.tolist()):
        jt = JaggedTensor(values=values, lengths=lengths)
        torch.testing.assert_close(pool_jagged(jt, "sum")[b], values[start : start + n].sum(0))
        mean = values[start : start + n].mean(0) if n else torch.zeros(2)
        torch.testing.assert_close(pool_jagged(jt, "mean")[b], mean)
        start += n


@pytest.mark.parametrize("mode", ["none", "mean_pool", "longer"])
def test_ranking_model_trains_in_every_sequence_mode(tmp_path: Path, mode: str):
    torch.manual_seed(0)
    model = RankingModel(SCHEMA, model_cfg(mode))
    groups = dict(zip(model.feature_groups.groups, model.feature_groups.group_dims))
    # none: the sequence group keeps nothing (no dense feature) and is dropped; longer: G = 1 + 1 + 2 CLS
    expected = {"none": None, "mean_pool": 16, "longer": 4 * 8}[mode]
    assert groups.get("sequence") == expected
    reader = ParquetReader(
        write(tmp_path), SCHEMA, batch_size=4, shuffle=False, split_keys=input_keys(SCHEMA, mode)
    )
    (batch,) = list(reader)
    loss, out = RankingTrainWrapper(model)(batch)
    loss.backward()
    assert torch.isfinite(out.logits).all()
    if mode == "longer":  # the sequence reaches the logits; the bag collection holds only `u`
        assert model.sequence_arch.merge_proj.weight.grad.abs().sum() > 0
        assert list(model.sparse_arch.embedding_bag_collection.embedding_bags) == ["u"]


def test_ranking_model_kv_cache_scores_equal_full_forward_for_many_candidates(tmp_path: Path):
    torch.manual_seed(0)
    model = RankingModel(SCHEMA, model_cfg("longer")).eval()
    users = {"uid": [5, 6, 7, 8], "u": [1, 2, 3, 4], "d": [0.5, 1.5, 2.5, 3.5],
             "s_item": [[1, 2, 3], [4], [], [5, 6, 7, 8, 9, 10]],
             "s_act": [[0, 1, 2], [3], [], [0, 1, 2, 3, 0, 1]]}  # fmt: skip
    user_index = torch.tensor([0, 0, 1, 3, 3, 3, 2, 1, 0, 3])  # 10 candidates of 4 users
    rows = user_index.tolist()

    def candidates(with_sequence: bool) -> Path:
        cols = {k: [users[k][u] for u in rows] for k in ("uid", "u", "d")}
        seq = {k: [users[k][u] if with_sequence else [] for u in rows] for k in ("s_item", "s_act")}
        table = pa.table({
            "y": pa.array([0] * len(rows), pa.int8()), "uid": pa.array(cols["uid"], pa.int64()),
            "d": pa.array(cols["d"], pa.float32()), "u": pa.array(cols["u"], pa.int64()),
            "item": pa.array([3, 9, 4, 11, 12, 13, 5, 17, 2, 6], pa.int64()),
            **{k: pa.array(v, pa.list_(pa.int64())) for k, v in seq.items()},
        })  # fmt: skip
        path = tmp_path / f"cand-{with_sequence}.parquet"
        pq.write_table(table, path)
        return path

    def read_one(path: Path, batch_size: int):
        (batch,) = list(ParquetReader(path, SCHEMA, batch_size=batch_size, shuffle=False,
                                      split_keys=input_keys(SCHEMA, "longer")))  # fmt: skip
        return batch

    user_table = pa.table({
        "y": pa.array([0] * 4, pa.int8()), "uid": pa.array(users["uid"], pa.int64()),
        "d": pa.array(users["d"], pa.float32()), "u": pa.array(users["u"], pa.int64()),
        "item": pa.array([0] * 4, pa.int64()),
        **{k: pa.array(users[k], pa.list_(pa.int64())) for k in ("s_item", "s_act")},
    })  # fmt: skip
    pq.write_table(user_table, tmp_path / "users.parquet")
    cache = model.encode_users(read_one(tmp_path / "users.parquet", 4).sequence)  # once per user
    lean = read_one(candidates(with_sequence=False), 10)  # candidate rows without the sequence
    cached = model.score_candidates(cache, user_index, lean.dense, lean.sparse, lean.sequence)
    full = read_one(candidates(with_sequence=True), 10)
    with torch.no_grad():
        expect = model(full.dense, full.sparse, full.sequence)
    assert cached.shape == (10, 1)
    torch.testing.assert_close(cached, expect, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and the cache is what carries the sequence: without it the scores differ
        assert (model(lean.dense, lean.sparse, lean.sequence) - expect).abs().amax() > 1e-4
    with pytest.raises(ValueError, match="model.sequence=longer"):
        RankingModel(SCHEMA, model_cfg("mean_pool")).encode_users(lean.sequence)


@pytest.mark.parametrize("mode", ["mean_pool", "longer"])
def test_embedding_l2_adds_the_mean_squared_norm_of_the_looked_up_embeddings(tmp_path: Path, mode: str):
    torch.manual_seed(0)
    model = RankingModel(SCHEMA, model_cfg(mode))
    reader = ParquetReader(
        write(tmp_path), SCHEMA, batch_size=4, shuffle=False, split_keys=input_keys(SCHEMA, mode)
    )
    (batch,) = list(reader)
    plain_loss, _ = RankingTrainWrapper(model)(batch)
    loss, out = RankingTrainWrapper(model, embedding_l2=0.1)(batch)
    pooled, unpooled = model.sparse_arch(batch.sparse, batch.sequence)
    sq = pooled.values().square().sum() + sum(jt.values().square().sum() for jt in (unpooled or {}).values())
    assert sq > 0
    torch.testing.assert_close(loss - plain_loss, 0.1 * sq / 4)
    torch.testing.assert_close(out.aux_loss, 0.1 * sq / 4)
    eval_loss, _ = RankingTrainWrapper(model, embedding_l2=0.1).eval()(batch)  # a training term only
    torch.testing.assert_close(eval_loss, plain_loss)


def test_longer_tokens_come_from_the_schema_roles_and_a_missing_role_is_a_schema_error():
    no_groups = {k: v for k, v in LONGER.items() if not k.endswith("_groups")}
    cfg = ModelConfig(
        sequence="longer", longer=LongerConfig(**no_groups), dense=RankMixerConfig(num_tokens=2, dim=8)
    )
    needs_roles = r"schema 'seq': model.sequence=longer needs .* `roles: \{candidate"
    with pytest.raises(SchemaError, match=needs_roles):
        RankingModel(SCHEMA, cfg)
    with_roles = Schema.from_dict({**SCHEMA.to_dict(), "roles": {"candidate": ["item"], "user": ["user"]}})
    model = RankingModel(with_roles, cfg)
    assert (model.longer_cfg.candidate_groups, model.longer_cfg.user_groups) == (["item"], ["user"])
    assert (model.longer_cfg.candidate_dim, model.longer_cfg.user_dim) == (8, 8 + 16)  # u + dense proj
    assert Schema.from_dict(with_roles.to_dict()) == with_roles  # roles round-trip
    with pytest.raises(SchemaError, match=r"schema.roles.candidate\[0\]: unknown group 'author'"):
        Schema.from_dict({**SCHEMA.to_dict(), "roles": {"candidate": ["author"]}})
    with pytest.raises(SchemaError, match=r"schema.roles.owner: unknown key"):
        Schema.from_dict({**SCHEMA.to_dict(), "roles": {"owner": ["user"]}})


def test_mean_pooled_bags_are_sums_divided_by_bag_size_and_empty_bags_are_zero():
    """TorchRec's tables sum; the sparse arch divides the mean features (the sequence here) itself."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from models.sparse_arch import SparseArch

    arch = SparseArch(SCHEMA, sequence="mean_pool")
    assert arch.poolings == {"u": "sum", "item": "mean", "s_item": "mean", "s_act": "mean"}
    ids = {"u": [[1], [2]], "item": [[3], [4]], "s_item": [[5, 6, 7], []], "s_act": [[1, 1], [2]]}
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=arch.pooled_keys,
        values=torch.tensor([i for k in arch.pooled_keys for bag in ids[k] for i in bag]),
        lengths=torch.tensor([len(bag) for k in arch.pooled_keys for bag in ids[k]]),
    )
    pooled, _ = arch(kjt)
    out = pooled.to_dict()
    ebc = arch.embedding_bag_collection
    weight = {c.name: t.weight for c, t in zip(ebc.embedding_bag_configs(), ebc.embedding_bags.values())}
    item, act = weight["item"], weight["s_act"]
    torch.testing.assert_close(out["s_item"][0], item[[5, 6, 7]].mean(0))
    torch.testing.assert_close(out["s_item"][1], torch.zeros(8))
    torch.testing.assert_close(out["s_act"][1], act[2])
    torch.testing.assert_close(out["u"][0], weight["u"][1])  # summed (one row)


@pytest.mark.parametrize("mode", ["none", "mean_pool", "longer"])
def test_every_module_but_the_sparse_arch_goes_to_the_jobs_device(mode: str):
    """The meta device stands in for a GPU: a module left behind (LONGER was) would make DDP refuse the
    model on the first GPU run."""
    model = RankingModel(SCHEMA, model_cfg(mode))
    place_dense_modules(model, torch.device("meta"))
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        expected = "cpu" if name.startswith("sparse_arch.") else "meta"
        assert t.device.type == expected, name
    assert any(n.startswith("sequence_arch.") for n, _ in model.named_parameters()) == (mode == "longer")


@pytest.mark.parametrize("mode", ["none", "mean_pool", "longer"])
def test_wide_term_adds_each_ids_per_task_bias_in_every_sequence_mode(tmp_path: Path, mode: str):
    torch.manual_seed(0)
    cfg = dataclasses.replace(model_cfg(mode), wide=True)
    model = RankingModel(SCHEMA, cfg).eval()
    sa = model.sparse_arch
    # one wide table per `sparse` feature (not the sequence's), fed from the KJT the feature is in
    assert sa.wide_tables == {"wide_u", "wide_item"} and {"wide_u", "wide_item"} <= set(sa.table_names())
    (batch,) = read(write(tmp_path), mode)
    tables = {name: t for bags, _ in sa.wide_collections() for name, t in bags.embedding_bags.items()}
    assert all(float(t.weight.abs().max()) == 0 for t in tables.values())  # starts as the model without it
    base = model(batch.dense, batch.sparse, batch.sequence)
    with torch.no_grad():
        for t in tables.values():
            t.weight.copy_(torch.randn_like(t.weight))
    wide = model(batch.dense, batch.sparse, batch.sequence) - base  # (B, 1)
    u, item = torch.tensor([1, 2, 3, 4]), torch.tensor([3, 4, 5, 6])  # the rows' ids (write)
    expected = tables["wide_u"].weight[u, :1] + tables["wide_item"].weight[item, :1]  # task 0's column
    torch.testing.assert_close(wide, expected)
    loss, _ = RankingTrainWrapper(model.train())(batch)
    loss.backward()
    assert tables["wide_item"].weight.grad is not None
