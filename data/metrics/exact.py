"""Exact evaluation metrics for ranking models: AUC, user-grouped AUC (UAUC), logloss, normalized entropy,
calibration, CTR.

Everything here is exact over the whole eval set: rows are kept (on the device they arrive on) until
``compute()``, so no metric is an average of per-batch values.

* ``compute()``: sharded, per-rank memory O(rows / world size) (data.metrics.distributed): AUC by a sample
  sort by score, UAUC with rows routed to the rank owning their user, every other metric from float64
  sums all_reduced (the prediction spread in two passes: the mean, then the squared deviations).
* ``compute_gathered()``: the reference, every rank's rows gathered to every rank and the metrics computed
  on all of them (memory O(rows) per rank). Both return the same values to ~1e-15 (tests/test_metrics.py).
* AUC / UAUC: data.metrics.auc, the single-process math (its conventions: ties, one-class sets).
  ``logloss`` and ``ctr`` use the raw 0/1 label values.
* Sample weights (the schema's weight column): AUC, logloss, CTR, the prediction mean and spread, NE and
  calibration are weighted; UAUC counts rows (each user's AUC, then the mean over users).
* NE (normalized entropy, He et al. 2014): logloss / the entropy of the base rate, H(ctr) = -ctr log ctr -
  (1 - ctr) log(1 - ctr): below 1 the model beats predicting the base rate for every row. Calibration: the
  mean prediction over the mean label (1 = calibrated).
* Gather: own code. ``torchmetrics.utilities.distributed.gather_all_tensors`` does pad/gather/trim,
  but trims with list-of-slices indexing, which torch deprecates (warns now, changes meaning later).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data.metrics.auc import binary_auc, per_user_auc, uauc_from_sums, user_auc, user_auc_sums, weighted_auc
from data.metrics.distributed import (
    all_gather_stack,
    all_reduce_sum,
    route_by_user,
    shard_device,
    sharded_auc,
)
from data.metrics.distributed import world_size as distributed_world_size

_NAN = float("nan")


# --------------------------------------------------------------------------------------------------
# Distributed gather
# --------------------------------------------------------------------------------------------------


def _all_gather_rows(local: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every rank's rows (rank order) on every rank; ranks may hold different row counts.

    all_gather needs equal shapes, so each rank pads to the largest count and the padding is trimmed.
    """
    device = shard_device(local.device)
    padded = local.new_zeros((max(counts), *local.shape[1:]), device=device)
    padded[: local.shape[0]] = local.to(device)
    buffers = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(buffers, padded)
    return torch.cat([buf[:n] for buf, n in zip(buffers, counts)]).cpu()


# --------------------------------------------------------------------------------------------------
# Evaluator
# --------------------------------------------------------------------------------------------------


def base_rate_entropy(ctr: float) -> float:
    """H(ctr) in nats: the logloss of predicting the base rate `ctr` for every row (0 at 0 and 1)."""
    if not 0 < ctr < 1:
        return 0.0
    return -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))


def normalized_entropy(logloss: float, ctr: float) -> float:
    """logloss / H(ctr); NaN where the base rate is 0 or 1 (no entropy to normalise by)."""
    h = base_rate_entropy(ctr)
    return logloss / h if h > 0 else _NAN


def _task_metrics(
    logits: torch.Tensor, labels: torch.Tensor, user_ids: torch.Tensor, weights: torch.Tensor
) -> dict[str, float]:
    """All metrics of one task over its rows, rows weighted by `weights` (see the module docstring).

    AUC/UAUC rank the logits: sigmoid is strictly increasing, so this equals the AUC of the scores
    sigmoid(logits) in exact arithmetic, without float sigmoid saturation creating spurious ties.
    logloss uses the logits directly (numerically stable, no clamping of probabilities).
    """
    w = weights.to(torch.float64)
    total = float(w.sum()) if logits.numel() else 0.0
    if total <= 0:
        return _undefined_task_metrics()
    logits64, labels64 = logits.to(torch.float64), labels.to(torch.float64)
    scores = torch.sigmoid(logits64)
    unit = bool((w == 1).all())
    bce = F.binary_cross_entropy_with_logits(logits64, labels64, reduction="none")  # (n,)
    logloss = float((bce * w).sum() / total)
    ctr = float((labels64 * w).sum() / total)
    pred_mean = float((scores * w).sum() / total)
    return {
        "auc": binary_auc(logits, labels) if unit else weighted_auc(logits, labels, w),
        **user_auc(logits, labels, user_ids),
        "logloss": logloss,
        "ne": normalized_entropy(logloss, ctr),
        "calibration": pred_mean / ctr if ctr > 0 else _NAN,
        "ctr": ctr,
        "pred_mean": pred_mean,
        # ~0: the model predicts a constant (collapsed)
        "pred_std": float((((scores - pred_mean) ** 2 * w).sum() / total).sqrt()),
    }


