"""`train(cfg)`: the whole hybrid-parallel training job, callable from `launch/train.py` and from tests.

Per step, TorchRec's `TrainPipelineSparseDist` overlaps the next batch's input distribution (all-to-all
of IDs) with this batch's forward/backward; embedding tables update inside the backward (fused Adagrad),
dense parameters all-reduce through DDP and step with RMSProp.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from data.reader import ParquetReader
from data.schema import Schema
from models.ranking import RankingModel, RankingTrainWrapper, sequence_settings
from models.sparse_arch import input_keys
from pipeline.checkpoint import CheckpointManager, agree_on_path
from pipeline.config import TrainConfig
from pipeline.dist import DistInfo, broadcast_object, init_distributed
from pipeline.evaluate import activated_flops_per_sample, dense_arch_of, evaluate, evaluate_inference_modes
from pipeline.optim import build_optimizer, fuse_sparse_optimizer, set_initial_accumulator
from pipeline.run_log import RunLog, setup_logging
from pipeline.sharding import shard_model, table_names

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
    if mode not in dtypes:
        raise ValueError(f"trainer.autocast: {mode!r} is not one of auto, bf16, fp16, off")
    return dtypes[mode]


def split_dir(root: str, split: str) -> Path:
    path = Path(root) / split
    if not path.is_dir():
        raise FileNotFoundError(
            f"data: split directory {path} does not exist (data.root={root!r}, "
            f"split={split!r}); build the dataset first, e.g. `make data`"
        )
    return path


def make_reader(cfg: TrainConfig, schema: Schema, info: DistInfo, split: str, train: bool) -> ParquetReader:
    d = cfg.data
    return ParquetReader(
        split_dir(d.root, split),
        schema,
        batch_size=d.batch_size if train else d.eval_batch_size,
        rank=info.rank,
        world_size=info.world_size,
        shuffle=train,
        shuffle_buffer=d.shuffle_buffer,
        seed=cfg.trainer.seed,
        policy="drop_last" if train else "pad",
        prefetch=d.prefetch,
        split_keys=input_keys(schema, sequence_settings(cfg.model)[0]),  # bag / embedding collection KJTs
    )


def resolve_run_dir(cfg: TrainConfig, info: DistInfo) -> Path:
    """Rank 0 names the run dir and every rank uses that name (ranks start at slightly different times)."""
    name = cfg.trainer.run_dir or f"outputs/train/{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(broadcast_object(name))
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return run_dir


@dataclass
class Position:
    """Where training is: global step, epoch, and steps done within that epoch."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


def build_model(cfg: TrainConfig, schema: Schema, info: DistInfo) -> tuple[Any, Any]:
    """RankingModel (tables on meta, materialised by sharding) -> fused sparse optim -> DMP -> optimizer."""
    model = RankingModel(
        schema, cfg.model, dense_proj_dim=cfg.trainer.dense_proj_dim, device=torch.device("meta")
    )
    model.feature_groups.to(info.device)
    model.dense_arch.to(info.device)
    wrapper = RankingTrainWrapper(model, autocast_dtype(cfg.trainer.autocast, info.device), info.device.type)
    fuse_sparse_optimizer(model.sparse_arch, cfg.optim.sparse)
    dmp, _ = shard_model(wrapper, table_names(schema), cfg.sharding, info, cfg.data.batch_size)
    optimizer = build_optimizer(dmp, cfg.optim.dense)
    set_initial_accumulator(dmp, cfg.optim.sparse.initial_accumulator_value)
    return dmp, optimizer


