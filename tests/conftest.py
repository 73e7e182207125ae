"""Shared fixtures: the real synthetic schema, one small generated dataset per test session, and a small
hand-written schema (two tables, one shared with the sequence) for sharding and wiring tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from data.build.generate import GenParams, generate
from data.schema import Schema

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_CONFIG = ROOT / "conf" / "data" / "synthetic.yaml"
SMALL_ROWS = 20_000


@pytest.fixture(scope="session")
def synthetic_schema() -> Schema:
    return Schema.load(SYNTHETIC_CONFIG)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory, synthetic_schema: Schema) -> Path:
    """~20k train rows (8 files x 4 row groups), valid/test scaled alike; returns the dataset root."""
    import yaml

    cfg = yaml.safe_load(SYNTHETIC_CONFIG.read_text())
    params = GenParams.from_dict(cfg["generator"]).scaled(SMALL_ROWS)
    root = tmp_path_factory.mktemp("data") / "synthetic"
    generate(synthetic_schema, params, root)
    return root


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40k rows written by the generator's command line (`python -m data.build.generate`), as a user
    builds the built-in data; returns the dataset root."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("cli") / "data"
    cmd = [
        sys.executable,
        "-m",
        "data.build.generate",
        "--config",
        str(SYNTHETIC_CONFIG),
        "--root",
        str(root),
    ]
    proc = subprocess.run([*cmd, "--rows", "40000", "--seed", "3"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


_TWO_TABLE_SCHEMA = {
    "name": "t",
    "labels": ["finish", "skip"],
    "user_id": "uid",
    "groups": ["user", "item", "sequence"],
    "dense": [
        {"name": "d0", "column": "d0", "group": "user"},
        {"name": "d1", "column": "d1", "group": "item"},
    ],
    "sparse": [
        {"name": "user_id", "column": "uid", "num_embeddings": 60, "embedding_dim": 8, "group": "user"},
        {
            "name": "item_id",
            "column": "iid",
            "num_embeddings": 80,
            "embedding_dim": 8,
            "group": "item",
            "table": "item",
        },
        {
            "name": "tags",
            "column": "tags",
            "num_embeddings": 30,
            "embedding_dim": 4,
            "group": "item",
            "multi_hot": True,
            "pooling": "mean",
        },
    ],
    "sequence": {
        "group": "sequence",
        "max_len": 8,
        "features": [
            {
                "name": "seq_item",
                "column": "seq_item",
                "num_embeddings": 80,
                "embedding_dim": 8,
                "table": "item",
            }
        ],
    },
}


@pytest.fixture(scope="session")
def two_table_schema() -> Schema:
    """user (id + dense), item (id on the shared "item" table + multi-hot tags + dense), and a sequence of
    item ids on the same "item" table."""
    return Schema.from_dict(_TWO_TABLE_SCHEMA)


def _join_one_rank_group(monkeypatch: pytest.MonkeyPatch):
    """A 1-rank gloo process group in this process, its torchrun-style environment set through
    monkeypatch (undone after the test: a later `python launch/train.py` must not inherit RANK /
    WORLD_SIZE / MASTER_PORT from it)."""
    import socket

    from pipeline.dist import init_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    for key, value in {**env, "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    return init_distributed(device="cpu")


@pytest.fixture
def one_rank_group(monkeypatch: pytest.MonkeyPatch):
    """A 1-rank gloo process group in this process, for the whole test."""
    import torch.distributed as dist

    yield _join_one_rank_group(monkeypatch)
    dist.destroy_process_group()


@pytest.fixture
def lazy_one_rank_group(monkeypatch: pytest.MonkeyPatch):
    """`join()`: a 1-rank gloo group in this process, joined at the first call, so the processes a test
    starts before that do not inherit its environment; left at the end of the test."""
    import torch.distributed as dist

    def join() -> None:
        if not dist.is_initialized():
            _join_one_rank_group(monkeypatch)

    yield join
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture
def evaluate_in_process(lazy_one_rank_group):
    """`evaluate_in_process(checkpoint, data_root) -> metrics.json`: `launch/eval.py`'s job
    (`pipeline.eval_job.run_eval`) in this process, without a process start and its imports. Tests that
    check the launcher itself run it as a process."""
    from pipeline.config import EvalConfig, ScoreDataConfig
    from pipeline.eval_job import run_eval

    def evaluate(checkpoint: Path, data_root: Path) -> dict:
        lazy_one_rank_group()
        return run_eval(EvalConfig(checkpoint=str(checkpoint), data=ScoreDataConfig(root=str(data_root))))

    return evaluate


@pytest.fixture
def predict_in_process(lazy_one_rank_group):
    """`predict_in_process(checkpoint, data_root, out, overwrite=False) -> _predict.json`:
    `launch/predict.py`'s job (`pipeline.predict_job.run_predict`) in this process."""
    from pipeline.config import PredictConfig, ScoreDataConfig
    from pipeline.predict_job import run_predict

    def predict(checkpoint: Path, data_root: Path, out: Path, overwrite: bool = False) -> dict:
        lazy_one_rank_group()
        data = ScoreDataConfig(root=str(data_root), eval_batch_size=1024)
        cfg = PredictConfig(checkpoint=str(checkpoint), out=str(out), data=data, overwrite=overwrite)
        return run_predict(cfg)

    return predict


@pytest.fixture
def launch_in_process():
    """`launch_in_process([python, script, *args]) -> CompletedProcess`: what `run` of that command would
    return (exit code, stdout, stderr), with the launcher's own code run in this process on the 1-rank
    group it makes itself (`launch.cli.run_launcher_here`), so neither an interpreter start nor its
    TorchRec import is paid, and nothing is left behind for a later process. For 1-rank jobs and
    refusals; what only a process shows (torchrun, several ranks, a killed rank) still starts one."""
    import subprocess
    import sys

    from launch.cli import run_launcher_here

    def launch(cmd: list[str]) -> subprocess.CompletedProcess:
        assert cmd[0] == sys.executable and cmd[1].endswith(".py"), cmd
        code, out, err = run_launcher_here(cmd[1:])
        return subprocess.CompletedProcess(cmd, code, out, err)

    return launch
