"""Writing a dataset directory `<root>/{train,valid,test}/part-*.parquet + dataset.json`, shared by the
synthetic generator (data.build.generate) and the MovieLens-100K converter (data.build.ml100k): `atomic_dir`
builds the whole directory in a sibling temp directory and swaps it in only once complete, `part_sizes`
spreads a split's rows over its part files, and `write_parts` writes those files with several row groups
each (so that the reader's round-robin of (file, row group) pairs gives every rank data) and returns the
per-file `{"path", "rows", "row_groups"}` entries that dataset.json lists.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SPLITS = ("train", "valid", "test")


def replace_dir(tmp: Path, root: Path) -> None:
    """Swap the finished directory `tmp` in as `root`: an existing `root` (directory or file) is moved
    aside to `.<name>.old-<pid>` first and removed only after the swap."""
    old = root.parent / f".{root.name}.old-{os.getpid()}"
    if root.exists():
        os.replace(root, old)
    os.replace(tmp, root)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


@contextmanager
def atomic_dir(root: str | Path) -> Iterator[Path]:
    """Yields an empty temp directory `.<name>.tmp-<pid>` next to `root`; when the block ends normally it
    replaces `root` whole (`replace_dir`). On any exception the temp directory is removed and `root` is
    left untouched. Datasets (data.build.generate, data.build.ml100k) and inference artifacts
    (pipeline/export.py)."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        replace_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def part_sizes(rows: int, max_files: int) -> list[int]:
    """Rows per part file: min(max_files, rows) files (at least one), sizes within 1 of each other, the
    larger ones first."""
    n_files = max(1, min(max_files, rows))
    return [rows // n_files + (f < rows % n_files) for f in range(n_files)]


def write_parts(
    out: Path, split: str, tables: Iterable[pa.Table], row_groups_per_file: int
) -> dict[str, Any]:
    """Each table -> `out/<split>/part-<i>.parquet` (zstd, about `row_groups_per_file` row groups);
    returns {"files": [{"path", "rows", "row_groups"}, ...], "row_groups": total}."""
    (out / split).mkdir(parents=True)
    files = []
    for f, table in enumerate(tables):
        n = table.num_rows
        path = out / split / f"part-{f:05d}.parquet"
        pq.write_table(table, path, row_group_size=max(1, -(-n // row_groups_per_file)), compression="zstd")
        files.append(
            {"path": f"{split}/{path.name}", "rows": n, "row_groups": pq.ParquetFile(path).num_row_groups}
        )
    return {"files": files, "row_groups": sum(f["row_groups"] for f in files)}
