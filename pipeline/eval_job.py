"""`run_eval(cfg)`: evaluate a checkpoint on N ranks (any N: DCP reshards the tables) and write
`metrics.json` (+ per-rank prediction Parquet files with `save_predictions=true`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist

from data.partitions import split_label
from pipeline.checkpoint import load_checkpoint_into
from pipeline.config import EvalConfig
from pipeline.evaluate import evaluate_inference_modes
from pipeline.files import write_json_atomic
from pipeline.job import build_model, make_reader, open_checkpoint_job

log = logging.getLogger(__name__)


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    info, checkpoint, run_cfg, schema = open_checkpoint_job(cfg.checkpoint, cfg.device)
    # Model and schema as trained; where the data lives and which split come from this job's config.
    run_cfg.data = cfg.data.over(run_cfg.data)
    run_cfg.sharding = cfg.sharding
    dmp, _ = build_model(run_cfg, schema, info)
    load_checkpoint_into(checkpoint, dmp, optimizer=None)
    reader = make_reader(run_cfg, schema, info, cfg.data.split, train=False)
    out_dir = Path(cfg.output) if cfg.output else checkpoint / f"eval_{split_label(cfg.data.split)}"
    preds = out_dir / "predictions" / f"part-{info.rank:05d}.parquet" if cfg.save_predictions else None
    metrics = evaluate_inference_modes(dmp, reader, info.device, list(schema.labels), cfg.max_batches, preds)
    result = {
        "checkpoint": str(checkpoint),
        "split": cfg.data.split,
        "data_root": run_cfg.data.root,
        "world_size": info.world_size,
        **metrics,
    }
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "metrics.json", result)
        log.info("metrics: %s", out_dir / "metrics.json")
    dist.barrier()
    return result
