"""The catalog: one small JSON entry per shard, so a store opens and its pending set is found
without opening every shard.

Layout beside the shards: `catalog/<shard name>.json` holds the shard file's size and mtime (to
detect a stale entry), its row counts (all rows, rows with audio), its meta fingerprint and its
videos table; `catalog/meta-<fingerprint>.json` holds the full meta once per fingerprint.

The catalog is a cache, the shards stay the truth. A writer writes a shard's entry durably before
it renames the shard into place, so a crash between the two leaves an entry without its shard,
which readers never look at (they start from the shards on disk). A shard without a valid entry
(written by an older avindex, entry lost or damaged, shard replaced) is read from the shard (in a
child process: avindex.isolated) and its entry rewritten. Entries are written whole (tmp +
fsync + rename), so readers never see half of one.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from avindex import isolated
from avindex.durable import write_text_durably
from avindex.shard import (
    SHARD_GLOB,
    VIDEO_COLUMNS,
    ShardError,
    ShardSummary,
    StoreMeta,
    VideoKey,
    VideoTable,
    summarize,
)

CATALOG_DIR = "catalog"
CATALOG_VERSION = 1
# Anything a damaged or hand-edited entry can raise while parsed: it is then ignored and rebuilt.
_ENTRY_ERRORS = (OSError, ValueError, KeyError, TypeError, RecursionError)
_FINGERPRINT = re.compile(r"[0-9a-f]{16}")

log = logging.getLogger("avindex.store")
# (path, size, mtime_ns) of shards found unreadable in this process: a store is opened several
# times per command, and reading a shard that hangs HDF5 costs the reader's whole timeout.
_UNREADABLE: dict[tuple[str, int, int], str] = {}


def shard_names(store_dir: Path) -> list[str]:
    """Names of the complete shards in a store folder, sorted (= by creation time)."""
    try:
        with os.scandir(store_dir) as entries:
            return sorted(
                e.name for e in entries if fnmatch.fnmatch(e.name, SHARD_GLOB) and e.is_file()
            )
    except FileNotFoundError:
        return []


def entry_path(store_dir: Path, shard: str) -> Path:
    """Where the catalog entry of shard `shard` lives."""
    return store_dir / CATALOG_DIR / f"{shard}.json"


def _meta_path(store_dir: Path, fingerprint: str) -> Path:
    return store_dir / CATALOG_DIR / f"meta-{fingerprint}.json"


def write_entry(store_dir: Path, shard: str, summary: ShardSummary, stat: os.stat_result) -> None:
    """Write (or replace) the entry of a shard whose file has `stat`; raises OSError."""
    (store_dir / CATALOG_DIR).mkdir(exist_ok=True)
    fingerprint = summary.meta.fingerprint()
    meta_file = _meta_path(store_dir, fingerprint)
    if not meta_file.exists():
        write_text_durably(meta_file, json.dumps(summary.meta.to_attrs(), sort_keys=True))
    entry = {
        "version": CATALOG_VERSION,
        "shard": shard,
        "shard_size": stat.st_size,
        "shard_mtime_ns": stat.st_mtime_ns,
        "meta": fingerprint,
        "rows": summary.rows,
        "audio_rows": summary.audio_rows,
        "videos": {c: getattr(summary.videos, c) for c in VIDEO_COLUMNS},
    }
    write_text_durably(entry_path(store_dir, shard), json.dumps(entry))


def entry_videos(store_dir: Path, shard: str) -> VideoTable | None:
    """The videos table of a shard's entry even when the entry is stale (the shard may be
    damaged): which videos the shard held, for clean-up. None when there is no usable entry."""
    try:
        return VideoTable.from_columns(
            json.loads(entry_path(store_dir, shard).read_text())["videos"]
        )
    except _ENTRY_ERRORS:
        return None


def finished(summaries: Iterable[ShardSummary], retry_failed: bool = False) -> set[VideoKey]:
    """Keys of the videos a writer skips: done ones, and failed ones unless `retry_failed`."""
    return {
        key
        for summary in summaries
        for key, status in zip(summary.videos.keys(), summary.videos.status, strict=True)
        if status == "done" or not retry_failed
    }


def drop_entry(store_dir: Path, shard: str) -> None:
    """Remove a shard's entry (the shard is gone or moved aside); a missing entry is fine."""
    entry_path(store_dir, shard).unlink(missing_ok=True)


