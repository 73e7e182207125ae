"""Human-readable end-of-job report: AUC / UAUC per task next to the dataset's oracle, normalized entropy and
calibration (rank 0 only)."""

from __future__ import annotations

import json
import os
from typing import Any

from data.storage import exists, join, read_bytes


def oracle_metrics(data_root: str, split: str) -> dict[str, dict[str, float]]:
    """{task: {"auc", "uauc"}} of the true probabilities, from the generator's dataset.json (if any; the
    daily mode's splits are its partitions, `dt=<date>`). `data_root`: a path or URI."""
    path = join(data_root, "dataset.json")
    if not exists(path):
        return {}
    info = json.loads(read_bytes(path))
    return info.get("splits", {}).get(split, {}).get("oracle", {})


def print_report(summary: dict[str, Any], data_root: str, title: str | None = None) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return
    metrics, split = summary["test"], summary.get("split", "test")
    tasks = sorted({k.split("/")[0] for k in metrics if k.endswith("/auc")})
    oracle = oracle_metrics(data_root, split)
    print(f"\n== {title or 'test metrics'} (split {split!r}, {int(metrics.get('rows', 0))} rows)")
    tail = f"{'UAUC-w':>8}{'NE':>8}{'calib':>8}"
    if oracle:  # the generator's true probabilities: how far from the best any model can do
        print(f"{'task':<10}{'AUC':>8}{'oracle':>8}{'gap':>8}{'UAUC':>8}{'oracle':>8}{'gap':>8}" + tail)
    else:  # real data has no oracle
        print(f"{'task':<10}{'AUC':>8}{'UAUC':>8}" + tail)
    nan = float("nan")
    for t in tasks:
        auc, uauc = metrics[f"{t}/auc"], metrics[f"{t}/uauc"]
        rest = (metrics[f"{t}/uauc_weighted"], *(metrics.get(f"{t}/{k}", nan) for k in ("ne", "calibration")))
        if oracle:
            o = oracle.get(t, {})
            oa, ou = o.get("auc", nan), o.get("uauc", nan)
            cells = (auc, oa, auc - oa, uauc, ou, uauc - ou, *rest)
        else:
            cells = (auc, uauc, *rest)
        print(f"{t:<10}" + "".join(f"{c:>8.4f}" for c in cells))
    key = "calibration_uncorrected"
    uncorrected = {t: metrics[f"{t}/{key}"] for t in tasks if f"{t}/{key}" in metrics}
    if uncorrected:  # trained on down-sampled negatives: the calibration the correction repaired
        print(
            "  predictions corrected for negative down-sampling; calibration without the correction: "
            + ", ".join(f"{t} {v:.4f}" for t, v in uncorrected.items())
        )
    if summary.get("collapsed"):
        print(f"  COLLAPSED (constant predictions): {', '.join(summary['collapsed'])}")
    if "selected_step" in summary and "valid" in summary and summary["valid"] is None:
        print(
            f"  the final state (step {summary['steps']}; no validation split); "
            f"stopped: {summary['stop_reason']}"
        )
    elif "selected_step" in summary:
        print(
            f"  selected step {summary['selected_step']} of {summary['steps']} on validation "
            f"({summary['early_stop']['metric']}); stopped: {summary['stop_reason']}"
        )
    if "test_dense_inference" in summary:  # Sparse-MoE: serving (sparse) vs all-experts (dense) inference
        dense = summary["test_dense_inference"]
        print(
            "  Sparse-MoE, same model with dense inference (every expert computed): "
            + " | ".join(f"{t} AUC {dense[f'{t}/auc']:.4f} UAUC {dense[f'{t}/uauc']:.4f}" for t in tasks)
        )
    if "moe/active_ratio" in metrics:
        flops = summary.get("activated_flops_per_sample"), summary.get("dense_flops_per_sample")
        cost = f"; {flops[0] / 1e6:.3f} of {flops[1] / 1e6:.3f} MFLOP/sample computed" if all(flops) else ""
        print(f"  Sparse-MoE serving: {metrics['moe/active_ratio']:.3f} of the experts active{cost}")
    extra = []
    if summary.get("train_samples_per_s"):
        extra.append(
            f"train {summary['train_samples_per_s']:.0f} samples/s over {summary['world_size']} ranks, "
            f"{summary['train_seconds']:.0f} s, {summary['steps']} steps"
        )
    if summary.get("run_dir"):
        extra.append(
            f"outputs: {summary['run_dir']} (metrics.json, metrics.jsonl, tensorboard/, checkpoints/)"
        )
    for line in extra:
        print(line)
