"""Exact evaluation metrics for ranking models: AUC, user-grouped AUC (UAUC), logloss, CTR.

Everything here is exact over the whole eval set: rows are kept until ``compute()`` and, under
``torch.distributed``, gathered to every rank, so no metric is an average of per-batch values.

Conventions
-----------
* Labels are 0/1. For the AUC family a label counts as positive when it is > 0.5; ``logloss`` and
  ``ctr`` use the raw label values.
* AUC is the Mann-Whitney statistic: P(score_pos > score_neg) + 1/2 * P(score_pos == score_neg).
* AUC of a set with only one class present is NaN (undefined), never 0.5 or 0.

Reused vs. own code
-------------------
* Global AUC: ``torchmetrics.functional.classification.binary_auroc(thresholds=None)``. It builds the
  ROC curve on distinct score values (sklearn's algorithm), so ties count 1/2 -- exact. Two caveats are
  handled here: it applies a sigmoid to scores outside [0, 1] (which can merge distinct scores into
  float ties, e.g. logits 20 and 25 both map to 1.0 in float32), and it returns 0 plus a warning when a
  class is absent.
* UAUC: own code. ``torchrec.metrics.gauc`` averages per-session AUCs only within one batch (sessions
  must be contiguous ``num_candidates`` runs, a user split across batches is counted twice), breaks
  score ties by sort order instead of counting them 1/2, also skips users whose scores are all equal,
  and needs fbgemm jagged ops. ``torchrec.metrics.auc.compute_auc_per_group`` loops over groups in
  Python and also ignores ties. Neither is exact nor fast enough for 100k+ users, so we compute rank
  sums per user with one sort + bincount.
* Gather: own code. ``torchmetrics.utilities.distributed.gather_all_tensors`` does pad/gather/trim,
  but trims with list-of-slices indexing, which torch deprecates (warns now, changes meaning later).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc

_NAN = float("nan")


# --------------------------------------------------------------------------------------------------
# Global AUC
# --------------------------------------------------------------------------------------------------


def _is_positive(labels: torch.Tensor) -> torch.Tensor:
    """Binary view of 0/1 labels (bool), flattened."""
    return labels.detach().reshape(-1) > 0.5


def _order_preserving_unit_scores(scores: torch.Tensor) -> torch.Tensor:
    """Map scores into [0, 1] without changing their order or their ties.

    torchmetrics applies a sigmoid to inputs outside [0, 1]; in float precision that saturates and
    turns distinct large logits into ties, which changes the AUC. Dense ranks / (n_distinct - 1) in
    float64 are strictly monotone in the scores and already inside [0, 1], so it leaves them alone.
    """
    if scores.numel() == 0 or bool(((scores >= 0) & (scores <= 1)).all()):
        return scores
    distinct, dense_rank = torch.unique(scores, sorted=True, return_inverse=True)
    return dense_rank.to(torch.float64) / max(distinct.numel() - 1, 1)


def binary_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact ROC AUC over all rows; every row has weight 1.

    Ties in scores count 1/2 (Mann-Whitney). Returns NaN when positives or negatives are absent.
    Scores may be probabilities or logits (any monotone transform gives the same AUC).
    """
    positive = _is_positive(labels)
    scores = scores.detach().reshape(-1)
    if scores.numel() != positive.numel():
        raise ValueError(f"scores has {scores.numel()} rows but labels has {positive.numel()}")
    n_pos = int(positive.sum())
    if n_pos == 0 or n_pos == positive.numel():
        return _NAN
    unit_scores = _order_preserving_unit_scores(scores)
    # validate_args=False: inputs are already checked/binarised; validation costs a pass over 1M rows.
    auc = binary_auroc(unit_scores, positive.long(), thresholds=None, validate_args=False)
    return float(auc)


# --------------------------------------------------------------------------------------------------
# User AUC (grouped AUC)
# --------------------------------------------------------------------------------------------------


def _sort_by_user_then_score(scores: torch.Tensor, user_ids: torch.Tensor) -> torch.Tensor:
    """Permutation ordering rows by (user_id, score) ascending; two stable sorts = a lexsort."""
    by_score = torch.argsort(scores, stable=True)
    return by_score[torch.argsort(user_ids[by_score], stable=True)]


def _run_starts(*keys: torch.Tensor) -> torch.Tensor:
    """Bool mask marking the first row of every run of equal consecutive key tuples."""
    n = keys[0].numel()
    starts = torch.zeros(n, dtype=torch.bool, device=keys[0].device)
    if n == 0:
        return starts
    starts[0] = True
    for key in keys:
        starts[1:] |= key[1:] != key[:-1]
    return starts


