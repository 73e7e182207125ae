"""Building a job from its config: readers, the sharded model and its optimizer, the run dir. Shared by
training (`pipeline/train_loop.py`) and the eval job (`pipeline/eval_job.py`).

The model is built on the meta device (embedding tables) and the CPU/GPU (everything dense), the tables
are marked for fused Adagrad, then `DistributedModelParallel` shards the tables and wraps the rest in DDP
(pipeline/sharding.py); the dense optimizer is built last, over the parameters DMP leaves to it.
"""

from __future__ import annotations

import logging
import random
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer

from data.partitions import split_files
from data.reader import ParquetReader
from data.schema import Schema
from models.dense_arch import DenseArch
from models.ranking import RankingModel, RankingTrainWrapper
from models.sparse_arch import input_keys
from pipeline.checkpoint import first_line, load_run_config, resolve_checkpoint
from pipeline.config import Autocast, Device, TrainConfig
from pipeline.dist import DistInfo, broadcast_object, describe_job, init_distributed
from pipeline.optim import build_optimizer, fuse_sparse_optimizer, set_initial_accumulator
from pipeline.run_dir import RunDir
from pipeline.run_log import setup_logging
from pipeline.sharding import shard_model, size_zch_history, table_names

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_dtype(mode: Autocast, device: torch.device) -> torch.dtype | None:
    mode = Autocast.parse(mode, "trainer.autocast")
    if mode == Autocast.auto:
        return torch.bfloat16 if device.type == "cuda" else None
    return {Autocast.bf16: torch.bfloat16, Autocast.fp16: torch.float16, Autocast.off: None}[mode]


def make_reader(cfg: TrainConfig, schema: Schema, info: DistInfo, split: str, train: bool) -> ParquetReader:
    d = cfg.data
    return ParquetReader(
        split_files(d.root, split),
        schema,
        batch_size=d.batch_size if train else d.eval_batch_size,
        rank=info.rank,
        world_size=info.world_size,
        shuffle=train,
        shuffle_buffer=d.shuffle_buffer,
        seed=cfg.trainer.seed,
        policy="drop_last" if train else "pad",
        prefetch=d.prefetch,
        workers=d.workers,
        split_keys=input_keys(schema, cfg.model.sequence),  # bag / embedding collection KJTs
        pin_memory=info.device.type == "cuda",
        negative_rate=d.negative_rate if train else 1.0,  # validation and test see every row
    )


def resolve_run_dir(cfg: TrainConfig, info: DistInfo) -> tuple[RunDir, bool]:
    """(the run dir, whether this job created it). Rank 0 names and creates it, every rank uses that name
    (ranks start at slightly different times); a path or URI that cannot be written is one ValueError
    line."""
    name = cfg.trainer.run_dir or f"outputs/train/{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = RunDir.at(broadcast_object(name))
    error = None
    created = not run_dir.exists()
    if info.is_main:
        try:
            run_dir.check_writable()
        except OSError as e:
            error = f"trainer.run_dir={str(run_dir)!r}: cannot write there ({e.strerror or first_line(e)})"
    error = broadcast_object(error)  # every rank stops with the same line, none hangs in a collective
    if error:
        raise ValueError(error)
    return run_dir, created


def build_model(
    cfg: TrainConfig, schema: Schema, info: DistInfo, total_steps: int = 0
) -> tuple[DistributedModelParallel, CombinedOptimizer]:
    """RankingModel (tables on meta, materialised by sharding) -> fused sparse optim -> DMP -> optimizer.
    `total_steps`: the training run's length, where a cosine lr schedule ends (0: not training)."""
    model = RankingModel(schema, cfg.model, torch.device("meta"), cfg.data.negative_rate, info.world_size)
    place_dense_modules(model, info.device)
    autocast = autocast_dtype(cfg.trainer.autocast, info.device)
    wrapper = RankingTrainWrapper(
        model,
        autocast,
        info.device.type,
        embedding_l2=cfg.optim.sparse.l2,
        task_weights=loss_task_weights(schema, cfg.trainer.task_weights),
    )
    fuse_sparse_optimizer(model.sparse_arch, cfg.optim.sparse)
    dmp, _ = shard_model(wrapper, table_names(model), cfg.sharding, info, cfg.data.batch_size)
    if model.sparse_arch.zch_bags is not None:
        size_zch_history(dmp, schema, cfg.data.batch_size, info.world_size)
    optimizer = build_optimizer(dmp, cfg.optim.dense, lr_scales_by_param(model), total_steps)
    set_initial_accumulator(dmp, cfg.optim.sparse.initial_accumulator_value)
    return dmp, optimizer


def loss_task_weights(schema: Schema, weights: dict[str, float]) -> tuple[float, ...]:
    """Each task's weight in the loss (trainer.task_weights: {task: weight}, a task not named weighs 1),
    in schema label order; a misnamed task or a negative weight is one ValueError line."""
    unknown = sorted(set(weights) - set(schema.labels))
    if unknown:
        raise ValueError(
            f"trainer.task_weights: unknown task(s) {unknown} "
            f"(the schema's labels: {', '.join(schema.labels)})"
        )
    out = tuple(float(weights.get(t, 1.0)) for t in schema.labels)
    if any(not w >= 0 for w in out) or not any(w > 0 for w in out):
        raise ValueError(f"trainer.task_weights: weights must be >= 0 and not all 0, got {dict(weights)}")
    return out


def place_dense_modules(model: RankingModel, device: torch.device) -> None:
    """Every module but the sparse arch on the job's device (feature groups, sequence arch, dense arch,
    and whatever the model gains later): DDP refuses parameters spread over devices. The sparse arch's
    tables stay on meta here; sharding materialises them where the plan puts them."""
    for child in model.children():
        if child is not model.sparse_arch:
            child.to(device)
    for name, buffer in model.named_buffers(recurse=False):  # its own (the down-sampling correction)
        model.register_buffer(name, buffer.to(device))


def lr_scales_by_param(model: RankingModel | DenseArch) -> dict[int, float]:
    """The model's dense-lr multipliers (`lr_scales()`) keyed by parameter identity: DMP and DDP prefix
    the names, not the parameters."""
    return {id(model.get_parameter(name)): scale for name, scale in model.lr_scales().items()}


def open_checkpoint_job(
    checkpoint_arg: str, device: Device = Device.auto
) -> tuple[DistInfo, Path, TrainConfig, Schema]:
    """The start of a job that scores with a checkpoint (eval, predict) on `device`: process group and
    logging, the checkpoint (a run dir: its selected one), its training config and schema, the run's seed."""
    info = init_distributed(device, key="device")
    setup_logging(info.rank)
    if info.is_main:
        log.info("%s", describe_job(info))
    checkpoint = resolve_checkpoint(checkpoint_arg)
    run_cfg = load_run_config(checkpoint)
    seed_everything(run_cfg.trainer.seed)
    return info, checkpoint, run_cfg, Schema.from_dict(run_cfg.data.schema)
