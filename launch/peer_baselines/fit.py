"""LightGBM and logistic regression on the schema's columns, chosen on validation and scored on test with
the pipeline's exact AUC / UAUC (launch/peers.py is the command line; features.py builds the matrices)."""

from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

try:  # the peers are an optional extra, not part of the core install
    import lightgbm as lgb
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import OneHotEncoder, StandardScaler
except ImportError as e:
    missing = f"launch/peers.py needs the [peers] extra ({e.name} is missing)"
    raise SystemExit(f"{missing}: pip install -e '.[peers]'") from None

from data.metrics.auc import binary_auc, user_auc
from data.schema import Schema
from launch.peer_baselines.features import Features, SplitData, load_split

REPO_ROOT = Path(__file__).resolve().parents[2]
SPLITS = ("train", "valid", "test")
# 16 settings: on ML-100K the first 12-setting grid chose its largest num_leaves (127) for every seed, so
# the grid was widened until the choice lies inside it
LGB_GRID: dict[str, list[Any]] = {
    "num_leaves": [31, 63, 127, 255],
    "learning_rate": [0.05, 0.1],
    "min_child_samples": [20, 100],
}
LGB_FIXED: dict[str, Any] = {
    "objective": "binary",
    "metric": "auc",
    "feature_fraction": 0.8,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "deterministic": True,
    "force_row_wise": True,
    "verbose": -1,
}
MAX_ROUNDS = 2000
EARLY_STOP = 50
LOGREG_C = [0.01, 0.1, 1.0, 10.0]
METRICS = ("auc", "uauc", "uauc_weighted", "uauc_users", "logloss")


# ------------------------------------------------------------------------ metrics
def task_metrics(logits: np.ndarray, labels: np.ndarray, user_id: np.ndarray) -> dict[str, float]:
    """AUC, UAUC (data.metrics.auc, exact) and logloss of one task's logits."""
    lg, lb = (
        torch.from_numpy(np.asarray(logits, np.float64)),
        torch.from_numpy(np.asarray(labels, np.float64)),
    )
    return {
        "auc": binary_auc(lg, lb),
        **user_auc(lg, lb, torch.from_numpy(np.asarray(user_id, np.int64))),
        "logloss": float(F.binary_cross_entropy_with_logits(lg, lb)),
    }


def split_metrics(logits: dict[str, np.ndarray], data: SplitData, tasks: tuple[str, ...]) -> dict[str, float]:
    """`<task>/<metric>` for every task's logits on one split."""
    out: dict[str, float] = {}
    for t, task in enumerate(tasks):
        for k, v in task_metrics(logits[task], data.labels[:, t], data.user_id).items():
            out[f"{task}/{k}"] = v
    return out


# ------------------------------------------------------------------------ LightGBM
def _lgb_x(f: Features) -> np.ndarray:
    return np.hstack([f.numeric, f.categorical.astype(np.float64)])


def _lgb_dataset(f: Features, y: np.ndarray, reference: lgb.Dataset | None = None) -> lgb.Dataset:
    return lgb.Dataset(
        _lgb_x(f),
        label=y,
        feature_name=f.names,
        categorical_feature=f.categorical_names,
        reference=reference,
        params={"verbose": -1},
        free_raw_data=False,
    )


