"""Model selection on validation: early stopping's bookkeeping, the collapse guard, and a real 2-rank run
whose validation curve is constructed, which must stop after `patience`, keep the best checkpoint and
evaluate the test split with it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from data.metrics.exact import ExactAUCEvaluator
from data.metrics.summary import collapsed_tasks, metric_value
from pipeline.config import EarlyStopConfig
from pipeline.early_stop import EarlyStopping

ROOT = Path(__file__).resolve().parents[1]


def test_early_stopping_tracks_the_best_and_stops_after_patience():
    stopper = EarlyStopping(EarlyStopConfig(patience=2, min_delta=0.01))
    assert stopper.update(10, 0.60) and stopper.best_step == 10
    assert not stopper.update(20, 0.605)  # not better by more than min_delta
    assert stopper.update(30, 0.70, {"mean_auc": 0.70}) and stopper.bad_validations == 0
    assert not stopper.update(40, math.nan) and not stopper.should_stop  # NaN is never an improvement
    assert not stopper.update(50, 0.69) and stopper.should_stop
    assert (stopper.best, stopper.best_step, stopper.best_metrics) == (0.70, 30, {"mean_auc": 0.70})
    resumed = EarlyStopping(EarlyStopConfig(patience=2, min_delta=0.01))
    resumed.load_state_dict(json.loads(json.dumps(stopper.state_dict())))  # through trainer.json
    assert resumed.state_dict() == stopper.state_dict() and resumed.should_stop
    never = EarlyStopping(EarlyStopConfig(patience=0))
    for step in range(5):
        never.update(step, 0.5)
    assert not never.should_stop


def test_selection_metric_is_a_key_or_a_mean_over_tasks():
    metrics = {"a/auc": 0.6, "b/auc": 0.8, "a/uauc": 0.5, "b/uauc": 0.7}
    assert metric_value(metrics, "mean_auc", ["a", "b"]) == pytest.approx(0.7)
    assert metric_value(metrics, "mean_uauc", ["a", "b"]) == pytest.approx(0.6)
    assert metric_value(metrics, "b/auc", ["a", "b"]) == 0.8
    with pytest.raises(ValueError, match="trainer.early_stop.metric: 'b/aucc'"):
        metric_value(metrics, "b/aucc", ["a", "b"])


def test_collapse_guard_fires_on_constant_predictions_and_not_on_a_real_model():
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (400, 2)).float()
    users = torch.arange(400) % 20
    evaluator = ExactAUCEvaluator(["constant", "real"])
    logits = torch.stack([torch.full((400,), 0.3), labels[:, 1] + torch.randn(400)], dim=1)
    evaluator.update(logits, labels, users)
    metrics = evaluator.compute()
    assert metrics["constant/pred_std"] < 1e-12 and metrics["constant/auc"] == 0.5
    assert collapsed_tasks(metrics, ["constant", "real"]) == ["constant"]


# ---- a real 2-rank run with a constructed validation curve --------------------------------------------

CURVE = [0.60, 0.70, 0.66, 0.65, 0.64, 0.9, 0.9]  # best at the 2nd validation; patience 3 stops at the 5th
EVAL_EVERY = 10


def _train_rank(rank: int, port: int, overrides: list[str]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import pipeline.train_loop as train_loop
    from launch.configs import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = OmegaConf.to_object(compose(config_name="train", overrides=overrides))
    real_evaluate, curve = train_loop.evaluate, iter(CURVE)

    def constructed_validation(*args, **kwargs) -> dict[str, float]:
        metrics = real_evaluate(*args, **kwargs)  # the real validation pass, then the curve's value
        metrics["mean_auc"] = next(curve)
        return metrics

    train_loop.evaluate = constructed_validation  # validation only: the test split uses pipeline.evaluate
    train_loop.train(cfg)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_early_stopping_selects_the_best_validation_step_and_tests_its_checkpoint(
    small_dataset: Path, tmp_path: Path, evaluate_in_process
):
    run_dir = tmp_path / "run"
    overrides = [f"data.root={small_dataset}", f"trainer.run_dir={run_dir}", "data.batch_size=256",
                 "trainer.epochs=3", f"trainer.eval_every={EVAL_EVERY}", "trainer.early_stop.patience=3",
                 "trainer.keep_last=1", "trainer.progress_bar=false"]  # fmt: skip
    mp.start_processes(_train_rank, args=(_free_port(), overrides), nprocs=2, join=True, start_method="spawn")
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["stop_reason"] == "early_stopping"
    assert summary["steps"] == 5 * EVAL_EVERY and summary["selected_step"] == 2 * EVAL_EVERY
    assert summary["valid"]["mean_auc"] == 0.70 and summary["early_stop"]["best_step"] == 2 * EVAL_EVERY
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert kept == ["step_00000020", "step_00000050"]  # the best, besides the last keep_last=1
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "test"] == [20]

    # The test metrics are those of the best checkpoint, not of the final state.
    def eval_auc(step: int) -> float:
        metrics = evaluate_in_process(run_dir / "checkpoints" / f"step_{step:08d}", small_dataset)
        return metrics["test"]["finish/auc"]

    assert summary["test"]["finish/auc"] == pytest.approx(eval_auc(20), abs=1e-6)
    assert summary["test"]["finish/auc"] != pytest.approx(eval_auc(50), abs=1e-6)
