"""Managed collisions (schema `zch:`): raw 64-bit ids through TorchRec's managed-collision bags. The schema
rules, the generator's raw ids, an evicted row starting fresh (embedding and fused Adagrad state) on a real
sharded model, and a 2-rank `torchrun launch/train.py` on raw ids resumed exactly, whose export and
Predictor map ids as the trained model does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import RecBatch
from data.build.generate import GenParams, generate
from data.schema import Schema, SchemaError
from models.config import model_config_class
from pipeline.config import DataConfig, TrainConfig
from pipeline.job import build_model
from tests.conftest import ROOT

RAW_CONFIG = ROOT / "conf" / "data" / "synthetic_raw.yaml"
TINY = {
    "name": "z",
    "labels": ["y"],
    "user_id": "uid",
    "groups": ["g"],
    "dense": [{"name": "d", "group": "g"}],
    "sparse": [
        {"name": "u", "num_embeddings": 10, "embedding_dim": 4, "group": "g"},
        {"name": "z", "num_embeddings": 4, "embedding_dim": 4, "group": "g", "zch": {"eviction": "lfu"}},
    ],
}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"hash": True}, r"sparse\[1\]\.zch: zch and hash: true exclude each other"),
        ({"multi_hot": True}, r"sparse\[1\]\.zch: managed collisions take single-valued features"),
        ({"zch": {"eviction": "fifo"}}, r"sparse\[1\]\.zch\.eviction"),
        ({"zch": {"evict": "lru"}}, r"sparse\[1\]\.zch\.evict: unknown key"),
    ],
)
def test_zch_schema_mistakes_are_one_line_naming_the_key(change: dict, expected: str):
    bad = json.loads(json.dumps(TINY))
    bad["sparse"][1].update(change)
    with pytest.raises(SchemaError, match=expected):
        Schema.from_dict(bad)
    shared = json.loads(json.dumps(TINY))  # a second feature on the zch table must say zch too
    shared["sparse"].append(
        {"name": "z2", "num_embeddings": 4, "embedding_dim": 4, "group": "g", "table": "z"}
    )
    with pytest.raises(SchemaError, match=r"sparse\[2\]\.zch: table 'z' is shared with"):
        Schema.from_dict(shared)


def test_raw_id_data_holds_64_bit_ids_far_beyond_the_tables_and_features_of_a_table_agree(tmp_path: Path):
    import yaml

    cfg = yaml.safe_load(RAW_CONFIG.read_text())
    schema = Schema.from_dict(cfg["schema"])
    generate(schema, GenParams.from_dict(cfg["generator"]).scaled(4000), tmp_path / "raw", verbose=False)
    table = pq.read_table(tmp_path / "raw" / "train")
    items, users = table["item_id"].to_numpy(), table["user_id"].to_numpy()
    assert np.abs(items).max() > 2**60 and np.abs(users).max() > 2**60  # raw 64-bit hashes
    assert len(np.unique(items)) > schema.tables()["item_id"]["num_embeddings"] // 8
    # the candidate item and the sequence's items share the item table: one id space
    seq = np.concatenate(table["seq_item_id"].to_numpy(zero_copy_only=False))
    assert len(np.intersect1d(seq, items)) > 100
    assert table["author_id"].to_numpy().max() < 1000  # a table without zch keeps its ids


def _batch(z: list[int]) -> RecBatch:
    ids = torch.tensor([1, 2, 3, 4, *z])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["u", "z"], values=ids, lengths=torch.ones(8, dtype=torch.long)
    )
    labels = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    return RecBatch(
        torch.ones(4, 1), kjt, labels, torch.arange(4), torch.ones(4, dtype=torch.bool), torch.ones(4)
    )


def test_an_evicted_row_starts_fresh_with_a_new_embedding_and_no_adagrad_state(one_rank_group):
    cfg = TrainConfig(data=DataConfig(schema=TINY, batch_size=4), model=model_config_class("dlrm")())
    dmp, optimizer = build_model(cfg, Schema.from_dict(TINY), one_rank_group, total_steps=10)
    weight_key = "model.sparse_arch.zch_bags._embedding_module.embedding_bags.z.weight"
    module = dmp.module.model.sparse_arch.zch_bags._managed_collision_collection._managed_collision_modules[
        "z"
    ]

    def local(tensor: torch.Tensor) -> torch.Tensor:
        return (tensor.local_shards()[0].tensor if hasattr(tensor, "local_shards") else tensor).clone()

    def state() -> tuple[torch.Tensor, torch.Tensor]:  # (Adagrad sum (4, 4), weight (4, 4))
        (sums,) = dmp.fused_optimizer.state_dict()["state"][weight_key].values()
        return local(sums), local(dmp.state_dict()[weight_key])

    def rows(ids: list[int]) -> list[int]:  # the module's mapping; -1: not in the table
        sorted_ids, mapping, query = (
            module._mch_sorted_raw_ids,
            module._mch_remapped_ids_mapping,
            torch.tensor(ids),
        )
        pos = torch.searchsorted(sorted_ids[:-1], query)
        return torch.where(sorted_ids[pos] == query, mapping[pos], -1).tolist()

    dmp.train()
    for _ in range(2):  # 3 usable rows (the 4th is the default row), all taken and trained
        loss, _ = dmp(_batch([10**15, -(10**15), 2**62, 10**15]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    before_rows = rows([10**15, -(10**15), 2**62, 7])
    assert sorted(before_rows[:3]) == [0, 1, 2] and before_rows[3] == -1
    sums, weight = state()
    assert (sums[:3].abs().sum(1) > 0).all()
    dmp(_batch([7, 7, 7, 7]))  # 7 outnumbers the once-seen ids: LFU evicts one of them for it
    after_rows = rows([10**15, -(10**15), 2**62, 7])
    new_row = after_rows[3]
    assert new_row in before_rows[1:3] and after_rows[0] == before_rows[0], (before_rows, after_rows)
    sums2, weight2 = state()
    assert float(sums2[new_row].abs().sum()) == 0.0  # the new id does not inherit the evicted one's state
    assert not torch.equal(weight2[new_row], weight[new_row]) and float(weight2[new_row].abs().max()) <= 0.5
    kept = [r for r in range(3) if r != new_row]
    assert torch.equal(sums2[kept], sums[kept]) and torch.equal(weight2[kept], weight[kept])


@pytest.mark.slow
def test_a_two_rank_run_on_raw_ids_resumes_exactly_and_its_export_maps_ids_as_the_model_does(
    tmp_path: Path, predict_in_process
):
    from pipeline.checkpoint import resolve_checkpoint
    from pipeline.export import export
    from pipeline.predictor import Predictor, zch_rows
    from tests.test_train_e2e import losses, ok, run, train_cmd

    data = tmp_path / "data"
    gen = [sys.executable, "-m", "data.build.generate", "--config", str(RAW_CONFIG), "--root", str(data)]
    subprocess.run([*gen, "--rows", "20000", "--seed", "3"], cwd=ROOT, check=True, capture_output=True)
    # checkpoints and log windows every 10 steps: the resumed run's windows are the uninterrupted run's
    args = ("data=synthetic_raw", "trainer.epochs=1", "trainer.checkpoint_every=10", "trainer.keep_last=3")
    full, cut = tmp_path / "full", tmp_path / "cut"
    log = ok(run(train_cmd(data, full, *args, "trainer.max_steps=30")))
    assert "Module 'model.sparse_arch.zch_bags' will be pipelined" in log.stdout + log.stderr
    ok(run(train_cmd(data, cut, *args, "trainer.max_steps=10", "trainer.final_eval=false")))
    ok(run(train_cmd(data, cut, *args, "trainer.max_steps=30", "trainer.resume=auto")))
    assert losses(cut) == losses(full) and sorted(losses(full)) == [
        10,
        20,
        30,
    ]  # the remapping resumed exactly
    test_full = json.loads((full / "metrics.json").read_text())["test"]
    assert json.loads((cut / "metrics.json").read_text())["test"] == test_full

    artifact = tmp_path / "export"
    manifest = export(resolve_checkpoint(str(full)), artifact, parity_rows=512)
    assert manifest["parity"]["max_abs_logit_diff"] <= 1e-5
    # the Predictor (raw ids remapped from the artifact) scores the test split as the checkpoint does on
    # one rank (launch/predict.py's job): both merge the shards' remapping
    predict_in_process(full, data, tmp_path / "pred")
    predictions = pq.read_table(tmp_path / "pred")
    predictor = Predictor(artifact)
    probs = predictor.predict(pq.read_table(data / "test"))
    rows = predictions["row_id"].to_numpy()
    for i, t in enumerate(predictor.tasks):
        np.testing.assert_allclose(probs[rows, i], predictions[f"score_{t}"].to_numpy(), atol=1e-5)
    # the test rows' items: most were trained on and hold rows; an id never seen takes the reserved last row
    item_table = predictor.tables["item_id"]
    size = item_table["weight"].shape[0]
    test_items = torch.from_numpy(pq.read_table(data / "test", columns=["item_id"])["item_id"].to_numpy())
    held = float((zch_rows(item_table, test_items) < size - 1).float().mean())
    assert held > 0.3, held
    assert zch_rows(item_table, torch.tensor([12345, -1])).tolist() == [size - 1, size - 1]