def fit_lightgbm(
    train: SplitData,
    valid: SplitData,
    task: int,
    seed: int,
    grid: dict[str, list[Any]] = LGB_GRID,
    threads: int = 1,
    max_rounds: int = MAX_ROUNDS,
    early_stop: int = EARLY_STOP,
) -> tuple[lgb.Booster, dict[str, Any]]:
    """The grid's best booster on the valid AUC (at its early-stopped round) and its settings."""
    best: tuple[float, lgb.Booster, dict[str, Any]] | None = None
    tried: dict[str, float] = {}
    for values in itertools.product(*grid.values()):
        setting = dict(zip(grid, values))
        params = {**LGB_FIXED, **setting, "seed": seed, "num_threads": threads}
        # a fresh Dataset per setting: min_child_samples is also a binning-time parameter
        dtrain = _lgb_dataset(train.features, train.labels[:, task])
        dvalid = _lgb_dataset(valid.features, valid.labels[:, task], reference=dtrain)
        booster = lgb.train(
            params,
            dtrain,
            num_boost_round=max_rounds,
            valid_sets=[dvalid],
            callbacks=[lgb.early_stopping(early_stop, first_metric_only=True, verbose=False)],
        )
        logits = booster.predict(_lgb_x(valid.features), num_iteration=booster.best_iteration, raw_score=True)
        auc = binary_auc(torch.from_numpy(logits), torch.from_numpy(valid.labels[:, task]))
        tried[",".join(f"{k}={v}" for k, v in setting.items())] = auc
        if best is None or auc > best[0]:
            best = (auc, booster, {**setting, "best_iteration": booster.best_iteration, "valid_auc": auc})
    assert best is not None, "empty grid"
    return best[1], {**best[2], "grid_valid_auc": tried}


