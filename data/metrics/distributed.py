"""Exact AUC and UAUC over rows sharded across ranks, with per-rank memory O(rows / world size).

No rank ever holds every row. Rows move once per metric with ``all_to_all_single`` and everything else
is a small all_gather / all_reduce of float64 sums:

* AUC (`sharded_auc`): a sample sort by score. Each rank sorts its scores and contributes a fixed number
  of regularly spaced samples, weighted by its row count; from their all_gather every rank picks the same
  world_size - 1 splitters, and each row goes to the rank owning its score range (bucket i holds
  splitter[i-1] < score <= splitter[i], torch.bucketize's rule). Equal scores always land on the same
  rank, so ties are exact. Each rank then sums the positive and negative weight of each distinct score
  (data.metrics.auc.score_group_sums) and its part of the Mann-Whitney numerator; the negative weight of
  all lower ranks' ranges, a global offset, comes from one all_gather of every rank's (numerator,
  positive, negative) sums.
  Limit: the rows of one score value all go to one rank. A model that predicts one value for most rows
  (collapsed) sends most rows to one rank, which then holds them all: still exact, no longer O(rows /
  world size) on that rank.
* UAUC (`route_by_user`, then data.metrics.auc.per_user_auc): rows go to rank hash(user id) mod world
  size, so each rank owns all rows of its users and computes their AUCs locally; the sums of the users'
  AUCs, of AUC * impressions, of impressions and the number of users are all_reduced. One user's rows
  all land on one rank (the same limit, for a user with a large share of the rows).

Without a process group, or with one rank, there are no collectives and no copies: the same code runs on
the local rows. Collectives run on the device `shard_device` names: CUDA where the group has NCCL for
CUDA tensors (a GPU job's `cpu:gloo,cuda:nccl` group, or pure NCCL), otherwise CPU (gloo, which runs
uneven ``all_to_all_single`` of 2-D CPU tensors: tests/test_metrics.py exercises it on 2 real ranks).

Memory and time against the gathered path: reports/throughput.md (`launch/bench.py eval`).

NaN scores (a diverged model) are not ranked meaningfully by either path; they are not guarded against.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from data.metrics.auc import auc_from_sums, mann_whitney_numerator, score_group_sums

# Samples per rank for the splitters: a splitter is off by at most rows_r / SAMPLES_PER_RANK rows of each
# rank r, so a rank's share is within ~world_size / 1024 of rows / world_size (continuous scores).
SAMPLES_PER_RANK = 1024

# Multiply-mod-prime mix of a user id's two 32-bit halves for `user_owner`: every product stays below
# 2^63, so int64 arithmetic never wraps (torch defines no unsigned 64-bit multiply on every device).
_PRIME = 2_147_483_647  # 2^31 - 1
_MIX_LO, _MIX_HI = 1_103_515_245, 1_664_525


# --------------------------------------------------------------------------------------------------
# Process group plumbing
# --------------------------------------------------------------------------------------------------


def world_size() -> int:
    """World size of the default process group, or 1 when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def shard_device(rows_device: torch.device) -> torch.device:
    """Where the sharded computation runs. One rank: where the rows are. Several: the same device on every
    rank, from the group alone (a rank with no rows must still take part in the same collectives): the
    current CUDA device when the group sends CUDA tensors through NCCL, else CPU for gloo."""
    if world_size() == 1:
        return rows_device
    backends = dict(pair.split(":") for pair in dist.get_backend_config().split(",") if ":" in pair)
    if backends.get("cuda") == "nccl" or dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place; returned for chaining). One rank: `values` unchanged."""
    if world_size() > 1:
        dist.all_reduce(values)
    return values


def all_gather_stack(values: torch.Tensor) -> torch.Tensor:
    """(world_size, *values.shape): every rank's `values` in rank order (same shape on every rank)."""
    if world_size() == 1:
        return values.unsqueeze(0)
    out = values.new_empty((world_size(), *values.shape))
    dist.all_gather(list(out.unbind(0)), values)
    return out


def exchange(rows: list[torch.Tensor], send_counts: torch.Tensor) -> list[torch.Tensor]:
    """all_to_all of row-aligned tensors: the first send_counts[0] rows go to rank 0, the next
    send_counts[1] to rank 1, and so on; returns the rows received, source rank order. `send_counts`:
    (world_size,) int64 on the rows' device. One rank: `rows` themselves."""
    if world_size() == 1:
        return rows
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)  # every rank learns how much it receives
    send, recv = send_counts.tolist(), recv_counts.tolist()
    received = []
    for part in rows:
        out = part.new_empty((sum(recv), *part.shape[1:]))
        dist.all_to_all_single(out, part.contiguous(), recv, send)
        received.append(out)
    return received


# --------------------------------------------------------------------------------------------------
# AUC: sample sort by score
# --------------------------------------------------------------------------------------------------


def _regular_samples(sorted_scores: torch.Tensor, n_samples: int) -> torch.Tensor:
    """(n_samples + 1,) float64: n_samples evenly spaced order statistics of this rank's sorted scores, then
    its row count (the samples' total weight). An empty rank sends zeros and count 0."""
    n = sorted_scores.numel()
    out = torch.zeros(n_samples + 1, dtype=torch.float64, device=sorted_scores.device)
    out[-1] = n
    if n:
        # (i + 1/2) n / S: the middle of each of S equal slices of the sorted rows
        slices = torch.arange(n_samples, device=out.device, dtype=torch.float64) + 0.5
        at = (slices * (n / n_samples)).long().clamp_(max=n - 1)
        out[:-1] = sorted_scores[at].to(torch.float64)
    return out