# the per-task keys of `_task_metrics` besides the UAUC family
_TASK_KEYS = ("auc", "logloss", "ne", "calibration", "ctr", "pred_mean", "pred_std")


def _undefined_task_metrics() -> dict[str, float]:
    """A task's metrics over rows of total weight 0 (or none): every value NaN, no counted user."""
    return {**dict.fromkeys((*_TASK_KEYS, "uauc", "uauc_weighted"), _NAN), "uauc_users": 0.0}


# --------------------------------------------------------------------------------------------------
# Sharded computation (compute): per-rank pieces, then float64 sums all_reduced
# --------------------------------------------------------------------------------------------------

# Columns of `_moment_sums`: sums over rows of w, w * logloss, w * label, w * sigmoid(logit) and
# w * sigmoid(logit - logit correction)
_TOTAL, _BCE, _LABEL, _PRED, _RAW = range(5)
_N_MOMENTS = 5


def _moment_sums(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, correction: torch.Tensor | None
) -> torch.Tensor:
    """(T, 5) float64 weighted sums of this rank's rows (n, T), columns as named above; the last is 0
    without a logit correction. `_task_metrics`' formulas, summed instead of averaged, one float64 column
    and one temporary at a time (products in place) to keep the peak a few bytes per row."""
    w = weights.to(torch.float64)  # (n,)
    per_task = []
    for t in range(logits.shape[1]):  # a few tasks
        z = logits[:, t].to(torch.float64, copy=True)
        y = labels[:, t].to(torch.float64, copy=True)
        bce = F.binary_cross_entropy_with_logits(z, y, reduction="none").mul_(w).sum()
        raw = torch.sigmoid(z - correction[t]).mul_(w).sum() if correction is not None else w.new_zeros(())
        per_task.append(torch.stack([w.sum(), bce, y.mul_(w).sum(), torch.sigmoid(z).mul_(w).sum(), raw]))
        del z, y
    return torch.stack(per_task)


