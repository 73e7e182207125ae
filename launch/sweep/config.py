"""Sweep configs of `launch/experiment.py` (conf/experiment/*.yaml): the typed dataclasses and
`load_sweep`, which validates a config and expands its cells (budget grid, quick subset). A config with a
`search:` section is a hyper-parameter search instead of a grid (launch/search.py)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


@dataclass
class Cell:
    label: str  # row of the table
    line: str = ""  # series in the plots ("" = the label)
    overrides: list[str] = field(default_factory=list)  # launch/train.py overrides (model=..., model.x=...)
    x: float | None = None  # x of "x" plots (e.g. the active ratio)
    params_budget: float | None = None  # solve the arch's scale field for this many dense params
    group: str = ""  # cells that compete in the sweep's `select` ("" = the line)


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
    labels: list[str] = field(default_factory=list)  # cells (search: archs) to keep ([] = all)
    budgets: list[float] = field(default_factory=list)  # budget-grid budgets to keep ([] = all)
    reference: str = ""  # replaces the sweep's reference ("" = keep it)
    trials: int | None = None  # search: trials per arch (None = the search's own)


@dataclass
class ParamSpec:
    """One searched override: a float/int range (`low`, `high`, `log`, `int`) or a list of `choices`."""

    low: float | None = None
    high: float | None = None
    log: bool = False  # sample on a log scale (suggest_float/suggest_int log=True)
    int: bool = False  # an integer range (suggest_int); the field name shadows no annotation below
    choices: list[Any] | None = None  # suggest_categorical: scalars (str, int, float, bool)


@dataclass
class ArchSearch:
    overrides: list[str] = field(default_factory=list)  # the arch's base overrides (model=..., ...)
    params: dict[str, ParamSpec] = field(default_factory=dict)  # override key -> its search space


@dataclass
class SearchConfig:
    """Per arch an Optuna TPE study over `params`, selected on the validation split; then the best
    settings are trained with the sweep's `seeds` and tested (launch/search.py)."""

    archs: dict[str, ArchSearch] = field(default_factory=dict)  # label -> base overrides + space
    trials: int = 12  # finished (complete or pruned) trials per arch
    metric: str = "mean_auc"  # a validation metric key (mean_auc / mean_uauc / "<task>/auc" ...)
    direction: str = "maximize"  # maximize | minimize
    sampler_seed: int = 0  # TPESampler seed
    # random trials before TPE models the results (Optuna's default, 10, leaves 2 of 12 trials to TPE)
    sampler_startup_trials: int = 4
    trial_seed: int = 0  # trainer.seed of every search trial
    pruner: str = "median"  # median (MedianPruner on the validation curve) | none
    prune_startup_trials: int = 3  # MedianPruner: no pruning until this many trials have finished
    prune_warmup_steps: int = 1  # MedianPruner: validations before this trainer step never prune


@dataclass
class SweepConfig:
    name: str
    description: str = ""
    overrides: list[str] = field(default_factory=list)  # applied to every cell, before the cell's own
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    reference: str = ""  # label of the row that deltas are relative to ("" = no deltas)
    # a validation AUC (mean_auc / mean_uauc / "<task>/auc" / "<task>/uauc"): the report then chooses, per
    # cell group, the cell with the best seed-mean of it at each run's selected step ("" = no selection)
    select: str = ""
    cells: list[Cell] = field(default_factory=list)
    budget_grid: BudgetGrid | None = None
    plots: list[Plot] = field(default_factory=list)
    measure_speed: bool = True  # time each cell's dense arch alone (batch 512) after the sweep
    quick: Quick = field(default_factory=Quick)
    search: SearchConfig | None = None  # a hyper-parameter search instead of cells (launch/search.py)


