"""Object storage end to end, against a real S3-compatible server on localhost (moto's server mode): daily
partitions read from it, a 2-rank run checkpointing to it, killed and resumed from it, predictions and an
export published to it (commit marker last) and scored back from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from data.build.generate import GenParams, generate
from data.storage import COMMIT_MARKER, exists, join, list_files, read_bytes
from tests.test_train_e2e import ROOT, ok, run

pytestmark = pytest.mark.slow
BUCKET = "rankmixer-test"


@pytest.fixture(scope="module")
def s3(synthetic_schema, tmp_path_factory):
    """A moto S3 server on a free localhost port, the standard AWS environment pointing at it (for this
    process and the jobs it starts), a bucket, and 3 days of generated data uploaded to it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        local = tmp_path_factory.mktemp("daily") / "data"
        params = GenParams(rows_train=4096, files_train=2, row_groups_per_file=2, days=3, seed=1)
        generate(synthetic_schema, params, local)
        fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}/")
        pafs.copy_files(str(local), f"{BUCKET}/data", destination_filesystem=fs)
        yield f"s3://{BUCKET}"
    server.stop()


TRAIN = [
    "data.train_split='dt<=2026-01-02'",
    "data.valid_split=none",
    "data.split='dt=2026-01-03'",
    "data.batch_size=256",
    "data.eval_batch_size=1024",
    "trainer.epochs=2",
    "trainer.checkpoint_every=5",
    "trainer.log_every=5",
    "trainer.progress_bar=false",
    "trainer.resume=auto",
]


def test_a_run_on_s3_reads_partitions_checkpoints_is_killed_resumes_and_publishes_predictions_and_export(s3):
    data, run_dir = f"{s3}/data", f"{s3}/runs/a"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["launch/train.py", f"data.root={data}", f"trainer.run_dir={run_dir}", *TRAIN]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)  # fmt: skip
    marker = join(run_dir, "checkpoints", "step_00000005", "trainer.json")
    deadline = time.time() + 300
    while not exists(marker) and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    kill_tree(job.pid)  # the whole job (torchrun and its workers), mid-run, right after a checkpoint
    _, err = job.communicate(timeout=60)
    assert exists(marker), err[-4000:]
    assert not exists(join(run_dir, "metrics.json"))  # it really was cut short

    resumed = ok(run(cmd))
    assert f"resumed from {run_dir}/checkpoints/step_000000" in resumed.stderr
    summary = json.loads(read_bytes(join(run_dir, "metrics.json")))
    # 2 days x 4096 rows in 8 row groups, 4 a rank: 16 batches of 256 an epoch, 2 epochs
    assert summary["steps"] == 32 and summary["test"]["rows"] == 4096
    assert summary["test"]["mean_auc"] > 0.55  # it learned from what it read off S3
    log = [json.loads(x) for x in read_bytes(join(run_dir, "metrics.jsonl")).decode().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == [5, 10, 15, 20, 25, 30, 32]  # each step once
    kept = [f.split("/")[0] for f in list_files(join(run_dir, "checkpoints")) if f.endswith("trainer.json")]
    assert len(kept) == 2  # keep_last, pruned on S3

    preds = f"{s3}/predictions"
    ok(run([sys.executable, "launch/predict.py", f"checkpoint={run_dir}", f"out={preds}",
            "data.split='dt=2026-01-03'"]))  # fmt: skip
    assert exists(join(preds, COMMIT_MARKER))
    fs, inner = pafs.FileSystem.from_uri(preds)
    scored = pq.read_table(inner, filesystem=fs).sort_by("row_id")
    assert scored.num_rows == 4096 and scored.column("row_id").to_pylist() == list(range(4096))

    artifact = f"{s3}/export"
    ok(run([sys.executable, "launch/export.py", f"checkpoint={run_dir}", f"out={artifact}",
            "split='dt=2026-01-03'"]))  # fmt: skip
    assert exists(join(artifact, COMMIT_MARKER)) and exists(join(artifact, "manifest.json"))
    from pipeline.predictor import Predictor

    predictor = Predictor(artifact)
    served = np.concatenate([b for f in _day_files(data, "2026-01-03") for b in predictor.predict_parquet(f)])
    ours = np.stack([scored.column(c).to_numpy() for c in ("score_finish", "score_skip")], axis=1)
    assert np.abs(served - ours).max() < 1e-4


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in sessions of their own,
    so killing its process group would leave them running)."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit():
                children.setdefault(int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(
                    int(p.name)
                )
        except OSError:
            pass
    todo, tree = [pid], []
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _day_files(data: str, day: str) -> list[str]:
    return [join(data, f) for f in list_files(data, ".parquet") if f.startswith(f"dt={day}/")]


def test_an_unpublished_output_is_refused_by_its_reader(s3):
    from pipeline.predictor import ArtifactError, Predictor

    with pytest.raises((FileNotFoundError, ArtifactError), match="not published"):
        Predictor(f"{s3}/no-such-export")


def test_a_run_dir_that_cannot_be_written_is_one_line(s3, one_rank_group):
    # what launch/train.py prints as its one line (before any reader or model is built)
    from pipeline.config import TrainConfig, TrainerConfig
    from pipeline.job import resolve_run_dir

    cfg = TrainConfig(trainer=TrainerConfig(run_dir="s3://no-such-bucket/run"))
    with pytest.raises(ValueError) as err:
        resolve_run_dir(cfg, one_rank_group)
    assert str(err.value).startswith("trainer.run_dir='s3://no-such-bucket/run': cannot write there (")
    assert "\n" not in str(err.value)
