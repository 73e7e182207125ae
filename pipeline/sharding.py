"""Shard a RankingModel: TorchRec's planner chooses a plan within the config's constraints, then
`DistributedModelParallel` shards the embedding tables and wraps every other module in DDP.

The model never knows it is distributed (torchtitan's `parallelize(model, config)` shape): `train_loop`
builds it on the meta device and hands it here.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.mc_embedding_modules import BaseShardedManagedCollisionEmbeddingCollection
from torchrec.distributed.mc_embeddingbag import ManagedCollisionEmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.types import KernelConfig, PlannerError, Topology, TopologyFactory
from torchrec.distributed.planner.types import TrainerConfig as PlannerTrainerConfig
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import CacheParams, ShardingPlan, ShardingType
from torchrec.sparse.jagged_tensor import JaggedTensor

from data.schema import Schema
from models.dense_arch import DenseArch
from models.ranking import RankingModel
from pipeline.config import ShardingConfig
from pipeline.dist import DistInfo

log = logging.getLogger(__name__)

_TYPES = {t.value: t.value for t in ShardingType}


def _check_types(where: str, types: list[str]) -> list[str]:
    bad = [t for t in types if t not in _TYPES]
    if bad or not types:
        raise ValueError(f"{where}: unknown or empty sharding type(s) {bad} (known: {sorted(_TYPES)})")
    return list(types)


_KERNELS = {k.value for k in EmbeddingComputeKernel}


def compute_kernels(cfg: ShardingConfig) -> list[str]:
    """`sharding.compute_kernels`, checked; default fused: the table in HBM (host RAM on CPU), its optimizer
    in the backward (plus `dense` for data_parallel tables, their only kernel). TorchRec would otherwise
    also weigh its non-fused `dense` kernel for sharded tables."""
    kernels = list(cfg.compute_kernels) or [EmbeddingComputeKernel.FUSED.value]
    bad = [k for k in kernels if k not in _KERNELS]
    if bad:
        raise ValueError(f"sharding.compute_kernels: unknown kernel(s) {bad} (known: {sorted(_KERNELS)})")
    return kernels


def planner_constraints(
    cfg: ShardingConfig, table_names: list[str], device_type: str, zch_tables: set[str] | None = None
) -> dict[str, ParameterConstraints]:
    """Per-table `ParameterConstraints` from `sharding.types`, `sharding.per_table` and the kernels.

    On CPU, row_wise is used only for the tables `sharding.per_table` names it for: offered everywhere,
    TorchRec's CPU cost model puts every table row-wise, a plan nobody has tuned on CPU."""
    kernels = compute_kernels(cfg)
    caching = EmbeddingComputeKernel.FUSED_UVM_CACHING.value in kernels
    if caching and not 0.0 < cfg.cache_load_factor <= 1.0:
        raise ValueError(f"sharding.cache_load_factor={cfg.cache_load_factor}: must be in (0, 1]")
    default = _check_types("sharding.types", list(cfg.types))
    if device_type == "cpu":
        default = [t for t in default if t != ShardingType.ROW_WISE.value] or default
    unknown = sorted(set(cfg.per_table) - set(table_names))
    if unknown:
        raise ValueError(f"sharding.per_table: unknown table(s) {unknown} (tables: {sorted(table_names)})")
    types = {
        name: _check_types(f"sharding.per_table.{name}", list(cfg.per_table[name]))
        if name in cfg.per_table
        else default
        for name in table_names
    }
    zch_tables = zch_tables or set()
    for name in sorted(zch_tables & set(cfg.per_table)):
        if cfg.per_table[name] != [ShardingType.ROW_WISE.value]:
            raise ValueError(
                f"sharding.per_table.{name}: a zch table shards row-wise only (TorchRec's managed-collision "
                f"sharding), got {cfg.per_table[name]}"
            )
    for name in zch_tables:  # row-wise, on the fused kernel (the CPU cost model knows no other for them)
        types[name] = [ShardingType.ROW_WISE.value]
    dp = ShardingType.DATA_PARALLEL.value
    return {
        name: ParameterConstraints(
            sharding_types=types[name],
            # a data_parallel table is a replicated dense parameter: TorchRec's dense kernel only
            compute_kernels=(
                [EmbeddingComputeKernel.FUSED.value]
                if name in zch_tables
                else kernels + ["dense"]
                if dp in types[name] and not cfg.compute_kernels
                else kernels
            ),
            cache_params=CacheParams(load_factor=cfg.cache_load_factor) if caching else None,
        )
        for name in table_names
    }


def topology(cfg: ShardingConfig, info: DistInfo) -> Topology:
    """The planner's view of the job's hardware: world, device type, and the memory per rank it may fill
    (`sharding.hbm_gib` / `ddr_gib`, else measured: the GPU's total memory, the host's RAM over its local
    ranks). TorchRec's planner otherwise assumes 32 GiB of HBM and 128 GiB of host RAM per rank."""
    hbm = cfg.hbm_gib * 2**30 if cfg.hbm_gib is not None else device_memory_bytes(info.device)
    ddr = cfg.ddr_gib * 2**30 if cfg.ddr_gib is not None else host_memory_bytes() // info.local_world_size
    return TopologyFactory.create_topology(
        PlannerTrainerConfig(
            world_size=info.world_size,
            local_world_size=info.local_world_size,
            hbm_cap_bytes=int(hbm) if hbm else None,
            ddr_cap_bytes=int(ddr),
        ),
        kernel_config=KernelConfig(compute_device=info.device.type),
    )


