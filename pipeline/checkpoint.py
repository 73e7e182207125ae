"""Checkpoints with `torch.distributed.checkpoint` (DCP): sharded embedding tables, the fused Adagrad state
and the dense optimizer state (through the CombinedOptimizer's `state_dict()`), plus the trainer's position.

Layout of `<root>/step_<N>/`:
- DCP files + `.metadata`: {"model": DMP state dict, "optim": CombinedOptimizer state dict}. DCP reshards on
  load, so a checkpoint written by 2 ranks loads on 1 rank (the eval job) or on 4.
- `trainer.json` (rank 0): step, epoch, step within the epoch, world size, written last.
- `rank_<r>.pt`: that rank's RNG states (the data position is derived from epoch/step: the reader is a
  deterministic function of (seed, epoch, rank, world size), so a resume replays the same order and skips).
- `config.yaml`: the resolved run config, so the checkpoint is self-contained for `launch/eval.py`.

Atomic: everything goes to `.step_<N>.tmp/` and rank 0 renames it once every rank has finished, so a
crash never leaves a checkpoint that looks complete; only `step_*` dirs with `trainer.json` count.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from data.storage import display, exists, is_uri, join, list_dirs, read_bytes, remove_tree, write_bytes
from pipeline.config import TrainConfig, load_train_config
from pipeline.dist import DistInfo

log = logging.getLogger(__name__)
_STEP_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _complete(root: str | Path) -> list[tuple[int, str]]:
    """(step, dir) of the complete checkpoints under `root` (a path or URI), oldest first."""
    found = [(int(m.group(1)), join(root, name)) for name in list_dirs(root) if (m := _STEP_DIR.match(name))]
    return sorted((step, path) for step, path in found if exists(join(path, "trainer.json")))


def step_dir(root: str | Path, step: int) -> str:
    """The directory of the checkpoint of `step` under a checkpoints root (matches _STEP_DIR)."""
    return join(root, f"step_{step:08d}")


def complete_checkpoints(root: str | Path) -> list[str]:
    """Complete checkpoints under `root`, oldest first."""
    return [p for _, p in _complete(root)]


def read_json(path: str | Path) -> dict[str, Any]:
    return json.loads(read_bytes(path))


def resolve_checkpoint(path: str | Path) -> str:
    """A checkpoint dir; or, for a run dir, the checkpoint its metrics.json selected (the best validation
    step, the one its test metrics come from), else its latest complete one; or the latest complete one
    under a checkpoints dir. Paths or URIs."""
    p = str(path)
    if exists(join(p, "trainer.json")):
        return p
    summary = join(p, "metrics.json")
    if exists(summary):
        selected = read_json(summary).get("selected_step")
        chosen = step_dir(join(p, "checkpoints"), selected) if selected is not None else None
        if chosen and exists(join(chosen, "trainer.json")):
            return chosen
    for root in (join(p, "checkpoints"), p):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    raise FileNotFoundError(
        f"checkpoint: no complete checkpoint at {display(p)} (looked for step_*/trainer.json)"
    )


class CheckpointManager:
    """Saves and loads the checkpoints under `root`, a local path or a URI. Local saves are atomic by
    rename (`.step_<N>.tmp/` -> `step_<N>/`); object stores have no rename, so a save writes `step_<N>/`
    in place and `trainer.json`, written last, is its commit marker: a dir without it is never loaded,
    listed or kept."""

    def __init__(self, root: str | Path, info: DistInfo, keep_last: int = 2) -> None:
        self.root = str(root)
        self.info = info
        self.keep_last = keep_last
        self.keep_step: int | None = None  # kept besides the last keep_last (the best validation step)
        self.in_place = is_uri(self.root)

    def path(self, step: int) -> str:
        return step_dir(self.root, step)

    def latest(self) -> str | None:
        found = complete_checkpoints(self.root)
        return found[-1] if found else None

    def latest_step(self) -> int | None:
        """The step of the latest complete checkpoint (None: there is none)."""
        found = _complete(self.root)
        return found[-1][0] if found else None

    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, Any],
        config_yaml: str,
    ) -> str:
        final = self.path(step)
        tmp = final if self.in_place else join(self.root, f".step_{step:08d}.tmp")
        try:
            if self.info.is_main:
                remove_tree(tmp)  # leftovers of a crashed save of the same step (or a re-save, in place)
                if not self.in_place:
                    os.makedirs(tmp)
            dist.barrier()
            dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=tmp)
            rng = io.BytesIO()
            torch.save({"rng": rng_state()}, rng)
            write_bytes(join(tmp, f"rank_{self.info.rank}.pt"), rng.getvalue())
            dist.barrier()
            if self.info.is_main:
                write_bytes(join(tmp, "config.yaml"), config_yaml.encode())
                meta = {**trainer_state, "step": step, "world_size": self.info.world_size}
                write_bytes(join(tmp, "trainer.json"), json.dumps(meta, indent=2).encode())  # the marker
        except (OSError, dcp.api.CheckpointException) as e:  # e.g. the disk is full
            if self.info.is_main:
                remove_tree(tmp)  # never leave a partial checkpoint on a full disk
            kept = ", ".join(p.rsplit("/", 1)[-1] for p in complete_checkpoints(self.root)) or "none"
            raise CheckpointError(
                f"checkpoint: saving step {step} to {display(final)} failed ({first_line(e)}); removed the "
                f"partial {tmp.rsplit('/', 1)[-1]}; complete checkpoints kept: {kept}"
            ) from e
        if self.info.is_main:
            if not self.in_place:
                if os.path.exists(final):  # re-saving a step (e.g. after a resume): replace it whole
                    shutil.rmtree(final)
                os.replace(tmp, final)
            old = _complete(self.root)[: -self.keep_last] if self.keep_last > 0 else []
            for old_step, old_path in old:
                if old_step != self.keep_step:
                    _remove_checkpoint(old_path)
            log.info("checkpoint saved: %s", display(final))
        dist.barrier()
        return final

    def load(
        self, path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, Any]:
        """Load model (and optimizer, if given) state in place; restore this rank's RNG when the world size
        matches. Returns trainer.json."""
        meta = read_json(join(path, "trainer.json"))
        load_checkpoint_into(path, model, optimizer)
        rank_file = join(path, f"rank_{self.info.rank}.pt")
        if meta["world_size"] == self.info.world_size and exists(rank_file):
            set_rng_state(torch.load(io.BytesIO(read_bytes(rank_file)), weights_only=False)["rng"])
        return meta


def _remove_checkpoint(path: str) -> None:
    """Remove a checkpoint, its commit marker first, so a removal cut short never leaves a dir that looks
    complete (on an object store a directory is deleted object by object)."""
    try:
        remove_tree(join(path, "trainer.json"))
        remove_tree(path)
    except OSError as e:
        log.warning("checkpoint: could not remove %s (%s)", display(path), first_line(e))


class CheckpointError(ValueError):
    """A checkpoint that cannot be saved, loaded or resumed here; one line naming it and why."""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():  # DCP wraps per-rank errors: the innermost message is the useful one
        if "Errno" in line or "Error:" in line:
            return line.strip()
    return text.splitlines()[0] if text else type(e).__name__


def config_diff(saved: Any, current: Any, path: str) -> list[str]:
    """Every leaf where two plain configs differ, as `path: <saved> in checkpoint, <current> now`. Lists
    of named entries (schema features) are matched by name: `schema.sparse[author_level].embedding_dim`."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for k in dict.fromkeys([*saved, *current]):
            if k not in current:
                out.append(f"{path}.{k}: {saved[k]!r} in checkpoint, absent now")
            elif k not in saved:
                out.append(f"{path}.{k}: absent in checkpoint, {current[k]!r} now")
            else:
                out += config_diff(saved[k], current[k], f"{path}.{k}")
        return out
    named = isinstance(saved, list) and isinstance(current, list)
    named = named and all(isinstance(x, dict) and "name" in x for x in (*saved, *current))
    if named:
        a, b = {x["name"]: x for x in saved}, {x["name"]: x for x in current}
        if list(a) != list(b):
            return [f"{path}: features {list(a)} in checkpoint, {list(b)} now"]
        return [d for name in a for d in config_diff(a[name], b[name], f"{path}[{name}]")]
    return [] if saved == current else [f"{path}: {saved!r} in checkpoint, {current!r} now"]


