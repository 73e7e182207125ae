"""`run_eval(cfg)`: evaluate a checkpoint on N ranks (any N: DCP reshards the tables) and write
`metrics.json` (+ per-rank prediction Parquet files with `save_predictions=true`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist

from data.schema import Schema
from pipeline.checkpoint import load_checkpoint_into, resolve_checkpoint
from pipeline.config import EvalConfig, TrainConfig, load_train_config
from pipeline.dist import DistInfo, init_distributed
from pipeline.evaluate import evaluate_inference_modes
from pipeline.files import write_json_atomic
from pipeline.job import build_model, make_reader, seed_everything
from pipeline.run_log import setup_logging

log = logging.getLogger(__name__)


def load_run_config(checkpoint: Path) -> TrainConfig:
    """The training config saved inside a checkpoint (model, schema, optimizers)."""
    path = checkpoint / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint}: no config.yaml (not written by launch/train.py?)")
    return load_train_config(path)


def open_checkpoint_job(checkpoint_arg: str) -> tuple[DistInfo, Path, TrainConfig, Schema]:
    """The start of a job that scores with a checkpoint (eval, predict): process group and logging, the
    checkpoint (a run dir: its selected one), its training config and schema, the run's seed."""
    info = init_distributed()
    setup_logging(info.rank)
    checkpoint = resolve_checkpoint(checkpoint_arg)
    run_cfg = load_run_config(checkpoint)
    seed_everything(run_cfg.trainer.seed)
    return info, checkpoint, run_cfg, Schema.from_dict(run_cfg.data.schema)


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    info, checkpoint, run_cfg, schema = open_checkpoint_job(cfg.checkpoint)
    # Model and schema as trained; where the data lives and which split come from this job's config.
    run_cfg.data.root, run_cfg.data.split = cfg.data.root, cfg.data.split
    run_cfg.data.eval_batch_size = cfg.data.eval_batch_size
    run_cfg.sharding = cfg.sharding
    dmp, _ = build_model(run_cfg, schema, info)
    load_checkpoint_into(checkpoint, dmp, optimizer=None)
    reader = make_reader(run_cfg, schema, info, cfg.data.split, train=False)
    out_dir = Path(cfg.output) if cfg.output else checkpoint / f"eval_{cfg.data.split}"
    preds = out_dir / "predictions" / f"part-{info.rank:05d}.parquet" if cfg.save_predictions else None
    metrics = evaluate_inference_modes(dmp, reader, info.device, list(schema.labels), cfg.max_batches, preds)
    result = {
        "checkpoint": str(checkpoint),
        "split": cfg.data.split,
        "world_size": info.world_size,
        **metrics,
    }
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "metrics.json", result)
        log.info("metrics: %s", out_dir / "metrics.json")
    dist.barrier()
    return result
