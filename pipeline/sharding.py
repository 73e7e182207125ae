"""Shard a RankingModel: TorchRec's planner chooses a plan within the config's constraints, then
`DistributedModelParallel` shards the embedding tables and wraps every other module in DDP.

The model never knows it is distributed (torchtitan's `parallelize(model, config)` shape): `train_loop`
builds it on the meta device and hands it here.
"""

from __future__ import annotations

import logging

import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.types import KernelConfig, PlannerError, TopologyFactory
from torchrec.distributed.planner.types import TrainerConfig as PlannerTrainerConfig
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ShardingPlan, ShardingType

from models.dense_arch import DenseArch
from models.ranking import RankingModel
from models.sparse_arch import embedding_bag_configs
from pipeline.config import ShardingConfig
from pipeline.dist import DistInfo

log = logging.getLogger(__name__)

_TYPES = {t.value: t.value for t in ShardingType}


def _check_types(where: str, types: list[str]) -> list[str]:
    bad = [t for t in types if t not in _TYPES]
    if bad or not types:
        raise ValueError(f"{where}: unknown or empty sharding type(s) {bad} (known: {sorted(_TYPES)})")
    return list(types)


def planner_constraints(
    cfg: ShardingConfig, table_names: list[str], device_type: str
) -> dict[str, ParameterConstraints]:
    """Per-table `ParameterConstraints` from `sharding.types` and `sharding.per_table`.

    On CPU, row_wise is used only for the tables `sharding.per_table` names it for: offered everywhere,
    TorchRec's CPU cost model puts every table row-wise, a plan nobody has tuned on CPU."""
    default = _check_types("sharding.types", list(cfg.types))
    if device_type == "cpu":
        default = [t for t in default if t != ShardingType.ROW_WISE.value] or default
    unknown = sorted(set(cfg.per_table) - set(table_names))
    if unknown:
        raise ValueError(f"sharding.per_table: unknown table(s) {unknown} (tables: {sorted(table_names)})")
    return {
        name: ParameterConstraints(
            sharding_types=_check_types(f"sharding.per_table.{name}", list(cfg.per_table[name]))
            if name in cfg.per_table
            else default
        )
        for name in table_names
    }


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


def sharders() -> list:
    """TorchRec's default sharders, with the bag sharder that also shards row-wise on CPU."""
    return [
        RowWiseOnCPUEmbeddingBagCollectionSharder() if type(s) is EmbeddingBagCollectionSharder else s
        for s in get_default_sharders()
    ]


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


def shard_model(
    model: nn.Module, schema_tables: list[str], cfg: ShardingConfig, info: DistInfo, batch_size: int
) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Plan (rank 0 plans, all ranks receive it) and shard `model` (built on the meta device)."""
    topology = TopologyFactory.create_topology(
        PlannerTrainerConfig(world_size=info.world_size, local_world_size=info.local_world_size),
        kernel_config=KernelConfig(compute_device=info.device.type),
    )
    constraints = planner_constraints(cfg, schema_tables, info.device.type)
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, constraints=constraints)
    model_sharders = sharders()
    try:
        plan = planner.collective_plan(model, model_sharders, dist.GroupMember.WORLD)
    except (PlannerError, RuntimeError) as e:  # e.g. a table too large for any allowed sharding type
        raise ValueError(f"sharding: no plan for sharding.types={cfg.types} per_table={cfg.per_table} on "
                         f"{info.device.type}: {str(e).strip().splitlines()[0]}") from None  # fmt: skip
    if info.is_main:
        log.info("sharding plan (world size %d):\n%s", info.world_size, plan_table(plan))
    dmp = DistributedModelParallel(module=model, device=info.device, plan=plan, sharders=model_sharders)
    return dmp, plan


def table_names(schema) -> list[str]:  # noqa: ANN001 - data.schema.Schema
    return [c.name for c in embedding_bag_configs(schema)]


def ranking_model(dmp: DistributedModelParallel) -> RankingModel:
    """The RankingModel inside DMP(RankingTrainWrapper(...)), as `build_model` wraps it."""
    return dmp.module.model


def dense_arch(dmp: DistributedModelParallel) -> DenseArch:
    return ranking_model(dmp).dense_arch