def _squared_deviation_sums(logits: torch.Tensor, weights: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """(T,) float64 sums of w * (sigmoid(logit) - mean)^2 over this rank's rows: the second pass of the
    prediction spread, around the global weighted means (T,) (two passes, like `_task_metrics`)."""
    w = weights.to(torch.float64)
    sums = []
    for t in range(logits.shape[1]):
        p = torch.sigmoid(logits[:, t].to(torch.float64))
        sums.append(p.sub_(means[t]).square_().mul_(w).sum())
    return torch.stack(sums)


def _uauc_sums(logits: torch.Tensor, labels: torch.Tensor, user_ids: torch.Tensor) -> torch.Tensor:
    """(T, 4) float64 `user_auc_sums` of the users this rank owns: rows are routed once, all tasks
    together, to the rank owning their user (data.metrics.distributed.route_by_user)."""
    users, (logits, labels) = route_by_user(user_ids, [logits, labels])  # (m,), (m, T), (m, T)
    per_task = [
        user_auc_sums(*per_user_auc(logits[:, t], labels[:, t], users)) for t in range(logits.shape[1])
    ]
    return torch.stack(per_task)


def _task_metrics_from_sums(
    moments: list[float], squared_deviation: float, auc: float, uauc: dict[str, float], corrected: bool
) -> dict[str, float]:
    """A task's metrics, in `_task_metrics`' key order (then ``calibration_uncorrected`` when `corrected`
    and the CTR is > 0), from its global sums: its `_moment_sums` row (total weight > 0), its
    `_squared_deviation_sums` entry, `sharded_auc` and `uauc_from_sums`."""
    total = moments[_TOTAL]
    logloss, ctr, pred_mean = moments[_BCE] / total, moments[_LABEL] / total, moments[_PRED] / total
    metrics = {
        "auc": auc,
        **uauc,
        "logloss": logloss,
        "ne": normalized_entropy(logloss, ctr),
        "calibration": pred_mean / ctr if ctr > 0 else _NAN,
        "ctr": ctr,
        "pred_mean": pred_mean,
        "pred_std": math.sqrt(squared_deviation / total),
    }
    if corrected and ctr > 0:
        metrics["calibration_uncorrected"] = moments[_RAW] / total / ctr
    return metrics


class ExactAUCEvaluator:
    """Accumulates eval rows batch by batch and computes exact metrics over the whole eval set.

    Rows stay on the device they arrive on (float32 logits/labels/weights, int64 user ids: 28 bytes/row
    for 2 tasks, so 12.5M rows, a 100M-row split on 8 ranks, is ~350 MB per rank). ``compute()`` is a
    collective when a process group with world size > 1 is initialised: call it on every rank. It runs
    on the CUDA device when the group sends CUDA tensors through NCCL (a GPU job's ``cpu:gloo,cuda:nccl``
    group) and on CPU under gloo, whatever device the rows came from. Rows carry their sample weight (1
    unless given); padding rows (mask False) are dropped in ``update``.

    ``logit_correction``: (num_tasks,) what the model added to its logits for negative down-sampling (log
    of each task's negative keep rate, models/ranking.py), or None; when given,
    ``<task>/calibration_uncorrected`` reports the calibration the model would have without it.
    """

    def __init__(self, task_names: list[str], logit_correction: torch.Tensor | None = None) -> None:
        if not task_names:
            raise ValueError("task_names must not be empty")
        self.task_names = list(task_names)
        self.logit_correction = None if logit_correction is None else logit_correction.detach().double().cpu()
        self.reset()

    def reset(self) -> None:
        """Drop all accumulated rows."""
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._user_ids: list[torch.Tensor] = []
        self._weights: list[torch.Tensor] = []

    def update(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        user_ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> None:
        """Add a batch: logits/labels (B, n_tasks), user_ids (B,), mask (B,) with False = padding row,
        weights (B,) the rows' sample weights (None: 1). Rows stay on their device."""
        n_tasks = len(self.task_names)
        batch = user_ids.shape[0]
        if logits.numel() != batch * n_tasks or labels.numel() != batch * n_tasks:
            shapes = f"{tuple(logits.shape)} / {tuple(labels.shape)}"
            raise ValueError(f"expected ({batch}, {n_tasks}) logits and labels, got {shapes}")
        # reshape also accepts (B,) inputs for a single task, and B == 0.
        logits = logits.detach().reshape(batch, n_tasks)
        labels = labels.detach().reshape(batch, n_tasks)
        weights = torch.ones(batch, device=logits.device) if weights is None else weights.detach().reshape(-1)
        if mask is not None:
            keep = mask.detach().reshape(-1).to(torch.bool)
            logits, labels, user_ids, weights = logits[keep], labels[keep], user_ids[keep], weights[keep]
        self._logits.append(logits.to(torch.float32))
        self._labels.append(labels.to(torch.float32))
        self._user_ids.append(user_ids.detach().reshape(-1).to(torch.int64))
        self._weights.append(weights.to(torch.float32))

    def _local_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's rows, one tensor per column (not copies: do not modify them)."""
        n_tasks = len(self.task_names)
        if not self._logits:
            empty = torch.empty(0, n_tasks)
            return empty, empty.clone(), torch.empty(0, dtype=torch.int64), torch.empty(0)
        # The batches are concatenated once and kept so: one column at a time, so the rows are never held
        # twice over (only one column is, for a moment).
        for name in ("_logits", "_labels", "_user_ids", "_weights"):
            parts = getattr(self, name)
            if len(parts) > 1:
                setattr(self, name, [torch.cat(parts)])
                del parts
        return self._logits[0], self._labels[0], self._user_ids[0], self._weights[0]

    def _global_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All ranks' rows in rank order (this rank's rows when not distributed)."""
        logits, labels, user_ids, weights = self._local_rows()
        world_size = distributed_world_size()
        if world_size == 1:
            return logits, labels, user_ids, weights
        device = shard_device(logits.device)
        counts = all_gather_stack(torch.tensor(logits.shape[0], device=device)).tolist()  # rows per rank
        # One collective for logits, labels and weights together (float32; 0/1 labels are exact).
        dense = _all_gather_rows(torch.cat([logits, labels, weights.unsqueeze(1)], dim=1), counts)
        n = len(self.task_names)
        return dense[:, :n], dense[:, n : 2 * n], _all_gather_rows(user_ids, counts), dense[:, 2 * n]

    def compute(self) -> dict[str, float]:
        """Per-task ``<task>/{auc,uauc,uauc_weighted,uauc_users,logloss,ne,calibration,ctr,pred_mean,
        pred_std}`` (and ``calibration_uncorrected`` with a logit correction), ``rows``.

        Exact over all valid rows of all ranks, with per-rank memory O(rows / world size): no rank holds
        every row (data.metrics.distributed; its docstring says when one rank does hold most rows: a
        score value or a user holding most of them). Every rank returns the same values, equal to
        ``compute_gathered()``'s to ~1e-15. One rank or no process group: no collectives, same code.
        """
        local = self._local_rows()
        device = shard_device(local[0].device)
        logits, labels, user_ids, weights = (t.to(device) for t in local)
        del local
        correction = None if self.logit_correction is None else self.logit_correction.to(device)
        n_tasks = len(self.task_names)
        # pass 1: one all_reduce of the weighted sums of every task and the row count
        local_sums = _moment_sums(logits, labels, weights, correction).reshape(-1)
        count = local_sums.new_tensor([logits.shape[0]])
        sums = all_reduce_sum(torch.cat([local_sums, count]))
        moments = sums[:-1].reshape(n_tasks, _N_MOMENTS)
        results: dict[str, float] = {"rows": float(sums[-1])}
        if float(moments[0, _TOTAL]) <= 0:  # the same weights for every task; the same answer on every rank
            for name in self.task_names:
                results.update({f"{name}/{k}": v for k, v in _undefined_task_metrics().items()})
            return results
        # pass 2: squared deviations around the global means; then AUC and UAUC, each a sharded computation
        means = moments[:, _PRED] / moments[:, _TOTAL]
        squared_deviation = all_reduce_sum(_squared_deviation_sums(logits, weights, means)).tolist()
        aucs = [sharded_auc(logits[:, t], labels[:, t], weights) for t in range(n_tasks)]
        uaucs = all_reduce_sum(_uauc_sums(logits, labels, user_ids))  # (T, 4)
        for t, name in enumerate(self.task_names):
            task = _task_metrics_from_sums(
                moments[t].tolist(),
                squared_deviation[t],
                aucs[t],
                uauc_from_sums(uaucs[t]),
                correction is not None,
            )
            results.update({f"{name}/{k}": v for k, v in task.items()})
        return results

    def compute_gathered(self) -> dict[str, float]:
        """``compute()``'s metrics the reference way: every rank's rows gathered to every rank (memory
        O(rows) per rank, the same computation on each), then computed on them in one process. Kept for
        the tests and the benchmark (launch/benchmarks/eval.py) to compare against; a collective too."""
        logits, labels, user_ids, weights = self._global_rows()
        results: dict[str, float] = {"rows": float(logits.shape[0])}
        for task, name in enumerate(self.task_names):
            for key, value in _task_metrics(logits[:, task], labels[:, task], user_ids, weights).items():
                results[f"{name}/{key}"] = value
            if self.logit_correction is not None and results[f"{name}/ctr"] > 0:
                raw = torch.sigmoid(logits[:, task].double() - self.logit_correction[task])
                w = weights.double()
                results[f"{name}/calibration_uncorrected"] = (
                    float((raw * w).sum() / w.sum()) / results[f"{name}/ctr"]
                )
        return results


__all__ = ["ExactAUCEvaluator"]
