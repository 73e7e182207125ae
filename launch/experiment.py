"""Experiment grids: train + evaluate every cell of a sweep config over seeds, then write a report.

    python launch/experiment.py conf/experiment/baselines.yaml [--quick] [--out DIR] [--nproc 2]

A sweep config (conf/experiment/*.yaml, typed by `SweepConfig`) lists cells; each cell is a set of
`launch/train.py` overrides, run once per seed under torchrun. A cell can ask for a dense-parameter budget
instead of a width: the arch's scale field (`models.baselines.SCALE_FIELD`) is then solved on the meta
device so that `dense_arch.num_params()` lands on the budget. Finished runs (a `metrics.json`) are never
rerun, so an interrupted sweep continues where it stopped. The report (`<out>/README.md`,
`<out>/results.json`, one PNG per plot) has every cell's mean and spread over seeds, params, FLOPs, the
measured training throughput of the pipeline and of the dense arch alone (samples/s, MFU on this machine).

Why a runner of our own instead of Hydra multirun: each cell is a torchrun job (2 processes), and a sweep
also has to solve budgets, skip finished runs and aggregate seeds into tables and plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

METRICS = ("finish/auc", "skip/auc", "finish/uauc", "skip/uauc")


@dataclass
class Cell:
    label: str  # row of the table
    line: str = ""  # series in the plots ("" = the label)
    overrides: list[str] = field(default_factory=list)  # launch/train.py overrides (model=..., model.x=...)
    x: float | None = None  # x of "x" plots (e.g. the active ratio)
    params_budget: float | None = None  # solve the arch's scale field for this many dense params


@dataclass
class BudgetGrid:
    """Cells = every model x every budget; label "<model> @<budget>"."""

    models: dict[str, list[str]] = field(default_factory=dict)  # line name -> overrides
    budgets: list[float] = field(default_factory=list)


@dataclass
class Plot:
    file: str  # PNG name under the report dir
    y: str = "finish/auc"  # a test metric
    x: str = "x"  # x | params | flops (activated forward FLOPs per sample)
    log_x: bool = False
    title: str = ""
    x_label: str = ""


@dataclass
class Quick:
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    labels: list[str] = field(default_factory=list)  # cells to keep ([] = all)
    budgets: list[float] = field(default_factory=list)  # budget-grid budgets to keep ([] = all)
    reference: str = ""  # replaces the sweep's reference ("" = keep it)


@dataclass
class SweepConfig:
    name: str
    description: str = ""
    overrides: list[str] = field(default_factory=list)  # applied to every cell, before the cell's own
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    reference: str = ""  # label of the row that deltas are relative to ("" = no deltas)
    cells: list[Cell] = field(default_factory=list)
    budget_grid: BudgetGrid | None = None
    plots: list[Plot] = field(default_factory=list)
    measure_speed: bool = True  # time each cell's dense arch alone (batch 512) after the sweep
    quick: Quick = field(default_factory=Quick)


def load_sweep(path: Path, quick: bool) -> tuple[SweepConfig, list[Cell]]:
    """The typed sweep config and its expanded cells (quick: the quick subset and overrides)."""
    raw = OmegaConf.load(path)
    try:
        cfg: SweepConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepConfig), raw))
    except Exception as e:  # omegaconf's errors name the key; keep them, drop the traceback
        raise SystemExit(f"error: {path}: {e}") from None
    cells = list(cfg.cells)
    if cfg.budget_grid is not None:
        budgets = cfg.budget_grid.budgets
        if quick and cfg.quick.budgets:
            budgets = [b for b in budgets if b in cfg.quick.budgets]
        for budget in budgets:
            for line, overrides in cfg.budget_grid.models.items():
                label = f"{line} @{_human(budget)}"
                cells.append(Cell(label=label, line=line, overrides=list(overrides), params_budget=budget))
    if quick:
        if cfg.quick.labels:
            cells = [c for c in cells if c.label in cfg.quick.labels]
        cfg.seeds = list(cfg.quick.seeds)
        cfg.reference = cfg.quick.reference or cfg.reference
        cfg.overrides = [*cfg.overrides, *cfg.quick.overrides]
    labels = [c.label for c in cells]
    if len(set(labels)) != len(labels):
        raise SystemExit(
            f"error: {path}: duplicate cell labels {sorted({x for x in labels if labels.count(x) > 1})}"
        )
    if cfg.reference and cfg.reference not in labels:
        raise SystemExit(f"error: {path}: reference {cfg.reference!r} is not a cell label")
    return cfg, cells


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return f"{n:g}"


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")


# ---- composing configs and solving budgets -----------------------------------------------------------


def compose(overrides: list[str]) -> Any:
    """The train config launch/train.py would run with these overrides (typed, validated)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import launch.train  # noqa: F401 - registers the typed config nodes in Hydra's ConfigStore
    from pipeline.config import reject_unknown_keys

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        cfg = hydra_compose(config_name="train", overrides=overrides)
    reject_unknown_keys(cfg)
    return cfg


