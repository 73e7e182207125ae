"""`train(cfg)`: the whole hybrid-parallel training job, callable from `launch/train.py` and from tests.

Per step, TorchRec's `TrainPipelineSparseDist` overlaps the next batch's input distribution (all-to-all
of IDs) with this batch's forward/backward; embedding tables update inside the backward (fused Adagrad),
dense parameters all-reduce through DDP and step with RMSProp. Read top to bottom: build the job, resume,
the loop (log, validate, checkpoint), the final checkpoint and test evaluation.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch.profiler import record_function
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from data.metrics.exact import normalized_entropy
from data.metrics.summary import collapsed_tasks, metric_value
from data.reader import ParquetReader
from data.schema import Schema
from data.storage import join
from pipeline.checkpoint import (
    CheckpointError,
    CheckpointManager,
    check_compatible,
    complete_checkpoints,
    first_line,
    load_checkpoint_into,
    read_json,
    resolve_checkpoint,
)
from pipeline.config import TrainConfig
from pipeline.dist import (
    RESTART_RECIPE,
    DistInfo,
    broadcast_object,
    describe_job,
    init_distributed,
    shared_store_restarts,
)
from pipeline.early_stop import EarlyStopping
from pipeline.evaluate import evaluate, evaluate_inference_modes
from pipeline.files import write_json_atomic
from pipeline.job import build_model, loss_task_weights, make_reader, resolve_run_dir, seed_everything
from pipeline.meter import TrainMeter
from pipeline.optim import sparse_state_bytes
from pipeline.profiler import StepProfiler, SyncDebugWindow
from pipeline.run_dir import RunDir
from pipeline.run_log import RunLog, setup_logging
from pipeline.sharding import dense_arch, ranking_model

log = logging.getLogger(__name__)


@dataclass
class Position:
    """Where training is: global step, epoch, and steps done within that epoch."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train, validate, checkpoint and (optionally) evaluate the test split; returns the final metrics."""
    # ---- the job: process group, data, run dir, sharded model + optimizer ----------------------------
    info = init_distributed(cfg.trainer.device)
    setup_logging(info.rank)
    if info.is_main:
        log.info("%s", describe_job(info))
    if info.is_main and shared_store_restarts():
        log.warning(
            "torchrun may restart this group on the previous group's rendezvous store, where a restarted "
            "rank can read a dead peer's address and fail or hang (pytorch#135712); launch restarts as: %s",
            RESTART_RECIPE,
        )
    seed_everything(cfg.trainer.seed)
    schema = Schema.from_dict(cfg.data.schema)
    loss_task_weights(schema, cfg.trainer.task_weights)  # a misnamed task fails before any data is read
    # Readers first: every split's files, columns and types are checked before a run dir is created.
    train_reader = make_reader(cfg, schema, info, cfg.data.train_split, train=True)
    validates = cfg.data.valid_split not in ("", "none")
    if not validates and info.is_main and cfg.trainer.early_stop.patience > 0:
        log.warning(
            "data.valid_split=none: trainer.early_stop.patience=%d has no validation to stop on; the run "
            "trains its steps and the final state is the model",
            cfg.trainer.early_stop.patience,
        )
    valid_reader = make_reader(cfg, schema, info, cfg.data.valid_split, train=False) if validates else None
    test_reader = (
        make_reader(cfg, schema, info, cfg.data.split, train=False) if cfg.trainer.final_eval else None
    )
    run_dir, created = resolve_run_dir(cfg, info)
    ckpt = CheckpointManager(run_dir.checkpoints, info, keep_last=cfg.trainer.keep_last)
    try:
        return _train(cfg, info, schema, train_reader, valid_reader, test_reader, run_dir, ckpt)
    except BaseException:
        # a run dir this job created and that holds no checkpoint is only debris of the failure
        if created and info.is_main and ckpt.latest() is None:
            run_dir.remove_local()
        raise


