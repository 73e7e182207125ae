"""Distribution proven with 2 real gloo processes: the planner's table-wise plan puts every table on exactly
one rank, and the sharded model (DMP: sharded tables + DDP dense) computes what the unsharded model computes
on the same global batch -- loss, dense gradients and the embedding update of one fused Adagrad step."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data.batch import RecBatch
from data.schema import Schema
from models.config import ModelConfig
from models.ranking import RankingModel, RankingTrainWrapper
from models.rankmixer import RankMixerConfig
from pipeline.config import ShardingConfig, SparseOptimConfig

MODEL = ModelConfig(dense=RankMixerConfig(num_tokens=4, dim=16, num_layers=2, ffn_mult=2))
CAPS = {"user_id": 60, "item_id": 80, "tags": 30, "seq_item": 80}
B = 16  # rows per rank
LR = 0.05


def global_batch(rows: slice) -> RecBatch:
    """A fixed batch of 2*B rows; `rows` picks the rows of one rank (or all of them)."""
    g = torch.Generator().manual_seed(0)
    n = 2 * B
    lens = {
        "user_id": torch.ones(n, dtype=torch.long),
        "item_id": torch.ones(n, dtype=torch.long),
        "tags": torch.randint(0, 4, (n,), generator=g),
        "seq_item": torch.randint(0, 9, (n,), generator=g),
    }
    vals = {k: torch.randint(0, CAPS[k], (int(v.sum()),), generator=g) for k, v in lens.items()}
    dense, labels = torch.rand(n, 2, generator=g) * 5, torch.randint(0, 2, (n, 2), generator=g).float()
    keys, lengths, values = list(CAPS), [], []
    for k in keys:
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens[k].cumsum(0)])
        lengths.append(lens[k][rows])
        values.append(vals[k][offsets[rows.start] : offsets[rows.stop]])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
    m = labels[rows].shape[0]
    return RecBatch(
        dense=dense[rows],
        sparse=kjt,
        labels=labels[rows],
        user_id=torch.arange(m),
        mask=torch.ones(m, dtype=torch.bool),
        weight=torch.ones(m),
    )


def deterministic_table(rows: int, cols: int, row0: int = 0, col0: int = 0) -> torch.Tensor:
    r = torch.arange(row0, row0 + rows, dtype=torch.float32).unsqueeze(1)
    c = torch.arange(col0, col0 + cols, dtype=torch.float32).unsqueeze(0)
    return 0.1 * torch.sin(0.37 * r + 1.3 * c)  # the same value for a cell, whichever rank holds it


def dense_grads(model: torch.nn.Module) -> dict[str, list]:
    return {
        n.replace("module.", "").replace("_dmp_wrapped_module.", ""): p.grad.flatten().tolist()
        for n, p in model.named_parameters()
        if p.grad is not None and "embedding_bags" not in n
    }


def _rank(rank: int, world: int, store: str, out: str, schema_dict: dict) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world)
    )
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from pipeline.dist import init_distributed
    from pipeline.optim import fuse_sparse_optimizer
    from pipeline.sharding import shard_model, table_names

    info = init_distributed()
    schema = Schema.from_dict(schema_dict)
    torch.manual_seed(0)  # dense init identical to the reference's
    model = RankingModel(schema, MODEL, device=torch.device("meta"))
    wrapper = RankingTrainWrapper(model)
    fuse_sparse_optimizer(model.sparse_arch, SparseOptimConfig(lr=LR, eps=1e-8))
    dmp, plan = shard_model(wrapper, table_names(model), ShardingConfig(types=["table_wise"]), info, B)

    owners = {t: list(ps.ranks) for t, ps in plan.plan["model.sparse_arch.embedding_bag_collection"].items()}
    held = []
    for name, tensor in dmp.state_dict().items():
        if "embedding_bags" in name and hasattr(tensor, "local_shards"):
            table = name.split("embedding_bags.")[1].split(".")[0]
            for shard in tensor.local_shards():
                held.append(table)
                off = shard.metadata.shard_offsets
                shard.tensor.copy_(deterministic_table(*shard.tensor.shape, off[0], off[1]))
    loss, _ = dmp(global_batch(slice(rank * B, (rank + 1) * B)))
    loss.backward()  # DDP averages dense grads; the fused Adagrad steps the tables inside backward
    updated = {}
    for name, tensor in dmp.state_dict().items():
        if "embedding_bags" in name and hasattr(tensor, "local_shards"):
            for shard in tensor.local_shards():
                updated[name.split("embedding_bags.")[1].split(".")[0]] = shard.tensor.tolist()
    losses = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(losses, loss.detach().reshape(1))
    Path(out, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "owners": owners,
                "held": held,
                "loss": float(torch.cat(losses).mean()),
                "grads": dense_grads(dmp),
                "tables": updated,
            }
        )
    )
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory, two_table_schema: Schema) -> list[dict]:
    out = tmp_path_factory.mktemp("sharded")
    args = (2, str(out / "store"), str(out), two_table_schema.to_dict())
    mp.start_processes(_rank, args=args, nprocs=2, join=True, start_method="spawn")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_table_wise_plan_puts_every_table_on_exactly_one_rank(sharded: list[dict]):
    owners = sharded[0]["owners"]
    assert owners == sharded[1]["owners"]  # one plan, agreed by all ranks
    assert sorted(owners) == ["item", "tags", "user_id"]
    assert all(len(ranks) == 1 for ranks in owners.values()), owners
    for rank in (0, 1):  # a rank holds exactly the tables planned on it
        assert sorted(sharded[rank]["held"]) == sorted(t for t, r in owners.items() if r == [rank])
    assert {r[0] for r in owners.values()} == {0, 1}  # the planner used both ranks


def test_sharded_model_matches_unsharded_model_on_the_same_batch(
    sharded: list[dict], two_table_schema: Schema
):
    torch.manual_seed(0)
    schema = two_table_schema
    # Tables on meta first, as in the sharded job, so the dense init draws the same random numbers.
    model = RankingTrainWrapper(RankingModel(schema, MODEL, device=torch.device("meta")))
    model.model.sparse_arch.to_empty(device="cpu")
    tables = model.model.sparse_arch.embedding_bag_collection.embedding_bags
    with torch.no_grad():
        for bag in tables.values():
            bag.weight.copy_(deterministic_table(*bag.weight.shape))
    before = {t: bag.weight.detach().clone() for t, bag in tables.items()}
    # Global-batch loss = mean of the two ranks' losses (equal batch sizes): the loss DDP differentiates.
    loss_a, _ = model(global_batch(slice(0, B)))
    loss_b, _ = model(global_batch(slice(B, 2 * B)))
    loss = (loss_a + loss_b) / 2
    loss.backward()
    assert sharded[0]["loss"] == pytest.approx(loss.item(), abs=1e-5)
    grads = dense_grads(model)
    for rank in (0, 1):
        assert sorted(sharded[rank]["grads"]) == sorted(grads)
        for name, g in grads.items():
            assert sharded[rank]["grads"][name] == pytest.approx(g, abs=1e-5), name
    # One Adagrad step from a zero accumulator moves each touched weight by lr * g / (|g| + eps), which
    # does not depend on the gradient's scale, so the sharded update (a sum of per-rank mean-loss
    # gradients) must match the reference's update from the global mean loss.
    for table, bag in tables.items():
        g = bag.weight.grad
        expected = before[table] - LR * g / (g.abs() + 1e-8)
        held = [s["tables"][table] for s in sharded if table in s["tables"]]
        assert len(held) == 1, table
        got = torch.tensor(held[0])
        touched = g.abs() > 1e-6  # skip cells whose step depends on eps
        assert torch.allclose(got[touched], expected[touched], atol=1e-4), table
        assert torch.equal(got[g == 0], before[table][g == 0]), table
        assert not math.isclose(float(got.sum()), float(before[table].sum()))


def test_a_gpu_job_group_carries_cpu_tensors_through_gloo_and_cuda_ones_through_nccl():
    """NCCL alone refuses CPU tensors, and the job's bookkeeping collectives (predict's row count, the
    evaluation statistics, object broadcasts) use CPU tensors: a CUDA job's group has both backends."""
    from pipeline.dist import backend_for

    assert backend_for(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert backend_for(torch.device("cpu")) == "gloo"


def test_the_planner_sees_the_configured_memory_and_kernels():
    from torchrec.distributed.types import CacheParams

    from pipeline.dist import DistInfo
    from pipeline.sharding import planner_constraints, topology

    info = DistInfo(0, 0, 8, 8, torch.device("cuda", 0), "cpu:gloo,cuda:nccl")
    storage = topology(ShardingConfig(hbm_gib=80, ddr_gib=256), info).devices[0].storage
    assert (storage.hbm, storage.ddr) == (80 * 2**30, 256 * 2**30)  # TorchRec alone assumes 32 / 128 GiB
    default = planner_constraints(ShardingConfig(), ["t"], "cuda")["t"]
    assert default.compute_kernels == ["fused"] and default.cache_params is None
    caching = ShardingConfig(compute_kernels=["fused", "fused_uvm_caching"], cache_load_factor=0.1)
    assert planner_constraints(caching, ["t"], "cuda")["t"].cache_params == CacheParams(load_factor=0.1)
    replicated = ShardingConfig(types=["data_parallel"])  # its only kernel is the dense one
    assert planner_constraints(replicated, ["t"], "cuda")["t"].compute_kernels == ["fused", "dense"]
    with pytest.raises(ValueError, match=r"sharding.compute_kernels: unknown kernel\(s\) \['fast'\]"):
        planner_constraints(ShardingConfig(compute_kernels=["fast"]), ["t"], "cuda")
    with pytest.raises(ValueError, match="sharding.cache_load_factor=0.0: must be in"):
        planner_constraints(
            ShardingConfig(compute_kernels=["fused_uvm_caching"], cache_load_factor=0.0), ["t"], "cuda"
        )


def test_the_plan_does_not_depend_on_the_string_hash_seed():
    """TorchRec's enumerator orders a table's sharding types as a Python set; under PYTHONHASHSEED=0 it
    planned make train's tables column_wise on 2 CPU ranks, under other seeds table_wise."""
    import subprocess
    import sys

    cmd = [sys.executable, "launch/plan.py", "--world-size", "2", "--device", "cpu"]
    root = Path(__file__).resolve().parents[1]
    procs = [  # side by side: each is a process start and a TorchRec import
        subprocess.Popen(
            cmd, cwd=root, env={**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for seed in ("0", "1")
    ]  # fmt: skip
    plans = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-2000:]
        plans.append([line.split()[2] for line in stdout.splitlines() if line.startswith("model.")])
    assert plans[0] == plans[1] and set(plans[0]) == {"table_wise"}, plans


def test_production_sized_tables_are_split_on_32_gib_gpus_and_not_on_80():
    from omegaconf import OmegaConf

    from launch.configs import compose_train
    from launch.plan import plan_report, scaled_schema

    def plan_of(hbm_gib: int) -> dict[str, str]:
        cfg = compose_train(["model=rankmixer_100m", "data.batch_size=8192", f"sharding.hbm_gib={hbm_gib}"])
        cfg.data.schema = scaled_schema(OmegaConf.to_container(cfg.data.schema, resolve=True), 10_000)
        report = plan_report(OmegaConf.to_object(cfg), 8, 8, "cuda")
        return {r.split()[1]: r.split()[2] for r in report.splitlines() if r.startswith("model.")}

    # item_id: 500M x 16 fp32 rows + exact Adagrad's state = 59.6 GiB
    assert plan_of(80)["item_id"] in ("table_wise", "column_wise")  # one shard, on one GPU
    assert plan_of(32)["item_id"] == "row_wise"
