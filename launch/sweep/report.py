"""Reports of `launch/experiment.py`: aggregate each cell's runs over seeds, then write `<out>/README.md`
(markdown table with deltas vs the reference row), one PNG per plot and `<out>/results.json`."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

from data.metrics.summary import metric_value
from launch.sweep.config import Plot, SweepConfig


def task_metric_keys(cells: list[dict]) -> list[str]:
    """Every task's test AUC, then every task's UAUC: the tasks the runs were tested on, in their order."""
    tasks: list[str] = []
    for cell in cells:
        for run in filter(None, cell["runs"]):
            tasks += [
                k[: -len("/auc")] for k in run.get("test", {}) if k.endswith("/auc") and k[:-4] not in tasks
            ]
    return [f"{t}/auc" for t in tasks] + [f"{t}/uauc" for t in tasks]


def _mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(cells: list[dict], select: str = "") -> list[dict]:
    """Each cell's test metrics over its seeds; with `select` (a validation metric) also each cell's
    validation value at its runs' selected steps, and `chosen`: the best cell of its group."""
    metrics = task_metric_keys(cells)
    for cell in cells:
        runs = [r for r in cell["runs"] if r is not None]
        cell["seeds_ok"] = len(runs)
        stats = {}
        for metric in (*metrics, "moe/active_ratio"):
            vals = [r["test"][metric] for r in runs if metric in r.get("test", {})]
            if vals:
                stats[metric] = _mean_spread(vals)
        cell["stats"] = stats
        flops = [r["activated_flops_per_sample"] for r in runs if "activated_flops_per_sample" in r]
        cell["activated_flops"] = statistics.fmean(flops) if flops else cell["dense_flops"]
        sps = [r["train_samples_per_s"] for r in runs if r.get("train_samples_per_s")]
        cell["pipeline_samples_per_s"] = statistics.fmean(sps) if sps else math.nan
        if select:  # the selection metric, then each task's AUC (the tasks the runs validated)
            valids = [r["valid"] for r in runs if r.get("valid")]
            tasks = [k for k in (valids[0] if valids else {}) if k.endswith("/auc") and k != select]
            cell["valid_stats"] = {
                m: _mean_spread([metric_value(v, m) for v in valids if m == select or m in v])
                for m in (select, *tasks)
            }
    if select:
        _choose(cells, select)
    return cells


def _group(cell: dict) -> str:
    return cell.get("group") or cell.get("line") or cell["label"]


def _choose(cells: list[dict], select: str) -> None:
    """Mark the cell with the best seed-mean validation `select` of each group (higher is better, as
    early stopping's metrics). A cell with a collapsed or failed run is never chosen."""
    groups: dict[str, list[dict]] = {}
    for c in cells:
        groups.setdefault(_group(c), []).append(c)
    for members in groups.values():
        eligible = [
            c
            for c in members
            if c["seeds_ok"] == len(c["runs"])
            and not math.isnan(c["valid_stats"][select][0])
            and not any(r.get("collapsed") for r in c["runs"])
        ]
        best = max(eligible, key=lambda c: c["valid_stats"][select][0], default=None)
        for c in members:
            c["chosen"] = c is best


