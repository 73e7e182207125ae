"""launch/experiment.py and launch/sweep/: sweep configs expand as written, budgets are solved, a re-report
reuses the earlier dense-arch speeds, and a real 2-rank sweep writes its table, plots and raw results, and is
neither rerun nor re-timed when resumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import launch.sweep.runner as experiment
from launch.experiment import main
from launch.sweep.config import SweepConfig, load_sweep
from launch.sweep.report import aggregate, markdown_table, task_metric_keys
from launch.sweep.runner import solve_budget

METRICS = ("finish/auc", "skip/auc", "finish/uauc", "skip/uauc")  # the built-in data's two tasks


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_budget_grid_expands_models_by_budgets_and_quick_keeps_its_subset(tmp_path: Path):
    cfg_path = write(
        tmp_path / "sweep.yaml",
        """
name: t
overrides: [trainer.max_steps=100]
seeds: [0, 1, 2]
reference: "a @1M"
cells: [{label: extra, overrides: [model.dense.dim=32]}]
budget_grid: {models: {a: [model=dlrm], b: [model=dcnv2]}, budgets: [1000000, 4000000]}
quick: {overrides: [trainer.max_steps=5], seeds: [7], budgets: [1000000], reference: "b @1M"}
""",
    )
    cfg, cells = load_sweep(cfg_path, quick=False)
    assert [c.label for c in cells] == ["extra", "a @1M", "b @1M", "a @4M", "b @4M"]
    assert cells[1].params_budget == 1e6 and cells[1].line == "a" and cells[1].overrides == ["model=dlrm"]
    assert cfg.seeds == [0, 1, 2]
    cfg, cells = load_sweep(cfg_path, quick=True)
    assert [c.label for c in cells] == ["extra", "a @1M", "b @1M"]
    assert cfg.seeds == [7] and cfg.overrides == ["trainer.max_steps=100", "trainer.max_steps=5"]
    assert cfg.reference == "b @1M"


@pytest.mark.parametrize(
    "body, message",
    [
        ("name: t\ncells: [{label: a, overides: []}]\n", "overides"),
        ("name: t\nreference: nope\ncells: [{label: a}]\n", "reference 'nope'"),
        ("name: t\ncells: [{label: a}, {label: a}]\n", r"duplicate cell labels \['a'\]"),
        ("name: t\nselect: finish/logloss\ncells: [{label: a}]\n", "select: 'finish/logloss' is not a valid"),
    ],
)
def test_bad_sweep_config_is_rejected_naming_the_problem(tmp_path: Path, body: str, message: str):
    with pytest.raises(SystemExit, match=message):
        load_sweep(write(tmp_path / "bad.yaml", body), quick=False)


@pytest.mark.parametrize("model", ["rankmixer_tiny", "dlrm", "dcnv2", "autoint", "wukong", "mmoe"])
def test_solved_width_lands_near_the_parameter_budget(model: str):
    name, width, params = solve_budget([f"model={model}"], 500_000)
    assert abs(params - 500_000) / 500_000 < 0.1, (name, width, params)  # RankMixer's D steps by T


def test_a_budget_that_leaves_a_degenerate_width_is_refused():
    # DCNv2 @100k: the cross net alone is ~83k params; a 1-unit deep MLP collapsed the model (issue 15)
    with pytest.raises(SystemExit, match=r"model.dense.deep_width=1 \(< 16\)"):
        solve_budget(["model=dcnv2"], 100_000)


def test_report_columns_are_the_tasks_the_runs_were_tested_on():
    """A sweep on MovieLens-100K (one task, `like`) reports like's AUC and UAUC, not the built-in data's."""
    run = {"test": {"like/auc": 0.8, "like/uauc": 0.7, "like/logloss": 0.5, "rows": 10.0}}
    cell = {"label": "a", "runs": [run, None], "params": 1000, "dense_flops": 2000.0}
    assert task_metric_keys([cell]) == ["like/auc", "like/uauc"]
    aggregate([cell])
    assert set(cell["stats"]) == {"like/auc", "like/uauc"}
    table = markdown_table(SweepConfig(name="t"), [cell])
    assert "like AUC" in table and "like UAUC" in table and "finish" not in table
    # a sweep over two datasets: each row shows its own tasks, blank (not "failed") for the other's
    other = {
        "label": "b",
        "runs": [{"test": {"finish/auc": 0.7, "finish/uauc": 0.6}}],
        "params": 1,
        "dense_flops": 1.0,
    }
    both = aggregate([cell, other])
    rows = markdown_table(SweepConfig(name="t"), both).splitlines()[2:]
    assert "failed" not in "\n".join(rows) and "0.8000" in rows[0] and "0.7000" in rows[1]


def test_rereport_reuses_earlier_speeds_and_partial_reports_keep_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The partial report written after each cell rewrites results.json; the speeds of the earlier report
    must survive it: neither re-measured nor dropped, also when a re-report stops half-way."""
    metrics = {"test": dict.fromkeys(METRICS, 0.7), "train_samples_per_s": 100.0}
    monkeypatch.setattr(experiment, "run_cell", lambda overrides, run_dir, seed, nproc: metrics)
    timed = []

    def fake_speed(cfg, batch_size: int = 512) -> dict:
        timed.append(cfg.model.arch)
        return {"samples_per_s": 100.0 + len(timed), "mfu": 0.5}

    monkeypatch.setattr(experiment, "measure_dense_speed", fake_speed)
    cfg_path = write(
        tmp_path / "sweep.yaml",
        "name: t\nseeds: [0]\n"
        "cells: [{label: a, overrides: [model=dlrm]}, {label: b, overrides: [model=dcnv2]}]",
    )
    out = tmp_path / "report"
    argv = [str(cfg_path), "--out", str(out)]

    def speeds() -> list:
        return [c.get("speed") for c in json.loads((out / "results.json").read_text())["cells"]]

    assert main(argv) == 0 and timed == ["dlrm", "dcnv2"]
    first = speeds()
    assert first == [{"samples_per_s": 101.0, "mfu": 0.5}, {"samples_per_s": 102.0, "mfu": 0.5}]
    assert main(argv) == 0  # re-report of a finished sweep
    assert timed == ["dlrm", "dcnv2"] and speeds() == first  # nothing re-timed, nothing dropped

    def stop_at_b(overrides, run_dir, seed, nproc):
        if "model=dcnv2" in overrides:
            raise KeyboardInterrupt
        return metrics

    monkeypatch.setattr(experiment, "run_cell", stop_at_b)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert speeds() == first[:1]  # the partial report written after cell a kept a's speed