def _train(
    cfg: TrainConfig,
    info: DistInfo,
    schema: Schema,
    train_reader: ParquetReader,
    valid_reader: ParquetReader | None,
    test_reader: ParquetReader | None,
    run_dir: RunDir,
    ckpt: CheckpointManager,
) -> dict[str, Any]:
    tasks = list(schema.labels)
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    if info.is_main:
        run_dir.pull()  # a remote run dir: the staging mirror of the files a resumed run appends to
    if info.is_main:
        log.info("run dir: %s", run_dir)
    steps_per_epoch = len(train_reader)
    total_steps = steps_per_epoch * cfg.trainer.epochs
    if cfg.trainer.max_steps >= 0:
        total_steps = min(total_steps, cfg.trainer.max_steps)
    dmp, optimizer = build_model(cfg, schema, info, total_steps)
    arch = dense_arch(dmp)
    dense_params = sum(p.numel() for _, p in in_backward_optimizer_filter(dmp.named_parameters()))
    sparse_state = torch.tensor([sparse_state_bytes(dmp)], dtype=torch.float64)
    torch.distributed.all_reduce(sparse_state)  # CPU: the group's gloo side carries it on a GPU job too
    sparse_state_total = int(sparse_state.item())
    if info.is_main:
        log.info(
            "dense params: %d; sparse optimizer state (%s): %.1f MiB on all ranks; batches/epoch/rank: %d",
            dense_params,
            cfg.optim.sparse.type,
            sparse_state_total / 2**20,
            steps_per_epoch,
        )

    # ---- resume (checked against this config before the run dir's config.yaml is rewritten) -----------
    stopper = EarlyStopping(cfg.trainer.early_stop)
    pos, trainer_state = resume(cfg, ckpt, info, dmp, optimizer, config_yaml)
    init_from = warm_start(cfg, info, dmp, optimizer, config_yaml) if not trainer_state else None
    if cfg.data.negative_rate < 1:  # this training split's keep rates (after any load: a new day's data)
        ranking_model(dmp).set_negative_keep_rates(train_reader.negative_keep_rates)
        if info.is_main:
            log.info(
                "negative down-sampling at %g: %d of the split's rows per rank kept; negatives kept per "
                "task: %s; evaluation and serving add log(rate) to each task's logit",
                cfg.data.negative_rate,
                train_reader.num_rows,
                ", ".join(f"{t} {r:.4f}" for t, r in zip(tasks, train_reader.negative_keep_rates)),
            )
    if info.is_main:
        (run_dir.local / "config.yaml").write_text(config_yaml)
    if "early_stop" in trainer_state:
        stopper.load_state_dict(trainer_state["early_stop"])
    select_best = cfg.trainer.early_stop.select_best
    ckpt.keep_step = stopper.best_step if select_best else None
    meter = TrainMeter()
    # training time and steps add up across restarts
    meter.train_seconds = trainer_state.get("train_seconds", 0.0)
    meter.train_steps = trainer_state.get("train_steps", 0)

    def save() -> None:
        if ckpt.latest_step() == pos.step:
            return  # already saved at this step (a validation's best and the epoch's end coincide)
        state = {
            "epoch": pos.epoch,
            "step_in_epoch": pos.step_in_epoch,
            "batch_size": cfg.data.batch_size,
            "train_seconds": meter.train_seconds,
            "train_steps": meter.train_steps,
            "early_stop": stopper.state_dict(),
        }
        if info.is_main:
            # a remote run dir: its log up to this step, before the checkpoint that a resume starts from
            # (a resume drops the records after its checkpoint, never those before it)
            run_dir.push()
        ckpt.save(pos.step, dmp, optimizer, state, config_yaml)

    # ---- the loop -------------------------------------------------------------------------------------
    # a resumed run's log continues from its checkpoint: records written after it (by the run that
    # crashed) are dropped, so metrics.jsonl holds each step once
    runlog = RunLog(run_dir.local, enabled=info.is_main, resume_step=pos.step if trainer_state else None)
    pipeline = TrainPipelineSparseDist(dmp, optimizer, info.device, execute_all_batches=True)

    def validate() -> None:
        if valid_reader is None:  # data.valid_split=none: no model selection (e.g. daily training)
            return
        meter.pause()  # validation time is not training time
        pipeline.detach()  # plain forward for eval
        metrics = evaluate(dmp, valid_reader, info.device, tasks, cfg.trainer.eval_max_batches)
        # Re-attach without restarting the in-flight batch's input dist (progress() would): its dist was
        # already issued and waited on before this validation. A restart swaps in fresh module contexts
        # whose splits nobody waits for, so the sharded EmbeddingCollection's output all-to-all runs with
        # empty splits (gloo: in->size == out->size); pooled bags keep no splits and were unaffected.
        pipeline.attach(sparse_dist=False)
        improved = stopper.update(
            pos.step, metric_value(metrics, cfg.trainer.early_stop.metric, tasks), metrics
        )
        runlog.log("valid", pos.step, metrics)
        if info.is_main:
            log.info("valid step %d: %s%s", pos.step, _fmt(metrics, tasks), " (best)" if improved else "")
            warn_collapsed(metrics, tasks, "validation")
        if improved and select_best:
            ckpt.keep_step = pos.step
            save()  # the best model so far, kept until a better one (pipeline/checkpoint.py keep_step)
        meter.resume()

    show_bar = info.is_main and cfg.trainer.progress_bar and sys.stderr.isatty()
    bar = tqdm(total=total_steps, initial=pos.step, disable=not show_bar, desc="train")
    profiler = StepProfiler(cfg.trainer.profile_steps, run_dir.local / "profile", enabled=info.is_main)
    sync_debug = SyncDebugWindow(cfg.trainer.sync_debug_steps, info.device)
    dmp.train()
    while pos.step < total_steps and pos.epoch < cfg.trainer.epochs and not stopper.should_stop:
        train_reader.set_epoch(pos.epoch)
        if pos.step_in_epoch:
            train_reader.load_state_dict({"epoch": pos.epoch, "batches_yielded": pos.step_in_epoch})
        batches = iter(train_reader)
        while pos.step < total_steps and not stopper.should_stop:
            profiler.before_step(pos.step)
            sync_debug.before_step(pos.step)
            try:
                out = pipeline.progress(batches)
            except StopIteration:
                break
            sync_debug.after_step(pos.step)
            profiler.after_step(pos.step)
            pos.step += 1
            pos.step_in_epoch += 1
            bar.update(1)
            with record_function("## meter ##"):
                meter.update(torch.cat([out.task_losses, out.aux_loss.reshape(1)]), out.task_sums)
                if pos.step % cfg.trainer.log_every == 0 or pos.step == total_steps:
                    record = train_record(meter, tasks, cfg.data.batch_size, info.world_size, pos.epoch)
                    record.update(arch.stats())
                    runlog.log("train", pos.step, record)
                    if info.is_main:
                        log_train(record, arch.stats_summary(record), tasks, pos.step, total_steps, info)
            if cfg.trainer.eval_every > 0 and pos.step % cfg.trainer.eval_every == 0:
                validate()
            if cfg.trainer.checkpoint_every > 0 and pos.step % cfg.trainer.checkpoint_every == 0:
                save()
        if pos.step_in_epoch >= steps_per_epoch:  # epoch finished (not stopped by max_steps)
            pos.epoch += 1
            pos.step_in_epoch = 0
            if cfg.trainer.eval_every == 0:
                validate()
            if cfg.trainer.checkpoint_every == 0:
                save()
    bar.close()
    pipeline.detach()
    stop_reason = (
        "early_stopping"
        if stopper.should_stop
        else "max_steps"
        if pos.step == cfg.trainer.max_steps
        else "epochs"
    )

    # ---- the end: a checkpoint of the final state, the selected model, the test split, metrics.json ----
    save()
    selected = pos.step
    if select_best and stopper.best_step is not None and stopper.best_step != pos.step:
        selected = stopper.best_step
        load_checkpoint_into(ckpt.path(selected), dmp, optimizer=None)
    if info.is_main:
        why = "best validation" if selected == stopper.best_step else "final state"
        log.info("stopped (%s) at step %d; selected step %d (%s)", stop_reason, pos.step, selected, why)
    summary: dict[str, Any] = {
        "steps": pos.step,
        "epochs": pos.epoch,
        "stop_reason": stop_reason,
        "selected_step": selected,
        "run_dir": str(run_dir),
        "init_from": init_from,
        "world_size": info.world_size,
        "dense_params": dense_params,
        "sparse_optimizer_state_bytes": sparse_state_total,
        "train_samples_per_s": meter.train_steps * cfg.data.batch_size * info.world_size / meter.train_seconds
        if meter.train_seconds
        else None,
        "train_seconds": meter.train_seconds,
        # validation metrics of the selected step: the best one, or the last one without select_best
        "valid": stopper.best_metrics if selected == stopper.best_step else stopper.last_metrics,
        "early_stop": {"metric": cfg.trainer.early_stop.metric, **stopper.state_dict(with_metrics=False)},
    }
    if test_reader is not None:
        preds = (
            run_dir.local / "predictions" / f"part-{info.rank:05d}.parquet"
            if cfg.trainer.save_predictions
            else None
        )
        summary.update(evaluate_inference_modes(dmp, test_reader, info.device, tasks, -1, preds))
        if preds is not None:
            run_dir.push(only=preds)  # each rank its own part
        summary["split"] = cfg.data.split
        runlog.log("test", selected, summary["test"])
        if info.is_main:
            warn_collapsed(summary["test"], tasks, f"the {cfg.data.split} split")
    evaluated = summary.get("test") or summary["valid"] or {}
    summary["collapsed"] = collapsed_tasks(evaluated, tasks)
    summary["dense_flops_per_sample"] = arch.flops_per_sample()  # all of it; activated: at serving
    summary["activated_flops_per_sample"] = arch.activated_flops_per_sample(summary.get("test", {}))
    if info.is_main:
        write_json_atomic(run_dir.local / "metrics.json", summary)
        log.info("metrics: %s", join(str(run_dir), "metrics.json"))
    runlog.close()
    if info.is_main:
        run_dir.push()
    torch.distributed.barrier()
    return summary


