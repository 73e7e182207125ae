"""Experiment grids: train + evaluate every cell of a sweep config over seeds, then write a report.

    python launch/experiment.py conf/experiment/baselines.yaml [--quick] [--out DIR] [--nproc 2] [--dry-run]

A sweep config (conf/experiment/*.yaml, typed by `launch.sweep.config.SweepConfig`) lists cells; each
cell is a set of `launch/train.py` overrides, run once per seed under torchrun (`launch.sweep.runner`).
A config with a `search:` section is a hyper-parameter search: run it with launch/search.py.
"""

from __future__ import annotations

import sys

from launch.sweep.cli import load_args
from launch.sweep.runner import run_grid


def main(argv: list[str] | None = None) -> int:
    cfg, cells, out, args = load_args(__doc__, argv, search=False)
    return run_grid(cfg, cells, out, args.nproc, args.quick, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
