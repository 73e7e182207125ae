"""`run_eval(cfg)`: evaluate a checkpoint on N ranks (any N: DCP reshards the tables) and write
`metrics.json` (+ per-rank prediction Parquet files with `save_predictions=true`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist

from data.partitions import split_label
from data.storage import display, is_uri, join, write_bytes
from pipeline.checkpoint import load_checkpoint_into
from pipeline.config import EvalConfig
from pipeline.evaluate import evaluate_inference_modes
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
    out_dir = cfg.output or join(checkpoint, f"eval_{split_label(cfg.data.split)}")
    if cfg.save_predictions and is_uri(out_dir):
        raise ValueError(
            f"save_predictions: needs a local output, not {display(out_dir)} (or use launch/predict.py)"
        )
    preds = Path(out_dir) / "predictions" / f"part-{info.rank:05d}.parquet" if cfg.save_predictions else None
    metrics = evaluate_inference_modes(dmp, reader, info.device, list(schema.labels), cfg.max_batches, preds)
    result = {
        "checkpoint": display(checkpoint),
        "split": cfg.data.split,
        "data_root": run_cfg.data.root,
        "world_size": info.world_size,
        **metrics,
    }
    if info.is_main:
        write_bytes(join(out_dir, "metrics.json"), json.dumps(result, indent=2, default=float).encode())
        log.info("metrics: %s", display(join(out_dir, "metrics.json")))
    dist.barrier()
    return result
