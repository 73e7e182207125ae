"""Evaluation loop: exact AUC / UAUC, logloss, NE and calibration per task over a whole split, across all
ranks (DESIGN s5).

Every rank runs the same number of batches (the reader's "pad" policy), because the sharded embedding
lookups are collectives; padding rows carry mask=False and never reach the metrics. The dense arch's
`eval_stats()` (e.g. the fraction of a conditional arch that was active) are reported as their mean over
batches and ranks, and each of its `inference_modes()` is evaluated besides the serving computation.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.distributed.model_parallel import DistributedModelParallel

from data.metrics.exact import ExactAUCEvaluator
from data.metrics.summary import collapsed_tasks
from data.reader import ParquetReader
from models.collectives import mean_over_ranks
from models.ranking import RankingOutput
from pipeline.files import write_atomic
from pipeline.sharding import dense_arch, ranking_model


def batch_outputs(
    model: DistributedModelParallel, reader: ParquetReader, device: torch.device, n: int
) -> Iterator[RankingOutput]:
    """The model's output on the reader's first `n` batches (every rank must run the same n: the sharded
    lookups are collectives); the reader's prefetch thread is stopped however the loop ends."""
    batches = iter(reader)
    try:
        for _ in range(n):
            yield model(next(batches).to(device, non_blocking=True))[1]
    finally:
        if hasattr(batches, "close"):
            batches.close()


@torch.no_grad()
def evaluate(
    model: DistributedModelParallel,
    reader: ParquetReader,
    device: torch.device,
    task_names: list[str],
    max_batches: int = -1,
    predictions_path: Path | None = None,
) -> dict[str, float]:
    """`model(batch) -> (loss, RankingOutput)` over `reader`; returns ExactAUCEvaluator's metrics and the
    dense arch's eval stats. With `predictions_path`, this rank's valid rows (user id, labels, scores,
    sample weight) go to that Parquet file."""
    was_training = model.training
    model.eval()
    arch = dense_arch(model)
    evaluator = ExactAUCEvaluator(task_names, ranking_model(model).logit_correction)
    preds: list[dict[str, torch.Tensor]] = []
    stat_sums: dict[str, float] = {}
    n = len(reader) if max_batches < 0 else min(max_batches, len(reader))
    for out in batch_outputs(model, reader, device, n):
        evaluator.update(out.logits, out.labels, out.user_id, out.mask, out.weight)
        for k, v in arch.eval_stats().items():
            stat_sums[k] = stat_sums.get(k, 0.0) + v
        if predictions_path is not None:
            m = out.mask
            preds.append(
                {
                    "user_id": out.user_id[m].cpu(),
                    "labels": out.labels[m].cpu(),
                    "scores": torch.sigmoid(out.logits[m]).cpu(),
                    "weight": out.weight[m].cpu(),
                }
            )
    metrics = evaluator.compute()
    for name in ("auc", "uauc", "ne"):  # mean_auc / mean_uauc: the default model-selection metrics
        metrics[f"mean_{name}"] = sum(metrics[f"{t}/{name}"] for t in task_names) / len(task_names)
    metrics["collapsed_tasks"] = float(len(collapsed_tasks(metrics, task_names)))
    for k, total in stat_sums.items():  # mean over batches, then ranks (every rank ran n batches)
        metrics[k] = mean_over_ranks(torch.tensor(total / n, dtype=torch.float64)).item()
    if predictions_path is not None:
        write_predictions(predictions_path, preds, task_names)
    model.train(was_training)
    return metrics


def evaluate_inference_modes(
    model: DistributedModelParallel,
    reader: ParquetReader,
    device: torch.device,
    task_names: list[str],
    max_batches: int = -1,
    predictions_path: Path | None = None,
) -> dict[str, dict[str, float]]:
    """{"test": metrics} of the serving computation, plus {"test_<mode>_inference": metrics} for each of
    the dense arch's other inference modes (`DenseArch.inference_modes`: a reference computation of the
    same model, so a large gap to "test" means the serving path is wrong)."""
    arch = dense_arch(model)
    result = {}
    for mode in arch.inference_modes():
        try:
            arch.use_inference_mode(mode)
            result[f"test_{mode}_inference"] = evaluate(model, reader, device, task_names, max_batches)
        finally:
            arch.use_inference_mode(None)
    result["test"] = evaluate(model, reader, device, task_names, max_batches, predictions_path)
    return result


def write_predictions(path: Path, preds: list[dict[str, torch.Tensor]], task_names: list[str]) -> None:
    cols: dict[str, pa.Array] = {"user_id": pa.array(torch.cat([p["user_id"] for p in preds]).numpy())}
    labels = torch.cat([p["labels"] for p in preds])
    scores = torch.cat([p["scores"] for p in preds])
    for i, t in enumerate(task_names):
        cols[t] = pa.array(labels[:, i].numpy())
        cols[f"score_{t}"] = pa.array(scores[:, i].numpy())
    cols["weight"] = pa.array(torch.cat([p["weight"] for p in preds]).numpy())  # the sample weights
    write_atomic(path, lambda tmp: pq.write_table(pa.table(cols), tmp, compression="zstd"))
