"""Exact metrics (data.metrics.auc, data.metrics.exact) vs sklearn / brute force, single-process and
2-rank gloo."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import log_loss, roc_auc_score

from data.metrics.auc import binary_auc, user_auc, weighted_auc
from data.metrics.exact import ExactAUCEvaluator

TASKS = ["click", "like"]


def _random_rows(n: int, seed: int, tie_levels: int | None, n_users: int = 50) -> tuple[torch.Tensor, ...]:
    """Scores (continuous or with only ``tie_levels`` distinct values), 0/1 labels, sparse user ids."""
    gen = torch.Generator().manual_seed(seed)
    if tie_levels is None:
        scores = torch.rand(n, generator=gen)
    else:
        scores = torch.randint(0, tie_levels, (n,), generator=gen).float() / tie_levels
    # Labels correlated with the score so the AUC is away from 0.5.
    labels = (torch.rand(n, generator=gen) < 0.2 + 0.5 * scores).float()
    # Non-contiguous, partly negative ids (hashed ids in production), rows in random user order.
    users = torch.randint(0, n_users, (n,), generator=gen) * 7919 - 1000
    return scores, labels, users


def _brute_force_uauc(scores: np.ndarray, labels: np.ndarray, users: np.ndarray) -> dict[str, float]:
    """Per-user loop with sklearn; users with one class are skipped."""
    aucs, sizes = [], []
    order = np.argsort(users, kind="stable")
    _, starts = np.unique(users[order], return_index=True)
    for rows in np.split(order, starts[1:]):
        if len(np.unique(labels[rows])) < 2:
            continue
        aucs.append(roc_auc_score(labels[rows], scores[rows]))
        sizes.append(len(rows))
    if not aucs:
        return {"uauc": math.nan, "uauc_weighted": math.nan, "uauc_users": 0.0}
    return {
        "uauc": float(np.mean(aucs)),
        "uauc_weighted": float(np.average(aucs, weights=sizes)),
        "uauc_users": float(len(aucs)),
    }


# ---------------------------------------------------------------------------------------------- binary_auc


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tie_levels", [None, 2, 5, 50])
@pytest.mark.parametrize("n", [7, 1000, 20_000])
def test_binary_auc_matches_sklearn(n: int, tie_levels: int | None, seed: int) -> None:
    scores, labels, _ = _random_rows(n, seed, tie_levels)
    if labels.min() == labels.max():
        pytest.skip("one class only")
    expected = roc_auc_score(labels.numpy(), scores.numpy())
    assert binary_auc(scores, labels) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("tie_levels", [None, 7])
def test_binary_auc_is_float64_exact_where_a_float32_roc_curve_is_not(tie_levels: int | None) -> None:
    """torchmetrics' float32 curve, used before, is 2e-10 (continuous) and 6e-9 (ties) off on these rows;
    the sharded evaluation must equal this value to 1e-9."""
    scores, labels, _ = _random_rows(100_000, 5, tie_levels)
    assert binary_auc(scores, labels) == pytest.approx(
        roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12
    )


def test_binary_auc_on_logits_keeps_distinct_large_logits_distinct() -> None:
    """float32 sigmoid maps all these logits to 1.0; the AUC must still see their order."""
    logits = torch.tensor([20.0, 21.0, 22.0, 23.0, 24.0, 25.0, -3.0, 30.0])
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    expected = roc_auc_score(labels.numpy(), logits.double().numpy())
    assert binary_auc(logits, labels) == pytest.approx(expected, abs=1e-7)
    assert expected != pytest.approx(roc_auc_score(labels.numpy(), torch.sigmoid(logits).numpy()))


def test_binary_auc_ties_count_half() -> None:
    assert binary_auc(torch.full((6,), 0.3), torch.tensor([0, 1, 0, 1, 1, 0.0])) == pytest.approx(0.5)
    # one pos/neg pair tied, one pair correctly ordered -> (1 + 0.5) / 2
    assert binary_auc(torch.tensor([0.5, 0.5, 0.9]), torch.tensor([0.0, 1.0, 1.0])) == pytest.approx(0.75)


@pytest.mark.parametrize(
    "labels", [torch.zeros(5), torch.ones(5), torch.empty(0)], ids=["all_neg", "all_pos", "empty"]
)
def test_binary_auc_is_nan_without_both_classes(labels: torch.Tensor) -> None:
    assert math.isnan(binary_auc(torch.rand(labels.numel()), labels))


def test_binary_auc_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        binary_auc(torch.rand(4), torch.ones(3))


# ---------------------------------------------------------------------------------------------- user_auc


_UAUC_CASES = [(n, u, t, s) for n, u in [(40, 30), (2000, 200)] for t in [None, 3, 20] for s in [0, 1]]


@pytest.mark.parametrize(("n", "n_users", "tie_levels", "seed"), [*_UAUC_CASES, (10_000, 800, 5, 2)])
def test_user_auc_matches_brute_force(n: int, n_users: int, tie_levels: int | None, seed: int) -> None:
    scores, labels, users = _random_rows(n, seed, tie_levels, n_users)
    got = user_auc(scores, labels, users)
    expected = _brute_force_uauc(scores.numpy(), labels.numpy(), users.numpy())
    assert got["uauc_users"] == expected["uauc_users"]
    # Some users must be skipped, so the test really exercises the single-class filter.
    assert got["uauc_users"] < len(torch.unique(users))
    assert got["uauc"] == pytest.approx(expected["uauc"], abs=1e-12)
    assert got["uauc_weighted"] == pytest.approx(expected["uauc_weighted"], abs=1e-12)


def test_user_auc_skips_single_class_users_and_weights_by_impressions() -> None:
    # user 1: 2 rows AUC 1.0; user 2: 4 rows AUC 0.5 (all tied); user 3: single class -> skipped
    scores = torch.tensor([0.1, 0.9, 0.4, 0.4, 0.4, 0.4, 0.2, 0.8])
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    users = torch.tensor([1, 1, 2, 2, 2, 2, 3, 3])
    got = user_auc(scores, labels, users)
    expected = {"uauc": 0.75, "uauc_weighted": (1.0 * 2 + 0.5 * 4) / 6, "uauc_users": 2.0}
    assert got == pytest.approx(expected)


def test_user_auc_is_row_order_invariant() -> None:
    scores, labels, users = _random_rows(5000, 3, 10, 300)
    perm = torch.randperm(5000, generator=torch.Generator().manual_seed(0))
    assert user_auc(scores, labels, users) == user_auc(scores[perm], labels[perm], users[perm])


def test_user_auc_single_user_equals_binary_auc() -> None:
    scores, labels, _ = _random_rows(5000, 4, 7)
    got = user_auc(scores, labels, torch.zeros(5000, dtype=torch.long))
    assert got["uauc_users"] == 1.0
    assert got["uauc"] == pytest.approx(binary_auc(scores, labels), abs=1e-12)
    assert got["uauc_weighted"] == got["uauc"]


@pytest.mark.parametrize(
    ("labels", "users"),
    [
        (torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.tensor([1, 2, 3, 4])),  # one row per user
        (torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([1, 1, 2, 2])),  # one class per user
        (torch.empty(0), torch.empty(0, dtype=torch.long)),
    ],
    ids=["singletons", "single_class_users", "empty"],
)
def test_user_auc_without_counted_users(labels: torch.Tensor, users: torch.Tensor) -> None:
    got = user_auc(torch.rand(labels.numel()), labels, users)
    assert math.isnan(got["uauc"]) and math.isnan(got["uauc_weighted"])
    assert got["uauc_users"] == 0.0


# ---------------------------------------------------------------------------------------------- evaluator


def _rank_batches(rank: int, weighted: bool = False) -> list[tuple[torch.Tensor | None, ...]]:
    """Deterministic eval batches for ``rank``: unequal row counts, padding rows, users shared by ranks;
    (logits, labels, users, mask, sample weights or None)."""
    gen = torch.Generator().manual_seed(100 + rank)
    sizes = [256, 256, 97] if rank == 0 else [256, 31, 64]
    batches = []
    for size in sizes:
        logits = torch.randn(size, len(TASKS), generator=gen) * 3
        # Heavy ties in task 0 (rounded logits), continuous task 1.
        logits[:, 0] = logits[:, 0].round()
        labels = (torch.rand(size, len(TASKS), generator=gen) < torch.sigmoid(logits)).float()
        users = torch.randint(0, 60, (size,), generator=gen)
        mask = torch.rand(size, generator=gen) > 0.15
        if rank == 1 and size == 64:
            mask[:] = False  # a batch that is padding only
        labels[~mask] = 1.0  # padding rows hold garbage that must not leak into the metrics
        logits[~mask] = 50.0
        # weights 0 .. 3 in quarters, some rows weight 0; padding rows get garbage weights too
        weights = torch.randint(0, 13, (size,), generator=gen).float() / 4 if weighted else None
        batches.append((logits, labels, users, mask, weights))
    return batches


def _valid_rows(batches: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = torch.cat([b[0][b[3]] for b in batches])
    labels = torch.cat([b[1][b[3]] for b in batches])
    users = torch.cat([b[2][b[3]] for b in batches])
    return logits, labels, users


def _valid_weights(batches: list) -> torch.Tensor:
    return torch.cat([b[4][b[3]] for b in batches])


def _evaluate(batches: list) -> dict[str, float]:
    evaluator = ExactAUCEvaluator(TASKS)
    for batch in batches:
        evaluator.update(*batch)
    return evaluator.compute()


def test_evaluator_matches_functions_over_valid_rows() -> None:
    batches = _rank_batches(0)
    got = _evaluate(batches)
    logits, labels, users = _valid_rows(batches)
    assert got["rows"] == float(logits.shape[0])
    for t, task in enumerate(TASKS):
        y = labels[:, t].numpy()
        p = torch.sigmoid(logits[:, t].double()).numpy()
        assert got[f"{task}/auc"] == pytest.approx(roc_auc_score(y, logits[:, t].numpy()), abs=1e-12)
        uauc = _brute_force_uauc(logits[:, t].numpy(), y, users.numpy())
        for key, value in uauc.items():
            assert got[f"{task}/{key}"] == pytest.approx(value, abs=1e-12)
        assert got[f"{task}/logloss"] == pytest.approx(log_loss(y, p), rel=1e-9)
        assert got[f"{task}/ctr"] == pytest.approx(y.mean(), rel=1e-12)
        assert got[f"{task}/pred_mean"] == pytest.approx(p.mean(), rel=1e-12)


def _numpy_ne(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """(normalized entropy, calibration), written out directly in numpy."""
    logloss = -(w * (y * np.log(p) + (1 - y) * np.log(1 - p))).sum() / w.sum()
    ctr = (w * y).sum() / w.sum()
    entropy = -(ctr * np.log(ctr) + (1 - ctr) * np.log(1 - ctr))
    return logloss / entropy, ((w * p).sum() / w.sum()) / ctr


@pytest.mark.parametrize("weighted", [False, True])
def test_ne_calibration_and_weighted_auc_and_logloss_equal_numpy_and_sklearn(weighted: bool) -> None:
    batches = _rank_batches(0, weighted)
    got = _evaluate(batches)
    logits, labels, _ = _valid_rows(batches)
    w = _valid_weights(batches).double().numpy() if weighted else np.ones(logits.shape[0])
    for t, task in enumerate(TASKS):
        y = labels[:, t].double().numpy()
        p = torch.sigmoid(logits[:, t].double()).numpy()
        ne, calibration = _numpy_ne(y, p, w)
        assert got[f"{task}/ne"] == pytest.approx(ne, rel=1e-9)
        assert got[f"{task}/calibration"] == pytest.approx(calibration, rel=1e-9)
        assert 0.3 < ne < 1.0 and 0.5 < calibration < 2  # a real signal, so the checks can fail
        assert got[f"{task}/auc"] == pytest.approx(
            roc_auc_score(y, logits[:, t].numpy(), sample_weight=w), abs=1e-12
        )
        assert got[f"{task}/logloss"] == pytest.approx(log_loss(y, p, sample_weight=w), rel=1e-9)
        assert got[f"{task}/ctr"] == pytest.approx((w * y).sum() / w.sum(), rel=1e-12)


@pytest.mark.parametrize("tie_levels", [None, 3])
def test_weighted_auc_counts_a_row_of_integer_weight_k_as_k_copies(tie_levels: int | None) -> None:
    scores, labels, _ = _random_rows(500, 7, tie_levels)
    weights = torch.randint(0, 4, (500,))
    copies = torch.repeat_interleave(torch.arange(500), weights)
    expected = roc_auc_score(labels[copies].numpy(), scores[copies].numpy())
    assert weighted_auc(scores, labels, weights.float()) == pytest.approx(expected, abs=1e-12)
    assert weighted_auc(scores, labels, torch.ones(500)) == binary_auc(scores, labels)
    assert math.isnan(weighted_auc(scores, torch.ones(500), torch.ones(500)))


def test_calibration_without_the_down_sampling_correction_is_reported_next_to_the_corrected_one() -> None:
    rate = 0.25
    batches = _rank_batches(0)
    corrected = ExactAUCEvaluator(TASKS, logit_correction=torch.full((2,), math.log(rate)))
    for logits, labels, users, mask, _ in batches:
        corrected.update(logits + math.log(rate), labels, users, mask)
    got, plain = corrected.compute(), _evaluate(batches)
    for task in TASKS:  # the uncorrected model's calibration is the plain evaluation's
        assert got[f"{task}/calibration_uncorrected"] == pytest.approx(plain[f"{task}/calibration"], rel=1e-6)
        assert got[f"{task}/calibration"] < 0.8 * plain[f"{task}/calibration"]
        assert got[f"{task}/auc"] == plain[f"{task}/auc"]  # a constant shift leaves the ranking alone


def test_evaluator_reset_and_empty() -> None:
    evaluator = ExactAUCEvaluator(TASKS)
    for batch in _rank_batches(1):
        evaluator.update(*batch)
    evaluator.reset()
    got = evaluator.compute()
    assert got["rows"] == 0.0
    assert got["click/uauc_users"] == 0.0
    assert all(math.isnan(got[f"click/{k}"]) for k in ("auc", "uauc", "logloss", "ctr", "pred_mean"))


def test_evaluator_rejects_wrong_task_count() -> None:
    with pytest.raises(ValueError):
        users = torch.zeros(4, dtype=torch.long)
        ExactAUCEvaluator(TASKS).update(torch.zeros(4, 3), torch.zeros(4, 3), users)


# ------------------------------------------------------------------------------ sharded vs gathered, 2 ranks

# Each case: what it stresses. Rows are built per rank by `_case_batches` (deterministic in case and rank).
SHARDED_CASES = {
    "heavy_ties": "task 0 has 4 distinct logits, task 1 ~20; unit weights; users shared by both ranks",
    "heavy_ties_weighted": "the same ties with sample weights 0 .. 3 in quarters (some rows weigh 0)",
    "continuous_weighted": "distinct float32 logits, weights 0 .. 3",
    "one_empty_rank": "rank 1's rows are all padding; ties and weights",
    "both_ranks_empty": "no valid row anywhere: every metric NaN",
    "all_equal_scores": "one logit for every row (AUC 0.5, spread 0): every row on one rank's range",
    "collapsed_scores": "90% of rows share one logit, the rest continuous",
    "one_class_task": "task 1 has no positive: its AUC, UAUC and NE are NaN",
    "users_on_one_rank": "each user's rows all on one rank (disjoint ids per rank)",
    "all_weights_zero": "every weight 0: every metric NaN, rows still counted",
    "logit_correction": "a down-sampling logit correction: calibration_uncorrected too",
}
CORRECTION = torch.full((len(TASKS),), math.log(0.25))


def _case_batches(case: str, rank: int) -> list[tuple[torch.Tensor | None, ...]]:
    """Three uneven batches (logits, labels, users, mask, weights or None) of `case` on `rank` (2 ranks)."""
    gen = torch.Generator().manual_seed(1000 * list(SHARDED_CASES).index(case) + rank)
    n = 3000 if rank == 0 else 1100  # uneven rows per rank
    logits = torch.randn(n, len(TASKS), generator=gen) * 2
    if "ties" in case or case in ("one_empty_rank", "logit_correction"):
        logits[:, 0] = torch.randint(-2, 2, (n,), generator=gen).float()
        logits[:, 1] = (logits[:, 1] * 2).round() / 2
    if case == "all_equal_scores":
        logits[:] = 0.7
    if case == "collapsed_scores":
        logits[torch.rand(n, generator=gen) < 0.9] = -2.0
    labels = (torch.rand(n, len(TASKS), generator=gen) < torch.sigmoid(logits - 1)).float()
    if case == "one_class_task":
        labels[:, 1] = 0.0
    users = torch.randint(0, 200, (n,), generator=gen) * 7919 - 1000  # sparse, partly negative, shared
    if case == "users_on_one_rank":
        users = rank * 1_000_003 + torch.randint(0, 100, (n,), generator=gen)
    weighted = "weighted" in case or case == "one_empty_rank"
    weights = torch.randint(0, 13, (n,), generator=gen).float() / 4 if weighted else None
    if case == "all_weights_zero":
        weights = torch.zeros(n)
    mask = torch.rand(n, generator=gen) > 0.1
    if case == "both_ranks_empty" or (case == "one_empty_rank" and rank == 1):
        mask[:] = False
    labels[~mask], logits[~mask] = 1.0, 50.0  # padding rows hold garbage that must not leak in
    parts = [torch.tensor_split(t, [n // 2, n // 2 + 7]) if t is not None else [None] * 3
             for t in (logits, labels, users, mask, weights)]  # fmt: skip
    return list(zip(*parts, strict=True))


def _case_evaluator(case: str, batches: list) -> ExactAUCEvaluator:
    evaluator = ExactAUCEvaluator(TASKS, CORRECTION if case == "logit_correction" else None)
    for batch in batches:
        evaluator.update(*batch)
    return evaluator


def _all_batches(case: str) -> list:
    """Both ranks' batches: the single-process evaluation of the whole split."""
    if case == "uneven":
        return _rank_batches(0, True) + _rank_batches(1, True)
    if case == "rank1_empty":
        return _rank_batches(0, True)[:1]  # rank 1 held a padding-only batch
    return _case_batches(case, 0) + _case_batches(case, 1)


