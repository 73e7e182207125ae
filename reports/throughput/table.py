"""The tables of reports/throughput.md from the outputs of reports/throughput/run.sh.

python reports/throughput/table.py /tmp/throughput
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _lines(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
        if path.exists()
        else []
    )


def loader(out: Path) -> None:
    print("| batch | window | reader | rows/s | rows/s per decoding core | over 1 worker |")
    print("|---|---|---|---|---|---|")
    for bs in (4096, 512):
        for row in _lines(out / f"loader_before_{bs}.jsonl"):
            rate = f"{row['rows_per_s']:,.0f}"
            print(f"| {bs} | 65536 | before: prefetch thread | {rate} | {rate} | |")
        for name in (f"loader_after65536_{bs}.jsonl", f"loader_after_{bs}.jsonl"):
            runs = [r for r in _lines(out / name) if "workers" in r]
            one = next((r["rows_per_s"] for r in runs if r["workers"] == 1), None)
            for r in runs:
                n = r["workers"]
                who = "prefetch thread" if n == 0 else f"{n} worker process{'es' if n > 1 else ''}"
                ratio = f"{r['rows_per_s'] / one:.2f}x" if one and n else ""
                print(f"| {bs} | {r['shuffle_buffer']} | after: {who} | {r['rows_per_s']:,.0f} | "
                      f"{r['rows_per_s'] / max(n, 1):,.0f} | {ratio} |")  # fmt: skip


def step(out: Path) -> None:
    print("| ranks | data.workers | ms/step streamed | ms/step pre-loaded | streamed / pre-loaded |")
    print("|---|---|---|---|---|")
    for r in (1, 2):
        for row in _lines(out / f"step_{r}.jsonl"):
            print(f"| {row['ranks']} | {row['workers']} | {row['ms_per_step_streamed']} | "
                  f"{row['ms_per_step_preloaded']} | {row['streamed_over_preloaded']} |")  # fmt: skip


def evaluation(out: Path) -> None:
    for name in ("eval.json", "eval_scaling.json"):
        path = out / name
        if path.exists():
            print(f"{name}:")
            print(json.dumps(json.loads(path.read_text()), indent=1)[:6000])


def train(out: Path) -> None:
    print(
        "| code | train samples/s (2 ranks) | test finish AUC | test skip AUC | test finish UAUC "
        "| test skip UAUC |"
    )
    print("|---|---|---|---|---|---|")
    for v in ("before", "after"):
        path = out / f"train_{v}" / "metrics.json"
        if not path.exists():
            continue
        m = json.loads(path.read_text())
        t = m["test"]
        print(f"| {v} | {m['train_samples_per_s']:,.0f} | {t['finish/auc']:.6f} | {t['skip/auc']:.6f} | "
              f"{t['finish/uauc']:.6f} | {t['skip/uauc']:.6f} |")  # fmt: skip


def real_run(out: Path) -> None:
    """The largest difference between the two codes' metrics of one checkpoint (every numeric key)."""
    paths = [out / f"eval_{v}" / "metrics.json" for v in ("before", "after")]
    if not all(p.exists() for p in paths):
        return
    before, after = (json.loads(p.read_text()) for p in paths)
    diffs = {
        f"{mode}/{k}": abs(after[mode][k] - v)
        for mode in ("test",)
        for k, v in before[mode].items()
        if isinstance(v, float) and v == v
    }
    auc = {k: d for k, d in diffs.items() if k.endswith("/auc") or k.endswith("mean_auc")}
    rest = {k: d for k, d in diffs.items() if k not in auc}
    worst = max(rest, key=rest.get)
    print(f"{len(rest)} metrics besides AUC compared; largest difference {rest[worst]:.3g} ({worst})")
    print(
        "AUC (before: float32 ROC curve; after: float64): "
        + ", ".join(f"{k} {d:.2g}" for k, d in auc.items())
    )


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/throughput")
    for section in (loader, step, train, evaluation, real_run):
        print(f"\n## {section.__name__}\n")
        section(out)
