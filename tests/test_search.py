"""launch/search.py and launch/sweep/search.py: the `search:` section is validated naming the key; with
the training job faked, trials run until `trials` are finished, a restart reuses the Optuna journal (no
trial rerun, an interrupted trial retried with its parameters), a trial worse than the median is pruned,
the final seeds train the best trial's settings and the report and recipe/<arch>.yaml are written; the
pruning watcher kills a real running process group; and a real 2-trial search runs end to end."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

import launch.sweep.runner as experiment
from data.metrics.summary import metric_value_or_none as metric_value
from launch.search import main
from launch.sweep.config import load_sweep
from launch.sweep.search import ValidationWatcher, recipe_yaml


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


SEARCH = """
name: s
overrides: [trainer.max_steps=30]
seeds: [0, 1]
search:
  trials: {trials}
  sampler_seed: 0
  sampler_startup_trials: 2
  pruner: {pruner}
  prune_startup_trials: 2
  prune_warmup_steps: 0
  archs:
    a:
      overrides: [model=dlrm]
      params:
        optim.dense.lr: {{low: 1.0e-4, high: 1.0e-1, log: true}}
        model.dense.mlp_width: {{choices: [32, 64]}}
quick: {{trials: 1, seeds: [5], overrides: [trainer.max_steps=3]}}
"""


def search_config(tmp_path: Path, trials: int = 4, pruner: str = "none") -> Path:
    return write(tmp_path / "search.yaml", SEARCH.format(trials=trials, pruner=pruner))


@pytest.mark.parametrize(
    "search, message",
    [
        ("{trails: 3, archs: {a: {}}}", "trails"),
        ("{trials: 0, archs: {a: {}}}", r"search\.trials: must be >= 1"),
        ("{pruner: hyperband, archs: {a: {}}}", r"search\.pruner: must be median or none"),
        ("{direction: up, archs: {a: {}}}", r"search\.direction"),
        ("{archs: {}}", r"search\.archs: no arch"),
        ("{archs: {a/b: {}}}", r"search\.archs\.a/b: an arch label"),
        ("{archs: {a: {params: {x.y: {low: 1}}}}}", r"archs\.a\.params\.x\.y: needs low and high"),
        ("{archs: {a: {params: {x: {low: 2, high: 1}}}}}", r"params\.x: needs finite low < high"),
        (
            "{archs: {a: {params: {x: {low: 0, high: 1, log: true}}}}}",
            r"params\.x: a log range needs low > 0",
        ),
        ("{archs: {a: {params: {x: {low: 0.5, high: 4, int: true}}}}}", r"params\.x: an int range needs"),
        ("{archs: {a: {params: {x: {choices: [1], low: 0}}}}}", r"params\.x: give either choices"),
        ("{archs: {a: {params: {x: {choices: []}}}}}", r"params\.x: choices is empty"),
        ("{archs: {a: {params: {x: {choices: [[1, 2]]}}}}}", r"params\.x: choices must be scalars"),
        ("{archs: {a: {params: {+x: {choices: [1]}}}}}", r"params\.\+x: the key must be a plain"),
        ("{archs: {a: {params: {x: {lo: 1}}}}}", "lo"),
    ],
)
def test_bad_search_section_is_rejected_naming_the_key(tmp_path: Path, search: str, message: str):
    with pytest.raises(SystemExit, match=message):
        load_sweep(write(tmp_path / "bad.yaml", f"name: t\nsearch: {search}\n"), quick=False)


def test_search_excludes_cells_and_quick_cuts_trials_seeds_and_archs(tmp_path: Path):
    with pytest.raises(SystemExit, match="either cells / budget_grid or search"):
        load_sweep(
            write(tmp_path / "b.yaml", "name: t\ncells: [{label: c}]\nsearch: {archs: {a: {}}}\n"), False
        )
    body = "name: t\nseeds: [0, 1]\nsearch: {trials: 9, archs: {a: {}, b: {}}}\nquick: {trials: 2, seeds: [3]"
    cfg, cells = load_sweep(write(tmp_path / "q.yaml", body + ", labels: [b]}\n"), quick=True)
    assert cells == [] and cfg.search.trials == 2 and cfg.seeds == [3] and list(cfg.search.archs) == ["b"]
    cfg, _ = load_sweep(tmp_path / "q.yaml", quick=False)
    assert cfg.search.trials == 9 and cfg.seeds == [0, 1] and list(cfg.search.archs) == ["a", "b"]
    with pytest.raises(SystemExit, match=r"quick\.labels: \['c'\] are not search\.archs"):
        load_sweep(write(tmp_path / "l.yaml", body + ", labels: [c]}\n"), quick=True)


def test_a_recipe_is_the_overrides_as_nested_keys_and_group_choices_as_overrides():
    recipe = yaml.safe_load(recipe_yaml(["model=dlrm", "optim.dense.lr=0.002", "model.dense.mlp_width=32"]))
    assert recipe == {
        "defaults": [{"override /model": "dlrm"}],
        "optim": {"dense": {"lr": 0.002}},
        "model": {"dense": {"mlp_width": 32}},
    }


def test_metric_value_computes_the_mean_over_tasks_when_the_trainer_did_not():
    record = {
        "finish/auc": 0.6,
        "skip/auc": 0.8,
        "finish/uauc": 0.5,
        "skip/uauc": 0.7,
        "finish/uauc_users": 9,
    }
    assert metric_value(record, "mean_auc") == pytest.approx(0.7)
    assert metric_value(record, "mean_uauc") == pytest.approx(0.6)
    assert metric_value({**record, "mean_auc": 0.1}, "mean_auc") == 0.1  # the trainer's own wins
    assert metric_value(record, "finish/auc") == 0.6 and metric_value(record, "loss") is None


class FakeRuns:
    """Stands in for runner.run_cell: writes a validation curve to metrics.jsonl line by line (calling
    the monitor after each, as run_cell's wait loop would) and a metrics.json. The curve rises with
    log(lr), or is flat at 0.45 for the trials in `bad`; `interrupt` raises KeyboardInterrupt instead.
    Like run_cell, it returns a finished run's metrics.json without rerunning it.
    Trial calls are counted by their run dir (<out>/trials/a-<n>); final runs are <arch>-trial<n>-seed<s>."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], int]] = []  # (run dir name, overrides, seed)
        self.bad: set[int] = set()  # trial-call indices with a flat, bad curve
        self.interrupt: int | None = None  # trial-call index that raises KeyboardInterrupt
        self.lines_written: list[int] = []

    def __call__(self, overrides, run_dir: Path, seed: int, nproc: int, monitor=None) -> dict:
        if (run_dir / "metrics.json").is_file():  # run_cell's resume: a finished run is not rerun
            return json.loads((run_dir / "metrics.json").read_text())
        self.calls.append((run_dir.name, list(overrides), seed))
        index = len(self.trial_overrides()) - 1 if run_dir.parent.name == "trials" else -1
        if index == self.interrupt:
            raise KeyboardInterrupt
        lr = float(next(o.split("=")[1] for o in overrides if o.startswith("optim.dense.lr=")))
        run_dir.mkdir(parents=True)
        written = 0
        for step in (10, 20, 30):
            auc = 0.45 if index in self.bad else good_auc(lr, step)
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(
                    json.dumps({"kind": "valid", "step": step, "finish/auc": auc, "skip/auc": auc}) + "\n"
                )
            written += 1
            if monitor is not None:
                try:
                    monitor()
                finally:
                    self.lines_written.append(written)
        valid = {"finish/auc": auc, "skip/auc": auc}
        test = {"finish/auc": auc + seed * 1e-3, "finish/uauc": 0.6, "skip/auc": auc, "skip/uauc": 0.6}
        metrics = {"valid": valid, "test": test, "selected_step": 30, "stop_reason": "max_steps"}
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    def trial_overrides(self) -> list[list[str]]:
        return [o for name, o, _ in self.calls if "seed" not in name]


def good_auc(lr: float, step: int) -> float:
    return 0.5 + 0.05 * (5 + math.log10(lr)) * step / 30  # lr 1e-4 .. 1e-1: 0.55 .. 0.7 at step 30


def test_search_finishes_trials_resumes_from_its_journal_and_trains_the_best_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    fake = FakeRuns()
    monkeypatch.setattr(experiment, "run_cell", fake)
    out = tmp_path / "report"
    argv = [str(search_config(tmp_path, trials=4)), "--out", str(out)]
    fake.interrupt = 2  # the process dies in the middle of the third trial
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert (out / "a.optuna.log").is_file() and len(fake.trial_overrides()) == 3
    interrupted = fake.trial_overrides()[2]
    fake.interrupt = None

    assert main(argv) == 0
    trials = fake.trial_overrides()
    assert len(trials) == 5  # 2 finished before, the interrupted one retried with its parameters, 1 more
    assert trials[3] == interrupted
    results = json.loads((out / "results.json").read_text())["archs"][0]
    states = [t["state"] for t in results["trials"]]
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]

    complete = [t for t in results["trials"] if t["state"] == "COMPLETE"]
    best = max(complete, key=lambda t: t["value"])
    assert results["best"]["number"] == best["number"]
    assert best["value"] == pytest.approx(good_auc(best["params"]["optim.dense.lr"], 30), abs=1e-3)
    finals = [(name, o, seed) for name, o, seed in fake.calls if "seed" in name]
    assert [seed for _, _, seed in finals] == [0, 1]
    for name, overrides, _ in finals:
        assert name.startswith(f"a-trial{best['number']}-seed")
        assert overrides[-2:] == best["overrides"] == results["tuned"]
    # the recipe: everything the chosen trial trained with (the arch's, the tuned, the common overrides)
    recipe = ["model=dlrm", *best["overrides"], "trainer.max_steps=30"]
    assert yaml.safe_load((out / "recipe" / "a.yaml").read_text()) == yaml.safe_load(recipe_yaml(recipe))
    assert results["stats"]["finish/auc"][1] > 0 and results["params"] > 0  # 2 seeds: a spread
    readme = (out / "README.md").read_text()
    assert "| a | `" in readme and "## a" in readme and "| 2 | FAIL |" in readme and "4 / 0 / 1" in readme
    assert (out / "best_so_far.png").stat().st_size > 1000

    calls = len(fake.calls)
    assert main(argv) == 0  # resumed again: nothing left to run
    assert len(fake.calls) == calls and json.loads((out / "results.json").read_text())["archs"][0] == results