def _routing_stats(evaluator: ExactAUCEvaluator) -> dict[str, object]:
    """Where the sharded path sends this rank's rows: task 1's score range and row count after the sample
    sort, and the user ids and row count after the routing by user."""
    from data.metrics.distributed import route_by_score, route_by_user

    logits, labels, users, weights = evaluator._local_rows()
    scores, _, _ = route_by_score(logits[:, 1].contiguous(), labels[:, 1].contiguous(), weights)
    by_user, _ = route_by_user(users, [logits])
    return {
        "score_rows": scores.numel(),
        "score_range": (float(scores.min()), float(scores.max())),
        "user_rows": by_user.numel(),
        "users": set(by_user.tolist()),
    }


def _sharded_worker(rank: int, world_size: int, store_path: str, out_dir: str) -> None:
    """One gloo rank: compute() and compute_gathered() of every case, and the routing of one case."""
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        results: dict[str, object] = {}
        for case in SHARDED_CASES:
            evaluator = _case_evaluator(case, _case_batches(case, rank))
            results[case] = {"sharded": evaluator.compute(), "gathered": evaluator.compute_gathered()}
        # the pre-existing cases: rank 1 with all its batches, then with only a padding batch
        batches = _rank_batches(rank, weighted=True)
        results["uneven"] = {"sharded": _case_evaluator("uneven", batches).compute()}
        rank1_empty = _case_evaluator("rank1_empty", batches[:1] if rank == 0 else batches[2:])
        results["rank1_empty"] = {"sharded": rank1_empty.compute()}
        results["routing"] = _routing_stats(_case_evaluator("", _case_batches("heavy_ties", rank)))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Every case on 2 gloo ranks (one spawn for all of them): each rank's results."""
    out = tmp_path_factory.mktemp("sharded")
    mp.start_processes(
        _sharded_worker, args=(2, str(out / "store"), str(out)), nprocs=2, start_method="spawn"
    )
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