def device_memory_bytes(device: torch.device) -> int | None:
    """The total memory of a CUDA device; None elsewhere (the planner places CPU tables in host RAM)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class RowWiseOnCPUEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """TorchRec's bag sharder, also offering row_wise on CPU.

    TorchRec 1.8 offers row-wise bags only on CUDA, yet its row-wise path (FBGEMM's CPU block bucketize,
    gloo reduce-scatter of the pooled rows) trains correctly on CPU: a 2-rank row-wise run's losses equal
    the table-wise run's (tests/test_reliability.py), which CPU clusters need to split a table larger than
    one host. The unpooled counterpart, TorchRec's EmbeddingCollection sharder, offers row_wise everywhere.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        row_wise = ShardingType.ROW_WISE.value
        return types + [row_wise] if compute_device_type == "cpu" and row_wise not in types else types


class OrderedEnumerator(EmbeddingEnumerator):
    """TorchRec's enumerator, offering a table's sharding types and kernels in the config's order.

    TorchRec 1.8 intersects the constraint's types with the sharder's as Python sets, so their order, and
    with it the planner's pick among plans of equal cost (a table_wise table vs. its single column_wise
    shard), follows the process's string-hash seed: `python launch/plan.py --world-size 2 --device cpu`
    printed 22 column_wise tables in one run and 0 in the next. Here the first type listed in
    `sharding.types` (or per_table) wins a tie, every run."""

    def _filter_sharding_types(self, name: str, allowed_sharding_types: list[str], *args: Any) -> list[str]:
        kept = set(super()._filter_sharding_types(name, allowed_sharding_types, *args))
        constraint = (self._constraints or {}).get(name)
        order = (constraint.sharding_types if constraint else None) or allowed_sharding_types
        return [t for t in dict.fromkeys([*order, *allowed_sharding_types]) if t in kept]

    def _filter_compute_kernels(self, name: str, allowed_compute_kernels: list[str], *args: Any) -> list[str]:
        kept = set(super()._filter_compute_kernels(name, allowed_compute_kernels, *args))
        constraint = (self._constraints or {}).get(name)
        order = (constraint.compute_kernels if constraint else None) or allowed_compute_kernels
        return [k for k in dict.fromkeys([*order, *allowed_compute_kernels]) if k in kept]


def make_planner(
    cfg: ShardingConfig,
    info: DistInfo,
    table_names: list[str],
    batch_size: int,
    zch_tables: set[str] | None = None,
) -> Any:
    """TorchRec's planner for this job's tables on its topology (`topology`), within the config's
    constraints (`planner_constraints`), deterministic (`OrderedEnumerator`)."""
    topo = topology(cfg, info)
    constraints = planner_constraints(cfg, table_names, info.device.type, zch_tables)
    return EmbeddingShardingPlanner(
        topology=topo,
        batch_size=batch_size,
        constraints=constraints,
        enumerator=OrderedEnumerator(topology=topo, batch_size=batch_size, constraints=constraints),
    )


def sharders() -> list:
    """TorchRec's default sharders, with the bag sharder that also shards row-wise on CPU, and the
    managed-collision bags' sharder built on it (its row-wise-only sharding would find no type on CPU)."""
    bags = RowWiseOnCPUEmbeddingBagCollectionSharder
    out = [bags() if type(s) is EmbeddingBagCollectionSharder else s for s in get_default_sharders()]
    out = [s for s in out if not isinstance(s, ManagedCollisionEmbeddingBagCollectionSharder)]
    return [*out, ManagedCollisionEmbeddingBagCollectionSharder(ebc_sharder=bags())]


def size_zch_history(dmp: DistributedModelParallel, schema: Schema, batch_size: int, world_size: int) -> None:
    """Size each managed-collision module's id history for the most ids one training step can route to a
    rank (batch x ranks x the table's features, a sequence feature counting max_len). TorchRec sizes it
    from the first batch it sees and silently drops the ids of a later, larger batch beyond it: they would
    never get a row."""
    per_row: dict[str, int] = {}
    for f in (*schema.sparse, *schema.sequence_features):
        if f.zch is not None:
            n = schema.sequence.max_len if f in schema.sequence_features else 1  # type: ignore[union-attr]
            per_row[f.table_name] = per_row.get(f.table_name, 0) + n
    collection = ranking_model(dmp).sparse_arch.zch_bags._managed_collision_collection
    for table, module in collection._managed_collision_modules.items():
        n = batch_size * world_size * per_row[table]
        ids = torch.empty(n, dtype=torch.int64, device=module.device)
        module._init_history_buffers({table: JaggedTensor(values=ids, lengths=torch.tensor([n]))})