def test_a_trial_below_the_median_is_pruned_at_its_first_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    fake = FakeRuns()
    fake.bad = {2}
    monkeypatch.setattr(experiment, "run_cell", fake)
    out = tmp_path / "report"
    assert main([str(search_config(tmp_path, trials=3, pruner="median")), "--out", str(out)]) == 0
    assert fake.lines_written == [1, 2, 3, 1, 2, 3, 1]  # the third trial stopped at its first validation
    results = json.loads((out / "results.json").read_text())["archs"][0]
    assert [t["state"] for t in results["trials"]] == ["COMPLETE", "COMPLETE", "PRUNED"]  # pruned counts
    assert results["trials"][2]["intermediate"] == {"10": 0.45}
    assert "| 2 | PRUNED |  | 10 (0.4500) |" in (out / "README.md").read_text()
    assert len(fake.calls) == 3 + 2  # and the final runs of the best trial


def test_the_watcher_prunes_a_real_running_job_and_its_process_group_dies(tmp_path: Path):
    """run_process + ValidationWatcher on a real process that appends a validation record every 50 ms for
    up to 20 s and has a child of its own: pruned at the first record, everything is killed at once."""
    study = optuna.create_study(
        direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    )
    good = study.ask()
    for step in range(1, 400):
        good.report(0.9, step)
    study.tell(good, 0.9)
    trial = study.ask()
    jsonl, child_pid = tmp_path / "metrics.jsonl", tmp_path / "child.pid"
    script = f"""
import json, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open({str(child_pid)!r}, "w").write(str(child.pid))
for step in range(1, 400):
    with open({str(jsonl)!r}, "a") as f:
        f.write(json.dumps({{"kind": "train", "step": step, "loss": 1.0}}) + "\\n")
        f.write(json.dumps({{"kind": "valid", "step": step, "mean_auc": 0.6}}) + "\\n")
    time.sleep(0.05)
"""
    t0 = time.time()
    with pytest.raises(optuna.TrialPruned):
        experiment.run_process(
            [sys.executable, "-c", script],
            tmp_path / "job.log",
            ValidationWatcher(jsonl, trial, "mean_auc"),
            0.1,
        )
    assert time.time() - t0 < 15
    lines = len(jsonl.read_text().splitlines())
    assert trial.should_prune() and lines < 200
    time.sleep(0.3)
    assert len(jsonl.read_text().splitlines()) == lines  # the writer is dead
    pid = int(child_pid.read_text())
    deadline = time.time() + 5
    while time.time() < deadline and _alive(pid):
        time.sleep(0.05)
    assert not _alive(pid)  # the job's own child went with it (process group)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split(") ")[-1].startswith("Z"))  # a zombie is dead


