"""The end-of-job report: oracle columns only where the dataset has an oracle; selection and collapse
are stated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.report import print_report

SUMMARY = {
    "test": {
        "rows": 10.0,
        **{
            "like/auc": 0.8,
            "like/uauc": 0.7,
            "like/uauc_weighted": 0.71,
            "like/ne": 0.9,
            "like/calibration": 1.02,
        },
    },
    "split": "test",
    "steps": 30,
    "selected_step": 20,
    "stop_reason": "early_stopping",
    "early_stop": {"metric": "mean_auc"},
    "collapsed": [],
}


def test_real_data_without_an_oracle_gets_no_oracle_columns(tmp_path: Path, capsys: pytest.CaptureFixture):
    print_report(SUMMARY, str(tmp_path))
    out = capsys.readouterr().out
    assert "oracle" not in out and "nan" not in out
    assert "like        0.8000  0.7000  0.7100" in out
    assert "selected step 20 of 30 on validation (mean_auc); stopped: early_stopping" in out


def test_generated_data_reports_the_gap_to_its_oracle(tmp_path: Path, capsys: pytest.CaptureFixture):
    oracle = {"splits": {"test": {"oracle": {"like": {"auc": 0.9, "uauc": 0.75}}}}}
    (tmp_path / "dataset.json").write_text(json.dumps(oracle))
    print_report({**SUMMARY, "collapsed": ["like"]}, str(tmp_path))
    out = capsys.readouterr().out
    assert "oracle" in out and "-0.1000" in out and "COLLAPSED (constant predictions): like" in out


def test_a_run_without_validation_reports_its_final_state(tmp_path: Path, capsys: pytest.CaptureFixture):
    print_report({**SUMMARY, "valid": None, "stop_reason": "epochs"}, str(tmp_path))
    out = capsys.readouterr().out
    assert "the final state (step 30; no validation split); stopped: epochs" in out and "selected" not in out
