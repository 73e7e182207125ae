"""The software stack and the job's device (issue 23, defect 3): `make venv STACK=...` rebuilds a venv of
the other stack from scratch and checks what it installed; `trainer.device=cuda` without a usable GPU is
one line before anything runs; every job names its device, backend and stack in its first log line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.stack import CUDA_BUILD, Stack, current_stack, resolve_device, stack_problem
from tests.test_reliability import error_lines, python_train, run

ROOT = Path(__file__).resolve().parents[1]


def make_dry_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`make -n venv ARGS` in a copy of the build files, whose .venv/ is only what the test put there."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    if not (tmp_path / "requirements").exists():
        shutil.copytree(ROOT / "requirements", tmp_path / "requirements")
    return subprocess.run(["make", "-n", "venv", *args], cwd=tmp_path, capture_output=True, text=True)


def test_a_venv_of_the_other_stack_is_rebuilt_from_scratch(tmp_path: Path):
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / ".stack").write_text("cpu\n")
    to_cuda = make_dry_run(tmp_path, "STACK=cuda")
    assert to_cuda.returncode == 0, to_cuda.stderr
    assert "rm -rf .venv" in to_cuda.stdout
    assert "-r requirements/cuda.txt" in to_cuda.stdout and "pipeline.stack --expect cuda" in to_cuda.stdout
    same = make_dry_run(tmp_path, "STACK=cpu")
    assert "rm -rf" not in same.stdout and "pipeline.stack --expect cpu" in same.stdout
    # a venv from before .stack existed is known by its stamp
    (tmp_path / ".venv" / ".stack").unlink()
    (tmp_path / ".venv" / ".stamp-cuda").write_text("")
    assert "rm -rf .venv" in make_dry_run(tmp_path, "STACK=cpu").stdout


def test_an_unknown_stack_is_refused_in_one_line(tmp_path: Path):
    proc = make_dry_run(tmp_path, "STACK=gpu")
    assert proc.returncode != 0
    assert proc.stderr.strip().endswith("STACK=gpu: must be cpu or cuda.  Stop.")


def test_the_stack_check_names_what_is_installed_and_how_to_fix_it():
    installed = current_stack()
    assert installed.name == "cpu" and stack_problem("cpu") is None  # this machine's venv
    problem = stack_problem("cuda")
    assert problem is not None and problem.endswith("make venv STACK=cuda")
    assert f"torch {torch.__version__} (CPU build)" in problem
    other_build = Stack("2.13.0+cu128", "12.8", "1.8.0", "cuda", "1.8.0")
    assert f"expected the CUDA {CUDA_BUILD} build" in stack_problem("cuda", other_build)
    mixed = Stack("2.13.0", CUDA_BUILD, "1.8.0", "cpu", "1.8.0")  # fbgemm-gpu-cpu over a CUDA torch
    assert mixed.name == "mixed" and "expected the cuda stack" in stack_problem("cuda", mixed)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.stack", "--expect", "cuda"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 1 and proc.stderr.strip() == problem


@pytest.mark.skipif(torch.cuda.is_available(), reason="proves the CPU-only behaviour")
def test_device_cuda_without_a_gpu_fails_in_one_line_before_any_run_dir(small_dataset: Path, tmp_path: Path):
    assert resolve_device("auto", 0) == torch.device("cpu")
    with pytest.raises(ValueError, match="eval.device=cuda: torch .* has no CUDA; build the CUDA stack"):
        resolve_device("cuda", 0, key="eval.device")
    with pytest.raises(ValueError, match="trainer.device: 'gpu' is not one of"):
        resolve_device("gpu", 0)
    proc = run(python_train(small_dataset, tmp_path / "run", "trainer.device=cuda"))
    assert proc.returncode != 0
    assert error_lines(proc) == [
        f"error [rank 0]: ValueError: trainer.device=cuda: torch {torch.__version__} (CPU build), fbgemm_gpu "
        f"{current_stack().fbgemm_gpu} (cpu), torchrec {current_stack().torchrec} has no CUDA; build the "
        "CUDA stack: make venv STACK=cuda"
    ]
    assert not (tmp_path / "run").exists()
