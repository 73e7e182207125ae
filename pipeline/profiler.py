"""Instruments over a window of training steps: `StepProfiler` (torch.profiler on one rank) and
`SyncDebugWindow` (CUDA host syncs raise)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def step_window(key: str, steps: list[int]) -> list[int]:
    if steps and (len(steps) != 2 or not 0 <= steps[0] < steps[1]):
        raise ValueError(f"{key}: expected [start, end), 0 <= start < end; got {steps}")
    return list(steps)


class SyncDebugWindow:
    """`torch.cuda.set_sync_debug_mode("error")` over the steps [start, end): a host sync there (`.item()`,
    a tensor built from a Python list, a copy to pageable memory) raises, naming the op, instead of
    silently stalling the GPU's queue. CUDA only; keep log and checkpoint steps (which sync on purpose)
    outside the window."""

    def __init__(self, steps: list[int], device: torch.device) -> None:
        self.window = step_window("trainer.sync_debug_steps", steps) if device.type == "cuda" else []

    def before_step(self, step: int) -> None:
        if self.window and step == self.window[0]:
            torch.cuda.set_sync_debug_mode("error")

    def after_step(self, step: int) -> None:
        if self.window and step + 1 == self.window[1]:
            torch.cuda.set_sync_debug_mode("default")
            log.info("no host sync in training steps %s (torch.cuda sync debug mode: error)", self.window)


class StepProfiler:
    """torch.profiler over the steps [start, end) on one rank: a chrome trace and a top-ops table, to see
    where a training step's time goes (input dist, embedding lookups, dense compute, DDP, optimizer)."""

    def __init__(self, steps: list[int], out_dir: Path, enabled: bool) -> None:
        self.window = step_window("trainer.profile_steps", steps) if enabled else []
        self.out_dir = out_dir
        self.prof: torch.profiler.profile | None = None

    def before_step(self, step: int) -> None:
        if self.window and step == self.window[0]:
            self.prof = torch.profiler.profile(record_shapes=False)
            self.prof.__enter__()

    def after_step(self, step: int) -> None:
        if self.prof is not None and step + 1 == self.window[1]:
            self.prof.__exit__(None, None, None)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.prof.export_chrome_trace(str(self.out_dir / "trace.json"))
            # on a GPU the kernels' device time is the step's cost; CPU time there is mostly launch overhead
            device = "cuda" if torch.cuda.is_available() else "cpu"
            table = self.prof.key_averages().table(sort_by=f"self_{device}_time_total", row_limit=15)
            (self.out_dir / "top_ops.txt").write_text(table)
            log.info(
                "profile of steps %s written to %s; top ops by self %s time:\n%s",
                self.window,
                self.out_dir,
                device.upper(),
                table,
            )
            self.prof = None
