"""The sweep runner: compose a cell's config, solve dense-parameter budgets, run each cell as a
`launch/train.py` torchrun job (finished runs are never rerun), and run a whole grid into a report.

A cell can ask for a dense-parameter budget instead of a width: the arch's scale field
(`models.config.DENSE_ARCHS`) is then solved on the meta device so that `dense_arch.num_params()` lands on
the budget. The report (`<out>/README.md`, `<out>/results.json`, one PNG per plot) has every cell's mean
and spread over seeds, params, FLOPs, the measured training throughput of the pipeline and of the dense arch
alone (samples/s, MFU on this machine).

Why a runner of our own instead of Hydra multirun: each cell is a torchrun job (2 processes), and a sweep
also has to solve budgets, skip finished runs and aggregate seeds into tables and plots.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from launch.benchmarks.timing import measure_training
from launch.sweep.config import Cell, SweepConfig
from launch.sweep.report import aggregate, write_report

REPO_ROOT = Path(__file__).resolve().parents[2]


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")


# ---- composing configs and solving budgets -----------------------------------------------------------


def compose(overrides: list[str]) -> Any:
    """The train config launch/train.py would run with these overrides (typed, validated)."""
    from launch.configs import compose_train

    return compose_train(overrides)


def build_dense_arch_for(cfg: Any, device: str = "meta") -> torch.nn.Module:
    """The dense arch of a composed config, on `device` (meta: no memory, exact param count)."""
    from data.schema import Schema
    from models.ranking import RankingModel

    schema = Schema.from_dict(OmegaConf.to_container(cfg.data.schema, resolve=True))
    model_cfg = OmegaConf.to_object(cfg.model)  # the typed ModelConfig
    with torch.device(device):  # the embedding tables are never materialised: only the dense arch is used
        return RankingModel(schema, model_cfg, device=torch.device("meta")).dense_arch


def solve_budget(overrides: list[str], budget: float) -> tuple[str, int, int]:
    """(scale field, width, params): the width (a multiple of the arch's granularity) whose dense params
    are closest to `budget`. Params grow monotonically with the width, so bisect."""
    from models.config import arch_spec

    cfg = compose(overrides)
    spec = arch_spec(cfg.model.arch)
    name = f"dense.{spec.scale_field}"
    step = int(cfg.model.dense[spec.scale_step]) if spec.scale_step else 1  # D splits into heads

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
    if best * step < MIN_WIDTH:
        # e.g. DCNv2 at 100k: its cross net alone is ~83k params, so the solver shrank the deep MLP to one
        # ReLU unit, which dies in the first steps and collapses the model to a constant prediction
        raise SystemExit(
            f"error: {budget:g} dense params leave model.{name}={best * step} (< {MIN_WIDTH}): at width "
            f"{step} the arch already has {params(1):,} params; use a larger budget"
        )
    return name, best * step, params(best)


MIN_WIDTH = 16  # a solved width below this is a degenerate model, not a smaller one


# ---- running --------------------------------------------------------------------------------------


def run_cell(
    cell_overrides: list[str],
    run_dir: Path,
    seed: int,
    nproc: int,
    monitor: Callable[[], None] | None = None,
) -> dict | None:
    """One torchrun training job (+ final test evaluation); its metrics.json, or None if it failed.
    A run with a metrics.json already is not rerun. `monitor` (the search's pruning) is called about
    every POLL_S seconds while the job runs; an exception it raises stops the job and propagates."""
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        return json.loads(metrics.read_text())
    if run_dir.exists():  # an interrupted run: start over (its checkpoints belong to a partial run)
        shutil.rmtree(run_dir)
    log = run_dir.with_name(run_dir.name + ".log")  # not with_suffix: "lr_0.003-seed0" has a "."
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        *launcher(nproc),
        "launch/train.py",
        *cell_overrides,
        f"trainer.seed={seed}",
        f"trainer.run_dir={run_dir}",
    ]
    t0 = time.time()
    returncode = run_process(cmd, log, monitor)
    if returncode != 0 or not metrics.is_file():
        print(f"  FAILED (exit {returncode}); log: {log}", flush=True)
        return None
    print(f"  done in {time.time() - t0:.0f} s", flush=True)
    return json.loads(metrics.read_text())


def launcher(nproc: int) -> list[str]:
    """The command that starts a job on `nproc` local processes: torchrun, or for one process a plain
    python (a 1-rank group too, pipeline/dist.py, without the agent's start-up)."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


POLL_S = 2.0  # how often a running job's monitor looks at its metrics.jsonl


def run_process(
    cmd: list[str], log: Path, monitor: Callable[[], None] | None = None, poll_s: float = POLL_S
) -> int:
    """Run `cmd` from the repo root, output to `log`; its exit status. The job gets a process group of its
    own (torchrun and its workers), so that a pruned trial or a Ctrl-C here ends all of it, not just
    torchrun: any exception while waiting (the monitor's, KeyboardInterrupt) kills the group, then
    propagates."""
    with open(log, "w") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
            start_new_session=True,
        )
        try:
            while True:
                try:
                    return proc.wait(timeout=poll_s)
                except subprocess.TimeoutExpired:
                    if monitor is not None:
                        monitor()
        except BaseException:
            kill_group(proc)
            raise


def kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the job's process group (torchrun forwards it to its workers), SIGKILL whatever is left of
    the group after `grace_s`, and reap torchrun."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the whole group is gone already
            break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            pass
    proc.wait()


def measure_dense_speed(cfg: Any, batch_size: int = 512) -> dict:
    """Training samples/s and MFU of the cell's dense arch alone (forward + backward + RMSProp), fp32."""
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


def run_grid(cfg: SweepConfig, cells: list[Cell], out: Path, nproc: int, quick: bool, dry_run: bool) -> int:
    """Every cell over the sweep's seeds (finished runs reused), a partial report after each cell, then
    the dense-arch speeds and the final report. 1 if any run failed."""
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
    if dry_run:
        return 0

    results = []
    # Speeds of an earlier report, read before the partial reports below rewrite results.json. Each cell
    # carries its earlier speed into them, so a re-report interrupted half-way keeps them too.
    previous = _previous_speeds(out / "results.json") if cfg.measure_speed else {}
    t0 = time.time()
    for i, (cell, overrides, _, params, flops) in enumerate(planned):
        runs = []
        for seed in cfg.seeds:
            print(f"[{i + 1}/{len(planned)}] {cell.label} seed {seed} ({time.time() - t0:.0f} s)", flush=True)
            runs.append(run_cell(overrides, out / "runs" / f"{_slug(cell.label)}-seed{seed}", seed, nproc))
        result = {
            **dataclasses.asdict(cell),
            "overrides": overrides,
            "params": params,
            "dense_flops": flops,
            "runs": runs,
        }
        if (cell.label, params) in previous:
            result["speed"] = previous[(cell.label, params)]
        results.append(result)
        aggregate(results, cfg.select)
        write_report(cfg, results, out, cfg.seeds, quick)  # a partial report after every cell
    if cfg.measure_speed:
        torch.set_num_threads(os.cpu_count() or 1)
        for result, (_, _, composed, _, _) in zip(results, planned):
            if not result.get("speed"):
                result["speed"] = measure_dense_speed(composed)
    aggregate(results, cfg.select)
    write_report(cfg, results, out, cfg.seeds, quick)
    failed = sum(r is None for c in results for r in c["runs"])
    print(f"report: {out / 'README.md'} ({time.time() - t0:.0f} s, {failed} failed runs)", flush=True)
    return 1 if failed else 0
