"""Worker of tests/test_pipelined_graphs.py, run on every rank by `torchrun --nproc_per_node 2`.

`python tests/pipelined_graphs_worker.py PLAN OUT`: PLAN is a JSON file {"common": [overrides...],
"combos": [{"name": ..., "overrides": [...]}, ...]}. Every combination is composed from conf/train.yaml
as `launch/train.py` composes it and trained by `pipeline.train_loop.train`, one after the other in the
same process group (one torchrun start and one TorchRec import for them all). Per combination, each rank's
stderr (logging, warnings, tracebacks) goes to OUT/logs/<name>.rank<r>.log, and rank 0 appends one JSON
line to OUT/results.jsonl: {"name", "errors": [per rank: None or a traceback], "train": [its train
records], "seconds"}.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # torchrun runs this file as a script, with tests/ as sys.path[0]
    sys.path.insert(0, str(ROOT))

# A desynchronised rank (one failed where the other went on into a collective) raises after this long
# instead of hanging until the test's own timeout; the slowest combination takes a few seconds.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)


@contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Redirect this process's fd 2 (Python logging and C++ warnings alike) to `path`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def compose_train_config(overrides: list[str]) -> Any:
    """The typed TrainConfig that `launch/train.py <overrides>` trains (same YAML, same checks)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from launch.configs import CONF_DIR
    from pipeline.config import reject_unknown_keys

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose(config_name="train", overrides=overrides)
    reject_unknown_keys(cfg)
    return OmegaConf.to_object(cfg)


def train_records(run_dir: Path) -> list[dict[str, float]]:
    """{"step", "loss", "aux_loss"} of every train record in rank 0's metrics.jsonl (a failed run that
    saved no checkpoint has had its run dir removed by train())."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: r[k] for k in ("step", "loss", "aux_loss")} for r in records if r["kind"] == "train"]


def main(argv: list[str]) -> None:
    import torch.distributed as dist

    from launch.configs import register_configs
    from pipeline.train_loop import train

    plan = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1])
    (out / "logs").mkdir(parents=True, exist_ok=True)
    rank = int(os.environ["RANK"])
    # train() reuses an initialised default group (pipeline/dist.py); initialising it here only adds the
    # timeout. gloo: these are CPU ranks.
    dist.init_process_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    register_configs()
    for combo in plan["combos"]:
        name = combo["name"]
        run_dir = out / "runs" / name
        overrides = [*plan["common"], *combo["overrides"], f"trainer.run_dir={run_dir}"]
        error = None
        start = time.perf_counter()
        with stderr_to(out / "logs" / f"{name}.rank{rank}.log"):
            try:
                train(compose_train_config(overrides))
            except Exception:
                traceback.print_exc()  # into this combination's log, where the test looks for it
                error = traceback.format_exc()
        seconds = time.perf_counter() - start
        try:
            errors = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
        except Exception:  # the group itself is broken: nothing after this can run
            errors = [error, f"all_gather after {name} failed:\n{traceback.format_exc()}"]
        if rank == 0:
            record = {"name": name, "errors": errors, "train": train_records(run_dir), "seconds": seconds}
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if errors[-1] and errors[-1].startswith("all_gather after"):
            break
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
