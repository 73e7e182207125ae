"""`EarlyStopping`: model selection on the validation split (DESIGN s5): track the best value of one
validation metric (higher is better, except for losses: `lower_is_better`), and stop after `patience`
validations without an improvement of more than `min_delta`. Its state goes into every checkpoint, so a
resumed run selects and stops exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any

from data.metrics.summary import lower_is_better
from pipeline.config import EarlyStopConfig


class EarlyStopping:
    def __init__(self, cfg: EarlyStopConfig) -> None:
        if cfg.patience < 0:
            raise ValueError(f"trainer.early_stop.patience must be >= 0, got {cfg.patience}")
        self.cfg = cfg
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_validations = 0  # validations since the best one
        self.best_metrics: dict[str, float] = {}  # every metric of the best validation
        self.last_metrics: dict[str, float] = {}
        self.last_step: int | None = None  # the step of the last validation

    def update(self, step: int, value: float, metrics: dict[str, float] | None = None) -> bool:
        """Record a validation (its selection `value` and all its `metrics`); True when it is the new
        best. A NaN value (e.g. one class only) is never an improvement."""
        sign = -1.0 if lower_is_better(self.cfg.metric) else 1.0
        improved = not math.isnan(value) and (
            self.best is None or sign * (value - self.best) > self.cfg.min_delta
        )
        self.last_metrics, self.last_step = dict(metrics or {}), step
        if improved:
            self.best, self.best_step, self.bad_validations = value, step, 0
            self.best_metrics = self.last_metrics
        else:
            self.bad_validations += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.cfg.patience > 0 and self.bad_validations >= self.cfg.patience

    def state_dict(self, with_metrics: bool = True) -> dict[str, Any]:
        state: dict[str, Any] = {
            "best": self.best,
            "best_step": self.best_step,
            "bad_validations": self.bad_validations,
        }
        if with_metrics:
            state.update(
                best_metrics=self.best_metrics, last_metrics=self.last_metrics, last_step=self.last_step
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.bad_validations = state["bad_validations"]
        self.best_metrics, self.last_metrics = state["best_metrics"], state["last_metrics"]
        self.last_step = state["last_step"]