def selection_table(cfg: SweepConfig, cells: list[dict]) -> str:
    """Validation metrics at each run's selected step (the early-stopping checkpoint), and the choice."""
    # every cell's metrics, in order: a sweep over two datasets validates different tasks per group
    metrics = list(dict.fromkeys(m for c in cells for m in c["valid_stats"])) if cells else [cfg.select]
    head = ["group", "cell", *[f"valid {m}" for m in metrics], "selected step / steps run", "stop", "chosen"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        runs = [r for r in c["runs"] if r is not None]
        steps = ", ".join(f"{r['selected_step']} / {r['steps']}" for r in runs)
        stops = ", ".join(sorted({r["stop_reason"] for r in runs}))
        if any(r.get("collapsed") for r in runs):
            stops += " (collapsed)"
        row = [_group(c), c["label"]]
        row += [_fmt(c["valid_stats"][m]) if m in c["valid_stats"] else "" for m in metrics]
        row += [steps or "failed", stops, "**yes**" if c.get("chosen") else ""]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _fmt(stat: tuple[float, float] | None, digits: int = 4) -> str:
    if stat is None or math.isnan(stat[0]):
        return "failed"
    return f"{stat[0]:.{digits}f} ± {stat[1]:.{digits}f}"


def markdown_table(cfg: SweepConfig, cells: list[dict]) -> str:
    ref = next((c for c in cells if c["label"] == cfg.reference), None)
    has_moe = any("moe/active_ratio" in c["stats"] for c in cells)
    metrics = task_metric_keys(cells)
    head = ["cell", "dense params", "fwd MFLOP/sample", "train GFLOP/batch 512"]
    for metric in metrics:
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
        for metric in metrics:
            stat = c["stats"].get(metric)
            row.append(_fmt(stat) if stat is not None or not c["seeds_ok"] else "")  # "": not its task
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


def read_valid_records(path: Path) -> list[dict]:
    """The "valid" records of a run's metrics.jsonl (complete lines only)."""
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")[:-1]  # the last piece is "" or a line still being written
    return [r for r in map(json.loads, filter(None, lines)) if r.get("kind") == "valid"]


def plot_learning_curves(
    curves: dict[str, list[dict | None]], metric: str, title: str, path: Path
) -> Path | None:
    """Validation `metric` against the trainer step, one line per name: the mean over its runs (seeds) at
    the steps every run validated, their min-max shaded, a dot at each run's selected step. Runs whose
    metrics.jsonl is gone (a report rebuilt elsewhere) are left out; None if no curve is left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.4, 4.4))
    if len(curves) > 10:  # the default cycle repeats its 10 colours
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
    drawn = 0
    for name, runs in curves.items():
        per_run = []
        for run in filter(lambda r: r and r.get("run_dir"), runs):
            records = read_valid_records(Path(run["run_dir"]) / "metrics.jsonl")
            values = {r["step"]: metric_value(r, metric) for r in records}
            if values:
                per_run.append((values, run.get("selected_step")))
        if not per_run:
            continue
        steps = sorted(set.intersection(*(set(v) for v, _ in per_run)))
        ys = [[v[s] for v, _ in per_run] for s in steps]
        (line,) = ax.plot(steps, [statistics.fmean(y) for y in ys], marker=".", label=name)
        if len(per_run) > 1:
            ax.fill_between(
                steps, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.2
            )
        chosen = [(sel, v[sel]) for v, sel in per_run if sel in v]
        ax.scatter([c[0] for c in chosen], [c[1] for c in chosen], color=line.get_color(), zorder=3)
        drawn += 1
    if drawn:
        ax.set_xlabel("trainer step")
        ax.set_ylabel(f"valid {metric}")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: curves cross
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return path if drawn else None


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
    curves = None
    if cfg.select:
        chosen = {c["label"]: c["runs"] for c in cells if c.get("chosen")}
        title = f"{cfg.name}: validation curves of the chosen cells"
        curves = plot_learning_curves(chosen, cfg.select, title, out / "valid_curves.png")
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
        *(
            [
                "",
                "## Selection on validation",
                "",
                f"Per group the cell with the best validation `{cfg.select}` (seed mean, each run at its "
                "selected step) is chosen; the test table above is for the record, never for choosing.",
                "",
                selection_table(cfg, cells),
                *(["", f"![validation curves of the chosen cells]({curves.name})"] if curves else []),
            ]
            if cfg.select
            else []
        ),
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
    title = f"{cfg.name}: validation curves of the final runs (seeds {cfg.seeds})"
    curves = plot_learning_curves(
        {a["arch"]: a["runs"] for a in archs}, search.metric, title, out / "valid_curves.png"
    )
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
        *(
            [
                "Learning curves of the final runs (mean over seeds, min-max shaded, dots at the steps "
                "early stopping selected):",
                "",
                f"![validation curves]({curves.name})",
                "",
            ]
            if curves
            else []
        ),
    ]
    for a in archs:
        text += [f"## {a['arch']}", "", f"Base overrides: `{' '.join(a['overrides'])}`", ""]
        text += [*_trial_table(a, search.metric), ""]
    (out / "README.md").write_text("\n".join(text))