def warn_collapsed(metrics: dict[str, float], tasks: list[str], where: str) -> None:
    collapsed = collapsed_tasks(metrics, tasks)
    if collapsed:
        std = ", ".join(f"{t} {metrics[f'{t}/pred_std']:.2e}" for t in collapsed)
        log.warning("COLLAPSED on %s: constant predictions (score std %s); its AUC means nothing", where, std)


def resume(
    cfg: TrainConfig, ckpt: CheckpointManager, info: DistInfo, dmp: Any, optimizer: Any, config_yaml: str
) -> tuple[Position, dict[str, Any]]:
    """The position to start from and the saved trainer state: (0, {}), or those of the checkpoint
    `trainer.resume` names, whose model, optimizer and RNG state are loaded in place. `auto`: the latest
    complete checkpoint under the run dir; one that fails to load (truncated, corrupt) is skipped with a
    warning for the one before it. A checkpoint of another schema / model, or one saved mid-epoch by
    another world size or batch size, is refused (CheckpointError), never loaded or skipped."""
    explicit = cfg.trainer.resume not in ("auto", "none", "")
    if explicit:
        candidates = [cfg.trainer.resume]
    elif cfg.trainer.resume == "auto":
        newest_first = list(reversed(complete_checkpoints(ckpt.root)))
        candidates = broadcast_object(newest_first)  # rank 0's listing, on every rank
    else:
        candidates = []
    for i, path in enumerate(candidates):
        try:
            check_compatible(path, config_yaml)
            meta = read_json(join(path, "trainer.json"))
            check_data_position(meta, cfg, info, path)
            meta = ckpt.load(path, dmp, optimizer)
            break
        except CheckpointError:
            raise
        except (OSError, ValueError, RuntimeError, dcp.api.CheckpointException) as e:
            if explicit or i + 1 == len(candidates):
                raise CheckpointError(f"resume: {path} cannot be loaded: {first_line(e)}") from e
            if info.is_main:
                log.warning("resume: skipping %s, which cannot be loaded (%s)", path, first_line(e))
    else:
        return Position(), {}
    resume_from = path
    pos = Position(meta["step"], meta["epoch"], meta["step_in_epoch"])
    if info.is_main:
        log.info(
            "resumed from %s at step %d (epoch %d, step %d in epoch)",
            resume_from,
            pos.step,
            pos.epoch,
            pos.step_in_epoch,
        )
    return pos, meta