def _assert_same_metrics(got: dict[str, float], expected: dict[str, float], tol: float = 1e-12) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=tol, abs=tol, nan_ok=True), key


@pytest.mark.parametrize("case", list(SHARDED_CASES))
def test_sharded_compute_equals_gathered_and_single_process_on_every_rank(case: str, sharded_runs) -> None:
    single = _case_evaluator(case, _all_batches(case))
    expected = single.compute_gathered()
    _assert_same_metrics(single.compute(), expected, tol=1e-9)  # no process group: the same code
    for rank, run in enumerate(sharded_runs):
        _assert_same_metrics(run[case]["gathered"], expected, tol=1e-9)
        _assert_same_metrics(run[case]["sharded"], expected, tol=1e-9)
        assert list(run[case]["sharded"]) == list(expected), rank  # same keys, same order


def test_sharded_cases_reach_the_edge_they_are_named_after(sharded_runs) -> None:
    """The cases are not vacuous: NaN where a case must give NaN, finite where it must not."""
    got = {case: run["sharded"] for case, run in sharded_runs[0].items() if case != "routing"}
    assert all(math.isnan(got["both_ranks_empty"][f"{t}/auc"]) for t in TASKS)
    assert got["all_weights_zero"]["rows"] > 0 and math.isnan(got["all_weights_zero"]["click/logloss"])
    assert math.isnan(got["one_class_task"]["like/auc"]) and math.isfinite(got["one_class_task"]["click/auc"])
    assert got["all_equal_scores"]["click/auc"] == 0.5 and got["all_equal_scores"]["click/pred_std"] < 1e-12
    assert "click/calibration_uncorrected" in got["logit_correction"]
    assert got["one_empty_rank"]["rows"] == sum(int(b[3].sum()) for b in _case_batches("one_empty_rank", 0))
    for case in ("heavy_ties", "continuous_weighted", "collapsed_scores", "users_on_one_rank"):
        assert all(math.isfinite(got[case][f"{t}/{k}"]) for t in TASKS for k in ("auc", "uauc", "ne")), case


