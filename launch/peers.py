"""Non-neural peers of the neural models, on the same Parquet splits and with the same metrics.

    python launch/peers.py --data conf/data/ml100k.yaml [--root datasets/ml100k] --seeds 0,1,2 \
        --out peers.json

Features: launch/peer_baselines/features.py (its docstring lists them; only the schema's columns, no target
encoding, nothing from labels or later rows). One model per task, trained on `train`, every setting
selected on `valid` (AUC), then scored on `test` with the project's exact metrics (data.metrics.auc: AUC, and
UAUC grouped by the schema's user_id column, each counted user weight 1; logloss of the logits).

- lightgbm: LGBMClassifier-equivalent `lgb.train` (binary objective) on dense + sequence / multi-hot
  summaries + the single-valued sparse ids declared categorical; early stopping on the valid AUC
  (patience EARLY_STOP rounds, at most MAX_ROUNDS); grid LGB_GRID selected on the valid AUC at the best
  round; feature_fraction 0.8 and row bagging 0.8 seeded with the run's seed, so seeds differ.
- logreg: scikit-learn LogisticRegression (L2, liblinear primal) on a one-hot of the categorical ids
  (unknown ids -> all zeros) + the numeric columns (NaN -> train mean + a missing indicator, then
  standardized on train); C from LOGREG_C on the valid AUC. Deterministic and seed-free: fitted once,
  the result listed under every seed (sd 0 by construction).

Output: a JSON file {"dataset", "root", "rows", "features", "peers": {"lightgbm" | "logreg": {"settings",
"seeds": {seed: {"valid", "test"}}, "mean", "sd", "seconds"}}, "seconds"}; metric keys are
`<task>/{auc,uauc,uauc_weighted,uauc_users,logloss}` like data.metrics.exact; mean and sample sd over seeds
(statistics.stdev, like the experiment reports). A markdown table of the test metrics goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from data.schema import Schema
from launch.cli import exit_on_user_error
from launch.peer_baselines.fit import LGB_GRID, LOGREG_C, MAX_ROUNDS, REPO_ROOT, markdown_table, run_peers


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", required=True, help="data config YAML with a `schema:` key (e.g. conf/data/ml100k.yaml)"
    )
    p.add_argument("--root", help="dataset root (default: the config's `root`, relative to the project)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated LightGBM seeds")
    p.add_argument("--out", required=True, help="JSON output file")
    p.add_argument("--threads", type=int, default=1, help="LightGBM threads (1: robust on busy cores)")
    args = p.parse_args(argv)

    cfg = yaml.safe_load(Path(args.data).read_text())
    schema = Schema.from_dict(cfg["schema"])
    root = Path(args.root) if args.root else REPO_ROOT / cfg["root"]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    result = run_peers(
        schema, root, seeds, args.threads, lgb_grid=LGB_GRID, logreg_c=LOGREG_C, max_rounds=MAX_ROUNDS
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"peers on {schema.name} ({root}), test split, mean ± sd over seeds {seeds}:\n")
    print(markdown_table(result, schema.labels))
    for name, peer in result["peers"].items():
        chosen = peer["settings"]["chosen"]
        if name == "logreg":
            print(f"\n{name}: " + ", ".join(f"{t}: C={c['C']}" for t, c in chosen.items()))
            continue
        print(f"\n{name}:")
        for seed, per_task in chosen.items():
            for t, c in per_task.items():
                shown = {k: v for k, v in c.items() if k != "grid_valid_auc"}
                print(f"  seed {seed} {t}: {shown}")
    print(f"\n{result['seconds']:.1f} s; wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