def warm_start(cfg: TrainConfig, info: DistInfo, dmp: Any, optimizer: Any, config_yaml: str) -> str | None:
    """`trainer.init_from`: load the model (tables and dense) of another run's checkpoint (for a run dir:
    its selected step, else its latest) into this fresh run, and with `trainer.init_optimizer` the
    optimizer state too, with the lr schedule restarted. Never its step, data position, early-stopping
    or metric state: this run starts at step 0 of its own data. Returns the checkpoint loaded."""
    if not cfg.trainer.init_from:
        return None
    try:
        path = resolve_checkpoint(cfg.trainer.init_from)
    except FileNotFoundError as e:
        raise CheckpointError(f"trainer.init_from: {e}") from e
    check_compatible(path, config_yaml, what="trainer.init_from")
    try:
        load_checkpoint_into(
            path, dmp, optimizer if cfg.trainer.init_optimizer else None, restart_schedule=True
        )
    except (OSError, ValueError, RuntimeError, dcp.api.CheckpointException) as e:
        raise CheckpointError(f"trainer.init_from: {path} cannot be loaded: {first_line(e)}") from e
    if info.is_main:
        what = "model and optimizer state" if cfg.trainer.init_optimizer else "model"
        log.info("warm start: %s from %s", what, path)
    return str(path)