def test_select_chooses_per_group_the_best_validation_cell_never_a_collapsed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # valid mean AUC per (cell, seed); the test split disagrees on purpose: the choice must not look at it
    valid = {"a1": [0.70, 0.72], "a2": [0.74, 0.70], "b1": [0.60, 0.60], "b2": [0.80, 0.80]}

    def fake_run(overrides, run_dir, seed, nproc):
        label = run_dir.name.split("-seed")[0]
        run_dir.mkdir(parents=True)
        curve = [
            {"kind": "valid", "step": step, "click/auc": v, "like/auc": v}
            for step, v in [(10, valid[label][seed])]
        ]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve))
        return {
            "run_dir": str(run_dir),
            "test": dict.fromkeys(METRICS, 0.9 if label == "a1" else 0.6),
            "valid": {"click/auc": valid[label][seed], "like/auc": valid[label][seed]},  # any task names
            "train_samples_per_s": 1.0,
            "selected_step": 10,
            "steps": 20,
            "stop_reason": "epochs",
            "collapsed": ["finish"] if label == "b2" else [],
        }

    monkeypatch.setattr(experiment, "run_cell", fake_run)
    cells = ", ".join(
        f"{{label: {c}, group: {c[0]}, overrides: [model=dlrm]}}" for c in ("a1", "a2", "b1", "b2")
    )
    cfg_path = write(
        tmp_path / "s.yaml",
        f"name: t\nseeds: [0, 1]\nmeasure_speed: false\nselect: mean_auc\ncells: [{cells}]",
    )
    out = tmp_path / "report"
    assert main([str(cfg_path), "--out", str(out)]) == 0
    got = json.loads((out / "results.json").read_text())["cells"]
    # a2's seed mean (0.72) beats a1's (0.71) although a1 has the best test and the best single seed
    assert {c["label"]: c["chosen"] for c in got} == {"a1": False, "a2": True, "b1": True, "b2": False}
    assert got[1]["valid_stats"]["mean_auc"][0] == pytest.approx(0.72)
    readme = (out / "README.md").read_text()
    assert (
        "## Selection on validation" in readme
        and "| valid mean_auc | valid click/auc | valid like/auc |" in readme
    )
    assert "| a | a2 | 0.7200 ± 0.0283 |" in readme and "epochs (collapsed)" in readme
    assert "![validation curves of the chosen cells](valid_curves.png)" in readme
    assert (out / "valid_curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_two_rank_sweep_writes_table_plots_results_and_skips_finished_runs(
    small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg_path = write(
        tmp_path / "sweep.yaml",
        f"""
name: e2e
overrides: [data.root={small_dataset}, data.batch_size=256, trainer.max_steps=12, trainer.eval_every=0,
            trainer.progress_bar=false, optim.dense.warmup_steps=4]
seeds: [0]
reference: rankmixer
measure_speed: true
cells:
  - {{label: rankmixer, x: 1, overrides: [model=rankmixer_tiny, model.dense.dim=16]}}
  - {{label: smoe x0.5, x: 0.5, overrides: [model=rankmixer_tiny, model.dense.dim=16, model.dense.ffn=smoe,
                                       model.dense.moe.num_experts=4, model.dense.moe.expert_mult=0.5]}}
plots: [{{file: auc.png, y: finish/auc, x: x}}]
""",
    )
    out = tmp_path / "report"
    assert main([str(cfg_path), "--out", str(out)]) == 0
    readme = (out / "README.md").read_text()
    assert (
        "| rankmixer |" in readme
        and "| smoe x0.5 |" in readme
        and "Δ %" in readme
        and "active ratio" in readme
    )
    assert (out / "auc.png").stat().st_size > 1000
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert [c["label"] for c in cells] == ["rankmixer", "smoe x0.5"]
    # each run's own log, also for a label with a "." (Path.with_suffix once cut it to "smoe_x0.log")
    assert sorted(p.name for p in (out / "runs").glob("*.log")) == [
        "rankmixer-seed0.log",
        "smoe_x0.5-seed0.log",
    ]
    for cell in cells:
        assert 0.4 < cell["stats"]["finish/auc"][0] < 1.0 and cell["speed"]["samples_per_s"] > 0
    smoe = cells[1]
    ratio = smoe["stats"]["moe/active_ratio"][0]
    assert 0 < ratio <= 1
    # activated FLOPs follow the measured ratio: below the every-expert count unless all are active
    assert smoe["activated_flops"] <= smoe["dense_flops"]
    capsys.readouterr()

    def no_second_timing(cfg, batch_size: int = 512) -> dict:
        raise AssertionError("a resumed sweep re-measured a dense-arch speed results.json already had")

    monkeypatch.setattr(experiment, "measure_dense_speed", no_second_timing)
    assert main([str(cfg_path), "--out", str(out)]) == 0  # resumed: every run has its metrics.json
    assert "done in" not in capsys.readouterr().out
    resumed = json.loads((out / "results.json").read_text())["cells"]
    assert [c["speed"] for c in resumed] == [c["speed"] for c in cells]  # kept, not dropped
