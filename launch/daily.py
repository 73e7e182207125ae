"""Daily training: for each day D of a partitioned dataset, train on D and evaluate on the next day.

    python launch/daily.py --root datasets/daily --start 2026-01-02 --end 2026-01-07 --out outputs/daily \\
        [--strategy incremental,retrain,frozen] [--window 1] [--key dt] [--nproc 2] [--export] \\
        [-- <launch/train.py overrides>]

Every training day is one `launch/train.py` torchrun job (`launch.sweep.runner.run_process`) on the
partitions `<key>=<day>` of `--root` (a path or a URI), with `data.valid_split=none` (no model selection:
the day's final state is the model) and the next partition as its test split: the next-day AUC / UAUC.
Strategies, each in `<out>/<strategy>/`:

- `incremental`: day D trains on the last `--window` days up to D, warm-started from day D-1's model
  and optimizer state (`trainer.init_from`, `trainer.init_optimizer`; the lr schedule starts again,
  without warmup); the first day from scratch.
- `retrain`: day D trains from scratch on every day from `--start` to D.
- `frozen`: the first day's model, never trained again, evaluated on each next day (`launch/eval.py`).

`<out>/<strategy>/<key>=<day>/` is day D's run dir; `results.jsonl` gets one line per day (next-day
metrics, the day's oracle from `dataset.json` where the data has one, training seconds and rows, the
running totals). A rerun skips the days that finished and resumes an interrupted one from its last
checkpoint (`trainer.resume=auto`), so the loop continues where it stopped. With several strategies,
`<out>/README.md` compares them day by day. `--export` writes each day's model to `<run dir>/export/`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from data.partitions import partition_values
from data.storage import display, list_files
from launch.report import oracle_metrics
from launch.sweep.runner import launcher, run_process

STRATEGIES = ("incremental", "retrain", "frozen")


def partition_days(root: str, key: str) -> list[str]:
    """The values of partition key `key` under `root`, sorted."""
    days = sorted({v[key] for f in list_files(root, ".parquet") if key in (v := partition_values(f))})
    if not days:
        raise SystemExit(f"error: no {key}=<value> partitions of Parquet files under {display(root)}")
    return days


def day_selection(key: str, days: list[str]) -> str:
    """The split selecting these consecutive days."""
    return f"{key}={days[0]}" if len(days) == 1 else f"{key}>={days[0]},{key}<={days[-1]}"


def quoted(value: object) -> str:
    """A Hydra override value as a quoted string: partition selections and run dirs hold `=`, `>`, `<`."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def train_day(
    args: argparse.Namespace, run_dir: Path, train_days: list[str], test_day: str | None, init: Path | None
) -> None:
    cmd = [
        *launcher(args.nproc),
        "launch/train.py",
        *args.overrides,
        f"data.root={quoted(args.root)}",
        f"data.train_split={quoted(day_selection(args.key, train_days))}",
        "data.valid_split=none",
        f"data.split={quoted(f'{args.key}={test_day}')}" if test_day else "trainer.final_eval=false",
        f"trainer.run_dir={quoted(run_dir)}",
        "trainer.resume=auto",  # an interrupted day continues from its last checkpoint
    ]
    if init is not None:
        cmd += [
            f"trainer.init_from={quoted(init)}",
            f"trainer.init_optimizer={str(args.init_optimizer).lower()}",
        ]
        if args.init_optimizer and not any(o.startswith("optim.dense.warmup_steps=") for o in args.overrides):
            cmd.append("optim.dense.warmup_steps=0")  # a warm optimizer state needs no lr warmup
    run_job(cmd, run_dir, run_dir / "metrics.json")


def eval_day(args: argparse.Namespace, model: Path, out: Path, test_day: str) -> None:
    cmd = [
        *launcher(args.nproc),
        "launch/eval.py",
        f"checkpoint={quoted(model)}",
        f"data.root={quoted(args.root)}",
        f"data.split={quoted(f'{args.key}={test_day}')}",
        f"output={quoted(out)}",
    ]
    run_job(cmd, out, out / "metrics.json")