def test_distributed_compute_equals_single_process_over_all_valid_rows(sharded_runs) -> None:
    for case in ("uneven", "rank1_empty"):
        expected = _case_evaluator(case, _all_batches(case)).compute()
        assert expected["rows"] > 0 and math.isfinite(expected["like/uauc"])
        for run in sharded_runs:
            _assert_same_metrics(run[case]["sharded"], expected)


def test_sample_sort_gives_each_rank_a_disjoint_score_range_and_about_half_the_rows(sharded_runs) -> None:
    """Task 1 of `heavy_ties` (a few dozen distinct logits): the ranks' ranges do not overlap, so a tie
    group is never split, and each rank holds a share near half (the splitter sits on a tie group's edge)."""
    low, high = (run["routing"] for run in sharded_runs)
    assert low["score_range"][1] < high["score_range"][0]
    total = low["score_rows"] + high["score_rows"]
    assert total == sum(int(b[3].sum()) for b in _all_batches("heavy_ties"))
    assert 0.3 * total < low["score_rows"] < 0.7 * total


def test_user_routing_gives_every_user_to_exactly_one_rank(sharded_runs) -> None:
    first, second = (run["routing"] for run in sharded_runs)
    assert not first["users"] & second["users"]
    assert first["users"] | second["users"] == set(
        torch.cat([b[2][b[3]] for b in _all_batches("heavy_ties")]).tolist()
    )
    total = first["user_rows"] + second["user_rows"]
    assert 0.3 * total < first["user_rows"] < 0.7 * total


