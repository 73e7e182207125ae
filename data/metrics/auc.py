"""Exact AUC / UAUC math, single process, no distribution: used by the generator's oracle
(data.build.generate) and by data.metrics.exact, which gathers rows across ranks and calls it.

Conventions
-----------
* Labels are 0/1. For the AUC family a label counts as positive when it is > 0.5.
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
"""

from __future__ import annotations

import torch
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


def weighted_auc(scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> float:
    """Exact ROC AUC with row weights: the weighted Mann-Whitney statistic, sum over (positive, negative)
    pairs of w_pos * w_neg * [s_pos > s_neg] (1/2 on ties), over the sum of w_pos * w_neg. Equals
    `binary_auc` when every weight is 1 (and counts a row of weight k as k copies of it). NaN when the
    positives' or the negatives' weight is 0. One sort; per distinct score, the weight of the negatives
    below it."""
    positive = _is_positive(labels)
    scores, weights = scores.detach().reshape(-1), weights.detach().reshape(-1).to(torch.float64)
    if not scores.numel() == positive.numel() == weights.numel():
        raise ValueError(
            f"row counts differ: scores {scores.numel()}, labels {positive.numel()}, "
            f"weights {weights.numel()}"
        )
    order = torch.argsort(scores)
    pos_w = torch.where(positive[order], weights[order], 0.0)  # (n,) in score order
    neg_w = weights[order] - pos_w
    group = torch.cumsum(_run_starts(scores[order]).long(), 0) - 1  # distinct score index of each row
    n_groups = int(group[-1]) + 1 if group.numel() else 0
    pos_g = torch.bincount(group, weights=pos_w, minlength=n_groups)  # (G,)
    neg_g = torch.bincount(group, weights=neg_w, minlength=n_groups)
    total_pos, total_neg = pos_g.sum(), neg_g.sum()
    if total_pos <= 0 or total_neg <= 0:
        return _NAN
    neg_below = torch.cumsum(neg_g, 0) - neg_g
    return float((pos_g * (neg_below + neg_g / 2)).sum() / (total_pos * total_neg))


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
