"""Entry-point plumbing shared by the launchers: user errors end the job with one clear line."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data.reader import DataError
from data.schema import SchemaError

# Mistakes in config or data: the message already names the key, file, column or value, so a traceback
# from deep inside the job would only bury it.
USER_ERRORS = (SchemaError, DataError, FileNotFoundError, ValueError)


# What a rank sees when another rank died (gloo: its sockets closed; NCCL: the communicator was aborted or
# the watchdog timed out on the dead peer's collective): the dead rank already said why.
PEER_FAILURE = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Connection refused",
    "NCCL communicator was aborted",
    "ncclRemoteError",
    "Watchdog caught collective operation timeout",
)


def is_peer_failure(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and any(m in str(e) for m in PEER_FAILURE)


def exit_on_user_error(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A user error ends the job with one line (exit 2); a rank whose collective failed because another
    rank died exits quietly (exit 1), so the failing rank's line is the one the user reads."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            if os.environ.get("RANKMIXER_TRACEBACK"):
                raise
            rank = os.environ.get("RANK", "0")
            print(
                f"error [rank {rank}]: {type(e).__name__}: {e}\n(RANKMIXER_TRACEBACK=1 shows the traceback)",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(2)
        except Exception as e:
            if is_peer_failure(e) and not os.environ.get("RANKMIXER_TRACEBACK"):
                sys.stdout.flush()
                os._exit(1)  # no teardown of the broken process group (more peer errors) either
            raise

    return wrapper


def config_dirs(argv: list[str]) -> list[Path]:
    """The `--config-dir` dirs of a command line."""
    dirs = []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]))
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]))
    return dirs


def check_config_yaml(argv: list[str]) -> None:
    """Every YAML file under conf/ and the `--config-dir` dirs parses; else one line with the file, line
    and column, before Hydra (whose YAML errors are a long traceback per rank) reads any of them."""
    import yaml

    from launch.configs import CONF_DIR

    for d in [CONF_DIR, *config_dirs(argv)]:
        for path in sorted(Path(d).rglob("*.yaml")):
            try:
                yaml.safe_load(path.read_text())
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
                problem = getattr(e, "problem", None) or str(e).splitlines()[0]
                print(f"error: {where}: invalid YAML: {problem}", file=sys.stderr, flush=True)
                sys.exit(2)


def prepare_launch(train: bool = False) -> None:
    """What every entry point runs before Hydra: the YAML check, then the config nodes' registration; for
    a train job, the default recipe where the data has none of its own (`launch.configs.with_recipe`)."""
    from launch.configs import register_configs, with_recipe

    check_config_yaml(sys.argv)
    register_configs()
    if train:
        overrides = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
        sys.argv += with_recipe(overrides, config_dirs(sys.argv))[len(overrides) :]


def run_launcher_here(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`python <argv>` (a script under the project root, or `-m module`) in this process, as `__main__` with
    that sys.argv and `env` added to the environment: the launcher's own code, without an interpreter start
    and its TorchRec import. It makes its own 1-rank group as a plain `python launch/...` does
    (pipeline/dist.py). Returns (exit code, stdout, stderr) as a process would: an uncaught exception is
    exit 1 with its traceback. The environment, sys.argv, Hydra's global state and the root logger are
    restored and the group destroyed after it, so a later launch or process inherits nothing."""
    import contextlib
    import io
    import logging
    import runpy
    import traceback

    import torch.distributed as dist
    from hydra.core.global_hydra import GlobalHydra

    if dist.is_initialized():
        raise RuntimeError("run_launcher_here: a process group is already up in this process")
    root = Path(__file__).resolve().parents[1]
    saved_env, saved_argv = dict(os.environ), sys.argv
    handlers, level = logging.root.handlers[:], logging.root.level
    out, err, code = io.StringIO(), io.StringIO(), 0
    os.environ.update(env or {})
    GlobalHydra.instance().clear()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if argv[0] == "-m":
                    sys.argv = [argv[1], *argv[2:]]
                    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
                else:
                    sys.argv = list(argv)
                    runpy.run_path(str(root / argv[0]), run_name="__main__")
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        GlobalHydra.instance().clear()
        if dist.is_initialized():
            dist.destroy_process_group()
        for key in set(os.environ) - set(saved_env):  # what the job set (its group's RANK, ...)
            del os.environ[key]
        os.environ.update(saved_env)
        sys.argv = saved_argv
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)
    return code, out.getvalue(), err.getvalue()
