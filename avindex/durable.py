"""Crash-safe file writes (tmp + fsync + rename + folder fsync) and the writer named by their tmps.

A tmp file is named `<final name>.<host>-<pid>-<start>-<random>.tmp`, so anyone can tell whether
the process that wrote it still runs: on this host (same boot, same pid namespace) a pid that is
gone, or that now belongs to a process started at another time, is a dead writer.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

TMP_SUFFIX = ".tmp"
STALE_TMP_SECONDS = 3600.0  # a tmp older than this belongs to a dead writer whatever its name says
_TMP_TAG = re.compile(r"\.([A-Za-z0-9_]+)-(\d+)-(\d+)-[0-9a-f]+\.tmp$")


def host_tag() -> str:
    """This host's name, reduced to [A-Za-z0-9_] so file names split cleanly into their parts."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def _read_text(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _host_incarnation() -> str:
    """Host name plus a digest of its boot id and pid namespace: pids only mean something inside
    one incarnation (a reboot, or a container with the same host name, is another one)."""
    boot = _read_text("/proc/sys/kernel/random/boot_id")
    try:
        pidns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pidns = ""
    return f"{host_tag()}_{hashlib.sha1(f'{boot}/{pidns}'.encode()).hexdigest()[:8]}"


def process_start(pid: int) -> int:
    """Start time of a process in clock ticks since boot (0 when /proc cannot tell)."""
    stat = _read_text(f"/proc/{pid}/stat")
    try:  # the command name (field 2) may hold spaces and ')': fields count from the last ')'
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return 0


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # another user's process (or an absurd pid, which is never ours)
    return True


@dataclass(frozen=True)
class WriterId:
    """Who wrote a file: host incarnation, pid and the pid's start time (pid reuse safe)."""

    host: str
    pid: int
    start: int

    @classmethod
    def current(cls) -> WriterId:
        """The identity of this process."""
        return cls(_HOST, os.getpid(), process_start(os.getpid()))

    @property
    def tag(self) -> str:
        """`host-pid-start`, the form used in file names."""
        return f"{self.host}-{self.pid}-{self.start}"

    def dead_here(self) -> bool:
        """True only for a process of this host incarnation that no longer runs (or whose pid now
        belongs to a process started at another time); writers elsewhere are never judged here."""
        if self.host != _HOST:
            return False
        if not _pid_running(self.pid):
            return True
        start = process_start(self.pid)
        return bool(start and self.start and start != self.start)


_HOST = _host_incarnation()


def tmp_path(final: Path) -> Path:
    """A tmp name beside `final` that no other writer uses and that names this writer."""
    return final.with_name(f"{final.name}.{WriterId.current().tag}-{uuid.uuid4().hex[:8]}.tmp")


def tmp_writer(name: str) -> WriterId | None:
    """The writer named in a tmp file name (None for a name this module did not make)."""
    match = _TMP_TAG.search(name)
    return WriterId(match[1], int(match[2]), int(match[3])) if match else None


def stale_tmp(path: Path, max_age: float = STALE_TMP_SECONDS) -> bool:
    """Whether a tmp file belongs to a dead writer: named by a dead process of this host, or older
    than `max_age` seconds (writers elsewhere cannot be asked)."""
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return False
    writer = tmp_writer(path.name)
    return age > max_age or (writer is not None and writer.dead_here())


def fsync_path(path: Path) -> None:
    """Flush a file or folder to disk so a rename after it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def durable_tmp(final: Path) -> Iterator[Path]:
    """Yield a tmp path beside `final`; when the block succeeds the tmp is fsynced and renamed to
    `final` and the folder fsynced, when it fails the tmp is removed and the error propagates."""
    tmp = tmp_path(final)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(final.parent)


def write_durably(final: Path, write: Callable[[Path], None]) -> None:
    """Write `final` all at once or not at all: `write(tmp)`, then fsync and rename (folder too)."""
    with durable_tmp(final) as tmp:
        write(tmp)


def write_text_durably(final: Path, text: str) -> None:
    """A small text file written all at once or not at all."""
    write_durably(final, lambda tmp: tmp.write_text(text))
