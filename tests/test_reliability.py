"""Faults an operator meets, through the real launcher: a killed rank recovered by torchrun, resumes that
refuse to lie (changed schema, world size mid-epoch), a corrupt newest checkpoint skipped, a failed save
cleaned up, and every failure as one line (bad data on one rank, YAML errors, unwritable paths)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.dist import shared_store_restarts
from tests.test_train_e2e import ROOT, ok, run

pytestmark = pytest.mark.slow

COMMON = [
    "data.batch_size=256",
    "data.eval_batch_size=1024",
    "trainer.progress_bar=false",
    "trainer.log_every=10",
]


def python_train(dataset: Path, run_dir: Path, *overrides: str) -> list[str]:
    """launch/train.py as one process (a 1-rank group): the cheap way to exercise resume logic. The tests
    here run it in this process (conftest launch_in_process: the launcher's own code, exit code and
    output, without an interpreter start and its TorchRec import); tests/test_stack.py runs it as a
    process, and a torchrun job ends in the launcher's one-line error in
    test_bad_data_on_one_rank_is_one_line_and_the_peer_exits_quietly."""
    return [
        sys.executable,
        "launch/train.py",
        f"data.root={dataset}",
        f"trainer.run_dir={run_dir}",
        *COMMON,
        *overrides,
    ]


def torchrun_train(dataset: Path, run_dir: Path, *overrides: str, nproc: int = 2, launcher=()) -> list[str]:
    launcher = list(launcher) or ["--standalone"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc_per_node", str(nproc)]
    return [
        *cmd,
        "launch/train.py",
        f"data.root={dataset}",
        f"trainer.run_dir={run_dir}",
        *COMMON,
        *overrides,
    ]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_resume_refuses_a_changed_schema_naming_the_field_and_leaves_the_run_dir(
    small_dataset, tmp_path, launch_in_process
):
    run_dir = tmp_path / "run"
    launch = launch_in_process
    ok(launch(python_train(small_dataset, run_dir, "trainer.max_steps=10", "trainer.final_eval=false")))
    saved = (run_dir / "config.yaml").read_text()
    # author_level's table 8 -> 16 wide (sparse[14] in conf/data/synthetic.yaml)
    proc = launch(python_train(small_dataset, run_dir, "trainer.max_steps=20", "trainer.resume=auto",
                               "data.schema.sparse.14.embedding_dim=16"))  # fmt: skip
    assert proc.returncode == 2
    checkpoint = run_dir / "checkpoints" / "step_00000010"
    assert error_lines(proc) == [
        f"error [rank 0]: CheckpointError: resume: {checkpoint} was written with another schema or model: "
        "schema.sparse[author_level].embedding_dim: 8 in checkpoint, 16 now; resume with the run's "
        "config.yaml, or start a new trainer.run_dir"
    ]
    assert "Traceback" not in proc.stderr
    assert (run_dir / "config.yaml").read_text() == saved  # nothing of the run was overwritten


def test_resume_auto_skips_a_truncated_newest_checkpoint_and_the_log_has_each_step_once(
    small_dataset, tmp_path, launch_in_process
):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ("trainer.checkpoint_every=10", "trainer.eval_every=0", "trainer.final_eval=false")
    launch = launch_in_process
    ok(launch(python_train(small_dataset, full, "trainer.max_steps=30", "trainer.keep_last=3", *args)))
    # a run that stopped at step 20 (its log and checkpoints as full's were then), whose newest is torn
    shutil.copytree(full, part, ignore=shutil.ignore_patterns("step_00000030", "metrics.json"))
    first_seconds = json.loads((part / "checkpoints" / "step_00000010" / "trainer.json").read_text())
    newest = part / "checkpoints" / "step_00000020"
    shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a torn write
    proc = ok(launch(python_train(small_dataset, part, "trainer.max_steps=30", "trainer.resume=auto", *args)))
    assert f"resume: skipping {newest}, which cannot be loaded" in proc.stderr
    assert "resumed from" in proc.stderr and "step_00000010 at step 10" in proc.stderr
    a = {r["step"]: r["loss"] for r in records(full) if r["kind"] == "train"}
    b = {r["step"]: r["loss"] for r in records(part) if r["kind"] == "train"}
    assert b[30] == pytest.approx(a[30], rel=1e-5)  # steps 11-30 replayed exactly from step 10
    keys = [(r["kind"], r["step"]) for r in records(part)]
    assert len(keys) == len(set(keys))  # steps 11-20 of the first run were dropped from the log
    summary = json.loads((part / "metrics.json").read_text())
    assert summary["train_seconds"] > first_seconds["train_seconds"] > 0  # timings add up across restarts


def test_a_world_size_change_mid_epoch_is_refused_and_at_an_epoch_end_resumes(
    small_dataset, tmp_path, launch_in_process
):
    run_dir = tmp_path / "run"
    ok(run(torchrun_train(small_dataset, run_dir, "trainer.max_steps=10", "trainer.checkpoint_every=10",
                          "trainer.final_eval=false", "trainer.eval_every=0")))  # fmt: skip
    launch = launch_in_process  # the 1-rank jobs
    proc = launch(python_train(small_dataset, run_dir, "trainer.resume=auto", "trainer.max_steps=20"))
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert (
        "was saved mid-epoch (epoch 0, step 10 of it) by 2 ranks of batch 256; on 1 ranks of batch 256"
        in line
    )
    assert "Resume with --nproc_per_node 2 data.batch_size=256" in line
    # (1 -> 2 ranks takes the same check, pipeline/train_loop.py check_data_position: not run again here)

    # at an epoch end every row of the next epoch is read once, whatever the world size: it resumes
    epoch_end = tmp_path / "epoch_end"
    ok(run(torchrun_train(small_dataset, epoch_end, "trainer.epochs=1", "trainer.final_eval=false")))
    two_rank_steps = json.loads((epoch_end / "metrics.json").read_text())["steps"]
    proc = ok(launch(python_train(small_dataset, epoch_end, "trainer.resume=auto", "trainer.epochs=2",
                                  "trainer.final_eval=false")))  # fmt: skip
    assert "was saved by 2 ranks, resuming on 1 at the start of epoch 1" in proc.stderr
    summary = json.loads((epoch_end / "metrics.json").read_text())
    rows = json.loads((small_dataset / "dataset.json").read_text())["splits"]["train"]["rows"]
    assert summary["epochs"] == 2 and summary["steps"] == two_rank_steps + rows // 256


def test_a_failed_save_is_one_error_removes_its_partial_dir_and_keeps_the_earlier_ones(
    tmp_path, monkeypatch, one_rank_group
):
    from pipeline import checkpoint
    from pipeline.checkpoint import CheckpointError, CheckpointManager

    info = one_rank_group
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = CheckpointManager(tmp_path / "ckpt", info, keep_last=2)
    manager.save(1, model, optimizer, {"epoch": 0, "step_in_epoch": 1}, "x: 1\n")

    def disk_full(obj, f, *args, **kwargs):  # the rank's RNG file, after DCP wrote its shards
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(CheckpointError) as err:
        manager.save(2, model, optimizer, {"epoch": 0, "step_in_epoch": 2}, "x: 1\n")
    assert str(err.value) == (
        f"checkpoint: saving step 2 to {tmp_path / 'ckpt' / 'step_00000002'} failed (OSError: "
        "[Errno 28] No space left on device); removed the partial .step_00000002.tmp; complete "
        "checkpoints kept: step_00000001"
    )
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_00000001"]


def bad_rank_dataset(src: Path, dst: Path) -> Path:
    """A copy of `src` whose train file part-00001 holds a label 7 in its first row group (read by one
    rank only: row groups are dealt round-robin)."""
    for split in ("train", "valid", "test"):
        (dst / split).mkdir(parents=True)
        for f in sorted((src / split).glob("*.parquet")):
            table = pq.read_table(f)
            if split == "train" and f.name == "part-00001.parquet":
                finish = table["finish"].to_numpy().copy()
                finish[0] = 7
                table = table.set_column(table.column_names.index("finish"), "finish", pa.array(finish))
            pq.write_table(
                table, dst / split / f.name, row_group_size=pq.ParquetFile(f).metadata.row_group(0).num_rows
            )
    return dst


def test_bad_data_on_one_rank_is_one_line_and_the_peer_exits_quietly(small_dataset, tmp_path):
    data = bad_rank_dataset(small_dataset, tmp_path / "data")
    run_dir = tmp_path / "run"
    proc = run(torchrun_train(data, run_dir, "trainer.max_steps=200"))
    assert proc.returncode != 0
    (line,) = error_lines(proc)
    assert "part-00001.parquet: row group 0, column 'finish': label must be 0 or 1, got 7.0 (row 0)" in line
    # the peer exits quietly: no gloo error and no frame of ours (torchrun's own failure summary remains)
    assert "Connection closed by peer" not in proc.stderr and "train_loop.py" not in proc.stderr
    assert not run_dir.exists()  # no checkpoint yet: the run dir this job created is removed


def test_config_and_path_mistakes_are_one_line_before_any_run_dir(small_dataset, tmp_path, launch_in_process):
    launch = launch_in_process  # launch/train.py's own code in this process, to its one-line exit
    conf = tmp_path / "conf" / "data"
    conf.mkdir(parents=True)
    (conf / "broken.yaml").write_text("schema:\n  name: x\n  labels: [a\n  user_id: u\n")
    proc = launch([sys.executable, "launch/train.py", "--config-dir", str(tmp_path / "conf"), "data=broken"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[0].startswith(f"error: {conf / 'broken.yaml'}:4:")
    assert len(proc.stderr.strip().splitlines()) == 1

    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = launch(python_train(small_dataset, blocker / "run", "trainer.max_steps=2"))
    run_dir = blocker / "run"
    assert error_lines(proc) == [
        f"error [rank 0]: ValueError: trainer.run_dir='{run_dir}': cannot write there (Not a directory)"
    ]

    # the test split is checked up front (metadata): no run dir, no training
    data = tmp_path / "data"
    for split in ("train", "valid", "test"):
        (data / split).mkdir(parents=True)
        for f in (small_dataset / split).glob("*.parquet"):
            table = pq.read_table(f)
            pq.write_table(
                table.drop_columns(["item_id"]) if split == "test" else table, data / split / f.name
            )
    proc = launch(python_train(data, tmp_path / "run", "trainer.max_steps=2"))
    assert "test/part-00000.parquet: column 'item_id' missing" in error_lines(proc)[0]
    assert not (tmp_path / "run").exists()


def kill_rank_when(agent: subprocess.Popen, run_dir: Path, rank: str, step: int) -> list[int]:
    """SIGKILL the torchrun worker with RANK=`rank` once the checkpoint of `step` is being written (its
    `.tmp` dir exists) or, should the poll miss that window, once a train step >= `step` is logged.
    Returns the list the killed pid is appended to."""
    killed: list[int] = []

    def workers() -> list[tuple[int, str | None]]:
        out = []
        for p in Path("/proc").iterdir():
            try:
                if p.name.isdigit() and int((p / "stat").read_text().split()[3]) == agent.pid:
                    env = (p / "environ").read_bytes().split(b"\0")
                    ranks = [e[5:].decode() for e in env if e.startswith(b"RANK=")]
                    out.append((int(p.name), ranks[0] if ranks else None))
            except OSError:
                pass
        return out

    def due() -> bool:
        if (run_dir / "checkpoints" / f".step_{step:08d}.tmp").exists():
            return True
        log = run_dir / "metrics.jsonl"
        steps = (
            [json.loads(x)["step"] for x in log.read_text().splitlines() if '"train"' in x]
            if log.exists()
            else []
        )
        return bool(steps) and max(steps) >= step

    def watch() -> None:
        while agent.poll() is None:
            if due():
                for pid, r in workers():
                    if r == rank:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                        return
            time.sleep(0.002)

    threading.Thread(target=watch, daemon=True).start()
    return killed


def test_torchrun_restarts_a_killed_rank_and_the_run_ends_as_an_uninterrupted_one(small_dataset, tmp_path):
    args = (
        "trainer.epochs=2",
        "trainer.max_steps=60",
        "trainer.checkpoint_every=10",
        "trainer.eval_every=0",
        "trainer.resume=auto",
    )
    full = tmp_path / "full"
    ok(run(torchrun_train(small_dataset, full, *args)))
    # the README's recipe: c10d rendezvous with a fresh store per rendezvous (a shared one hands restarted
    # ranks the dead ones' addresses: pytorch#135712)
    launcher = ["--nnodes", "1", "--max-restarts", "2", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]  # fmt: skip
    crashed = tmp_path / "crashed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    cmd = torchrun_train(small_dataset, crashed, *args, launcher=launcher)
    agent = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    killed = kill_rank_when(agent, crashed, rank="1", step=30)  # mostly mid-save of step 30's checkpoint
    out, err = agent.communicate(timeout=600)
    assert agent.returncode == 0, err[-4000:]
    assert killed, "rank 1 was never killed"
    resumed = re.findall(r"resumed from \S+/step_(\d+) at step", err)
    assert resumed in (["00000020"], ["00000030"]), err[-4000:]  # one restart, from a complete checkpoint
    assert "torchrun may restart this group" not in err  # the recipe's store is not shared
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full, crashed))
    for key in ("finish/auc", "skip/auc", "finish/uauc", "skip/uauc"):
        assert b["test"][key] == pytest.approx(a["test"][key], abs=1e-6), key
    keys = [(r["kind"], r["step"]) for r in records(crashed)]
    assert len(keys) == len(set(keys))
    loss = [{r["step"]: r["loss"] for r in records(d) if r["kind"] == "train"} for d in (full, crashed)]
    assert loss[1].keys() == loss[0].keys() and all(
        loss[1][s] == pytest.approx(x, rel=1e-5) for s, x in loss[0].items()
    )
    assert not list((crashed / "checkpoints").glob(".*.tmp"))  # the killed save's partial dir is gone


def test_restarts_on_a_shared_rendezvous_store_are_detected(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # static, or c10d sharing its store
    assert shared_store_restarts()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # c10d + TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    assert not shared_store_restarts()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")  # no restart, nothing stale to read
    assert not shared_store_restarts()


def test_two_nodes_under_c10d_rendezvous_train_as_one_node_with_row_column_and_table_wise_shards(
    small_dataset, tmp_path, launch_in_process
):
    """From one table-wise checkpoint (step 10; a plan's shards initialise their rows differently, so runs
    compare from common weights), train to step 30 on two torchrun agents (1 process each, as on 2
    machines) and on one agent with 2 processes, with item_id row-wise, user_id_emb column-wise and
    author_id table-wise over both nodes; and table-wise: the run that wrote the checkpoint went on to step
    30 (a resume continues a run exactly: test_torchrun_restarts_a_killed_rank_and_the_run_ends_as_an_
    uninterrupted_one). Row-wise on CPU is planned by pipeline.sharding (TorchRec 1.8 plans it only on
    CUDA); mean pooling is the sparse arch's, as TorchRec's would divide the other tables' features
    again."""
    trw = "+sharding.per_table={item_id:[table_row_wise]}"  # CUDA-only in TorchRec 1.8
    proc = launch_in_process(python_train(small_dataset, tmp_path / "trw", trw))
    assert "sharding: no plan for" in error_lines(proc)[0] and "compute device: cpu" in error_lines(proc)[0]
    common = ("trainer.eval_every=0", "trainer.final_eval=false", "trainer.checkpoint_every=10")
    table_wise = "sharding.types=[table_wise]"
    runs = {name: tmp_path / name for name in ("table_wise", "single", "multi")}
    ok(run(torchrun_train(small_dataset, runs["table_wise"], *common, "trainer.max_steps=30",
                          "trainer.keep_last=3", table_wise)))  # fmt: skip
    for d in (runs["single"], runs["multi"]):  # the run dir as it was at its checkpoint of step 10
        later = ("step_00000020", "step_00000030", "metrics.json")
        shutil.copytree(runs["table_wise"], d, ignore=shutil.ignore_patterns(*later))
    args = (*common, "trainer.max_steps=30", "trainer.resume=auto")
    mixed = "+sharding.per_table={item_id:[row_wise],user_id_emb:[column_wise],author_id:[table_wise]}"
    args = (*args, mixed)
    proc = ok(run(torchrun_train(small_dataset, runs["single"], *args)))
    assert "resumed from" in proc.stderr and "step_00000010 at step 10" in proc.stderr
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    nodes = []
    for node_rank in (0, 1):
        launcher = ["--nnodes", "2", "--node-rank", str(node_rank), "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes"]  # fmt: skip
        cmd = torchrun_train(small_dataset, runs["multi"], *args, nproc=1, launcher=launcher)
        nodes.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    logs = [n.communicate(timeout=600) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], logs[0][1][-3000:] + logs[1][1][-3000:]
    plan = next(err for _, err in logs if "sharding plan (world size 2)" in err)
    # the three kinds of shards, on both nodes (16-wide tables stay one column shard: TorchRec's minimum
    # column partition is wider)
    plan_rows = re.findall(r"  (\w+) +(\w+_wise) +\w+ +([\d,]+) ", plan)  # table, sharding, ranks
    shards = {table: (kind, ranks) for table, kind, ranks in plan_rows}
    assert shards["item_id"] == ("row_wise", "0,1")
    assert shards["user_id_emb"][0] == "column_wise" and shards["author_id"][0] == "table_wise"
    assert {int(r) for *_, ranks in plan_rows for r in ranks.split(",")} == {0, 1}
    loss = {
        name: {r["step"]: r["loss"] for r in records(d) if r["kind"] == "train"} for name, d in runs.items()
    }
    assert list(loss["single"]) == [10, 20, 30]
    for name in ("multi", "table_wise"):  # two nodes = one node; row-wise = table-wise
        assert loss[name].keys() == loss["single"].keys(), name
        assert all(loss[name][s] == pytest.approx(x, rel=1e-5) for s, x in loss["single"].items()), name