@pytest.mark.slow
def test_real_two_trial_search_on_the_small_dataset(
    small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg_path = write(
        tmp_path / "search.yaml",
        f"""
name: e2e-search
overrides: [data.root={small_dataset}, data.batch_size=256, trainer.max_steps=12, trainer.eval_every=6,
            trainer.progress_bar=false, optim.dense.warmup_steps=4]
seeds: [0]
search:
  trials: 2
  archs:
    dlrm:
      overrides: [model=dlrm, model.dense.mlp_width=32]
      params:
        optim.dense.lr: {{low: 1.0e-3, high: 3.0e-2, log: true}}
""",
    )
    out = tmp_path / "report"
    assert main([str(cfg_path), "--out", str(out), "--nproc", "1"]) == 0
    result = json.loads((out / "results.json").read_text())["archs"][0]
    assert [t["state"] for t in result["trials"]] == ["COMPLETE", "COMPLETE"]
    assert all("6" in t["intermediate"] for t in result["trials"])  # watched while running
    assert 0.4 < result["best"]["value"] < 1.0 and 0.4 < result["stats"]["finish/auc"][0] < 1.0
    assert (out / "runs" / f"dlrm-trial{result['best']['number']}-seed0" / "metrics.json").is_file()
    trial_metrics = json.loads((out / "trials" / "dlrm-0" / "metrics.json").read_text())
    assert "test" not in trial_metrics and metric_value(trial_metrics["valid"], "mean_auc") > 0.4
    assert "| dlrm | `optim.dense.lr=" in (out / "README.md").read_text()
    # the written recipe trains what the chosen trial trained: `--config-dir <out> recipe=dlrm`
    chosen = experiment.compose([f"hydra.searchpath=[file://{out}]", "recipe=dlrm"])
    assert chosen.model.arch == "dlrm" and chosen.model.dense.mlp_width == 32
    assert chosen.optim.dense.lr == pytest.approx(result["best"]["params"]["optim.dense.lr"], rel=1e-3)
