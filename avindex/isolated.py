"""Read untrusted shards in a child process, so a shard that crashes or hangs HDF5 becomes a
ShardError instead of a dead or stuck caller (damaged string attributes can make HDF5 loop
forever: the damaged-shard fuzz test found such files).

Only shards the catalog does not vouch for are read this way (written before the catalog, entry
lost, file changed), and `avindex check` reads every shard this way; catalogued shards never are.
One child (`python -m avindex.isolated`, so the caller's main module is never re-run) serves the
whole process; it is started on first use and again after a shard killed or hung it. POSIX only
(pipes passed by descriptor, resource limits), like the rest of avindex.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import resource
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from avindex.errors import AvindexError
from avindex.shard import ShardError, one_line

READ_TIMEOUT_SECONDS = 60.0  # reading a healthy shard's summary takes milliseconds
CHILD_MEMORY_BYTES = 4 << 30  # a hostile header must not make the reader allocate the host away


class _Child:
    """The reader process and the two pipes to it."""

    def __init__(self) -> None:
        to_child, inbox = os.pipe()
        outbox, from_child = os.pipe()
        self.owner = os.getpid()  # a forked copy of the caller must start its own child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "avindex.isolated", str(to_child), str(from_child)],
            pass_fds=(to_child, from_child),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,  # HDF5 may print error stacks: errors come back as replies
        )
        os.close(to_child)
        os.close(from_child)
        self.requests = Connection(inbox, readable=False)
        self.replies = Connection(outbox, writable=False)
        self.requests.send(sys.path)  # so the child imports what the caller imports

    def stop(self) -> int | None:
        """Kill the child; returns its exit code."""
        self.requests.close()
        self.replies.close()
        with contextlib.suppress(OSError):
            self.proc.kill()
        return self.proc.wait()


_lock = threading.Lock()
_child: _Child | None = None


def call(fn: Callable[[Path], Any], path: Path, timeout: float | None = None) -> Any:
    """fn(path) run in the reader child (fn must be importable by module and name); raises
    ShardError when fn fails, or the child crashes or does not answer within `timeout` s
    (default READ_TIMEOUT_SECONDS)."""
    global _child
    timeout = READ_TIMEOUT_SECONDS if timeout is None else timeout
    with _lock:
        if _child is None or _child.owner != os.getpid():
            _child = _Child()
        child = _child
        try:
            child.requests.send((fn, str(path)))
            if not child.replies.poll(timeout):
                _child = None
                child.stop()
                raise ShardError(f"reading it did not finish within {timeout:g} s")
            kind, value = child.replies.recv()
        except (EOFError, OSError):
            _child = None
            code = child.stop()
            raise ShardError(f"reading it crashed the reader process (exit code {code})") from None
    if kind == "ok":
        return value
    raise ShardError(value) if kind == "shard" else AvindexError(value)


def _serve(inbox: Connection, outbox: Connection) -> None:
    """Child: answer (function, path) requests until the caller hangs up."""
    with contextlib.suppress(ValueError, OSError):  # a lower hard limit is already set
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_BYTES, CHILD_MEMORY_BYTES))
    sys.path[:0] = [p for p in inbox.recv() if p not in sys.path]
    while True:
        try:
            request = inbox.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            fn, path = pickle.loads(request)
            reply: tuple[str, Any] = ("ok", fn(Path(path)))
        except ShardError as exc:
            reply = ("shard", str(exc))
        except AvindexError as exc:
            reply = ("user", str(exc))
        except MemoryError:
            reply = ("shard", "reading it needs more memory than any shard may")
        except Exception as exc:  # whatever else a hostile file triggers is about that file
            reply = ("shard", one_line(exc))
        outbox.send(reply)


if __name__ == "__main__":
    _serve(
        Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False)
    )