def _tie_averaged_ranks_within_user(user_starts: torch.Tensor, tie_starts: torch.Tensor) -> torch.Tensor:
    """1-based rank of each sorted row inside its user, tied rows sharing their average rank (float64).

    ``tie_starts`` must include every user start, so a tie group never spans two users.
    """
    n = tie_starts.numel()
    position = torch.arange(n, device=tie_starts.device)
    # Each row's user begins at the last user start at or before it.
    user_first = torch.where(user_starts, position, torch.zeros_like(position)).cummax(0).values
    group_first = position[tie_starts]
    group_last = torch.cat([group_first[1:], position.new_tensor([n])]) - 1
    group_id = torch.cumsum(tie_starts.long(), 0) - 1
    mid = (group_first[group_id] + group_last[group_id]).to(torch.float64) / 2
    return mid - user_first.to(torch.float64) + 1


def _per_user_auc(
    ranks: torch.Tensor, positive: torch.Tensor, user_index: torch.Tensor, n_users: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-user (auc, n_impressions, counted) from within-user rank sums; auc is NaN where not counted.

    Mann-Whitney: AUC_u = (R_pos - P (P + 1) / 2) / (P N), with R_pos the sum of positive ranks.
    Rank sums are half-integers, exact in float64 far beyond 1M rows.
    """
    pos = positive.to(torch.float64)
    n_pos = torch.bincount(user_index, weights=pos, minlength=n_users)
    n_rows = torch.bincount(user_index, minlength=n_users).to(torch.float64)
    rank_sum_pos = torch.bincount(user_index, weights=ranks * pos, minlength=n_users)
    n_neg = n_rows - n_pos
    counted = (n_pos > 0) & (n_neg > 0)
    auc = (rank_sum_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return torch.where(counted, auc, torch.full_like(auc, _NAN)), n_rows, counted


def user_auc(scores: torch.Tensor, labels: torch.Tensor, user_ids: torch.Tensor) -> dict[str, float]:
    """Exact per-user AUC averaged over users that have both a positive and a negative row.

    Returns ``uauc`` (each counted user weight 1), ``uauc_weighted`` (each counted user weighted by
    its number of impressions = rows, positives and negatives together) and ``uauc_users`` (number of
    counted users). Users with one class only are skipped; with no counted user both means are NaN.
    Ties in scores within a user count 1/2. Vectorised: one lexsort, no loop over users.
    """
    scores = scores.detach().reshape(-1)
    positive = _is_positive(labels)
    user_ids = user_ids.detach().reshape(-1)
    if not scores.numel() == positive.numel() == user_ids.numel():
        raise ValueError(
            f"row counts differ: scores {scores.numel()}, labels {positive.numel()}, users {user_ids.numel()}"
        )
    if scores.numel() == 0:
        return {"uauc": _NAN, "uauc_weighted": _NAN, "uauc_users": 0.0}
    order = _sort_by_user_then_score(scores, user_ids)
    sorted_users, sorted_scores = user_ids[order], scores[order]
    user_starts = _run_starts(sorted_users)
    tie_starts = _run_starts(sorted_users, sorted_scores)
    ranks = _tie_averaged_ranks_within_user(user_starts, tie_starts)
    user_index = torch.cumsum(user_starts.long(), 0) - 1
    auc, n_rows, counted = _per_user_auc(ranks, positive[order], user_index, int(user_starts.sum()))
    return _average_user_aucs(auc[counted], n_rows[counted])


def _average_user_aucs(auc: torch.Tensor, impressions: torch.Tensor) -> dict[str, float]:
    """Unweighted and impression-weighted means of the counted users' AUCs."""
    n_users = auc.numel()
    if n_users == 0:
        return {"uauc": _NAN, "uauc_weighted": _NAN, "uauc_users": 0.0}
    return {
        "uauc": float(auc.mean()),
        "uauc_weighted": float((auc * impressions).sum() / impressions.sum()),
        "uauc_users": float(n_users),
    }


# --------------------------------------------------------------------------------------------------
# Distributed gather
# --------------------------------------------------------------------------------------------------


def _distributed_world_size() -> int:
    """World size of the default process group, or 1 when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _collective_device() -> torch.device:
    """Device the default backend can communicate from (NCCL needs CUDA tensors; gloo takes CPU)."""
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


def _task_metrics(logits: torch.Tensor, labels: torch.Tensor, user_ids: torch.Tensor) -> dict[str, float]:
    """All metrics of one task over its rows (every row weight 1).

    AUC/UAUC rank the logits: sigmoid is strictly increasing, so this equals the AUC of the scores
    sigmoid(logits) in exact arithmetic, without float sigmoid saturation creating spurious ties.
    logloss uses the logits directly (numerically stable, no clamping of probabilities).
    """
    if logits.numel() == 0:
        nan_keys = ("auc", "uauc", "uauc_weighted", "logloss", "ctr", "pred_mean")
        return {**dict.fromkeys(nan_keys, _NAN), "uauc_users": 0.0}
    logits64, labels64 = logits.to(torch.float64), labels.to(torch.float64)
    return {
        "auc": binary_auc(logits, labels),
        **user_auc(logits, labels, user_ids),
        "logloss": float(F.binary_cross_entropy_with_logits(logits64, labels64)),
        "ctr": float(labels64.mean()),
        "pred_mean": float(torch.sigmoid(logits64).mean()),
    }


class ExactAUCEvaluator:
    """Accumulates eval rows batch by batch and computes exact metrics over the whole eval set.

    Rows are stored on CPU (float32 logits/labels, int64 user ids: ~20 bytes/row for 2 tasks, so 1M rows
    is ~20 MB per rank). ``compute()`` gathers all ranks' rows to every rank when a process group with
    world size > 1 is initialised, so it is a collective: call it on every rank. Every valid row has
    weight 1; padding rows (mask False) are dropped in ``update``.
    """

    def __init__(self, task_names: list[str]) -> None:
        if not task_names:
            raise ValueError("task_names must not be empty")
        self.task_names = list(task_names)
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._user_ids: list[torch.Tensor] = []

    def reset(self) -> None:
        """Drop all accumulated rows."""
        self._logits, self._labels, self._user_ids = [], [], []

    def update(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        user_ids: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Add a batch: logits/labels (B, n_tasks), user_ids (B,), mask (B,) with False = padding row."""
        n_tasks = len(self.task_names)
        batch = user_ids.shape[0]
        if logits.numel() != batch * n_tasks or labels.numel() != batch * n_tasks:
            shapes = f"{tuple(logits.shape)} / {tuple(labels.shape)}"
            raise ValueError(f"expected ({batch}, {n_tasks}) logits and labels, got {shapes}")
        # reshape also accepts (B,) inputs for a single task, and B == 0.
        logits = logits.detach().reshape(batch, n_tasks)
        labels = labels.detach().reshape(batch, n_tasks)
        if mask is not None:
            keep = mask.detach().reshape(-1).to(torch.bool)
            logits, labels, user_ids = logits[keep], labels[keep], user_ids[keep]
        # CPU storage: eval sets do not fit next to the model in accelerator memory.
        self._logits.append(logits.to("cpu", torch.float32))
        self._labels.append(labels.to("cpu", torch.float32))
        self._user_ids.append(user_ids.detach().reshape(-1).to("cpu", torch.int64))

    def _local_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's rows, concatenated."""
        n_tasks = len(self.task_names)
        if not self._logits:
            empty = torch.empty(0, n_tasks)
            return empty, empty.clone(), torch.empty(0, dtype=torch.int64)
        return torch.cat(self._logits), torch.cat(self._labels), torch.cat(self._user_ids)

    def _global_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All ranks' rows in rank order (this rank's rows when not distributed)."""
        logits, labels, user_ids = self._local_rows()
        world_size = _distributed_world_size()
        if world_size == 1:
            return logits, labels, user_ids
        counts = _gather_row_counts(logits.shape[0], world_size)
        # One collective for logits and labels together (both float32; 0/1 labels are exact).
        dense = _all_gather_rows(torch.cat([logits, labels], dim=1), counts)
        n_tasks = len(self.task_names)
        return dense[:, :n_tasks], dense[:, n_tasks:], _all_gather_rows(user_ids, counts)

    def compute(self) -> dict[str, float]:
        """Per-task ``<task>/{auc,uauc,uauc_weighted,uauc_users,logloss,ctr,pred_mean}`` and ``rows``.

        Exact over all valid rows of all ranks; every rank returns the same values.
        """
        logits, labels, user_ids = self._global_rows()
        results: dict[str, float] = {"rows": float(logits.shape[0])}
        for task, name in enumerate(self.task_names):
            for key, value in _task_metrics(logits[:, task], labels[:, task], user_ids).items():
                results[f"{name}/{key}"] = value
        return results


__all__ = ["ExactAUCEvaluator", "binary_auc", "user_auc"]
