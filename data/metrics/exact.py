"""Exact evaluation metrics for ranking models: AUC, user-grouped AUC (UAUC), logloss, normalized entropy,
calibration, CTR.

Everything here is exact over the whole eval set: rows are kept until ``compute()`` and, under
``torch.distributed``, gathered to every rank, so no metric is an average of per-batch values.

* AUC / UAUC: data.metrics.auc, the single-process math (its conventions: ties, one-class sets, what it reuses
  from torchmetrics and why). ``logloss`` and ``ctr`` use the raw 0/1 label values.
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

from data.metrics.auc import binary_auc, user_auc, weighted_auc

_NAN = float("nan")


# --------------------------------------------------------------------------------------------------
# Distributed gather
# --------------------------------------------------------------------------------------------------


def _distributed_world_size() -> int:
    """World size of the default process group, or 1 when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _collective_device() -> torch.device:
    """Device the default backend can communicate from: a pure NCCL group needs CUDA tensors; gloo, and the
    pipeline's CUDA jobs' `cpu:gloo,cuda:nccl` group (pipeline/dist.py), take CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_row_counts(n_rows: int, world_size: int) -> list[int]:
    """Number of rows held by each rank, in rank order."""
    device = _collective_device()
    local = torch.tensor([n_rows], dtype=torch.long, device=device)
    counts = [torch.zeros_like(local) for _ in range(world_size)]
    dist.all_gather(counts, local)
    return [int(c.item()) for c in counts]


def _all_gather_rows(local: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Concatenate every rank's rows (rank order) on every rank; ranks may hold different row counts.

    all_gather needs equal shapes, so each rank pads to the largest count and the padding is trimmed.
    """
    device = _collective_device()
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
        nan_keys = (*_TASK_KEYS, "uauc", "uauc_weighted")
        return {**dict.fromkeys(nan_keys, _NAN), "uauc_users": 0.0}
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


class ExactAUCEvaluator:
    """Accumulates eval rows batch by batch and computes exact metrics over the whole eval set.

    Rows are stored on CPU (float32 logits/labels, int64 user ids: ~20 bytes/row for 2 tasks, so 1M rows
    is ~20 MB per rank). ``compute()`` gathers all ranks' rows to every rank when a process group with
    world size > 1 is initialised, so it is a collective: call it on every rank. Rows carry their sample
    weight (1 unless given); padding rows (mask False) are dropped in ``update``.

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
        weights (B,) the rows' sample weights (None: 1)."""
        n_tasks = len(self.task_names)
        batch = user_ids.shape[0]
        if logits.numel() != batch * n_tasks or labels.numel() != batch * n_tasks:
            shapes = f"{tuple(logits.shape)} / {tuple(labels.shape)}"
            raise ValueError(f"expected ({batch}, {n_tasks}) logits and labels, got {shapes}")
        # reshape also accepts (B,) inputs for a single task, and B == 0.
        logits = logits.detach().reshape(batch, n_tasks)
        labels = labels.detach().reshape(batch, n_tasks)
        weights = torch.ones(batch) if weights is None else weights.detach().reshape(-1)
        if mask is not None:
            keep = mask.detach().reshape(-1).to(torch.bool)
            logits, labels, user_ids, weights = logits[keep], labels[keep], user_ids[keep], weights[keep]
        # CPU storage: eval sets do not fit next to the model in accelerator memory.
        self._logits.append(logits.to("cpu", torch.float32))
        self._labels.append(labels.to("cpu", torch.float32))
        self._user_ids.append(user_ids.detach().reshape(-1).to("cpu", torch.int64))
        self._weights.append(weights.to("cpu", torch.float32))

    def _local_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's rows, concatenated."""
        n_tasks = len(self.task_names)
        if not self._logits:
            empty = torch.empty(0, n_tasks)
            return empty, empty.clone(), torch.empty(0, dtype=torch.int64), torch.empty(0)
        rows = self._logits, self._labels, self._user_ids, self._weights
        return tuple(torch.cat(part) for part in rows)  # type: ignore[return-value]

    def _global_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All ranks' rows in rank order (this rank's rows when not distributed)."""
        logits, labels, user_ids, weights = self._local_rows()
        world_size = _distributed_world_size()
        if world_size == 1:
            return logits, labels, user_ids, weights
        counts = _gather_row_counts(logits.shape[0], world_size)
        # One collective for logits, labels and weights together (float32; 0/1 labels are exact).
        dense = _all_gather_rows(torch.cat([logits, labels, weights.unsqueeze(1)], dim=1), counts)
        n = len(self.task_names)
        return dense[:, :n], dense[:, n : 2 * n], _all_gather_rows(user_ids, counts), dense[:, 2 * n]

    def compute(self) -> dict[str, float]:
        """Per-task ``<task>/{auc,uauc,uauc_weighted,uauc_users,logloss,ne,calibration,ctr,pred_mean,
        pred_std}`` (and ``calibration_uncorrected`` with a logit correction), ``rows``.

        Exact over all valid rows of all ranks; every rank returns the same values.
        """
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