def test_choose_splitters_weighs_each_ranks_samples_by_its_row_count() -> None:
    from data.metrics.distributed import choose_splitters

    samples = 100
    small = torch.linspace(0, 1, samples, dtype=torch.float64)  # 1,000 rows in [0, 1]
    large = torch.linspace(2, 3, samples, dtype=torch.float64)  # 9,000 rows in [2, 3]
    empty = torch.zeros(samples, dtype=torch.float64)  # a rank without rows: its samples weigh nothing
    gathered = torch.stack(
        [torch.cat([small, small.new_tensor([1000])]), torch.cat([large, large.new_tensor([9000])]),
         torch.cat([empty, empty.new_tensor([0])])]
    )  # fmt: skip
    splitters = choose_splitters(gathered, world=3)
    # thirds of 10,000 rows: 1,000 below 2, then 2,333 and 5,667 of the 9,000 spread over [2, 3]
    assert splitters.tolist() == pytest.approx([2 + 2333 / 9000, 2 + 5667 / 9000], abs=0.02)


def test_user_owner_spreads_strided_and_negative_ids_evenly() -> None:
    from data.metrics.distributed import user_owner

    for ids in (torch.arange(80_000) * 7919 - 10**6, torch.arange(80_000) << 32, -torch.arange(80_000)):
        owners = user_owner(ids, 8)
        assert owners.min() >= 0 and owners.max() < 8
        share = torch.bincount(owners, minlength=8) / ids.numel()
        assert share.min() > 0.115 and share.max() < 0.135, share
    assert torch.equal(user_owner(torch.tensor([5, 5, 5]), 3), user_owner(torch.tensor([5]), 3).expand(3))