def choose_splitters(gathered: torch.Tensor, world: int) -> torch.Tensor:
    """(world - 1,) float64 splitters from `all_gather_stack` of `_regular_samples`, (world, S + 1).

    Each of a rank's S samples stands for rows_r / S of its rows; splitter k is the first sample, in score
    order, at which that weight reaches k / world of all rows. Every rank computes the same splitters
    from the same gathered tensor (stable sort: no run-to-run freedom)."""
    samples, counts = gathered[:, :-1], gathered[:, -1:]
    weight = (counts / samples.shape[1]).expand_as(samples).reshape(-1)  # (world * S,)
    values, order = torch.sort(samples.reshape(-1), stable=True)
    cum = torch.cumsum(weight[order], 0)
    targets = counts.sum() * torch.arange(1, world, device=gathered.device, dtype=torch.float64) / world
    # first sample whose cumulative weight reaches the target: a sample of weight > 0 (a real score)
    at = torch.searchsorted(cum, targets).clamp_(max=values.numel() - 1)
    return values[at]


def route_by_score(
    scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, n_samples: int = SAMPLES_PER_RANK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores, labels, weights), (m,) each: the rows of this rank's score range, from every rank.

    `scores`, `labels`, `weights`: (n,) this rank's rows. Ranges are contiguous in score: every score of
    rank r is below every score of rank r + 1, and equal scores land on one rank. One rank: the inputs."""
    world = world_size()
    if world == 1:
        return scores, labels, weights
    sorted_scores, order = torch.sort(scores)
    # (n, 3) send buffer in score order, float32 or wider: scores, 0/1 labels, float32 weights travel exactly
    dtype = torch.promote_types(scores.dtype, torch.float32)
    rows = torch.stack([sorted_scores.to(dtype), labels[order].to(dtype), weights[order].to(dtype)], 1)
    del order
    splitters = choose_splitters(all_gather_stack(_regular_samples(sorted_scores, n_samples)), world)
    # bucket i: splitter[i-1] < score <= splitter[i] (torch.bucketize, right=False); the rows are sorted,
    # so each bucket is a contiguous run and its end is a binary search
    ends = torch.searchsorted(sorted_scores, splitters.to(scores.dtype), right=True)
    bounds = torch.cat([ends.new_zeros(1), ends, ends.new_full((1,), scores.numel())])
    del sorted_scores
    received = exchange([rows], torch.diff(bounds))[0]
    del rows
    return received[:, 0], received[:, 1], received[:, 2]


def sharded_auc(scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> float:
    """Exact weighted AUC (data.metrics.auc.weighted_auc's value, `binary_auc`'s with unit weights) over all
    ranks' rows; a collective: call it on every rank, which all return the same value.

    `scores`, `labels`, `weights`: (n,) this rank's rows (n may be 0), on `shard_device`."""
    scores, labels, weights = route_by_score(scores.reshape(-1), labels.reshape(-1), weights.reshape(-1))
    pos_g, neg_g = score_group_sums(scores, labels > 0.5, weights)
    del scores, labels, weights
    local = torch.stack([mann_whitney_numerator(pos_g, neg_g), pos_g.sum(), neg_g.sum()])
    numerator, pos, neg = all_gather_stack(local).unbind(1)  # (world,) each, rank (= score range) order
    # rank r's positives rank above every negative of ranks < r: add that negative weight times theirs
    neg_of_lower_ranks = torch.cumsum(neg, 0) - neg
    total = (numerator + neg_of_lower_ranks * pos).sum()
    return auc_from_sums(float(total), float(pos.sum()), float(neg.sum()))


# --------------------------------------------------------------------------------------------------
# UAUC: rows routed to the rank owning their user
# --------------------------------------------------------------------------------------------------


def user_owner(user_ids: torch.Tensor, world: int) -> torch.Tensor:
    """(n,) int64 rank in [0, world) owning each user id: a multiply-mod-prime mix of the id's two 32-bit
    halves, then mod world, so sequential or strided ids (hashed or raw) still spread evenly. A function of
    the id alone, identical on every rank and device."""
    lo = user_ids & 0xFFFFFFFF
    hi = (user_ids >> 32) & 0xFFFFFFFF  # arithmetic shift, then the mask: the high half as unsigned
    mixed = (lo * _MIX_LO % _PRIME + hi * _MIX_HI % _PRIME) % _PRIME
    return mixed % world


def route_by_user(
    user_ids: torch.Tensor, values: list[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(user_ids (m,), values): every row of the users this rank owns (`user_owner`), from all ranks.
    `values`: row-aligned (n, ...) tensors travelling with the ids (e.g. logits and labels). One rank:
    the inputs."""
    world = world_size()
    if world == 1:
        return user_ids, values
    owner = user_owner(user_ids, world)
    order = torch.argsort(owner)
    send_counts = torch.bincount(owner, minlength=world)
    del owner
    users, *received = exchange([user_ids[order], *(v[order] for v in values)], send_counts)
    return users, received


__all__ = [
    "all_gather_stack",
    "all_reduce_sum",
    "choose_splitters",
    "exchange",
    "route_by_score",
    "route_by_user",
    "shard_device",
    "sharded_auc",
    "user_owner",
    "world_size",
]
