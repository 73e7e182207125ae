"""End to end through the real launchers: `torchrun --nproc_per_node 2 launch/train.py` (gloo, 2 CPU
processes) on a generated Parquet dataset, then `launch/eval.py` on 1 rank from the 2-rank checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]

pytestmark = pytest.mark.slow


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"command failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    )
    return proc


def train_cmd(dataset: Path, run_dir: Path, *overrides: str, nproc: int = 2) -> list[str]:
    return [
        *TORCHRUN,
        "--nproc_per_node",
        str(nproc),
        "launch/train.py",
        # the library defaults (a constant lr after warmup): an interruption is simulated by a smaller
        # trainer.max_steps, which would move a cosine schedule's end (the built-in data's recipe has one)
        "recipe=paper",
        f"data.root={dataset}",
        f"trainer.run_dir={run_dir}",
        "data.batch_size=256",
        "data.eval_batch_size=1024",
        "trainer.log_every=10",
        "trainer.progress_bar=false",
        "trainer.epochs=3",
        "optim.dense.warmup_steps=20",
        *overrides,
    ]


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


# The refusals below run launch/train.py's own code in this process (conftest launch_in_process), each
# ending before a run dir is made. A launcher process ending in its one-line error: tests/test_reliability.py
# (resumes refused) and tests/test_stack.py.
def test_misspelt_override_is_rejected_before_training(launch_in_process, dataset: Path, tmp_path: Path):
    proc = launch_in_process([sys.executable, "launch/train.py", f"data.root={dataset}", "trainer.epocs=2"])
    assert proc.returncode != 0
    assert "epocs" in proc.stderr


def test_wrongly_typed_override_is_rejected_with_the_key(launch_in_process, dataset: Path, tmp_path: Path):
    proc = launch_in_process(
        [sys.executable, "launch/train.py", f"data.root={dataset}", "trainer.max_steps=many"]
    )
    assert proc.returncode != 0
    assert "max_steps" in proc.stderr


def test_unknown_model_field_names_the_field(launch_in_process, dataset: Path, tmp_path: Path):
    proc = launch_in_process(
        [
            sys.executable,
            "launch/train.py",
            f"data.root={dataset}",
            f"trainer.run_dir={tmp_path / 'r'}",
            "+model.dense.num_tokenz=4",
        ]
    )
    assert proc.returncode != 0
    assert "num_tokenz" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_missing_dataset_split_names_the_directory(launch_in_process, tmp_path: Path):
    missing = tmp_path / "nowhere"
    proc = launch_in_process(
        [sys.executable, "launch/train.py", f"data.root={missing}", f"trainer.run_dir={tmp_path / 'r'}"]
    )
    assert proc.returncode != 0
    assert str(missing / "train") in proc.stderr
    assert not (tmp_path / "r").exists()


SMOE = [
    "model.dense.ffn=smoe",
    "model.dense.moe.num_experts=4",
    "model.dense.moe.active_ratio=0.5",
    "model.dense.moe.router=relu_dtsi",
]


def records(run_dir: Path, kind: str) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["kind"] == kind}


def test_sparse_moe_run_logs_routing_resumes_exactly_and_evaluates_sparse_and_dense(
    dataset: Path, tmp_path: Path, evaluate_in_process
):
    steps = 20
    full = tmp_path / "full"
    # The data come from loader worker processes (data/workers.py): 1 per rank here, 2 in the resumed run,
    # whose batches must still be the uninterrupted run's.
    ok(
        run(
            train_cmd(
                dataset,
                full,
                *SMOE,
                f"trainer.max_steps={2 * steps}",
                f"trainer.checkpoint_every={steps}",
                "data.workers=1",
            )
        )
    )
    part = tmp_path / "part"  # the second half again, from the full run's checkpoint of step `steps`
    cut = f"trainer.resume={full / 'checkpoints' / f'step_{steps:08d}'}"
    ok(
        run(
            train_cmd(
                dataset,
                part,
                *SMOE,
                f"trainer.max_steps={2 * steps}",
                "trainer.final_eval=false",
                "data.workers=2",
                cut,
            )
        )
    )
    a, b = records(full, "train"), records(part, "train")
    for step in (30, 40):  # task loss, lambda * L_reg and the lambda controller's state all resume exactly
        for key in ("loss", "aux_loss", "moe/block0/lambda", "moe/block0/gate_bias_mean", "moe/active_ratio"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert a[40]["aux_loss"] > 0 and 0 < a[40]["moe/active_ratio"] <= 1

    evaluated = evaluate_in_process(full, dataset)
    trained = json.loads((full / "metrics.json").read_text())
    for mode in ("test", "test_dense_inference"):  # serving (sparse) and all-experts (dense) inference
        for key in ("finish/auc", "skip/uauc"):
            assert evaluated[mode][key] == pytest.approx(trained[mode][key], abs=1e-5), (mode, key)
    # The same gates either way: sparse inference only skips experts whose gate is 0.
    assert evaluated["test"]["finish/auc"] == pytest.approx(
        evaluated["test_dense_inference"]["finish/auc"], abs=1e-4
    )


def test_model_override_of_a_preset_field_is_type_checked():
    # composed as launch/train.py composes (the launcher's one-line report of a type error: the test above)
    from launch.configs import compose_train

    with pytest.raises(Exception, match=r"model\.dense\.moe\.num_experts"):
        compose_train(["model.dense.moe.num_experts=many"])


LONGER = [
    "model.sequence=longer",
    "model.longer.dim=16",
    "model.longer.merge=8",
    "model.longer.recent_queries=4",
]


def test_longer_sequence_arch_trains_sharded_resumes_exactly_and_evaluates_on_one_rank(
    dataset: Path, tmp_path: Path, evaluate_in_process
):
    steps = 10
    full = tmp_path / "full"
    overrides = (*LONGER, f"trainer.max_steps={2 * steps}", f"trainer.checkpoint_every={steps}")
    proc = ok(run(train_cmd(dataset, full, *overrides)))
    # the unpooled EmbeddingCollection is sharded by the planner and pipelined like the bags
    assert "model.sparse_arch.embedding_collection' will be pipelined" in proc.stderr
    assert "will NOT be pipelined" not in proc.stderr
    part = tmp_path / "part"  # the second half again, from the full run's checkpoint of step `steps`
    cut = f"trainer.resume={full / 'checkpoints' / f'step_{steps:08d}'}"
    ok(
        run(
            train_cmd(
                dataset, part, *LONGER, f"trainer.max_steps={2 * steps}", "trainer.final_eval=false", cut
            )
        )
    )
    a, b = losses(full), losses(part)
    for step in (2 * steps,):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step
    evaluated = evaluate_in_process(full, dataset)
    trained = json.loads((full / "metrics.json").read_text())
    assert evaluated["test"]["finish/auc"] == pytest.approx(trained["test"]["finish/auc"], abs=1e-5)