def build_dense_arch_for(cfg: Any, device: str = "meta") -> torch.nn.Module:
    """The dense arch of a composed config, on `device` (meta: no memory, exact param count)."""
    from data.schema import Schema
    from models.ranking import RankingModel

    schema = Schema.from_dict(OmegaConf.to_container(cfg.data.schema, resolve=True))
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    with torch.device(device):  # the embedding tables are never materialised: only the dense arch is used
        return RankingModel(schema, model_cfg, device=torch.device("meta")).dense_arch


def _multiple_of(model_cfg: Any) -> int:
    """Width granularity: RankMixer's D must split into T heads, attention dims into heads."""
    arch = model_cfg.arch
    if arch == "rankmixer":
        return int(model_cfg.num_tokens)
    if arch == "autoint":
        return int(model_cfg.num_heads)
    return 1


def solve_budget(overrides: list[str], budget: float) -> tuple[str, int, int]:
    """(scale field, width, params): the width (a multiple of the arch's granularity) whose dense params
    are closest to `budget`. Params grow monotonically with the width, so bisect."""
    from models.baselines import SCALE_FIELD

    cfg = compose(overrides)
    name = SCALE_FIELD[cfg.model.arch]
    step = _multiple_of(cfg.model)

    def params(units: int) -> int:
        return build_dense_arch_for(compose([*overrides, f"model.{name}={units * step}"])).num_params()

    lo, hi = 1, 2
    while params(hi) < budget:
        lo, hi = hi, hi * 2
        if hi > 1 << 20:
            raise SystemExit(f"error: cannot reach {budget:g} params by scaling model.{name}")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if params(mid) < budget else (lo, mid)
    best = min((lo, hi), key=lambda u: abs(params(u) - budget))
    return name, best * step, params(best)


# ---- running --------------------------------------------------------------------------------------


def run_cell(cell_overrides: list[str], run_dir: Path, seed: int, nproc: int) -> dict | None:
    """One torchrun training job (+ final test evaluation); its metrics.json, or None if it failed.
    A run with a metrics.json already is not rerun."""
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        return json.loads(metrics.read_text())
    if run_dir.exists():  # an interrupted run: start over (its checkpoints belong to a partial run)
        import shutil

        shutil.rmtree(run_dir)
    log = run_dir.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = [
        *torchrun,
        "launch/train.py",
        *cell_overrides,
        f"trainer.seed={seed}",
        f"trainer.run_dir={run_dir}",
    ]
    t0 = time.time()
    with open(log, "w") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    if proc.returncode != 0 or not metrics.is_file():
        print(f"  FAILED (exit {proc.returncode}); log: {log}", flush=True)
        return None
    print(f"  done in {time.time() - t0:.0f} s", flush=True)
    return json.loads(metrics.read_text())


def measure_dense_speed(cfg: Any, batch_size: int = 512) -> dict:
    """Training samples/s and MFU of the cell's dense arch alone (forward + backward + RMSProp), fp32."""
    from launch.bench import measure_training

    dense = build_dense_arch_for(cfg, device="cpu")
    torch.manual_seed(0)
    groups = [torch.randn(batch_size, d) for d in dense.cfg.group_dims]
    labels = torch.randint(0, 2, (batch_size, dense.cfg.num_tasks)).float()
    return measure_training(dense, groups, labels, dense.flops_per_sample(), steps=6, warmup=2)


