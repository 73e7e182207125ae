"""Evaluation loop: exact AUC / UAUC per task over a whole split, across all ranks (DESIGN s5).

Every rank runs the same number of batches (the reader's "pad" policy), because the sharded embedding
lookups are collectives; padding rows carry mask=False and never reach the metrics.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from tqdm import tqdm

from data.reader import ParquetReader
from pipeline.metrics import ExactAUCEvaluator


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    reader: ParquetReader,
    device: torch.device,
    task_names: list[str],
    max_batches: int = -1,
    predictions_path: Path | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """`model(batch) -> (loss, RankingOutput)` over `reader`; returns ExactAUCEvaluator's metrics.
    With `predictions_path`, this rank's valid rows (user id, labels, scores) go to that Parquet file."""
    was_training = model.training
    model.eval()
    evaluator = ExactAUCEvaluator(task_names)
    preds: list[dict[str, torch.Tensor]] = []
    n = len(reader) if max_batches < 0 else min(max_batches, len(reader))
    moe_stats = getattr(dense_arch_of(model), "moe_stats", None)
    active_ratios: list[float] = []  # Sparse-MoE: measured fraction of active experts, per batch
    batches = iter(reader)
    for _ in tqdm(range(n), desc="eval", disable=not progress, leave=False):
        batch = next(batches).to(device, non_blocking=True)
        _, out = model(batch)
        evaluator.update(out.logits, out.labels, out.user_id, out.mask)
        if callable(moe_stats) and "active_ratio" in (stats := moe_stats()):
            active_ratios.append(stats["active_ratio"])
        if predictions_path is not None:
            m = out.mask
            preds.append(
                {
                    "user_id": out.user_id[m].cpu(),
                    "labels": out.labels[m].cpu(),
                    "scores": torch.sigmoid(out.logits[m]).cpu(),
                }
            )
    if hasattr(batches, "close"):
        batches.close()
    metrics = evaluator.compute()
    if active_ratios:  # mean over batches and ranks (every rank runs the same number of batches)
        ratio = torch.tensor(sum(active_ratios) / len(active_ratios), dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(ratio)
            ratio /= dist.get_world_size()
        metrics["moe/active_ratio"] = ratio.item()
    if predictions_path is not None:
        write_predictions(predictions_path, preds, task_names)
    model.train(was_training)
    return metrics


def dense_arch_of(dmp: torch.nn.Module) -> torch.nn.Module:
    """The dense arch inside DistributedModelParallel(RankingTrainWrapper(RankingModel))."""
    return dmp.module.model.dense_arch


def activated_flops_per_sample(dense_arch: torch.nn.Module, active_ratio: float | None) -> float:
    """Forward FLOPs per sample the dense arch computes at serving: for a Sparse-MoE RankMixer, at the
    measured active-expert ratio (eval's "moe/active_ratio"); for anything else, all of it."""
    if active_ratio is not None and getattr(dense_arch, "moe_ffns", lambda: [])():
        return dense_arch.flops_per_sample(active_ratio)
    return dense_arch.flops_per_sample()


def evaluate_inference_modes(
    model: torch.nn.Module,
    reader: ParquetReader,
    device: torch.device,
    task_names: list[str],
    max_batches: int = -1,
    predictions_path: Path | None = None,
) -> dict[str, dict[str, float]]:
    """{"test": metrics}; for a Sparse-MoE model also {"test_dense_inference": ...}. "test" is what serving
    computes: sparse inference (inactive experts skipped); dense inference computes every expert with the
    same gates, so the two differ only by numerics -- a large gap means the sparse path is wrong."""
    moe_ffns = getattr(dense_arch_of(model), "moe_ffns", None)
    moes = moe_ffns() if callable(moe_ffns) else []
    result = {}
    if moes:
        saved = [m.sparse_inference for m in moes]
        try:
            for m in moes:
                m.sparse_inference = False
            result["test_dense_inference"] = evaluate(model, reader, device, task_names, max_batches)
        finally:
            for m, flag in zip(moes, saved):
                m.sparse_inference = flag
    result["test"] = evaluate(model, reader, device, task_names, max_batches, predictions_path)
    return result


def write_predictions(path: Path, preds: list[dict[str, torch.Tensor]], task_names: list[str]) -> None:
    cols: dict[str, pa.Array] = {"user_id": pa.array(torch.cat([p["user_id"] for p in preds]).numpy())}
    labels = torch.cat([p["labels"] for p in preds])
    scores = torch.cat([p["scores"] for p in preds])
    for i, t in enumerate(task_names):
        cols[t] = pa.array(labels[:, i].numpy())
        cols[f"score_{t}"] = pa.array(scores[:, i].numpy())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.table(cols), tmp, compression="zstd")
    tmp.replace(path)