def export_day(run_dir: Path, test_day: str | None, args: argparse.Namespace) -> None:
    cmd = [
        sys.executable,
        "launch/export.py",
        f"checkpoint={quoted(run_dir)}",
        f"out={quoted(run_dir / 'export')}",
    ]
    if test_day:  # the parity rows: the next day's
        cmd.append(f"split={quoted(f'{args.key}={test_day}')}")
    run_job(cmd, run_dir, run_dir / "export" / "manifest.json", log_name="export.log")


def run_job(cmd: list[str], where: Path, product: Path, log_name: str = "job.log") -> None:
    where.mkdir(parents=True, exist_ok=True)
    log = where.parent / f"{where.name}.{log_name}"
    t0 = time.time()
    code = run_process(cmd, log)
    if code != 0 or not product.is_file():
        script = next((c for c in cmd if c.startswith("launch/")), cmd[0])
        raise SystemExit(f"error: {script} for {where} failed (exit {code}); log: {log}")
    print(f"  {where.name}: done in {time.time() - t0:.0f} s", flush=True)


def day_row(
    strategy: str,
    day: str,
    test_day: str | None,
    train_days: list[str],
    metrics: dict,
    root: str,
    key: str,
) -> dict[str, Any]:
    """One line of results.jsonl."""
    test = metrics.get("test", {})
    tasks = sorted({k.split("/")[0] for k in test if k.endswith("/auc")})
    truth = oracle_metrics(root, f"{key}={test_day}") if test_day else {}
    row: dict[str, Any] = {
        "day": day,
        "strategy": strategy,
        "next_day": test_day,
        "train_days": len(train_days),
        "train_seconds": round(metrics.get("train_seconds", 0.0), 1),
        "train_rows": metrics.get("train_rows", 0),
        "mean_auc": test.get("mean_auc"),
        "mean_uauc": test.get("mean_uauc"),
    }
    for t in tasks:
        row[f"{t}/auc"], row[f"{t}/uauc"] = test.get(f"{t}/auc"), test.get(f"{t}/uauc")
    if truth:
        row["oracle_mean_auc"] = sum(m["auc"] for m in truth.values()) / len(truth)
    return row


