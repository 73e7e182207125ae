"""The training signals production uses, end to end: a sample-weight column, per-task loss weights and
negative down-sampling in a 2-rank `torchrun launch/train.py`, then NE and calibration in the train log,
metrics.json and the report, checked against numpy over the run's own predictions, and the down-sampling
correction carried into `launch/export.py`'s artifact and the Predictor."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.checkpoint import resolve_checkpoint
from pipeline.export import export
from pipeline.predictor import Predictor
from tests.test_train_e2e import ok, run, train_cmd

pytestmark = pytest.mark.slow
RATE = 0.25


def with_weights(src: Path, dst: Path) -> Path:
    """The dataset with a sample-weight column `w` (0.5, 1, 1.5 or 2, by row) in every split."""
    shutil.copytree(src, dst)
    for path in dst.glob("*/*.parquet"):
        table = pq.read_table(path)
        w = 0.5 + (np.arange(table.num_rows) % 4) * 0.5
        pq.write_table(table.append_column("w", pa.array(w, pa.float32())), path)
    return dst


def numpy_metrics(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> dict[str, float]:
    logloss = -(w * (y * np.log(p) + (1 - y) * np.log(1 - p))).sum() / w.sum()
    ctr = (w * y).sum() / w.sum()
    entropy = -(ctr * np.log(ctr) + (1 - ctr) * np.log(1 - ctr))
    return {"ne": logloss / entropy, "calibration": (w * p).sum() / w.sum() / ctr}


def test_weighted_down_sampled_run_reports_ne_and_calibration_as_numpy_and_serves_corrected(
    dataset: Path, tmp_path: Path
):
    data = with_weights(dataset, tmp_path / "data")
    run_dir = tmp_path / "run"
    proc = ok(
        run(
            train_cmd(
                data,
                run_dir,
                "+data.schema.weight=w",
                f"data.negative_rate={RATE}",
                "+trainer.task_weights={skip: 0.5}",
                "trainer.epochs=1",
                "trainer.max_steps=40",
                "trainer.save_predictions=true",
            )
        )
    )
    summary = json.loads((run_dir / "metrics.json").read_text())
    test = summary["test"]
    tasks = ["finish", "skip"]

    # the train log's windows: NE and calibration per task, on the down-sampled rows
    windows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in windows if r["kind"] == "train"]
    assert train and all(0 < r[f"{t}/ne"] < 1.5 and r[f"{t}/calibration"] > 0 for r in train for t in tasks)

    # metrics.json's NE / calibration / AUC are numpy's over the run's predictions with their weights
    preds = pa.concat_tables([pq.read_table(f) for f in sorted((run_dir / "predictions").glob("*.parquet"))])
    assert preds.num_rows == test["rows"] and set(preds["weight"].to_numpy()) == {0.5, 1.0, 1.5, 2.0}
    w = preds["weight"].to_numpy().astype(np.float64)
    for t in tasks:
        y, p = preds[t].to_numpy().astype(np.float64), preds[f"score_{t}"].to_numpy().astype(np.float64)
        expected = numpy_metrics(y, p, w)
        assert test[f"{t}/ne"] == pytest.approx(expected["ne"], rel=1e-5)
        assert test[f"{t}/calibration"] == pytest.approx(expected["calibration"], rel=1e-5)
        # trained on a quarter of the negatives: raw predictions overshoot, the corrected ones far less
        raw = test[f"{t}/calibration_uncorrected"]
        assert raw > 1.5 and abs(math.log(test[f"{t}/calibration"])) < 0.5 * abs(math.log(raw)), (t, raw)
    assert "calibration without the correction" in proc.stdout + proc.stderr

    # the exported artifact serves the corrected predictions: its weighted calibration on the test split is
    # the evaluation's
    artifact = tmp_path / "export"
    export(resolve_checkpoint(str(run_dir)), artifact, parity_rows=512)  # its selected step
    predictor = Predictor(artifact)
    table = pa.concat_tables([pq.read_table(f) for f in sorted((data / "test").glob("*.parquet"))])
    scores = np.concatenate(
        [predictor.predict(table.slice(i, 8192)) for i in range(0, table.num_rows, 8192)]
    ).astype(np.float64)  # (n, tasks)
    tw = table["w"].to_numpy().astype(np.float64)
    for i, t in enumerate(tasks):
        y = table[t].to_numpy().astype(np.float64)
        served = numpy_metrics(y, scores[:, i], tw)
        assert served["calibration"] == pytest.approx(test[f"{t}/calibration"], rel=1e-4)
        assert served["ne"] == pytest.approx(test[f"{t}/ne"], rel=1e-4)
