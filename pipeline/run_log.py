"""Run logging on rank 0: a JSONL file of every logged record (machine-readable curves) and TensorBoard
event files of the same scalars, both under the run dir; plain `logging` for humans."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.files import write_atomic


def setup_logging(rank: int) -> None:
    """Our packages log INFO on rank 0 (WARNING elsewhere); everything else WARNING. FBGEMM and TorchRec
    log a lot at INFO on the root logger; the one TorchRec line kept is the pipeliner's verdict on each
    sharded module ("will be pipelined" / "will NOT be pipelined"), which says whether input
    distribution really overlaps compute."""
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    level = logging.INFO if rank == 0 else logging.WARNING
    for name in ("pipeline", "data", "launch", "models", "torchrec.distributed.train_pipeline.utils"):
        logging.getLogger(name).setLevel(level)


def _keep(record: dict[str, Any], resume_step: int) -> bool:
    return record.get("kind") != "test" and record.get("step", 0) <= resume_step


class RunLog:
    """Scalars -> <run_dir>/metrics.jsonl and TensorBoard; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None) -> None:
        """`resume_step`: the step a resumed run continues from; records of later steps (written by the run
        that stopped, after its last checkpoint) and its test records are dropped first."""
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if enabled:
            path = run_dir / "metrics.jsonl"
            if resume_step is not None and path.is_file():
                kept = [
                    line
                    for line in path.read_text().splitlines()
                    if line.strip() and _keep(json.loads(line), resume_step)
                ]
                write_atomic(path, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in kept)))
            self._jsonl = open(path, "a", buffering=1)  # noqa: SIM115 - closed in close()
            from torch.utils.tensorboard import SummaryWriter  # heavy import: rank 0 only

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        for k, v in values.items():
            if isinstance(v, int | float):
                self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