def _previous_speeds(path: Path) -> dict[tuple[str, int], dict]:
    """Dense-arch speeds of an earlier report of this sweep, by (label, params): a resumed sweep that
    trains nothing new does not re-time anything either."""
    if not path.is_file():
        return {}
    cells = json.loads(path.read_text()).get("cells", [])
    return {(c["label"], c["params"]): c["speed"] for c in cells if c.get("speed")}


# ---- aggregation and report -----------------------------------------------------------------------


def _mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(cells: list[dict]) -> list[dict]:
    for cell in cells:
        runs = [r for r in cell["runs"] if r is not None]
        cell["seeds_ok"] = len(runs)
        stats = {}
        for metric in (*METRICS, "moe/active_ratio"):
            vals = [r["test"][metric] for r in runs if metric in r.get("test", {})]
            if vals:
                stats[metric] = _mean_spread(vals)
        cell["stats"] = stats
        flops = [r["activated_flops_per_sample"] for r in runs if "activated_flops_per_sample" in r]
        cell["activated_flops"] = statistics.fmean(flops) if flops else cell["dense_flops"]
        sps = [r["train_samples_per_s"] for r in runs if r.get("train_samples_per_s")]
        cell["pipeline_samples_per_s"] = statistics.fmean(sps) if sps else math.nan
    return cells


def _fmt(stat: tuple[float, float] | None, digits: int = 4) -> str:
    if stat is None or math.isnan(stat[0]):
        return "failed"
    return f"{stat[0]:.{digits}f} ± {stat[1]:.{digits}f}"


