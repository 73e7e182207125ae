"""Reports of `launch/experiment.py`: aggregate each cell's runs over seeds, then write `<out>/README.md`
(markdown table with deltas vs the reference row), one PNG per plot and `<out>/results.json`."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

from launch.sweep_config import Plot, SweepConfig

METRICS = ("finish/auc", "skip/auc", "finish/uauc", "skip/uauc")


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


# ---- search mode (launch/search.py) ------------------------------------------------------------------


def _task_metrics(archs: list[dict]) -> list[str]:
    """The per-task test AUC / UAUC keys of the final runs, in the trainer's order."""
    keys: list[str] = []
    for a in archs:
        for run in filter(None, a["runs"]):
            keys += [k for k in run.get("test", {}) if k.endswith(("/auc", "/uauc")) and k not in keys]
    return keys


def aggregate_search(archs: list[dict]) -> list[dict]:
    """Each arch's test metrics, mean and sample sd over the final runs' seeds."""
    for a in archs:
        runs = [r for r in a["runs"] if r is not None]
        a["seeds_ok"] = len(runs)
        a["stats"] = {}
        for metric in _task_metrics([a]):
            a["stats"][metric] = _mean_spread([r["test"][metric] for r in runs if metric in r["test"]])
    return archs


def _best_so_far(a: dict, maximize: bool) -> tuple[list[int], list[float]]:
    xs, ys, best = [], [], None
    for t in a["trials"]:
        if t["state"] == "COMPLETE" and t["value"] is not None:
            better = best is None or (t["value"] > best if maximize else t["value"] < best)
            best = t["value"] if better else best
            xs.append(t["number"])
            ys.append(best)
    return xs, ys


def plot_best_so_far(cfg: SweepConfig, archs: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    search = cfg.search
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for a in archs:
        xs, ys = _best_so_far(a, search.direction == "maximize")
        if xs:
            ax.step(xs, ys, where="post", marker="o", label=a["arch"])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial number")
    ax.set_ylabel(f"best valid {search.metric} so far")
    ax.set_title(f"{cfg.name}: search progress (complete trials)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "best_so_far.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _trial_table(a: dict, metric: str) -> list[str]:
    lines = [f"| trial | state | valid {metric} | last validated step | settings |", "|---|---|---|---|---|"]
    for t in a["trials"]:
        steps = list(t["intermediate"])
        last = f"{steps[-1]} ({t['intermediate'][steps[-1]]:.4f})" if steps else ""
        value = f"{t['value']:.4f}" if t["value"] is not None else ""
        lines.append(f"| {t['number']} | {t['state']} | {value} | {last} | `{' '.join(t['overrides'])}` |")
    return lines


def write_search_report(cfg: SweepConfig, archs: list[dict], out: Path, quick: bool) -> None:
    search = cfg.search
    aggregate_search(archs)
    (out / "results.json").write_text(
        json.dumps({"config": dataclasses.asdict(cfg), "archs": archs}, indent=1)
    )
    png = plot_best_so_far(cfg, archs, out)
    tasks = _task_metrics(archs)
    head = ["arch", "chosen settings", f"valid {search.metric} (best trial)"]
    head += [f"test {m.replace('/', ' ').replace('uauc', 'UAUC').replace('auc', 'AUC')}" for m in tasks]
    head += ["dense params", "trials complete / pruned / failed"]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in archs:
        states = [t["state"] for t in a["trials"]]
        counts = f"{states.count('COMPLETE')} / {states.count('PRUNED')} / {states.count('FAIL')}"
        best = a["best"]
        row = [a["arch"], f"`{' '.join(a.get('tuned', []))}`" if best else "none (no complete trial)"]
        row.append(f"{best['value']:.4f} (#{best['number']})" if best else "")
        row += [_fmt(a["stats"].get(m)) if best else "" for m in tasks]
        row += [f"{a['params'] / 1e6:.3f}M" if "params" in a else "", counts]
        table.append("| " + " | ".join(row) + " |")
    text = [
        f"# {cfg.name}{' (quick)' if quick else ''}",
        "",
        cfg.description.strip(),
        "",
        f"Hyper-parameter search (launch/search.py): per arch {search.trials} Optuna trials (TPE sampler, "
        f"seed {search.sampler_seed}; pruner: {search.pruner}), each one training run with seed "
        f"{search.trial_seed}, selected on the validation split by `{search.metric}` ({search.direction}). "
        f"The best trial's settings were then trained with seeds {cfg.seeds} and evaluated on the test split "
        "once: test columns are mean ± sample standard deviation over those seeds. The trials never "
        "evaluated the test split (`trainer.final_eval=false`).",
        "",
        f"Common overrides: `{' '.join(cfg.overrides)}`",
        "",
        *table,
        "",
        f"![best valid {search.metric} so far]({png.name})",
        "",
    ]
    for a in archs:
        text += [f"## {a['arch']}", "", f"Base overrides: `{' '.join(a['overrides'])}`", ""]
        text += [*_trial_table(a, search.metric), ""]
    (out / "README.md").write_text("\n".join(text))