def check_data_position(meta: dict[str, Any], cfg: TrainConfig, info: DistInfo, path: str) -> None:
    """Mid-epoch, the data position is only meaningful for the world size and batch size that saved it:
    each rank streams its own shard of the row groups in its own shuffled order. At an epoch boundary
    any world size resumes exactly (the next epoch reads every row once)."""
    saved_world, saved_batch = meta.get("world_size"), meta.get("batch_size", cfg.data.batch_size)
    if meta.get("step_in_epoch", 0) == 0:
        if saved_world != info.world_size and info.is_main:
            epoch, batch = meta.get("epoch", 0), cfg.data.batch_size
            log.warning(
                "resume: %s was saved by %s ranks, resuming on %d at the start of epoch %d: the global "
                "batch is now %d x %d",
                path, saved_world, info.world_size, epoch, info.world_size, batch,
            )  # fmt: skip
        return
    if saved_world != info.world_size or saved_batch != cfg.data.batch_size:
        raise CheckpointError(
            f"resume: {path} was saved mid-epoch (epoch {meta['epoch']}, step {meta['step_in_epoch']} of "
            f"it) by {saved_world} ranks of batch {saved_batch}; on {info.world_size} ranks of batch "
            f"{cfg.data.batch_size} the data order differs and rows would be skipped or repeated. Resume "
            f"with --nproc_per_node {saved_world} data.batch_size={saved_batch}, or from a checkpoint saved "
            "at an epoch end (trainer.checkpoint_every=0 saves there)"
        )


def train_record(meter: TrainMeter, tasks: list[str], batch_size: int, world_size: int, epoch: int) -> dict:
    """The log window's train record: per-task loss (mean over steps and ranks), NE and calibration (over
    the window's rows, with their sample weights), total and aux loss, samples/s. A collective."""
    losses, sums, seconds, steps = meter.flush()
    rate = steps * batch_size / seconds
    record: dict[str, Any] = {}
    for i, t in enumerate(tasks):
        bce, positives, predicted, weight = (float(x) for x in sums[i])
        ctr = positives / weight if weight > 0 else float("nan")
        record[f"{t}/loss"] = float(losses[i])
        record[f"{t}/ne"] = normalized_entropy(bce / weight, ctr) if weight > 0 else float("nan")
        record[f"{t}/calibration"] = predicted / positives if positives > 0 else float("nan")
    record.update(
        loss=float(losses[:-1].sum()),
        aux_loss=float(losses[-1]),
        samples_per_s_per_rank=rate,
        samples_per_s=rate * world_size,
        epoch=epoch,
    )
    return record


def log_train(record: dict, summary: str, tasks: list[str], step: int, total: int, info: DistInfo) -> None:
    log.info(
        "step %d/%d epoch %d loss %.4f (%s) %.0f samples/s (%d ranks)",
        step,
        total,
        record["epoch"],
        record["loss"],
        " ".join(f"{t} {record[f'{t}/loss']:.4f} ne {record[f'{t}/ne']:.4f}" for t in tasks),
        record["samples_per_s"],
        info.world_size,
    )
    if summary:  # the dense arch's own line (`DenseArch.stats_summary`)
        log.info("  %s, aux loss %.4f", summary, record["aux_loss"])


def _fmt(metrics: dict[str, float], tasks: list[str]) -> str:
    return " | ".join(
        f"{t} auc {metrics[f'{t}/auc']:.4f} uauc {metrics[f'{t}/uauc']:.4f} ne {metrics[f'{t}/ne']:.4f} "
        f"calibration {metrics[f'{t}/calibration']:.3f}"
        for t in tasks
    )