def run_lightgbm(
    data: dict[str, SplitData], tasks: tuple[str, ...], seed: int, **kwargs: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One seed: per-task selected settings, and {"valid", "test"} metrics of the selected models."""
    logits: dict[str, dict[str, np.ndarray]] = {"valid": {}, "test": {}}
    chosen: dict[str, Any] = {}
    for t, task in enumerate(tasks):
        booster, chosen[task] = fit_lightgbm(data["train"], data["valid"], t, seed, **kwargs)
        for split in logits:
            x = _lgb_x(data[split].features)
            logits[split][task] = booster.predict(x, num_iteration=booster.best_iteration, raw_score=True)
    metrics = {split: split_metrics(logits[split], data[split], tasks) for split in logits}
    return chosen, metrics


# ------------------------------------------------------------------------ logistic regression
class LogRegDesign:
    """Sparse design: one-hot categorical ids + imputed, standardized numeric columns (fit on train)."""

    def __init__(self, train: Features) -> None:
        self.onehot = OneHotEncoder(handle_unknown="ignore", sparse_output=True, dtype=np.float64)
        self.onehot.fit(train.categorical)
        self.imputer = SimpleImputer(strategy="mean", add_indicator=True, keep_empty_features=True)
        self.scaler = StandardScaler().fit(self.imputer.fit_transform(train.numeric))

    def __call__(self, f: Features) -> sp.csr_matrix:
        dense = self.scaler.transform(self.imputer.transform(f.numeric))
        return sp.hstack([self.onehot.transform(f.categorical), sp.csr_matrix(dense)], format="csr")


def fit_logreg(
    x_train: sp.csr_matrix,
    y_train: np.ndarray,
    x_valid: sp.csr_matrix,
    y_valid: np.ndarray,
    cs: list[float] = LOGREG_C,
) -> tuple[LogisticRegression, dict[str, Any]]:
    """The C of the grid with the best valid AUC, its model and settings."""
    best: tuple[float, LogisticRegression, float] | None = None
    tried: dict[str, float] = {}
    for c in cs:
        model = LogisticRegression(C=c, solver="liblinear", max_iter=1000, random_state=0)
        model.fit(x_train, y_train)
        auc = binary_auc(torch.from_numpy(model.decision_function(x_valid)), torch.from_numpy(y_valid))
        tried[f"C={c}"] = auc
        if best is None or auc > best[0]:
            best = (auc, model, c)
    assert best is not None, "empty grid"
    return best[1], {"C": best[2], "valid_auc": best[0], "grid_valid_auc": tried}


def run_logreg(
    data: dict[str, SplitData], tasks: tuple[str, ...], cs: list[float] = LOGREG_C
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-task selected C and {"valid", "test"} metrics (deterministic: no seed)."""
    design = LogRegDesign(data["train"].features)
    x = {split: design(d.features) for split, d in data.items()}
    logits: dict[str, dict[str, np.ndarray]] = {"valid": {}, "test": {}}
    chosen: dict[str, Any] = {}
    for t, task in enumerate(tasks):
        model, chosen[task] = fit_logreg(
            x["train"], data["train"].labels[:, t], x["valid"], data["valid"].labels[:, t], cs
        )
        for split in logits:
            logits[split][task] = model.decision_function(x[split])
    metrics = {split: split_metrics(logits[split], data[split], tasks) for split in logits}
    return chosen, metrics


# ------------------------------------------------------------------------ driver
def _summary(per_seed: dict[str, dict[str, Any]], stat: Any) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for split in ("valid", "test"):
        keys = next(iter(per_seed.values()))[split]
        out[split] = {k: stat([r[split][k] for r in per_seed.values()]) for k in keys}
    return out


def _mean_sd(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    sd = _summary(per_seed, lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    return {"mean": _summary(per_seed, statistics.fmean), "sd": sd}


def run_peers(
    schema: Schema,
    root: str | Path,
    seeds: list[int],
    threads: int = 1,
    lgb_grid: dict[str, list[Any]] = LGB_GRID,
    logreg_c: list[float] = LOGREG_C,
    max_rounds: int = MAX_ROUNDS,
) -> dict[str, Any]:
    """Both peers on `<root>/{train,valid,test}`; the JSON-ready result (see the module docstring)."""
    start = time.perf_counter()
    data = {split: load_split(root, split, schema) for split in SPLITS}
    tasks = schema.labels
    f = data["train"].features
    result: dict[str, Any] = {
        "dataset": schema.name,
        "root": str(root),
        "rows": {split: d.n for split, d in data.items()},
        "features": {"numeric": f.numeric_names, "categorical": f.categorical_names},
        "peers": {},
    }

    t0 = time.perf_counter()
    lgb_seeds: dict[str, dict[str, Any]] = {}
    for seed in seeds:
        chosen, metrics = run_lightgbm(
            data, tasks, seed, grid=lgb_grid, threads=threads, max_rounds=max_rounds
        )
        lgb_seeds[str(seed)] = {"settings": chosen, **metrics}
    result["peers"]["lightgbm"] = {
        "settings": {
            "grid": lgb_grid,
            "fixed": {**LGB_FIXED, "max_rounds": max_rounds, "early_stopping_rounds": EARLY_STOP},
            "chosen": {s: r["settings"] for s, r in lgb_seeds.items()},
        },
        "seeds": lgb_seeds,
        **_mean_sd(lgb_seeds),
        "seconds": time.perf_counter() - t0,
    }

    t0 = time.perf_counter()
    chosen, metrics = run_logreg(data, tasks, logreg_c)
    lr_seeds = {str(seed): {"settings": chosen, **metrics} for seed in seeds}
    result["peers"]["logreg"] = {
        "settings": {
            "grid": {"C": logreg_c},
            "fixed": {"solver": "liblinear", "penalty": "l2", "max_iter": 1000},
            "chosen": chosen,
            "fits": 1,
            "note": "deterministic and seed-free: fitted once, listed under every seed (sd 0)",
        },
        "seeds": lr_seeds,
        **_mean_sd(lr_seeds),
        "seconds": time.perf_counter() - t0,
    }
    result["seconds"] = time.perf_counter() - start
    return result


def markdown_table(result: dict[str, Any], tasks: tuple[str, ...]) -> str:
    """Test AUC / UAUC mean ± sd over seeds, one row per peer."""
    head = "| model | " + " | ".join(f"{t} AUC | {t} UAUC" for t in tasks) + " | seeds |"
    lines = [head, "|---" * (2 + 2 * len(tasks)) + "|"]
    for name, peer in result["peers"].items():
        mean, sd = peer["mean"]["test"], peer["sd"]["test"]
        cells = [f"{mean[f'{t}/{m}']:.4f} ± {sd[f'{t}/{m}']:.4f}" for t in tasks for m in ("auc", "uauc")]
        fits = peer["settings"].get("fits", len(peer["seeds"]))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(peer['seeds'])} ({fits} fit) |")
    return "\n".join(lines)
