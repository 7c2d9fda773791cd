"""Read untrusted shards in a child process, so a shard that crashes or hangs HDF5 becomes a
ShardError instead of a dead or stuck caller (damaged string attributes can make HDF5 loop
forever: the damaged-shard fuzz test found such files).

Only shards the catalog does not vouch for are read this way (written before the catalog, entry
lost, file changed), and `avindex check` reads every shard this way; catalogued shards never are.
One quiet worker (workers.Sandbox) per time limit serves the whole process; a shard that kills
or hangs it gets a fresh one.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from avindex.errors import AvindexError
from avindex.shard import ShardError, one_line
from avindex.workers import Failed, PoolLimits, Sandbox

READ_TIMEOUT_SECONDS = 60.0  # reading a healthy shard's summary takes milliseconds
CHILD_MEMORY_BYTES = 4 << 30  # a hostile header must not make the reader allocate the host away

_lock = threading.Lock()
_sandboxes: dict[tuple[int, float], Sandbox] = {}  # (owning pid, time limit) -> its reader


def _sandbox(timeout: float) -> Sandbox:
    """The reader for `timeout`, started on first use (again in a forked copy of the caller)."""
    key = (os.getpid(), timeout)
    with _lock:
        if key not in _sandboxes:
            limits = PoolLimits(timeout, CHILD_MEMORY_BYTES, quiet=True, role="shard reader")
            _sandboxes[key] = Sandbox(1, limits)
        return _sandboxes[key]


def call(fn: Callable[[Path], Any], path: Path, timeout: float | None = None) -> Any:
    """fn(path) run in the reader child (fn must be importable by module and name); raises
    ShardError when fn fails, or the child crashes or does not answer within `timeout` s
    (default READ_TIMEOUT_SECONDS); a user error of fn (AvindexError) is raised as it is."""
    event = _sandbox(READ_TIMEOUT_SECONDS if timeout is None else timeout).run(fn, Path(path))
    if not isinstance(event, Failed):
        return event.value
    if isinstance(event.error, ShardError | AvindexError):
        raise event.error
    if event.error is not None:  # whatever else a hostile file triggers is about that file
        raise ShardError(one_line(event.error))
    raise ShardError(event.reason)  # the reader crashed or stalled
