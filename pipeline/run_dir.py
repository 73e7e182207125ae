"""A training run's directory, on local disk or an object store (`trainer.run_dir=s3://bucket/runs/x`).

Local: the run writes into it directly. Remote: checkpoints go straight to `<uri>/checkpoints/` through
DCP's fsspec writer (pipeline/checkpoint.py, `trainer.json` as commit marker), while the files written a
line at a time (metrics.jsonl, TensorBoard events) and the small ones (config.yaml, metrics.json,
predictions) are written to a local staging mirror and uploaded before each checkpoint and at the end:
an object store cannot append. A resumed run first downloads the run's metrics.jsonl, which holds every
record up to its checkpoint (those after it are dropped, pipeline/run_log.py), so the log continues as
on local disk.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from data.storage import display, exists, is_uri, join, read_bytes, remove_tree, write_bytes

STAGED = ("metrics.jsonl",)  # downloaded on start: the files a resumed run appends to


@dataclass(frozen=True)
class RunDir:
    uri: str  # the run dir as configured: a path or a URI
    local: Path  # where files other than checkpoints are written: the run dir, or its staging mirror

    @classmethod
    def at(cls, uri: str) -> RunDir:
        if not is_uri(uri):
            return cls(uri, Path(uri))
        digest = hashlib.sha1(display(uri).encode()).hexdigest()[:16]
        return cls(uri, Path(tempfile.gettempdir()) / "rankmixer-staging" / digest)

    @property
    def remote(self) -> bool:
        return is_uri(self.uri)

    @property
    def checkpoints(self) -> str:
        return join(self.uri, "checkpoints")

    def __str__(self) -> str:
        return display(self.uri)

    def exists(self) -> bool:
        """Local: the directory exists; remote: some object is under it."""
        return exists(self.uri)

    def check_writable(self) -> None:
        """Create it (local) and prove it takes a file; OSError otherwise."""
        self.local.mkdir(parents=True, exist_ok=True)
        probe = join(self.uri, ".write_test")
        write_bytes(probe, b"")
        remove_tree(probe)

    def pull(self) -> None:
        """Remote: a fresh staging mirror holding the run's files that a resumed run appends to."""
        if not self.remote:
            return
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)
        for name in STAGED:
            if exists(join(self.uri, name)):
                (self.local / name).write_bytes(read_bytes(join(self.uri, name)))

    def push(self, only: Path | None = None) -> None:
        """Remote: upload the staging mirror's files (or just `only`, a file in it), each a whole object;
        nothing is ever deleted there."""
        if not self.remote:
            return
        files = [only] if only is not None else [p for p in self.local.rglob("*") if p.is_file()]
        for path in files:
            if not path.name.startswith("."):
                write_bytes(join(self.uri, path.relative_to(self.local).as_posix()), path.read_bytes())

    def remove_local(self) -> None:
        """The run dir (local) or its staging mirror (remote), after a failed start."""
        shutil.rmtree(self.local, ignore_errors=True)
