"""Instruments over a window of training steps: `StepProfiler` (torch.profiler on one rank, with the step's
time split into its parts by `step_breakdown`) and `SyncDebugWindow` (CUDA host syncs raise)."""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd.profiler_util import FunctionEvent

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


# ---- the step's parts ---------------------------------------------------------------------------------
# An op's time goes to the innermost range (record_function or op) whose name matches a rule, so TorchRec's
# own ranges inside our forward (lookup, output dist) win over ours around them. Backward ops run under
# "## backward ##" with no range of their own: autograd's node for a forward op carries that op's sequence
# number, so it is charged to the forward op's part ("dense forward" -> "dense backward").
_RULES: list[tuple[str, str]] = [
    (r"^\[lookup\]", "embedding lookup (fwd)"),
    (r"^\[output_dist|EmbeddingBagCollectionAwaitable|All2All_Pooled", "all-to-all: output dist"),
    (r"SplitLookupFunction|split_embedding_backward", "fused optimizer (embedding bwd + Adagrad)"),
    (r"runtime_forward_assemble_KJT|sparse_data_dist|^\[splits_dist\]", "all-to-all: input dist"),
    (r"AccumulateGrad", "DDP grad copy + allreduce"),  # the reducer's hooks run under it
    (r"^## mean_pool ##", "sparse arch: mean pool"),
    (r"^## feature_groups ##", "feature groups"),
    (r"^## dense_arch ##", "dense forward"),
    (r"^## loss ##", "loss + embedding L2"),
    (r"^## (copy_batch_to_gpu|next_batch|wait_for_batch)", "data (wait + to device)"),
    (r"^## (optimizer|zero_grad)", "dense optimizer (zero_grad, clip, RMSProp)"),
    (r"^## meter ##", "meter + logging"),
    (r"^## forward", "forward: other (DDP, KJT, Python)"),
    (r"^## backward", "backward: other"),
]
_BACKWARD_OF = {
    "sparse arch: mean pool": "sparse arch: mean pool (bwd)",
    "feature groups": "feature groups (bwd)",
    "dense forward": "dense backward",
    "loss + embedding L2": "loss + embedding L2 (bwd)",
    "forward: other (DDP, KJT, Python)": "backward: other",
}
_COMPILED = [(re.compile(p), part) for p, part in _RULES]
_UNRANGED = "Python / other (outside the ranges)"


def _rule(name: str) -> str | None:
    return next((part for pattern, part in _COMPILED if pattern.search(name)), None)


def step_breakdown(events: list[FunctionEvent], steps: int) -> list[tuple[str, float, float]]:
    """[(part, ms per step, % of the step)] of the profiled window's thread that ran the forward, largest
    first. The window's wall time is the step time; what no range covers is `_UNRANGED`."""
    forward = next((e for e in events if e.name.startswith("## forward")), None)
    if forward is None or steps <= 0:
        return []
    main = [e for e in events if e.thread == forward.thread]
    seq_part: dict[int, str] = {}  # forward op sequence number -> its part
    part_us: dict[str, float] = defaultdict(float)
    for e in sorted(main, key=lambda e: e.time_range.start):  # parents before children
        part, node = None, e
        while node is not None and part is None:
            if node.name.startswith("autograd::engine::evaluate_function"):
                part = _rule(node.name) or _BACKWARD_OF.get(seq_part.get(node.sequence_nr, ""), None)
            part = part or _rule(node.name)
            node = node.cpu_parent
        part = part or _UNRANGED
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::"):
            seq_part.setdefault(e.sequence_nr, part)
        part_us[part] += e.self_cpu_time_total
    span = max(e.time_range.end for e in main) - min(e.time_range.start for e in main)
    part_us[_UNRANGED] += span - sum(e.time_range.elapsed_us() for e in main if e.cpu_parent is None)
    rows = [(p, us / steps / 1e3, 100 * us / span) for p, us in part_us.items()]
    return sorted(rows, key=lambda r: -r[1])


def format_breakdown(rows: list[tuple[str, float, float]]) -> str:
    width = max((len(p) for p, _, _ in rows), default=10)
    lines = [f"{'part':<{width}}  ms/step  % of step"]
    lines += [f"{p:<{width}}  {ms:7.2f}  {pct:8.1f}" for p, ms, pct in rows]
    lines.append(f"{'step':<{width}}  {sum(ms for _, ms, _ in rows):7.2f}  {100.0:8.1f}")
    return "\n".join(lines)


class StepProfiler:
    """torch.profiler over the steps [start, end) on one rank: a chrome trace, a top-ops table and the step's
    time by part (`step_breakdown`: data, lookup, all-to-all, feature groups, dense forward / backward,
    allreduce, optimizers, Python), to see where a training step's time goes."""

    def __init__(self, steps: list[int], out_dir: Path, enabled: bool) -> None:
        self.window = step_window("trainer.profile_steps", steps) if enabled else []
        self.out_dir = out_dir
        self.prof: torch.profiler.profile | None = None
        self.clocks = (0.0, 0.0)

    def before_step(self, step: int) -> None:
        if self.window and step == self.window[0]:
            self.prof = torch.profiler.profile(record_shapes=False)
            self.prof.__enter__()
            self.clocks = (time.perf_counter(), time.thread_time())

    def after_step(self, step: int) -> None:
        if self.prof is None or step + 1 != self.window[1]:
            return
        steps = self.window[1] - self.window[0]
        wall_ms = 1e3 * (time.perf_counter() - self.clocks[0]) / steps
        cpu_ms = 1e3 * (time.thread_time() - self.clocks[1]) / steps
        self.prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.out_dir / "trace.json"))
        # on a GPU the kernels' device time is the step's cost; CPU time there is mostly launch overhead
        device = "cuda" if torch.cuda.is_available() else "cpu"
        table = self.prof.key_averages().table(sort_by=f"self_{device}_time_total", row_limit=15)
        (self.out_dir / "top_ops.txt").write_text(table)
        # wall time minus the thread's CPU time: what it spent not running (waiting for the peers'
        # collectives, the data, the GIL, or a core on a shared machine)
        breakdown = format_breakdown(step_breakdown(self.prof.events(), steps))
        breakdown += f"\nwall {wall_ms:.2f} ms/step; the thread ran (CPU time) {cpu_ms:.2f} ms/step"
        (self.out_dir / "breakdown.txt").write_text(breakdown + "\n")
        log.info(
            "profile of steps %s written to %s; top ops by self %s time:\n%s\nthe step by part (host time "
            "of the thread that runs it):\n%s",
            self.window,
            self.out_dir,
            device.upper(),
            table,
            breakdown,
        )
        self.prof = None
