"""Atomic file writes: a reader, or a job resumed after a crash, never sees a half-written file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes the whole file to a temporary name next to `path`, then it is renamed into
    place (a rename within one directory is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.replace(path)


def write_json_atomic(path: Path, value: Any) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2, default=float)))
