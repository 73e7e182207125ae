"""The daily loop (launch/daily.py) on generated daily partitions: day D trains on D and is scored on D+1,
warm-started from day D-1; a rerun continues at the day where the loop stopped; a warm start from a model
of another shape is one line naming the field."""

from __future__ import annotations

import json
import sys

import pytest

from data.build.generate import GenParams, generate
from tests.test_train_e2e import ok, run

pytestmark = pytest.mark.slow
TRAIN = [
    "trainer.epochs=1",
    # the library's warmup on every day: 16 steps a day stay in it, so day 2's first steps barely move the
    # model it starts from (with `launch/daily.py`'s default for warm days, no warmup, they are full steps)
    "optim.dense.warmup_steps=200",
    "data.batch_size=256",
    "data.eval_batch_size=1024",
    "trainer.log_every=5",
    "trainer.progress_bar=false",
]


@pytest.fixture(scope="module")
def days(synthetic_schema, tmp_path_factory):
    root = tmp_path_factory.mktemp("daily") / "data"
    generate(synthetic_schema, GenParams(rows_train=4096, files_train=2, row_groups_per_file=2, days=3), root)
    return root


def daily(root, out, *args):
    return [
        sys.executable,
        "launch/daily.py",
        f"--root={root}",
        f"--out={out}",
        "--nproc=1",
        *args,
        "--",
        *TRAIN,
    ]


def test_each_day_is_warm_started_from_the_day_before_and_a_rerun_continues_where_it_stopped(days, tmp_path):
    out = tmp_path / "daily"
    first = ok(run(daily(days, out, "--end=2026-01-01")))
    assert "incremental 2026-01-01: train on dt=2026-01-01" in first.stdout
    rows = [json.loads(x) for x in (out / "incremental" / "results.jsonl").read_text().splitlines()]
    assert [(r["day"], r["next_day"]) for r in rows] == [("2026-01-01", "2026-01-02")]

    second = ok(run(daily(days, out, "--end=2026-01-02")))
    assert "train on dt=2026-01-01" not in second.stdout  # finished days are not trained again
    day2 = out / "incremental" / "dt=2026-01-02"
    log = (out / "incremental" / "dt=2026-01-02.job.log").read_text()
    assert "warm start: model and optimizer state from " in log and "dt=2026-01-01/checkpoints/step_" in log
    assert "optim.dense.warmup_steps=0" not in log.splitlines()[0]  # the user's warmup is kept
    summary = json.loads((day2 / "metrics.json").read_text())
    assert "dt=2026-01-01" in summary["init_from"] and summary["split"] == "dt=2026-01-03"
    assert summary["steps"] == 4096 // 256  # one day's rows, once: no step or data position carried over
    rows = [json.loads(x) for x in (out / "incremental" / "results.jsonl").read_text().splitlines()]
    assert [r["day"] for r in rows] == ["2026-01-01", "2026-01-02"]
    assert rows[1]["total_train_rows"] == 2 * rows[0]["train_rows"] and rows[1]["oracle_mean_auc"] > 0.7
    first_loss = [json.loads(x)["loss"] for x in (out / "incremental" / "dt=2026-01-01" / "metrics.jsonl")
                  .read_text().splitlines() if '"train"' in x]  # fmt: skip
    warm_loss = [
        json.loads(x)["loss"] for x in (day2 / "metrics.jsonl").read_text().splitlines() if '"train"' in x
    ]
    assert warm_loss[0] < first_loss[0] - 0.1  # it starts where day 1 ended, not from scratch

    # a warm start from a model of another shape: refused naming the field (what launch/train.py prints as
    # its one line, pipeline/train_loop.py warm_start)
    from omegaconf import OmegaConf

    from launch.configs import compose_train
    from pipeline.checkpoint import CheckpointError, check_compatible, resolve_checkpoint

    day1 = resolve_checkpoint(out / "incremental" / "dt=2026-01-01")
    other = compose_train([f"data.root={days}", "model.dense.num_layers=3"])
    with pytest.raises(CheckpointError) as err:
        check_compatible(day1, OmegaConf.to_yaml(other), what="trainer.init_from")
    assert str(err.value).startswith(f"trainer.init_from: {day1} was written with another schema or model: ")
    assert "model.dense.num_layers: 2 in checkpoint, 3 now" in str(err.value)
