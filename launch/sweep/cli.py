"""The command line that launch/experiment.py and launch/search.py share: a sweep config and where its
report goes."""

from __future__ import annotations

import argparse
from pathlib import Path

from launch.sweep.config import Cell, SweepConfig, load_sweep
from launch.sweep.runner import REPO_ROOT


def load_args(
    doc: str, argv: list[str] | None, search: bool
) -> tuple[SweepConfig, list[Cell], Path, argparse.Namespace]:
    """(the sweep config, its cells, the report dir (created), the parsed flags). A grid given to the
    search entry point, or a search to the grid one, is an error naming the entry point to use."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="sweep config, e.g. conf/experiment/baselines.yaml")
    parser.add_argument("--quick", action="store_true", help="the config's quick subset (< 15 min)")
    parser.add_argument("--out", type=Path, default=None, help="report dir (default reports/<name>[-quick])")
    parser.add_argument("--nproc", type=int, default=2, help="torchrun processes per run")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the cells (budgets solved) or search spaces, run nothing",
    )
    args = parser.parse_args(argv)
    if not args.config.is_file():
        raise SystemExit(f"error: sweep config {args.config} not found")
    cfg, cells = load_sweep(args.config, args.quick)
    if search and cfg.search is None:
        raise SystemExit(f"error: {args.config} has no `search:` section: run it with launch/experiment.py")
    if not search and cfg.search is not None:
        raise SystemExit(
            f"error: {args.config} is a search (`search:` section): run it with launch/search.py"
        )
    out = args.out or REPO_ROOT / "reports" / (cfg.name + ("-quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    return cfg, cells, out, args