def check_compatible(checkpoint: str | Path, config_yaml: str, what: str = "resume") -> None:
    """Refuse (CheckpointError naming the first changed field) to resume (or warm-start from) a checkpoint
    whose schema or model config differs from this run's: its tensors would not fit, or would mean
    something else."""
    import yaml

    try:
        saved = yaml.safe_load(read_bytes(join(checkpoint, "config.yaml")))
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(
            f"{what}: {display(join(checkpoint, 'config.yaml'))} unreadable: {first_line(e)}"
        ) from e
    current = yaml.safe_load(config_yaml)
    diffs = config_diff(saved["data"]["schema"], current["data"]["schema"], "schema")
    diffs += config_diff(saved["model"], current["model"], "model")
    if diffs:
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        fix = "resume with the run's config.yaml, or start a new trainer.run_dir"
        if what != "resume":
            fix = "train with the schema and model of the checkpoint"
        raise CheckpointError(
            f"{what}: {display(checkpoint)} was written with another schema or model: {diffs[0]}{more}; {fix}"
        )


def load_checkpoint_into(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    restart_schedule: bool = False,
) -> None:
    """DCP-load a checkpoint into live (possibly differently sharded) model / optimizer state.
    `restart_schedule`: the lr schedule's step count (pipeline/optim.py ScheduledOptimizer keeps it in the
    optimizer state, `__warmup`) starts again from 0 (a warm start), the rest of the state is loaded."""
    state: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        # Optimizer state is created lazily on the first step; make it exist so DCP can load in place.
        optimizer.init_state()  # type: ignore[attr-defined]
        state["optim"] = optimizer.state_dict()
    dcp.load(state, checkpoint_id=str(path))  # a URI goes through DCP's fsspec reader
    model.load_state_dict(state["model"])
    if optimizer is not None:
        if restart_schedule:
            for key, value in state["optim"]["state"].items():
                if key.endswith("__warmup"):
                    value["warmup"].zero_()
        optimizer.load_state_dict(state["optim"])
        optimizer.post_load_state_dict()  # type: ignore[attr-defined]  # e.g. warmup re-applies its lr


def load_run_config(checkpoint: str | Path) -> TrainConfig:
    """The training config saved inside a checkpoint (model, schema, optimizers)."""
    path = join(checkpoint, "config.yaml")
    if not exists(path):
        raise FileNotFoundError(
            f"checkpoint {display(checkpoint)}: no config.yaml (not written by launch/train.py?)"
        )
    return load_train_config(read_bytes(path).decode(), where=display(path))
