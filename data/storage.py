"""Where files live: a local path or a URI (`s3://`, `gs://`, `hdfs://`, `file://`), through pyarrow's
filesystems, so the data root, run dirs and job outputs take either.

Credentials and endpoints come from each filesystem's own environment and config files (S3: the AWS
variables such as `AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, `AWS_REGION`, or `~/.aws/`; GCS: Google's
application-default credentials; HDFS: the Hadoop configuration), never from our config, and no URI is
logged with its query string.

Object stores have no atomic rename, so a directory we publish there (predictions, an export) counts as
written only once its commit marker (`publish_marker`) exists; readers require it (`require_published`).
"""

from __future__ import annotations

import functools
import os
from urllib.parse import urlsplit

import pyarrow.fs as pafs

COMMIT_MARKER = "_COMMITTED"


def is_uri(path: str | os.PathLike[str]) -> bool:
    return "://" in str(path)


@functools.lru_cache(maxsize=16)
def _filesystem(prefix: str) -> pafs.FileSystem:
    """One filesystem per scheme + authority (S3 clients are costly to build and resolve the bucket's
    region on creation)."""
    return pafs.FileSystem.from_uri(prefix)[0]


def resolve(path: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a local path or a URI."""
    text = str(path)
    if not is_uri(text):
        return pafs.LocalFileSystem(), os.path.abspath(text)
    u = urlsplit(text)
    if u.scheme == "file":
        return pafs.LocalFileSystem(), u.path
    fs = _filesystem(f"{u.scheme}://{u.netloc}/" + (f"?{u.query}" if u.query else ""))
    inner = u.path if u.scheme in ("hdfs", "viewfs") else f"{u.netloc}{u.path}"
    return fs, inner.rstrip("/") or "/"


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """`base/part/...` for a local path or a URI (a URI's query string, if any, stays at the end)."""
    text = str(base)
    if not is_uri(text):
        return os.path.join(text, *parts)
    u = urlsplit(text)
    path = "/".join([u.path.rstrip("/"), *(p.strip("/") for p in parts)])
    return f"{u.scheme}://{u.netloc}{path}" + (f"?{u.query}" if u.query else "")


def display(path: str | os.PathLike[str]) -> str:
    """A path or URI for messages and logs: without its query string."""
    text = str(path)
    return text.split("?", 1)[0] if is_uri(text) else text


def exists(path: str | os.PathLike[str]) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_dir(path: str | os.PathLike[str]) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def list_files(root: str | os.PathLike[str], suffix: str = "") -> list[str]:
    """Every file under `root` (recursively) whose name ends with `suffix`, as paths relative to `root`,
    sorted; hidden entries (a `.` or `_` first in any part: temp dirs, markers) are left out."""
    fs, p = resolve(root)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True, allow_not_found=True))
    out = []
    for info in infos:
        if info.type != pafs.FileType.File or not info.path.endswith(suffix):
            continue
        rel = info.path[len(p) :].lstrip("/")
        if not any(part[:1] in "._" for part in rel.split("/")):
            out.append(rel)
    return sorted(out)


def list_dirs(root: str | os.PathLike[str]) -> list[str]:
    """Names of the directories directly under `root` (none if it does not exist)."""
    fs, p = resolve(root)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def total_size(root: str | os.PathLike[str]) -> int:
    """Bytes of every file under `root`."""
    fs, p = resolve(root)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True, allow_not_found=True))
    return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File)


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a whole file. Local: through a temp name renamed into place. Object stores: a single PUT,
    which a reader sees whole or not at all."""
    text = str(path)
    if not is_uri(text):
        tmp = f"{os.path.join(os.path.dirname(text), '.' + os.path.basename(text))}.tmp"
        os.makedirs(os.path.dirname(text) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, text)
        return
    fs, p = resolve(text)
    with fs.open_output_stream(p) as f:
        f.write(data)


def remove_tree(path: str | os.PathLike[str]) -> None:
    fs, p = resolve(path)
    if fs.get_file_info(p).type == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif fs.get_file_info(p).type == pafs.FileType.File:
        fs.delete_file(p)


def publish_marker(directory: str | os.PathLike[str]) -> None:
    """Mark a directory written in place on an object store as complete: the last write."""
    write_bytes(join(directory, COMMIT_MARKER), b"")


def is_published(directory: str | os.PathLike[str]) -> bool:
    return exists(join(directory, COMMIT_MARKER))


def publish_dir(local: str | os.PathLike[str], uri: str) -> None:
    """Upload a finished local directory to `uri` on an object store: an existing output there goes first
    (its marker before anything else), then every file, then the commit marker, last."""
    remove_tree(join(uri, COMMIT_MARKER))
    remove_tree(uri)
    base = os.fspath(local)
    for rel in list_files(base):
        with open(os.path.join(base, rel), "rb") as f:
            write_bytes(join(uri, rel), f.read())
    publish_marker(uri)


def fetch_dir(uri: str, local: str | os.PathLike[str]) -> None:
    """Download a published directory (it must carry its commit marker) into `local`."""
    if not is_published(uri):
        raise FileNotFoundError(
            f"{display(uri)}: not published (no {COMMIT_MARKER}: missing, or still being written)"
        )
    for rel in list_files(uri):
        dest = os.path.join(os.fspath(local), rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "wb") as f:
            f.write(read_bytes(join(uri, rel)))