class Catalog:
    """Summaries of a store's shards: from valid catalog entries, else read from the shard (and
    the entry rewritten). Unreadable shards are listed in `errors` and logged once."""

    def __init__(self, store_dir: str | os.PathLike[str], rewrite: bool = True) -> None:
        """A catalog reader of `store_dir`; `rewrite=False` never writes entries (read-only use)."""
        self.dir = Path(store_dir)
        self.rewrite = rewrite
        self.summaries: dict[str, ShardSummary] = {}
        self.errors: dict[str, str] = {}
        self.from_catalog = 0  # summaries served by entries...
        self.from_shards = 0  # ...and by reading shards (tests and the benchmark count them)
        self._metas: dict[str, StoreMeta] = {}

    def read(self, names: Iterable[str]) -> None:
        """Summarise the named shards not summarised (or found unreadable) yet."""
        for name in names:
            if name not in self.summaries and name not in self.errors:
                self._read_one(name)

    def refresh(self) -> list[str]:
        """Summarise shards that appeared since the last call; returns their names."""
        new = [n for n in shard_names(self.dir) if n not in self.summaries and n not in self.errors]
        self.read(new)
        return new

    def _read_one(self, name: str) -> None:
        try:
            stat = os.stat(os.path.join(self.dir, name))  # not pathlib: this runs per shard
        except OSError as exc:
            self._fail(name, f"cannot stat ({exc.strerror or exc})")
            return
        summary = self.entry(name, stat)
        if summary is not None:
            self.from_catalog += 1
            self.summaries[name] = summary
            return
        known = (os.path.join(self.dir, name), stat.st_size, stat.st_mtime_ns)
        if known in _UNREADABLE:  # another reader in this process found it so (maybe slowly)
            self._fail(name, _UNREADABLE[known])
            return
        try:
            summary = isolated.call(summarize, self.dir / name)
        except ShardError as exc:
            _UNREADABLE[known] = str(exc)
            self._fail(name, str(exc))
            return
        self.from_shards += 1
        self.summaries[name] = summary
        if self.rewrite:
            try:
                write_entry(self.dir, name, summary, stat)
            except OSError as exc:  # a read-only store still opens, only slower
                log.debug("%s: cannot write its catalog entry (%s)", self.dir / name, exc)
                self.rewrite = False

    def _fail(self, name: str, reason: str) -> None:
        self.errors[name] = reason
        log.warning(
            "%s: unreadable shard skipped (%s); run `avindex check %s`",
            self.dir / name,
            reason,
            self.dir,
        )

    def entry(self, name: str, stat: os.stat_result) -> ShardSummary | None:
        """The summary in a shard's entry when the entry is valid for the file with `stat`."""
        try:
            data = json.loads(entry_path(self.dir, name).read_bytes())
            if (
                data["version"] != CATALOG_VERSION
                or data["shard"] != name
                or data["shard_size"] != stat.st_size
                or data["shard_mtime_ns"] != stat.st_mtime_ns
            ):
                return None
            table = VideoTable.from_columns(data["videos"])
            rows, audio_rows = int(data["rows"]), int(data["audio_rows"])
            if sum(table.n_clips) != rows or not 0 <= audio_rows <= rows:
                return None
            return ShardSummary(self._meta(str(data["meta"])), rows, audio_rows, table)
        except _ENTRY_ERRORS:
            return None

    def _meta(self, fingerprint: str) -> StoreMeta:
        """The meta of a fingerprint (read once); raises ValueError when its file does not match."""
        if fingerprint not in self._metas:
            if not _FINGERPRINT.fullmatch(fingerprint):  # it becomes part of a file name
                raise ValueError(f"catalog meta fingerprint {fingerprint!r} is not hex")
            attrs: dict[str, Any] = json.loads(_meta_path(self.dir, fingerprint).read_text())
            meta = StoreMeta.from_attrs(attrs)
            if meta.fingerprint() != fingerprint:
                raise ValueError(f"catalog meta {fingerprint} does not match its contents")
            self._metas[fingerprint] = meta
        return self._metas[fingerprint]