def _evict_and_reset_optimizer_state(self: Any, evictions_per_table: dict[str, torch.Tensor | None]) -> None:
    """Evicted (and newly admitted) rows of a sharded managed-collision table start fresh: the table's
    init function for the row and zeros for its fused optimizer state. Replaces TorchRec 1.8's
    `_evict`, which keeps exact Adagrad's accumulator (a new id inherits the evicted one's squared-gradient
    sum) and, for row-wise Adagrad, calls a kernel FBGEMM has only on CUDA (a CPU job fails at the first
    step). Private API: check it on each TorchRec upgrade (tests/test_zch.py fails if it changes)."""
    for table, rows in evictions_per_table.items():
        if rows is None or rows.numel() == 0:
            continue
        tbe, index = self._table_to_tbe_and_index[table]
        cache = self.__dict__.setdefault("_tbe_index_of_table", {})  # .item() once per table, not per step
        i = cache[table] = cache[table] if table in cache else int(index.item())
        rows = rows.long()
        with torch.no_grad():
            weight = tbe.split_embedding_weights()[i]  # this rank's shard, a view into the TBE
            init_fn = self._embedding_module._table_name_to_config[table].init_fn
            weight[rows] = init_fn(weight[rows].clone()).to(weight.dtype)
            for state in tbe.get_optimizer_state()[i].values():
                state[rows] = 0


BaseShardedManagedCollisionEmbeddingCollection._evict = _evict_and_reset_optimizer_state


def plan_table(plan: ShardingPlan) -> str:
    """The plan as a fixed-width table: one row per embedding table."""
    rows = [("module", "table", "sharding", "kernel", "ranks", "shard sizes")]
    for module_path, module_plan in sorted(plan.plan.items()):
        for table, ps in sorted(module_plan.items()):  # type: ignore[union-attr]
            sizes = ""
            if ps.sharding_spec is not None:
                sizes = " ".join("x".join(map(str, s.shard_sizes)) for s in ps.sharding_spec.shards)
            rows.append(
                (
                    module_path,
                    table,
                    ps.sharding_type,
                    ps.compute_kernel,
                    ",".join(map(str, ps.ranks or [])),
                    sizes,
                )
            )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows)


_TOO_LARGE_HINT = (
    "; for tables larger than HBM: sharding.compute_kernels=[fused,fused_uvm_caching], "
    "model.table_dtype=fp16, optim.sparse.type=rowwise_adagrad"
)


def no_plan_error(cfg: ShardingConfig, device_type: str, e: BaseException) -> ValueError:
    """The planner's failure as one line with the constraints it had (and what to try when out of memory)."""
    first = str(e).strip().splitlines()[0].strip() if str(e).strip() else type(e).__name__
    hint = _TOO_LARGE_HINT if "insufficient storage" in first and device_type == "cuda" else ""
    return ValueError(
        f"sharding: no plan for sharding.types={cfg.types} per_table={cfg.per_table} "
        f"compute_kernels={compute_kernels(cfg)} on {device_type}: {first}{hint}"
    )


def shard_model(
    model: nn.Module, schema_tables: list[str], cfg: ShardingConfig, info: DistInfo, batch_size: int
) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Plan (rank 0 plans, all ranks receive it) and shard `model` (built on the meta device)."""
    planner = make_planner(cfg, info, schema_tables, batch_size, model_zch_tables(model))
    model_sharders = sharders()
    try:
        plan = planner.collective_plan(model, model_sharders, dist.GroupMember.WORLD)
    except (PlannerError, RuntimeError) as e:  # e.g. a table too large for any allowed sharding type
        raise no_plan_error(cfg, info.device.type, e) from None
    if info.is_main:
        log.info("sharding plan (world size %d):\n%s", info.world_size, plan_table(plan))
        replicated = sorted(
            table
            for module_plan in plan.plan.values()
            for table, ps in module_plan.items()  # type: ignore[union-attr]
            if ps.sharding_type == ShardingType.DATA_PARALLEL.value
        )
        if replicated:  # TorchRec's data_parallel tables take no fused optimizer: DDP and the dense one
            log.warning("data_parallel tables %s train with the dense optimizer (optim.dense), not "
                        "optim.sparse", replicated)  # fmt: skip
    dmp = DistributedModelParallel(module=model, device=info.device, plan=plan, sharders=model_sharders)
    return dmp, plan


def table_names(model: RankingModel) -> list[str]:
    """Every embedding table of the model: the sharding plan's tables."""
    return model.sparse_arch.table_names()


def model_zch_tables(model: nn.Module) -> set[str]:
    """The managed-collision tables of a RankingModel (or the wrapper around one)."""
    inner = getattr(model, "model", model)
    return inner.sparse_arch.zch_tables if isinstance(inner, RankingModel) else set()


def ranking_model(dmp: DistributedModelParallel) -> RankingModel:
    """The RankingModel inside DMP(RankingTrainWrapper(...)), as `build_model` wraps it."""
    return dmp.module.model


def dense_arch(dmp: DistributedModelParallel) -> DenseArch:
    return ranking_model(dmp).dense_arch