def markdown_table(cfg: SweepConfig, cells: list[dict]) -> str:
    ref = next((c for c in cells if c["label"] == cfg.reference), None)
    has_moe = any("moe/active_ratio" in c["stats"] for c in cells)
    head = ["cell", "dense params", "fwd MFLOP/sample", "train GFLOP/batch 512"]
    for metric in METRICS:
        head.append(metric.replace("/", " ").replace("auc", "AUC").replace("uAUC", "UAUC"))
        if ref is not None:
            head.append("Δ %")
    if has_moe:
        head.append("active ratio")
    head += ["pipeline samples/s", "dense-arch samples/s", "MFU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        row = [
            c["label"],
            f"{c['params'] / 1e6:.3f}M",
            f"{c['activated_flops'] / 1e6:.2f}",
            f"{3 * c['dense_flops'] * 512 / 1e9:.2f}",  # training computes every expert (dense training)
        ]
        for metric in METRICS:
            stat = c["stats"].get(metric)
            row.append(_fmt(stat))
            if ref is not None:
                base = ref["stats"].get(metric)
                ok = stat is not None and base is not None
                row.append(f"{100 * (stat[0] - base[0]) / base[0]:+.2f}" if ok else "")
        if has_moe:
            row.append(
                _fmt(c["stats"].get("moe/active_ratio"), 3) if "moe/active_ratio" in c["stats"] else ""
            )
        speed = c.get("speed") or {}
        row += [
            f"{c['pipeline_samples_per_s']:.0f}",
            f"{speed['samples_per_s']:.0f}" if speed else "",
            f"{speed['mfu']:.1%}" if speed else "",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(cfg: SweepConfig, cells: list[dict], spec: Plot, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs_of = {"x": lambda c: c["x"], "params": lambda c: c["params"], "flops": lambda c: c["activated_flops"]}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    lines: dict[str, list[dict]] = {}
    for c in cells:
        if spec.y in c["stats"] and xs_of[spec.x](c) is not None:
            lines.setdefault(c["line"] or c["label"], []).append(c)
    for name, members in lines.items():
        members.sort(key=xs_of[spec.x])
        xs = [xs_of[spec.x](c) for c in members]
        ys = [c["stats"][spec.y][0] for c in members]
        errs = [c["stats"][spec.y][1] for c in members]
        ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=name)
    if spec.log_x:
        ax.set_xscale("log", base=2 if spec.x == "x" else 10)
    ax.set_xlabel(spec.x_label or spec.x)
    ax.set_ylabel(f"test {spec.y}")
    ax.set_title(spec.title or cfg.name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / spec.file
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(cfg: SweepConfig, cells: list[dict], out: Path, seeds: list[int], quick: bool) -> None:
    (out / "results.json").write_text(
        json.dumps({"config": dataclasses.asdict(cfg), "cells": cells}, indent=1)
    )
    pngs = [plot(cfg, cells, spec, out) for spec in cfg.plots]
    text = [
        f"# {cfg.name}{' (quick grid)' if quick else ''}",
        "",
        cfg.description.strip(),
        "",
        f"Seeds: {seeds}; each cell is the mean ± sample standard deviation over seeds. Test split, "
        "exact AUC and UAUC (per-user AUC). Δ % = 100 × (metric − reference) / reference"
        + (f", reference: `{cfg.reference}`." if cfg.reference else "."),
        "FLOPs: forward matmul FLOPs per sample computed at serving (Sparse-MoE: at the measured active "
        "ratio); training = 3 × forward, with every expert (dense training). Pipeline samples/s: the "
        "whole torchrun job (embeddings, data, 2 ranks); dense-arch samples/s and MFU: the dense arch "
        "alone, batch 512, 1 process on all cores, fp32, MFU against a GEMM timed after each step.",
        "",
        f"Common overrides: `{' '.join(cfg.overrides)}`",
        "",
        markdown_table(cfg, cells),
        "",
        *[f"![{p.stem}]({p.name})" for p in pngs],
        "",
        "Per-cell overrides:",
        "",
        *[f"- `{c['label']}`: `{' '.join(c['overrides'])}`" for c in cells],
        "",
    ]
    (out / "README.md").write_text("\n".join(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", type=Path, help="sweep config, e.g. conf/experiment/baselines.yaml")
    parser.add_argument("--quick", action="store_true", help="the config's quick subset (< 15 min)")
    parser.add_argument("--out", type=Path, default=None, help="report dir (default reports/<name>[-quick])")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes per run")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the cells (budgets solved), run nothing"
    )
    args = parser.parse_args(argv)
    if not args.config.is_file():
        raise SystemExit(f"error: sweep config {args.config} not found")
    cfg, cells = load_sweep(args.config, args.quick)
    out = args.out or REPO_ROOT / "reports" / (cfg.name + ("-quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)

    planned = []
    for cell in cells:
        overrides = [*cfg.overrides, *cell.overrides]
        if cell.params_budget is not None:
            name, width, _ = solve_budget(overrides, cell.params_budget)
            overrides.append(f"model.{name}={width}")
        composed = compose(overrides)  # fails here, before any training, on a bad override
        dense = build_dense_arch_for(composed)
        planned.append((cell, overrides, composed, dense.num_params(), dense.flops_per_sample()))
        print(f"{cell.label}: {dense.num_params():,} dense params; {' '.join(overrides)}", flush=True)
    if args.dry_run:
        return 0

    results = []
    t0 = time.time()
    for i, (cell, overrides, _, params, flops) in enumerate(planned):
        runs = []
        for seed in cfg.seeds:
            print(f"[{i + 1}/{len(planned)}] {cell.label} seed {seed} ({time.time() - t0:.0f} s)", flush=True)
            runs.append(
                run_cell(overrides, out / "runs" / f"{_slug(cell.label)}-seed{seed}", seed, args.nproc)
            )
        results.append(
            {
                **dataclasses.asdict(cell),
                "overrides": overrides,
                "params": params,
                "dense_flops": flops,
                "runs": runs,
            }  # fmt: skip
        )
        aggregate(results)
        write_report(cfg, results, out, cfg.seeds, args.quick)  # a partial report after every cell
    if cfg.measure_speed:
        torch.set_num_threads(os.cpu_count() or 1)
        previous = _previous_speeds(out / "results.json")
        for result, (_, _, composed, _, _) in zip(results, planned):
            key = (result["label"], result["params"])
            result["speed"] = previous.get(key) or measure_dense_speed(composed)
    aggregate(results)
    write_report(cfg, results, out, cfg.seeds, args.quick)
    failed = sum(r is None for c in results for r in c["runs"])
    print(f"report: {out / 'README.md'} ({time.time() - t0:.0f} s, {failed} failed runs)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
