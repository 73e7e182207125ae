"""The search behind `launch/search.py`: a sweep config with a `search:` section (`SearchConfig`).

Per arch one Optuna study (TPE sampler, median pruner) picks hyper-parameters on the VALIDATION split;
only the chosen settings are then trained with the sweep's seeds and evaluated on the test split, once.
Choosing on test would report the maximum of noisy test estimates, an optimistic number no other
method in the report gets.

Each trial is one `launch/train.py` torchrun job (`runner.run_cell`, like a grid cell) with the
arch's overrides plus the sampled values as Hydra overrides, in `<out>/trials/<arch>-<number>/`, and
`trainer.final_eval=false`: a trial never even computes test metrics.

Pruning: while the job runs, `ValidationWatcher` reads the validation records the trainer appends to the
run's metrics.jsonl and reports them to the trial (step = trainer step; with `trainer.eval_every=0` every
trial validates at the same epoch ends, so the median pruner compares like with like). When the trial's
curve falls below the median of earlier trials at the same step, the watcher raises TrialPruned inside
run_cell's wait loop, which kills the job's process group.

Resume without a database server: each study is a JournalStorage file, `<out>/<arch>.optuna.log`,
appended to as trials start and end. A restart loads it; finished (complete or pruned) trials count
towards `trials` and are not rerun. A trial still RUNNING in the journal belonged to a process that died:
if its job had finished (a metrics.json), it is completed from that; otherwise it is marked FAIL and its
parameters are enqueued, so the same point is retried as a new trial. One search process per `--out`.
The sampler is reseeded on restart, so a resumed search samples other points than an uninterrupted one.
The final runs live in `<out>/runs/<arch>-trial<best>-seed<seed>/` (resumable like grid runs; the best
trial's number in the name keeps runs of an earlier best from being reused).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from data.metrics.summary import metric_value_or_none as metric_value
from launch.sweep import runner
from launch.sweep.config import ArchSearch, ParamSpec, SearchConfig, SweepConfig
from launch.sweep.report import read_valid_records, write_search_report

MAX_CONSECUTIVE_FAILURES = 3  # a broken arch config fails every trial: give up on the arch after this many
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# A trial never evaluates the test split (its metrics.json still has the selected step's validation metrics):
# nothing about test can leak into the choice, and the trial saves the evaluation's time.
TRIAL_OVERRIDES = ["trainer.final_eval=false"]


def finished_value(run_dir: Path, metrics: dict | None, metric: str) -> float | None:
    """A finished run's objective: the validation metric of the step the trainer selected (metrics.json
    "valid"), else that of the last validation in metrics.jsonl. None when neither has it (or NaN)."""
    value = metric_value((metrics or {}).get("valid") or {}, metric)
    if value is None:
        records = read_valid_records(run_dir / "metrics.jsonl")
        value = metric_value(records[-1], metric) if records else None
    return None if value is None or math.isnan(value) else value


class ValidationWatcher:
    """Follows a running job's metrics.jsonl: each new validation record is reported to the trial at its
    trainer step; called with prune=True (run_cell's monitor), raises TrialPruned when the pruner says so."""

    def __init__(self, path: Path, trial: optuna.Trial, metric: str) -> None:
        self.path, self.trial, self.metric = path, trial, metric
        self._offset = 0
        self._partial = b""

    def _new_records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def report(self, prune: bool) -> None:
        for record in self._new_records():
            value = metric_value(record, self.metric) if record.get("kind") == "valid" else None
            if value is None:
                continue
            step = int(record["step"])
            self.trial.report(value, step)
            if prune and self.trial.should_prune():
                raise optuna.TrialPruned(f"step {step}: {self.metric} {value:.4f}")

    def __call__(self) -> None:
        self.report(prune=True)


def override_value(value: Any) -> str:
    """A sampled value as Hydra override text; floats to 4 significant digits, so that the overrides a
    trial ran, the final runs and recipe/<arch>.yaml read the same (and readably)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def as_overrides(params: dict[str, ParamSpec], values: dict[str, Any]) -> list[str]:
    return [f"{key}={override_value(values[key])}" for key in params if key in values]


def suggest(trial: optuna.Trial, params: dict[str, ParamSpec]) -> list[str]:
    """Sample every searched key (in config order); the trial's overrides."""
    values: dict[str, Any] = {}
    for key, p in params.items():
        if p.choices is not None:
            values[key] = trial.suggest_categorical(key, list(p.choices))
        elif p.int:
            values[key] = trial.suggest_int(key, int(p.low), int(p.high), log=p.log)
        else:
            values[key] = trial.suggest_float(key, p.low, p.high, log=p.log)
    return as_overrides(params, values)


def open_study(search: SearchConfig, arch: str, out: Path) -> optuna.Study:
    backend = optuna.storages.journal.JournalFileBackend(str(out / f"{arch}.optuna.log"))
    if search.pruner == "median":
        pruner: optuna.pruners.BasePruner = optuna.pruners.MedianPruner(
            n_startup_trials=search.prune_startup_trials, n_warmup_steps=search.prune_warmup_steps
        )
    else:
        pruner = optuna.pruners.NopPruner()
    return optuna.create_study(
        storage=optuna.storages.JournalStorage(backend),
        sampler=optuna.samplers.TPESampler(
            seed=search.sampler_seed, n_startup_trials=search.sampler_startup_trials
        ),
        pruner=pruner,
        study_name=arch,
        direction=search.direction,
        load_if_exists=True,
    )


def trial_dir(out: Path, arch: str, number: int) -> Path:
    return out / "trials" / f"{arch}-{number}"


def recover_interrupted(study: optuna.Study, out: Path, arch: str, metric: str) -> None:
    """Trials left RUNNING by a process that died: complete them from a finished job, else FAIL them and
    enqueue their parameters for a clean retry (a new trial number, a fresh run dir)."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        run_dir = trial_dir(out, arch, t.number)
        metrics_path = run_dir / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
        value = finished_value(run_dir, metrics, metric) if metrics else None
        if value is not None:
            study.tell(t.number, value)
            print(
                f"[{arch}] trial {t.number} was interrupted after its run finished: {value:.4f}", flush=True
            )
            continue
        study.tell(t.number, state=TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params)
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"[{arch}] trial {t.number} was interrupted: failed, its parameters queued again", flush=True)


def search_arch(cfg: SweepConfig, arch: str, spec: ArchSearch, out: Path, nproc: int) -> optuna.Study:
    """Run trials until `trials` of them are complete or pruned (or the arch keeps failing)."""
    search = cfg.search
    assert search is not None
    base = [*cfg.overrides, *spec.overrides]
    study = open_study(search, arch, out)
    recover_interrupted(study, out, arch, search.metric)
    failures = 0
    while (done := len(study.get_trials(deepcopy=False, states=FINISHED))) < search.trials:
        trial = study.ask()
        overrides = suggest(trial, spec.params)
        run_dir = trial_dir(out, arch, trial.number)
        shutil.rmtree(run_dir, ignore_errors=True)  # a new trial number: anything there is stale
        print(f"[{arch} {done + 1}/{search.trials}] trial {trial.number}: {' '.join(overrides)}", flush=True)
        watcher = ValidationWatcher(run_dir / "metrics.jsonl", trial, search.metric)
        trial.set_user_attr("run_dir", str(run_dir))
        try:
            metrics = runner.run_cell(
                [*base, *overrides, *TRIAL_OVERRIDES], run_dir, search.trial_seed, nproc, monitor=watcher
            )
        except optuna.TrialPruned as e:
            study.tell(trial, state=TrialState.PRUNED)
            print(f"  pruned at {e}", flush=True)
            failures = 0
            continue
        watcher.report(prune=False)  # the last validations: the curve later trials are compared with
        value = finished_value(run_dir, metrics, search.metric) if metrics else None
        if value is None:
            study.tell(trial, state=TrialState.FAIL)
            failures += 1
            print(f"  trial failed ({search.metric} missing or run failed)", flush=True)
            if failures >= MAX_CONSECUTIVE_FAILURES:
                print(f"[{arch}] {failures} failed trials in a row: giving up on this arch", flush=True)
                break
            continue
        for key in ("selected_step", "stop_reason", "collapsed"):
            if key in metrics:
                trial.set_user_attr(key, metrics[key])
        study.tell(trial, value)
        failures = 0
        print(f"  valid {search.metric} {value:.4f} (best {study.best_value:.4f})", flush=True)
    return study


def _trial_rows(study: optuna.Study, spec: ArchSearch) -> list[dict]:
    return [
        {
            "number": t.number,
            "state": t.state.name,
            "overrides": as_overrides(spec.params, t.params),
            "params": t.params,
            "value": t.value if t.state == TrialState.COMPLETE else None,
            "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
            "user_attrs": t.user_attrs,
        }
        for t in study.get_trials(deepcopy=False)
        if t.state != TrialState.WAITING
    ]


def recipe_yaml(overrides: list[str], comment: str = "") -> str:
    """Hydra overrides as a recipe config (conf/recipe/*.yaml: `# @package _global_`): `a.b=v` becomes
    nested keys, a config-group choice (`model=dlrm`) an `override /model: dlrm` in its defaults list."""
    groups, values = [], {}
    for o in overrides:
        key, value = o.split("=", 1)
        if "." not in key:
            groups.append({f"override /{key}": value})
            continue
        *parents, leaf = key.split(".")
        node = values
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = yaml.safe_load(value)
    body = {"defaults": groups} if groups else {}
    recipe = yaml.safe_dump({**body, **values}, default_flow_style=False, sort_keys=False)
    return "# @package _global_\n" + comment + recipe


def write_tuned(
    out: Path, cfg: SweepConfig, arch: str, tuned: list[str], best: optuna.trial.FrozenTrial
) -> Path:
    """`<out>/recipe/<arch>.yaml`: a recipe of every override the chosen trial trained with (the common
    ones, the arch's, the tuned values), except the dataset choice (`data=`: the caller's) and display
    settings. `--config-dir <out> recipe=<arch>` trains with it."""
    recipe = [
        o for o in [*tuned, *cfg.overrides] if not o.startswith(("data=", "recipe=", "trainer.progress_bar="))
    ]
    shown = out.resolve()
    if shown.is_relative_to(Path.cwd()):  # the default report dir is absolute; the README runs from the repo
        shown = shown.relative_to(Path.cwd())
    header = (
        f"# {cfg.name}: {arch}'s chosen settings (trial {best.number}, valid {cfg.search.metric} "
        f"{best.value:.4f}), selected on the validation split. Train with them:\n"
        f"#   torchrun --nproc_per_node 2 launch/train.py --config-dir {shown.as_posix()} "
        f"data=<the search's data> recipe={arch}\n"
    )
    path = out / "recipe" / f"{arch}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(recipe_yaml(recipe, header))
    return path


def describe(p: ParamSpec) -> str:
    if p.choices is not None:
        return "{" + ", ".join(map(override_value, p.choices)) + "}"
    kind = " ".join(k for k in ("log", "int") if getattr(p, k))
    return f"[{p.low:g}, {p.high:g}]" + (f" {kind}" if kind else "")


def check_overrides(cfg: SweepConfig) -> None:
    """Compose every arch with the first value of each searched key: a misspelt key or a wrong type fails
    here, before any training."""
    for arch, spec in cfg.search.archs.items():
        first = {k: p.choices[0] if p.choices is not None else p.low for k, p in spec.params.items()}
        overrides = [*cfg.overrides, *spec.overrides, *as_overrides(spec.params, first)]
        try:
            runner.compose(overrides)
        except Exception as e:
            raise SystemExit(f"error: search.archs.{arch}: {e}") from None
        space = ", ".join(f"{k} {describe(p)}" for k, p in spec.params.items())
        print(f"{arch}: {' '.join([*cfg.overrides, *spec.overrides])}; searching {space}", flush=True)


def run_search(cfg: SweepConfig, out: Path, nproc: int, quick: bool, dry_run: bool = False) -> int:
    """Search every arch, train its best settings over the seeds, write the report; 1 if any arch found
    nothing or a final run failed."""
    search = cfg.search
    assert search is not None
    check_overrides(cfg)
    if dry_run:
        return 0
    results: list[dict] = []
    t0 = time.time()
    for arch, spec in search.archs.items():
        study = search_arch(cfg, arch, spec, out, nproc)
        base = [*cfg.overrides, *spec.overrides]
        result: dict[str, Any] = {
            "arch": arch,
            "overrides": list(spec.overrides),
            "trials": _trial_rows(study, spec),
            "best": None,
            "runs": [],
        }
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if complete:
            best = study.best_trial
            tuned = as_overrides(spec.params, best.params)
            result["best"] = {"number": best.number, "value": best.value, "params": best.params}
            result["tuned"] = tuned
            write_tuned(out, cfg, arch, [*spec.overrides, *tuned], best)
            for seed in cfg.seeds:
                elapsed = f"{time.time() - t0:.0f} s"
                print(
                    f"[{arch}] final run: trial {best.number}'s settings, seed {seed} ({elapsed})", flush=True
                )
                run_dir = out / "runs" / f"{arch}-trial{best.number}-seed{seed}"
                result["runs"].append(runner.run_cell([*base, *tuned], run_dir, seed, nproc))
            dense = runner.build_dense_arch_for(runner.compose([*base, *tuned]))
            result["params"] = dense.num_params()
        else:
            print(f"[{arch}] no complete trial: no final runs", flush=True)
        results.append(result)
        write_search_report(cfg, results, out, quick)  # a partial report after every arch
    failed = sum(r is None for a in results for r in a["runs"]) + sum(a["best"] is None for a in results)
    print(f"report: {out / 'README.md'} ({time.time() - t0:.0f} s, {failed} failures)", flush=True)
    return 1 if failed else 0
