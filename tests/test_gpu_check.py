"""The GPU acceptance script's CPU mode (`launch/gpu_check.sh --cpu`): every step that makes sense on gloo,
through the real launchers (torchrun for the 2-rank jobs; the 1-rank jobs run their launcher's code in the
check's one process), so the script a GPU owner runs once cannot rot between GPU runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["logits", "auc"]  # torch only
STEPS += ["stack", "data", "train", "sharding", "resume", "eval", "longer", "predict", "export"]


@pytest.mark.slow
def test_gpu_check_cpu_mode_passes_every_step(tmp_path: Path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", "launch/gpu_check.sh", "--cpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split(":")[0].split()[1] for line in lines[1:-1]] == STEPS, lines
    assert all(line.startswith("ok   ") for line in lines[1:-1]) and lines[-1].endswith("every step passed")
    assert "row_wise" in next(line for line in lines if line.startswith("ok   sharding"))


def test_gpu_check_refuses_an_unknown_mode_in_one_line():
    proc = subprocess.run(["bash", "launch/gpu_check.sh", "--gpu"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "usage: launch/gpu_check.sh [--cpu | --torch-only]"
