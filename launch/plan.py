"""The sharding plan of a train config on a topology that need not be this machine's: TorchRec's planner,
as `launch/train.py` runs it, without sharding anything (no GPU, no process group).

    python launch/plan.py --world-size 8 --device cuda sharding.hbm_gib=80 [train overrides]
    python launch/plan.py --world-size 8 --device cuda --row-scale 10000 sharding.hbm_gib=32 \
        optim.sparse.type=rowwise_adagrad

Prints one row per table shard (sharding type, compute kernel, rank, HBM and host memory) and each rank's
totals against its capacity. `--row-scale` multiplies every table's rows, to see the plan of tables the
size of a production feed's on the built-in schema. A config that cannot be planned is one line.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from omegaconf import OmegaConf

from launch.cli import exit_on_user_error, prepare_launch
from launch.configs import compose_train
from pipeline.config import TrainConfig


def scaled_schema(schema: dict[str, Any], row_scale: float) -> dict[str, Any]:
    """The schema mapping with every table's `num_embeddings` times `row_scale`."""
    out = dict(schema)
    out["sparse"] = [{**f, "num_embeddings": int(f["num_embeddings"] * row_scale)} for f in schema["sparse"]]
    if schema.get("sequence"):
        seq = schema["sequence"]
        out["sequence"] = {
            **seq,
            "features": [
                {**f, "num_embeddings": int(f["num_embeddings"] * row_scale)} for f in seq["features"]
            ],
        }
    return out


def plan_report(cfg: TrainConfig, world_size: int, local_world_size: int, device: str) -> str:
    """The plan of `cfg`'s tables on `world_size` ranks of `device` (the memory: cfg.sharding's), as text."""
    from data.schema import Schema
    from models.ranking import RankingModel, RankingTrainWrapper
    from pipeline.dist import DistInfo
    from pipeline.optim import fuse_sparse_optimizer
    from pipeline.sharding import make_planner, no_plan_error, plan_table, sharders, table_names, topology

    if device == "cuda" and cfg.sharding.hbm_gib is None and not torch.cuda.is_available():
        raise ValueError("--device cuda without a GPU here: give the HBM per rank (sharding.hbm_gib=80)")
    schema = Schema.from_dict(cfg.data.schema)
    info = DistInfo(0, 0, world_size, local_world_size, torch.device(device), backend="none")
    model = RankingModel(schema, cfg.model, device=torch.device("meta"))
    fuse_sparse_optimizer(model.sparse_arch, cfg.optim.sparse)  # optimizer state counts in the storage
    wrapper = RankingTrainWrapper(model, None, device)
    planner = make_planner(
        cfg.sharding, info, table_names(model), cfg.data.batch_size, model.sparse_arch.zch_tables
    )
    capacity = topology(cfg.sharding, info).devices[0].storage
    try:
        plan = planner.plan(wrapper, sharders())
    except Exception as e:  # noqa: BLE001 - the planner's own errors (PlannerError and others): one line
        raise no_plan_error(cfg.sharding, device, e) from None
    hbm, ddr = [0] * world_size, [0] * world_size
    for option in planner._best_plan or []:  # the chosen options, with the planner's storage estimates
        for shard in option.shards:
            hbm[shard.rank] += shard.storage.hbm
            ddr[shard.rank] += shard.storage.ddr
    gib = 2**30
    lines = [
        f"{world_size} ranks ({local_world_size} per host) of {device}; per rank: HBM "
        f"{capacity.hbm / gib:.1f} GiB, host memory {capacity.ddr / gib:.1f} GiB; "
        f"batch {cfg.data.batch_size} per rank; optimizer {cfg.optim.sparse.type}, tables "
        f"{cfg.model.table_dtype}",
        plan_table(plan),
        "rank  HBM GiB  host GiB",
        *(f"{r:<4}  {hbm[r] / gib:7.2f}  {ddr[r] / gib:8.2f}" for r in range(world_size)),
    ]
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--local-world-size", type=int, default=None, help="ranks per host (default: all)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--row-scale", type=float, default=1.0, help="multiply every table's rows by this")
    args, overrides = parser.parse_known_args(argv)
    cfg = compose_train(overrides)
    if args.row_scale != 1.0:
        cfg.data.schema = scaled_schema(OmegaConf.to_container(cfg.data.schema, resolve=True), args.row_scale)
    config: TrainConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    print(plan_report(config, args.world_size, args.local_world_size or args.world_size, args.device))


if __name__ == "__main__":
    prepare_launch()
    main(sys.argv[1:])
