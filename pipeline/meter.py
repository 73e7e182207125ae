"""`TrainMeter`: the training loss, NE, calibration and throughput between two log lines, and the training
time in all.

Time spent outside training steps (validation) is left out: `pause()` before it, `resume()` after it.
"""

from __future__ import annotations

import time

import torch

from models.collectives import mean_over_ranks


class TrainMeter:
    def __init__(self) -> None:
        self.train_seconds, self.train_steps = 0.0, 0  # training time and steps of the whole run
        self.resume()

    def update(self, losses: torch.Tensor, task_sums: torch.Tensor) -> None:
        """One training step's losses (a fixed shape; averaged over the window's steps by `flush`) and its
        per-task row sums (`RankingOutput.task_sums`, (num_tasks, 4); added up over the window). Tensor
        arithmetic only: no host sync in the step."""
        self._steps += 1
        self._loss_sum = losses if self._loss_sum is None else self._loss_sum + losses
        self._task_sums = task_sums if self._task_sums is None else self._task_sums + task_sums

    def flush(self) -> tuple[torch.Tensor, torch.Tensor, float, int]:
        """(the window's mean losses, averaged over ranks; its per-task row sums, averaged over ranks (their
        ratios are the window's weighted means over all ranks' rows); its seconds; its steps); a new
        window starts. A collective: every rank calls it at the same step."""
        n = self._loss_sum.numel()
        both = mean_over_ranks(torch.cat([self._loss_sum / self._steps, self._task_sums.flatten()]))
        seconds, steps = self.pause()
        self.resume()
        return both[:n], both[n:].view(-1, 4), seconds, steps

    def pause(self) -> tuple[float, int]:
        """Stop the clock: the window's time and steps go into the run's totals, its losses are dropped."""
        seconds, steps = time.perf_counter() - self._t0, self._steps
        self.train_seconds += seconds
        self.train_steps += steps
        self.resume()
        return seconds, steps

    def resume(self) -> None:
        """Start a new window's clock."""
        self._t0, self._steps, self._loss_sum, self._task_sums = time.perf_counter(), 0, None, None