def load_sweep(path: Path, quick: bool) -> tuple[SweepConfig, list[Cell]]:
    """The typed sweep config and its expanded cells (quick: the quick subset and overrides)."""
    raw = OmegaConf.load(path)
    try:
        cfg: SweepConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepConfig), raw))
    except Exception as e:  # omegaconf's errors name the key; keep them, drop the traceback
        raise SystemExit(f"error: {path}: {e}") from None
    if cfg.search is not None:
        return _load_search(path, cfg, quick), []
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
    if cfg.select and not re.fullmatch(r"mean_u?auc|[A-Za-z0-9_.-]+/u?auc", cfg.select):
        # higher is better for the choice: AUCs only, not a loss
        raise SystemExit(
            f"error: {path}: select: {cfg.select!r} is not a validation AUC "
            "(mean_auc, mean_uauc, <task>/auc or <task>/uauc)"
        )
    return cfg, cells


def _load_search(path: Path, cfg: SweepConfig, quick: bool) -> SweepConfig:
    """Validate the `search:` section (errors name the key) and apply the quick subset."""
    search = cfg.search
    assert search is not None

    def fail(key: str, message: str) -> None:
        raise SystemExit(f"error: {path}: search.{key}: {message}")

    if cfg.cells or cfg.budget_grid is not None:
        raise SystemExit(f"error: {path}: a sweep has either cells / budget_grid or search, not both")
    if not cfg.seeds:
        raise SystemExit(f"error: {path}: seeds: the final runs need at least one seed")
    if search.trials < 1:
        fail("trials", f"must be >= 1, got {search.trials}")
    if quick and cfg.quick.trials is not None and cfg.quick.trials < 1:
        raise SystemExit(f"error: {path}: quick.trials: must be >= 1, got {cfg.quick.trials}")
    if not search.metric:
        fail("metric", "must name a validation metric, e.g. mean_auc")
    if search.direction not in ("maximize", "minimize"):
        fail("direction", f"must be maximize or minimize, got {search.direction!r}")
    for key in ("sampler_startup_trials", "prune_startup_trials", "prune_warmup_steps"):
        if getattr(search, key) < 0:
            fail(key, f"must be >= 0, got {getattr(search, key)}")
    if search.pruner not in ("median", "none"):
        fail("pruner", f"must be median or none, got {search.pruner!r}")
    if not search.archs:
        fail("archs", "no arch to search")
    for arch, spec in search.archs.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", arch):  # names files: <arch>.optuna.log, trials/<arch>-N
            fail(f"archs.{arch}", "an arch label may only have letters, digits, '_', '.' and '-'")
        for key, p in spec.params.items():
            _check_param(lambda m, k=f"archs.{arch}.params.{key}": fail(k, m), key, p)
    if quick:
        known = set(search.archs)
        if unknown := sorted(set(cfg.quick.labels) - known):
            raise SystemExit(f"error: {path}: quick.labels: {unknown} are not search.archs ({sorted(known)})")
        if cfg.quick.labels:
            search.archs = {a: s for a, s in search.archs.items() if a in cfg.quick.labels}
        search.trials = cfg.quick.trials or search.trials
        cfg.seeds = list(cfg.quick.seeds)
        cfg.overrides = [*cfg.overrides, *cfg.quick.overrides]
    return cfg


def _check_param(fail: Any, key: str, p: ParamSpec) -> None:
    if key.startswith(("+", "~")) or "=" in key or not key:
        fail("the key must be a plain override key such as optim.dense.lr")
    if p.choices is not None:
        if p.low is not None or p.high is not None or p.log or p.int:
            fail("give either choices or low/high (log, int), not both")
        if not p.choices:
            fail("choices is empty")
        if any(not isinstance(c, str | int | float | bool) for c in p.choices):
            fail(f"choices must be scalars (str, int, float, bool), got {p.choices}")
        return
    if p.low is None or p.high is None:
        fail("needs low and high (a range) or choices")
    if not (math.isfinite(p.low) and math.isfinite(p.high)) or p.low >= p.high:
        fail(f"needs finite low < high, got low={p.low:g} high={p.high:g}")
    if p.log and p.low <= 0:
        fail(f"a log range needs low > 0, got {p.low:g}")
    if p.int and (p.low != int(p.low) or p.high != int(p.high)):
        fail(f"an int range needs integer bounds, got low={p.low:g} high={p.high:g}")


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return f"{n:g}"
