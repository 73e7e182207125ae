"""Sweep configs of `launch/experiment.py` (conf/experiment/*.yaml): the typed dataclasses and
`load_sweep`, which validates a config and expands its cells (budget grid, quick subset)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf


@dataclass
class Cell:
    label: str  # row of the table
    line: str = ""  # series in the plots ("" = the label)
    overrides: list[str] = field(default_factory=list)  # launch/train.py overrides (model=..., model.x=...)
    x: float | None = None  # x of "x" plots (e.g. the active ratio)
    params_budget: float | None = None  # solve the arch's scale field for this many dense params


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
    labels: list[str] = field(default_factory=list)  # cells to keep ([] = all)
    budgets: list[float] = field(default_factory=list)  # budget-grid budgets to keep ([] = all)
    reference: str = ""  # replaces the sweep's reference ("" = keep it)


@dataclass
class SweepConfig:
    name: str
    description: str = ""
    overrides: list[str] = field(default_factory=list)  # applied to every cell, before the cell's own
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    reference: str = ""  # label of the row that deltas are relative to ("" = no deltas)
    cells: list[Cell] = field(default_factory=list)
    budget_grid: BudgetGrid | None = None
    plots: list[Plot] = field(default_factory=list)
    measure_speed: bool = True  # time each cell's dense arch alone (batch 512) after the sweep
    quick: Quick = field(default_factory=Quick)


def load_sweep(path: Path, quick: bool) -> tuple[SweepConfig, list[Cell]]:
    """The typed sweep config and its expanded cells (quick: the quick subset and overrides)."""
    raw = OmegaConf.load(path)
    try:
        cfg: SweepConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepConfig), raw))
    except Exception as e:  # omegaconf's errors name the key; keep them, drop the traceback
        raise SystemExit(f"error: {path}: {e}") from None
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
    return cfg, cells


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return f"{n:g}"
