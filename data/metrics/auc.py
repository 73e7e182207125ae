"""Exact AUC / UAUC math on one process's rows: used by the generator's oracle (data.build.generate), by
data.metrics.exact (over gathered rows) and by data.metrics.distributed (the per-rank pieces of the
sharded computation, whose partial sums these functions also return).

Conventions
-----------
* Labels are 0/1. For the AUC family a label counts as positive when it is > 0.5.
* AUC is the Mann-Whitney statistic: P(score_pos > score_neg) + 1/2 * P(score_pos == score_neg).
* AUC of a set with only one class present is NaN (undefined), never 0.5 or 0.
* Everything runs on the scores' device (CPU or GPU) and sums in float64.

Reused vs. own code
-------------------
* Global AUC: own code, one sort and per-distinct-score weight sums (`score_group_sums`), in float64.
  ``torchmetrics.functional.classification.binary_auroc``, used before, builds its ROC curve in float32
  (its cumsum of the 0/1 targets is float32, exact only up to 2^24 rows, and the curve's trapezoids are
  float32): measured 3e-9 to 6e-8 off the exact value at 1k to 2M rows. The sharded path
  (data.metrics.distributed) must equal the single-process value to 1e-9, so both now share this exact
  float64 math. It also ranks logits directly, so no sigmoid turns distinct large logits into ties.
* UAUC: own code. ``torchrec.metrics.gauc`` averages per-session AUCs only within one batch (sessions
  must be contiguous ``num_candidates`` runs, a user split across batches is counted twice), breaks
  score ties by sort order instead of counting them 1/2, also skips users whose scores are all equal,
  and needs fbgemm jagged ops. ``torchrec.metrics.auc.compute_auc_per_group`` loops over groups in
  Python and also ignores ties. Neither is exact nor fast enough for 100k+ users, so we compute rank
  sums per user with one sort + bincount.
"""

from __future__ import annotations

import torch

_NAN = float("nan")


# --------------------------------------------------------------------------------------------------
# Global AUC
# --------------------------------------------------------------------------------------------------


def _is_positive(labels: torch.Tensor) -> torch.Tensor:
    """Binary view of 0/1 labels (bool), flattened."""
    return labels.detach().reshape(-1) > 0.5


def score_group_sums(
    scores: torch.Tensor, positive: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos_g, neg_g): (G,) float64 weight of the positive and of the negative rows at each distinct score,
    distinct scores ascending. One sort; equal scores share a group, which is how ties count 1/2."""
    sorted_scores, order = torch.sort(scores)
    w = weights[order].to(torch.float64)  # (n,) in score order, a copy: filled in place below
    pos = positive[order]
    del order
    group = torch.cumsum(_run_starts(sorted_scores), 0).sub_(1)  # (n,) int64 distinct score index of each row
    del sorted_scores
    n_groups = int(group[-1]) + 1 if group.numel() else 0
    # .to: bincount of no rows is int64 whatever the weights' dtype (a shard may hold no rows)
    pos_g = torch.bincount(group, weights=torch.where(pos, w, 0.0), minlength=n_groups).to(torch.float64)
    neg_g = torch.bincount(group, weights=w.masked_fill_(pos, 0.0), minlength=n_groups).to(torch.float64)
    return pos_g, neg_g


def mann_whitney_numerator(pos_g: torch.Tensor, neg_g: torch.Tensor) -> torch.Tensor:
    """0-dim float64: sum over distinct scores of pos_g * (negative weight strictly below + half the tied
    negative weight), with `pos_g`/`neg_g` from `score_group_sums`. Over the product of the total positive
    and negative weights it is the AUC. A shard holding a score range adds its count of negative weight
    below the range times its positive weight (data.metrics.distributed)."""
    neg_below = torch.cumsum(neg_g, 0) - neg_g
    return (pos_g * (neg_below + neg_g / 2)).sum()


def auc_from_sums(numerator: float, total_pos: float, total_neg: float) -> float:
    """The AUC from the Mann-Whitney numerator and the total weights; NaN when a class weighs 0."""
    if total_pos <= 0 or total_neg <= 0:
        return _NAN
    return numerator / (total_pos * total_neg)


def binary_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact ROC AUC over all rows; every row has weight 1 (`weighted_auc` with unit weights).

    Ties in scores count 1/2 (Mann-Whitney). Returns NaN when positives or negatives are absent.
    Scores may be probabilities or logits (any monotone transform gives the same AUC).
    """
    scores = scores.detach().reshape(-1)
    return weighted_auc(scores, labels, torch.ones_like(scores, dtype=torch.float64))