def run_strategy(args: argparse.Namespace, strategy: str, days: list[str], all_days: list[str]) -> list[dict]:
    """Every day of one strategy (finished days are read back, not rerun); its results rows."""
    out = Path(args.out) / strategy
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    totals = {"train_seconds": 0.0, "train_rows": 0}
    first_model: Path | None = None
    for i, day in enumerate(days):
        pos = all_days.index(day)
        test_day = all_days[pos + 1] if pos + 1 < len(all_days) else None
        run_dir = out / f"{args.key}={day}"
        if strategy == "retrain":
            train_days = days[: i + 1]
        else:
            train_days = all_days[max(0, pos - args.window + 1) : pos + 1]
        if strategy == "frozen" and i > 0:
            assert first_model is not None
            metrics_path = run_dir / "metrics.json"
            if test_day and not metrics_path.is_file():
                print(f"{strategy} {day}: the first day's model on {test_day}", flush=True)
                eval_day(args, first_model, run_dir, test_day)
            metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
            metrics["train_seconds"], metrics["train_rows"] = 0.0, 0
            train_days = []
        else:
            if not (run_dir / "metrics.json").is_file():
                init = out / f"{args.key}={days[i - 1]}" if strategy == "incremental" and i > 0 else None
                print(f"{strategy} {day}: train on {day_selection(args.key, train_days)}", flush=True)
                train_day(args, run_dir, train_days, test_day, init)
                if args.export:
                    export_day(run_dir, test_day, args)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            metrics["train_rows"] = metrics.get("train_rows") or _rows_trained(run_dir)
        first_model = first_model or run_dir
        row = day_row(strategy, day, test_day, train_days, metrics, args.root, args.key)
        totals["train_seconds"] += row["train_seconds"]
        totals["train_rows"] += row["train_rows"]
        row["total_train_seconds"] = round(totals["train_seconds"], 1)
        row["total_train_rows"] = totals["train_rows"]
        rows.append(row)
        (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        shown = f"{row['mean_auc']:.4f}" if row["mean_auc"] is not None else "-"
        print(f"{strategy} {day}: next-day ({test_day}) mean AUC {shown}", flush=True)
    return rows


def _rows_trained(run_dir: Path) -> int:
    """Rows one epoch pass trained on, from the run's config and step count (all ranks)."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return int(metrics["steps"]) * int(cfg["data"]["batch_size"]) * int(metrics["world_size"])


def comparison(results: dict[str, list[dict]], root: str) -> str:
    """A markdown table: per day, each strategy's next-day mean AUC / UAUC, and the compute each used."""
    strategies = list(results)
    days = [r["day"] for r in results[strategies[0]]]
    head = "| day | next day | oracle AUC | " + " | ".join(f"{s} AUC | {s} UAUC" for s in strategies) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(strategies))]
    by = {s: {r["day"]: r for r in rows} for s, rows in results.items()}
    for d in days:
        first = by[strategies[0]][d]
        oracle = first.get("oracle_mean_auc")
        cells = [d, first["next_day"] or "-", f"{oracle:.4f}" if oracle else "-"]
        for s in strategies:
            r = by[s].get(d, {})
            for k in ("mean_auc", "mean_uauc"):
                cells.append(f"{r[k]:.4f}" if r.get(k) is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| strategy | mean next-day AUC | mean next-day UAUC | train seconds | rows trained |",
        "|---|---|---|---|---|",
    ]
    for s, rows in results.items():
        scored = [r for r in rows if r["mean_auc"] is not None]
        auc = sum(r["mean_auc"] for r in scored) / max(len(scored), 1)
        uauc = sum(r["mean_uauc"] for r in scored) / max(len(scored), 1)
        last = rows[-1]
        lines.append(
            f"| {s} | {auc:.4f} | {uauc:.4f} | {last['total_train_seconds']:.0f} "
            f"| {last['total_train_rows']:,} |"
        )
    return (
        f"Daily training on {display(root)}: next-day mean AUC / UAUC over tasks.\n\n"
        + "\n".join(lines)
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="data root (path or URI) with <key>=<day> partitions")
    ap.add_argument("--out", required=True, help="output directory (local)")
    ap.add_argument("--start", help="first training day (default: the first partition)")
    ap.add_argument("--end", help="last training day (default: the last partition)")
    ap.add_argument("--strategy", default="incremental", help=f"comma-separated, of {', '.join(STRATEGIES)}")
    ap.add_argument("--window", type=int, default=1, help="incremental: days of data each day trains on")
    ap.add_argument("--key", default="dt", help="the partition key of days")
    ap.add_argument("--nproc", type=int, default=2, help="torchrun processes per job")
    ap.add_argument(
        "--init-optimizer", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
        help="incremental: warm-start the optimizer state too (default true)",
    )  # fmt: skip
    ap.add_argument("--export", action="store_true", help="export each trained day's model")
    ap.add_argument("overrides", nargs="*", help="launch/train.py overrides (after --)")
    args = ap.parse_args(argv)
    strategies = [s.strip() for s in args.strategy.split(",") if s.strip()]
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown or not strategies:
        ap.error(f"--strategy: unknown {unknown}; choose from {', '.join(STRATEGIES)}")
    if args.window < 1:
        ap.error("--window must be >= 1")
    all_days = partition_days(args.root, args.key)
    start, end = args.start or all_days[0], args.end or all_days[-1]
    days = [d for d in all_days if start <= d <= end]
    if not days:
        ap.error(
            f"no {args.key} partition in [{start}, {end}] under {display(args.root)} "
            f"(there: {all_days[0]} .. {all_days[-1]})"
        )
    results = {s: run_strategy(args, s, days, all_days) for s in strategies}
    if len(strategies) > 1:
        (Path(args.out) / "README.md").write_text(comparison(results, args.root))
        print(f"comparison: {Path(args.out) / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
