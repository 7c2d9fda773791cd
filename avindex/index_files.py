"""A store's index folder: validated file names, one-builder lock, durable writes, index.json."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from avindex.durable import TMP_SUFFIX, durable_tmp, fsync_path
from avindex.errors import AvindexError
from avindex.store import MODALITIES

INDEX_DIR = "index"
INDEX_JSON = "index.json"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"  # in-progress files and part folders; a new builder removes stale ones
SCHEMA = 2  # 2: unique file names per build, inverted lists merged on disk, re-rank setting
READABLE_SCHEMAS = (1, 2)  # 1: fixed '<modality>.faiss' names, lists inside the index file
KINDS = ("faiss", "ivfdata")  # the index proper, and its on-disk inverted lists
_NAME = re.compile(r"(visual|audio)-[0-9a-f]{16}\.(faiss|ivfdata)")


def index_dir(store_dir: str | os.PathLike[str]) -> Path:
    """The index folder of a store."""
    return Path(store_dir) / INDEX_DIR


def new_file_name(modality: str, kind: str) -> str:
    """A fresh name for one file of a new index generation (never reused, never overwritten)."""
    return f"{modality}-{uuid.uuid4().hex[:16]}.{kind}"


def _valid_name(name: Any, modality: str, kind: str) -> bool:
    """Only names this module makes: a plain file name, never a path out of the folder."""
    if not isinstance(name, str):
        return False
    if kind == "faiss" and name == f"{modality}.faiss":  # schema 1
        return True
    match = _NAME.fullmatch(name)
    return match is not None and match.groups() == (modality, kind)


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """Hold the index folder's lock for a build or update; a second one fails at once.

    An OS file lock (flock): released when the holder exits, however it dies, so a killed build
    never blocks the next one. Failing fast (rather than waiting) tells the user at once that
    another run is busy; waiting behind it would redo work that run is about to finish.
    """
    folder.mkdir(exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise AvindexError(
            f"{folder}: another `avindex index` is building this index; "
            "wait for it to finish and run again"
        ) from None
    try:
        _clear_stale(folder)  # we hold the lock: any temporary file is a dead builder's
        yield
    finally:
        os.close(fd)


def _clear_stale(folder: Path) -> None:
    for path in [*folder.glob(TMP_PREFIX + "*"), *folder.glob("*" + TMP_SUFFIX)]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def temp_path(folder: Path, name: str) -> Path:
    """A unique temporary path in the index folder (removed by its writer or the next builder)."""
    return folder / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}"


def _write_error(path: Path, what: str, exc: OSError | RuntimeError) -> AvindexError:
    reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[-1]
    return AvindexError(
        f"{path}: cannot write the {what} ({reason}); free space or fix permissions and "
        "run again (the previous index is kept)"
    )


def checked_write(path: Path, write: Callable[[str], None], what: str) -> None:
    """Write a working file through `write(path)`; a failure is one AvindexError, no file left."""
    try:
        write(str(path))
    except (OSError, RuntimeError) as exc:  # faiss reports I/O errors as RuntimeError
        path.unlink(missing_ok=True)
        raise _write_error(path, what, exc) from exc


def durable_write(path: Path, write: Callable[[str], None], what: str) -> None:
    """Write a file through `write(tmp)`, fsync it, rename it into place and fsync the folder.

    A failure (a full disk, a faiss write error) is one AvindexError and leaves no temporary
    file; the previous file at `path`, if any, is untouched.
    """
    try:
        with durable_tmp(path) as tmp:
            checked_write(tmp, write, what)
    except OSError as exc:
        raise _write_error(path, what, exc) from exc


def sync_file(path: Path, what: str) -> None:
    """fsync a file written in place (the merged inverted lists) so it survives a power loss."""
    try:
        fsync_path(path)
    except OSError as exc:
        raise AvindexError(f"{path}: cannot write the {what} ({exc.strerror or exc})") from exc


def entry_path(folder: Path, entry: dict[str, Any], modality: str, kind: str) -> Path | None:
    """The checked path of an index.json entry's file of `kind` (None: the entry has none)."""
    name = entry.get("file" if kind == "faiss" else kind)
    if name is None and kind != "faiss":
        return None
    if not _valid_name(name, modality, kind):
        raise AvindexError(
            f"{folder / INDEX_JSON}: {modality} {kind} file {name!r} is not an index file name; "
            f"rebuild the index with `avindex index {folder.parent}`"
        )
    return folder / name


