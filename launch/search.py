"""Hyper-parameter searches: per arch an Optuna study picks settings on the validation split, then those
settings are trained over the sweep's seeds and tested once (`launch.sweep.search`).

    python launch/search.py conf/experiment/search_ml100k.yaml [--quick] [--out DIR] [--nproc 1] [--dry-run]

The sweep config has a `search:` section (`launch.sweep.config.SearchConfig`); a grid without one is run
by launch/experiment.py.
"""

from __future__ import annotations

import sys

from launch.sweep.cli import load_args
from launch.sweep.search import run_search


def main(argv: list[str] | None = None) -> int:
    cfg, _, out, args = load_args(__doc__, argv, search=True)
    return run_search(cfg, out, args.nproc, args.quick, dry_run=args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
