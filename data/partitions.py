"""Which Parquet files a split is.

A split is either a directory under the data root (`train`: `<root>/train/*.parquet`, the layout the
built-in datasets use), or a selection of Hive-style partitions under the root, written as conditions that
must all hold, separated by commas:

    dt=2026-01-08                      one partition
    dt>=2026-01-01,dt<=2026-01-07      a range (also >, <, !=)
    dt=2026-01-01|2026-01-03           a list
    dt=2026-01-08,hour>=12             any `key=value` level

A partition's files are the Parquet files anywhere below its `key=value/` directories. Values compare as
numbers when both sides are numbers, else as strings (which orders ISO dates). Entries whose name starts
with `.` or `_` (temp dirs, commit markers) are never data.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

from data.decode import DataError
from data.storage import display, is_dir, join, list_files

_CONDITION = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*(!=|>=|<=|=|>|<)\s*([^\s=<>!].*?)\s*$")
_OPS: dict[str, Callable[[object, object], bool]] = {
    "=": operator.eq,
    "!=": operator.ne,
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}


def _comparable(a: str, b: str) -> tuple[object, object]:
    try:
        return float(a), float(b)
    except ValueError:
        return a, b


@dataclass(frozen=True)
class Condition:
    key: str
    op: str
    values: tuple[str, ...]  # several only for `=` (a list)

    def holds(self, value: str) -> bool:
        if self.op == "=":
            return any(_OPS["="](*_comparable(value, v)) for v in self.values)
        return _OPS[self.op](*_comparable(value, self.values[0]))


def is_selection(split: str) -> bool:
    """Whether a split names partitions (it has a comparison) rather than a directory."""
    return any(op in split for op in ("=", "<", ">"))


def parse_selection(split: str) -> list[Condition]:
    conditions = []
    for part in split.split(","):
        m = _CONDITION.match(part)
        if not m:
            raise ValueError(
                f"data: split {split!r}: {part.strip()!r} is not a condition like dt>=2026-01-01 "
                "(key, one of = != >= <= > <, value; conditions separated by commas)"
            )
        key, op, value = m.groups()
        values = tuple(v.strip() for v in value.split("|"))
        if len(values) > 1 and op != "=":
            raise ValueError(f"data: split {split!r}: a list of values (a|b) needs =, not {op}")
        conditions.append(Condition(key, op, values))
    return conditions


def partition_values(rel_path: str) -> dict[str, str]:
    """{key: value} of the `key=value` directories of a file's path relative to the root."""
    return dict(part.split("=", 1) for part in rel_path.split("/")[:-1] if "=" in part)


def split_files(root: str, split: str) -> list[str]:
    """The Parquet files (paths or URIs, sorted) of a split under a data root: the directory
    `<root>/<split>`, or the partitions the selection picks. Errors are one line naming the root, the
    split and what is there."""
    if not is_selection(split):
        path = join(root, split)
        if not is_dir(path):
            raise DataError(
                f"data: split directory {display(path)} does not exist (data.root={display(root)!r}, "
                f"split={split!r}); build the dataset first, e.g. `make data`"
            )
        found = list_files(path, ".parquet")
        if not found:
            raise DataError(f"{display(path)}: no *.parquet files in directory")
        return [join(path, f) for f in found]
    conditions = parse_selection(split)
    files = [(f, partition_values(f)) for f in list_files(root, ".parquet")]
    keys = sorted({k for _, values in files for k in values})
    for c in conditions:
        if c.key not in keys:
            raise DataError(
                f"data: split {split!r}: no partition key {c.key!r} under {display(root)} "
                f"(keys: {', '.join(keys) or 'none, no key=value directories'})"
            )
    chosen = [f for f, values in files if all(c.key in values and c.holds(values[c.key]) for c in conditions)]
    if not chosen:
        first = conditions[0].key
        seen = sorted({values[first] for _, values in files if first in values})
        shown = f"{seen[0]} .. {seen[-1]} ({len(seen)})" if len(seen) > 3 else ", ".join(seen)
        raise DataError(
            f"data: split {split!r} selects no partition under {display(root)} ({first}: {shown})"
        )
    return [join(root, f) for f in chosen]


def split_label(split: str) -> str:
    """A split as a file-name part (`eval_<label>`): `dt>=2026-01-01,dt<=2026-01-07` ->
    `dt_ge_2026-01-01_dt_le_2026-01-07`."""
    words = {">=": "_ge_", "<=": "_le_", "!=": "_ne_", ">": "_gt_", "<": "_lt_", ",": "_", "|": "+"}
    out = split
    for sym, word in words.items():
        out = out.replace(sym, word)
    return re.sub(r"[^\w.=+-]", "_", out)