def remove_unreferenced(folder: Path, info: dict[str, Any]) -> None:
    """Delete the index files of earlier generations (only names this module makes)."""
    keep = {entry.get(key) for entry in info["modalities"].values() for key in ("file", "ivfdata")}
    for path in folder.iterdir():
        ours = any(_valid_name(path.name, m, k) for m in MODALITIES for k in KINDS)
        if ours and path.name not in keep:
            path.unlink(missing_ok=True)


def read_index_info(store_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The store's checked index.json; missing, corrupt or incomplete is a one-line user error."""
    folder = index_dir(store_dir)
    path = folder / INDEX_JSON
    if not path.exists():
        raise AvindexError(f"{store_dir}: store has no index; run `avindex index {store_dir}`")
    try:
        info = json.loads(path.read_bytes())
    except (ValueError, RecursionError):  # a hand edit, a full disk, hostile nesting
        info = None
    problem = _schema_problem(info, folder)
    if problem:
        raise AvindexError(
            f"{path}: corrupt index.json ({problem}); "
            f"rebuild the index with `avindex index {store_dir}`"
        )
    for entry in info["modalities"].values():
        entry.setdefault("ivfdata", None)  # schema 1: lists inside the index file
        entry.setdefault("rerank", 0)  # schema 1: no re-rank
    return info


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _schema_problem(info: Any, folder: Path) -> str | None:
    """What is wrong with a parsed index.json, or None when every field is usable."""
    if not isinstance(info, dict):
        return "not an index description"
    schema = info.get("schema")
    if _is_int(schema) and schema > SCHEMA:
        return f"schema {schema} from a newer avindex; upgrade avindex or rebuild"
    if schema not in READABLE_SCHEMAS:
        return f"unknown schema {schema!r}"
    for key, ok in (
        ("model_sha256", lambda v: isinstance(v, str)),
        ("num_clips", _is_int),
        ("shards", lambda v: isinstance(v, list)),
        ("modalities", lambda v: isinstance(v, dict) and set(v) <= set(MODALITIES)),
    ):
        if not ok(info.get(key)):
            return f"missing or bad {key!r}"
    for shard in info["shards"]:
        if not (
            isinstance(shard, dict)
            and isinstance(shard.get("name"), str)
            and _is_int(shard.get("first_id"))
            and _is_int(shard.get("count"))
        ):
            return "bad entry in 'shards'"
    for modality, entry in info["modalities"].items():
        problem = _entry_problem(entry, modality)
        if problem:
            return f"{modality}: {problem}"
    return None


def _entry_problem(entry: Any, modality: str) -> str | None:
    if not isinstance(entry, dict):
        return "not an index entry"
    for key, ok in (
        ("file", lambda v: _valid_name(v, modality, "faiss")),
        ("ivfdata", lambda v: v is None or _valid_name(v, modality, "ivfdata")),
        ("factory", lambda v: isinstance(v, str)),
        ("dim", _is_int),
        ("count", _is_int),
        ("rerank", _is_int),
        ("params", lambda v: isinstance(v, dict) and all(map(_is_int, v.values()))),
    ):
        if key in ("ivfdata", "rerank") and key not in entry:
            continue  # schema 1 has neither
        if not ok(entry.get(key)):
            return f"missing or bad {key!r}"
    return None


def write_index_info(folder: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Switch the index to the generation `info` describes, in one atomic rename; returns it."""
    info = {"schema": SCHEMA, **info, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    info["schema"] = SCHEMA
    text = json.dumps(info, indent=2)
    durable_write(folder / INDEX_JSON, lambda p: Path(p).write_text(text), "index.json")
    return info