def weighted_auc(scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> float:
    """Exact ROC AUC with row weights: the weighted Mann-Whitney statistic, sum over (positive, negative)
    pairs of w_pos * w_neg * [s_pos > s_neg] (1/2 on ties), over the sum of w_pos * w_neg. Equals
    `binary_auc` when every weight is 1 (and counts a row of weight k as k copies of it). NaN when the
    positives' or the negatives' weight is 0. One sort; per distinct score, the weight of the negatives
    below it."""
    positive = _is_positive(labels)
    scores, weights = scores.detach().reshape(-1), weights.detach().reshape(-1)
    if not scores.numel() == positive.numel() == weights.numel():
        raise ValueError(
            f"row counts differ: scores {scores.numel()}, labels {positive.numel()}, "
            f"weights {weights.numel()}"
        )
    pos_g, neg_g = score_group_sums(scores, positive, weights)
    numerator = float(mann_whitney_numerator(pos_g, neg_g))
    return auc_from_sums(numerator, float(pos_g.sum()), float(neg_g.sum()))


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


def _per_user_auc_from_ties(
    user_starts: torch.Tensor, tie_starts: torch.Tensor, positive: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(auc, impressions) of the users with both classes, from rows sorted by (user, score): `user_starts`
    and `tie_starts` (n,) bool mark each user's and each (user, score) tie group's first row (every user
    start is a tie start), `positive` (n,) float64 0/1.

    Mann-Whitney per user over its tie groups: U_u = sum over the user's groups of pos_g * (the user's
    negatives in lower groups + neg_g / 2), AUC_u = U_u / (P_u N_u). Counts and U are integers or
    half-integers, exact in float64 below 2^53, so U is the exact rank-sum statistic R_pos - P (P + 1) / 2.
    Per row only the group index is built; the rest is per group (G <= n).
    """
    group = torch.cumsum(tie_starts, 0).sub_(1)  # (n,) int64 tie group of each row
    n_groups = int(group[-1]) + 1
    pos_g = torch.bincount(group, weights=positive, minlength=n_groups)  # (G,)
    rows_g = torch.bincount(group, minlength=n_groups).to(torch.float64)
    del group
    neg_g = rows_g - pos_g
    opens_user = user_starts[tie_starts]  # (G,) the group is its user's lowest score
    user = torch.cumsum(opens_user, 0).sub_(1)  # (G,) user index of each group
    n_users = int(user[-1]) + 1
    neg_before = torch.cumsum(neg_g, 0) - neg_g  # negatives in all lower groups, every user's
    neg_below = neg_before - neg_before[opens_user][user]  # ... of this group's user only
    u_stat = torch.bincount(user, weights=pos_g * (neg_below + neg_g / 2), minlength=n_users)  # (U,)
    n_pos = torch.bincount(user, weights=pos_g, minlength=n_users)
    n_rows = torch.bincount(user, weights=rows_g, minlength=n_users)
    n_neg = n_rows - n_pos
    counted = (n_pos > 0) & (n_neg > 0)
    return u_stat[counted] / (n_pos[counted] * n_neg[counted]), n_rows[counted]


def per_user_auc(
    scores: torch.Tensor, labels: torch.Tensor, user_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(auc, impressions): (U,) float64 exact AUC and row count of every user that has both a positive and
    a negative row (U such users, in user id order). Ties within a user count 1/2. Vectorised: one
    lexsort, no loop over users. Needs all of a user's rows (data.metrics.distributed routes them so)."""
    scores = scores.detach().reshape(-1)
    positive = _is_positive(labels)
    user_ids = user_ids.detach().reshape(-1)
    if not scores.numel() == positive.numel() == user_ids.numel():
        raise ValueError(
            f"row counts differ: scores {scores.numel()}, labels {positive.numel()}, users {user_ids.numel()}"
        )
    if scores.numel() == 0:
        empty = torch.empty(0, dtype=torch.float64, device=scores.device)
        return empty, empty.clone()
    order = _sort_by_user_then_score(scores, user_ids)
    sorted_users = user_ids[order]
    user_starts = _run_starts(sorted_users)
    tie_starts = _run_starts(sorted_users, scores[order])
    del sorted_users
    positive = positive[order].to(torch.float64)
    del order
    return _per_user_auc_from_ties(user_starts, tie_starts, positive)


def user_auc_sums(auc: torch.Tensor, impressions: torch.Tensor) -> torch.Tensor:
    """(4,) float64 [sum of AUCs, sum of AUC * impressions, sum of impressions, number of users] of counted
    users (`per_user_auc`): sums, so shards owning disjoint users add theirs up."""
    return torch.stack([auc.sum(), (auc * impressions).sum(), impressions.sum(), auc.new_tensor(auc.numel())])


def uauc_from_sums(sums: torch.Tensor) -> dict[str, float]:
    """``uauc`` (mean of the users' AUCs), ``uauc_weighted`` (impression-weighted mean) and ``uauc_users``
    from `user_auc_sums` (summed over shards); both means NaN without a counted user."""
    auc_sum, weighted_sum, impressions, n_users = sums.tolist()
    if n_users == 0:
        return {"uauc": _NAN, "uauc_weighted": _NAN, "uauc_users": 0.0}
    return {"uauc": auc_sum / n_users, "uauc_weighted": weighted_sum / impressions, "uauc_users": n_users}


def user_auc(scores: torch.Tensor, labels: torch.Tensor, user_ids: torch.Tensor) -> dict[str, float]:
    """Exact per-user AUC averaged over users that have both a positive and a negative row.

    Returns ``uauc`` (each counted user weight 1), ``uauc_weighted`` (each counted user weighted by
    its number of impressions = rows, positives and negatives together) and ``uauc_users`` (number of
    counted users). Users with one class only are skipped; with no counted user both means are NaN.
    Ties in scores within a user count 1/2. Vectorised: one lexsort, no loop over users.
    """
    return uauc_from_sums(user_auc_sums(*per_user_auc(scores, labels, user_ids)))