def _reduce_mean(values: torch.Tensor) -> torch.Tensor:
    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train, validate, checkpoint and (optionally) evaluate the test split; returns the final metrics."""
    info = init_distributed()
    setup_logging(info.rank)
    seed_everything(cfg.trainer.seed)
    schema = Schema.from_dict(cfg.data.schema)
    task_names = list(schema.labels)
    # Readers first: they validate the data (files, columns, types) before a run dir is created.
    train_reader = make_reader(cfg, schema, info, cfg.data.train_split, train=True)
    valid_reader = make_reader(cfg, schema, info, cfg.data.valid_split, train=False)
    run_dir = resolve_run_dir(cfg, info)
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    if info.is_main:
        (run_dir / "config.yaml").write_text(config_yaml)
        log.info(
            "run dir: %s (world size %d, %s, backend %s)", run_dir, info.world_size, info.device, info.backend
        )

    dmp, optimizer = build_model(cfg, schema, info)
    dense_params = sum(p.numel() for _, p in in_backward_optimizer_filter(dmp.named_parameters()))
    if info.is_main:
        log.info("dense params: %d; train batches/epoch/rank: %d", dense_params, len(train_reader))

    ckpt = CheckpointManager(run_dir / "checkpoints", info, keep_last=cfg.trainer.keep_last)
    pos = Position()
    resume_from = None
    if cfg.trainer.resume == "auto":
        resume_from = agree_on_path(info, ckpt.latest())
    elif cfg.trainer.resume not in ("none", ""):
        resume_from = Path(cfg.trainer.resume)
    if resume_from is not None:
        meta = ckpt.load(resume_from, dmp, optimizer)
        pos = Position(meta["step"], meta["epoch"], meta["step_in_epoch"])
        if info.is_main:
            log.info(
                "resumed from %s at step %d (epoch %d, step %d in epoch)",
                resume_from,
                pos.step,
                pos.epoch,
                pos.step_in_epoch,
            )

    runlog = RunLog(run_dir, enabled=info.is_main)
    pipeline = TrainPipelineSparseDist(dmp, optimizer, info.device, execute_all_batches=True)
    steps_per_epoch = len(train_reader)
    total_steps = steps_per_epoch * cfg.trainer.epochs
    if cfg.trainer.max_steps >= 0:
        total_steps = min(total_steps, cfg.trainer.max_steps)
    show_bar = info.is_main and cfg.trainer.progress_bar and sys.stderr.isatty()
    bar = tqdm(total=total_steps, initial=pos.step, disable=not show_bar, desc="train")

    def save() -> None:
        ckpt.save(
            pos.step, dmp, optimizer, {"epoch": pos.epoch, "step_in_epoch": pos.step_in_epoch}, config_yaml
        )

    def validate() -> dict[str, float]:
        pipeline.detach()  # plain forward for eval; the next progress() re-attaches the pipeline
        metrics = evaluate(dmp, valid_reader, info.device, task_names, cfg.trainer.eval_max_batches)
        runlog.log("valid", pos.step, metrics)
        if info.is_main:
            log.info("valid step %d: %s", pos.step, _fmt(metrics, task_names))
        return metrics

    profiler = StepProfiler(cfg.trainer.profile_steps, run_dir / "profile", enabled=info.is_main)
    dmp.train()
    window_t, window_steps, window_loss = time.perf_counter(), 0, None
    train_time, train_steps = 0.0, 0
    valid_metrics: dict[str, float] = {}
    while pos.step < total_steps:
        train_reader.set_epoch(pos.epoch)
        if pos.step_in_epoch:
            train_reader.load_state_dict({"epoch": pos.epoch, "batches_yielded": pos.step_in_epoch})
        batches = iter(train_reader)
        while pos.step < total_steps:
            profiler.before_step(pos.step)
            try:
                out = pipeline.progress(batches)
            except StopIteration:
                break
            profiler.after_step(pos.step)
            pos.step += 1
            pos.step_in_epoch += 1
            window_steps += 1
            step_losses = torch.cat([out.task_losses, out.aux_loss.reshape(1)])  # (num_tasks + 1,)
            window_loss = step_losses if window_loss is None else window_loss + step_losses
            bar.update(1)
            if pos.step % cfg.trainer.log_every == 0 or pos.step == total_steps:
                elapsed = time.perf_counter() - window_t
                losses = _reduce_mean(window_loss / window_steps)
                rate = window_steps * cfg.data.batch_size / elapsed
                record = {f"{t}/loss": float(losses[i]) for i, t in enumerate(task_names)}
                record.update(
                    loss=float(losses[:-1].sum()),
                    aux_loss=float(losses[-1]),
                    samples_per_s_per_rank=rate,
                    samples_per_s=rate * info.world_size,
                    epoch=pos.epoch,
                )
                record.update({f"moe/{k}": v for k, v in moe_stats(dmp).items()})
                runlog.log("train", pos.step, record)
                if info.is_main:
                    log.info(
                        "step %d/%d epoch %d loss %.4f (%s) %.0f samples/s (%d ranks)",
                        pos.step,
                        total_steps,
                        pos.epoch,
                        record["loss"],
                        " ".join(f"{t} {record[f'{t}/loss']:.4f}" for t in task_names),
                        record["samples_per_s"],
                        info.world_size,
                    )
                    if "moe/active_ratio" in record:
                        log.info(
                            "  moe: aux loss %.4f, active ratio %.3f, %s",
                            record["aux_loss"],
                            record["moe/active_ratio"],
                            " ".join(f"{k[4:]} {v:.3g}" for k, v in record.items() if "lambda" in k),
                        )
                train_time += elapsed
                train_steps += window_steps
                window_t, window_steps, window_loss = time.perf_counter(), 0, None
            if cfg.trainer.eval_every > 0 and pos.step % cfg.trainer.eval_every == 0:
                train_time += time.perf_counter() - window_t
                train_steps += window_steps
                valid_metrics = validate()
                window_t, window_steps, window_loss = time.perf_counter(), 0, None
            if cfg.trainer.checkpoint_every > 0 and pos.step % cfg.trainer.checkpoint_every == 0:
                save()
        if pos.step_in_epoch >= steps_per_epoch:  # epoch finished (not stopped by max_steps)
            pos.epoch += 1
            pos.step_in_epoch = 0
            if cfg.trainer.eval_every == 0:
                valid_metrics = validate()
            if cfg.trainer.checkpoint_every == 0:
                save()
    bar.close()
    pipeline.detach()
    if not ckpt.latest() or int(ckpt.latest().name.split("_")[1]) != pos.step:
        save()  # always leave a checkpoint of the final state

    summary: dict[str, Any] = {
        "steps": pos.step,
        "epochs": pos.epoch,
        "run_dir": str(run_dir),
        "world_size": info.world_size,
        "dense_params": dense_params,
        "train_samples_per_s": (train_steps * cfg.data.batch_size * info.world_size / train_time)
        if train_time
        else None,
        "train_seconds": train_time,
        "valid": valid_metrics,
    }
    if cfg.trainer.final_eval:
        test_reader = make_reader(cfg, schema, info, cfg.data.split, train=False)
        preds = (
            run_dir / "predictions" / f"part-{info.rank:05d}.parquet"
            if cfg.trainer.save_predictions
            else None
        )
        summary.update(evaluate_inference_modes(dmp, test_reader, info.device, task_names, -1, preds))
        summary["split"] = cfg.data.split
        runlog.log("test", pos.step, summary["test"])
    dense_arch = dense_arch_of(dmp)
    summary["dense_flops_per_sample"] = dense_arch.flops_per_sample()  # every expert, for Sparse-MoE
    summary["activated_flops_per_sample"] = activated_flops_per_sample(
        dense_arch, summary.get("test", {}).get("moe/active_ratio")
    )
    if info.is_main:
        write_json_atomic(run_dir / "metrics.json", summary)
        log.info("metrics: %s", run_dir / "metrics.json")
    runlog.close()
    dist.barrier()
    return summary


class StepProfiler:
    """torch.profiler over the steps [start, end) on one rank: a chrome trace and a top-ops table, to see
    where a training step's time goes (input dist, embedding lookups, dense compute, DDP, optimizer)."""

    def __init__(self, steps: list[int], out_dir: Path, enabled: bool) -> None:
        if steps and (len(steps) != 2 or not 0 <= steps[0] < steps[1]):
            raise ValueError(f"trainer.profile_steps: expected [start, end), 0 <= start < end; got {steps}")
        self.window = steps if enabled else []
        self.out_dir = out_dir
        self.prof: torch.profiler.profile | None = None

    def before_step(self, step: int) -> None:
        if self.window and step == self.window[0]:
            self.prof = torch.profiler.profile(record_shapes=False)
            self.prof.__enter__()

    def after_step(self, step: int) -> None:
        if self.prof is not None and step + 1 == self.window[1]:
            self.prof.__exit__(None, None, None)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.prof.export_chrome_trace(str(self.out_dir / "trace.json"))
            table = self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
            (self.out_dir / "top_ops.txt").write_text(table)
            log.info(
                "profile of steps %s written to %s; top ops by self CPU time:\n%s",
                self.window,
                self.out_dir,
                table,
            )
            self.prof = None


def moe_stats(dmp: torch.nn.Module) -> dict[str, float]:
    """Sparse-MoE routing stats of this rank's last training forward (lambda, active ratio, expert use)."""
    stats = getattr(dense_arch_of(dmp), "moe_stats", None)
    return stats() if callable(stats) else {}


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(value, indent=2, default=float))
    tmp.replace(path)


def _fmt(metrics: dict[str, float], task_names: list[str]) -> str:
    return " | ".join(
        f"{t} auc {metrics[f'{t}/auc']:.4f} uauc {metrics[f'{t}/uauc']:.4f}" for t in task_names
    )