def _collective_devices_worker(rank: int, world_size: int, store_path: str, out_dir: str) -> None:
    """One gloo rank of an evaluation (the exact evaluator, the evaluation statistics' mean over ranks),
    recording the device of every tensor handed to a collective."""
    from models.collectives import mean_over_ranks

    seen: list[str] = []

    def recording(collective):  # noqa: ANN001, ANN202
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            for a in args:
                for t in a if isinstance(a, list | tuple) else [a]:
                    if isinstance(t, torch.Tensor):
                        seen.append(t.device.type)
            return collective(*args, **kwargs)

        return call

    for name in ("all_reduce", "all_gather", "broadcast", "reduce_scatter", "all_to_all_single", "gather"):
        setattr(dist, name, recording(getattr(dist, name)))
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        evaluator = ExactAUCEvaluator(TASKS)
        for batch in _rank_batches(rank):
            evaluator.update(*batch)
        evaluator.compute()
        mean_over_ranks(torch.tensor([1.0, 2.0], dtype=torch.float64))
        (Path(out_dir) / f"devices{rank}.txt").write_text(" ".join(seen))
    finally:
        dist.destroy_process_group()


def test_a_cuda_jobs_group_takes_every_tensor_evaluation_hands_to_a_collective(tmp_path: Path) -> None:
    """Issue 23, defect 2: evaluation hands CPU tensors to collectives, which a NCCL-only group (a CUDA
    job's group before) refuses; a CUDA job's group (`backend_for`) takes every one of them."""
    from pipeline.dist import backend_for, served_devices

    mp.start_processes(
        _collective_devices_worker,
        args=(2, str(tmp_path / "store"), str(tmp_path)),
        nprocs=2,
        start_method="spawn",
    )
    for rank in range(2):
        devices = set((tmp_path / f"devices{rank}.txt").read_text().split())
        assert devices == {"cpu"}
        assert not devices <= served_devices("nccl")  # NCCL alone would refuse these
        assert devices <= served_devices(backend_for(torch.device("cuda", 0)))
