"""Reading MovieLens-100K's RecBole atomic files `recbole/dataset_example/ml-100k/ml-100k.{inter,user,item}`
straight out of the `recbole==1.2.1` wheel (recbole itself is never installed or imported, and no data is
vendored into this repository): finding the wheel, unzipping the three members and parsing them into raw
string columns. Atomic files are tab-separated with a `name:type` header; `token_seq` fields are
space-separated. Anything missing or unreadable raises SourceError, whose message names what failed and
the pip command that fetches the wheel. The conversion is data.build.ml100k_tables; the CLI is
data.build.ml100k.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

PACKAGE = "recbole==1.2.1"
WHEEL_GLOB = "recbole-1.2.1-*.whl"
MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
DEFAULT_WHEEL_DIR = "datasets/.cache"

# the fields each atomic file must have (header names before the ':type' suffix)
FIELDS = {
    "inter": ("user_id", "item_id", "rating", "timestamp"),
    "user": ("user_id", "age", "gender", "occupation", "zip_code"),
    "item": ("item_id", "release_year", "class"),
}


class SourceError(RuntimeError):
    """The RecBole wheel is missing or unreadable; the message names what failed and the pip command."""


def pip_command(wheel_dir: str | Path) -> str:
    return f"python -m pip download --no-deps {PACKAGE} -d {wheel_dir}"


def find_wheel(wheel_dir: str | Path) -> Path:
    d = Path(wheel_dir)
    found = sorted(d.glob(WHEEL_GLOB)) if d.is_dir() else []
    if not found:
        raise SourceError(
            f"MovieLens-100K source missing: no {WHEEL_GLOB} in {d}; download it with: {pip_command(d)}"
        )
    return found[-1]


def read_wheel(wheel: str | Path) -> dict[str, dict[str, list[str]]]:
    """{"inter" | "user" | "item": {field: values}} from the wheel's atomic files."""
    wheel = Path(wheel)
    redo = pip_command(wheel.parent)
    out: dict[str, dict[str, list[str]]] = {}
    try:
        with zipfile.ZipFile(wheel) as z:
            for kind in FIELDS:
                member = MEMBER.format(kind)
                try:
                    raw = z.read(member)
                except KeyError:
                    raise SourceError(
                        f"{wheel}: has no {member} (not the {PACKAGE} wheel?); {redo}"
                    ) from None
                out[kind] = parse_atomic(_decode(raw), f"{wheel.name}:{member}", FIELDS[kind])
    except (zipfile.BadZipFile, OSError) as e:
        raise SourceError(f"{wheel}: not a readable wheel ({e}); re-download it with: {redo}") from e
    return out


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def parse_atomic(text: str, where: str, fields: Sequence[str]) -> dict[str, list[str]]:
    """A RecBole atomic file (tab-separated, header `name:type ...`) -> {field: column of raw strings}."""
    lines = [ln.rstrip("\r") for ln in text.split("\n")]
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        raise SourceError(f"{where}: empty file")
    names = [h.split(":", 1)[0] for h in lines[0].split("\t")]
    missing = [f for f in fields if f not in names]
    if missing:
        raise SourceError(f"{where}: missing field(s) {missing}; header has {names}")
    idx = [names.index(f) for f in fields]
    cols: dict[str, list[str]] = {f: [] for f in fields}
    for n, ln in enumerate(lines[1:], start=2):
        parts = ln.split("\t")
        if len(parts) != len(names):
            raise SourceError(f"{where}: line {n} has {len(parts)} fields, header has {len(names)}")
        for f, i in zip(fields, idx):
            cols[f].append(parts[i].strip())
    return cols
