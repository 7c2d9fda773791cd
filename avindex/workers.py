"""Child processes for work on untrusted media: a crash, a hang or a memory blow-up while decoding
one file fails that file's job only, never the process that asked for it.

Each worker is a spawned process with its own pipe; jobs are module-level functions (pickled by
name) that return a value or yield items, streamed back as they come. A dispatcher thread hands
jobs to idle workers, forwards their messages into a bounded queue (so decoding runs ahead of the
consumer, up to a limit) and replaces a worker that died or stalled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import json
import logging
import os
import pickle
import queue
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from avindex.errors import AvindexError

_POLL = 0.2  # seconds between checks for stalled workers and a closed pool
_MAX_FAILED_STARTS = 3  # workers dying before they are ready: the machine, not a file, is at fault


@dataclass(frozen=True)
class Job:
    """One unit of work: `fn(*args)` in a worker (fn must be a module-level function)."""

    key: Hashable
    fn: Callable[..., Any]
    args: tuple = ()


@dataclass(frozen=True)
class Item:
    """A value a generator job yielded."""

    key: Hashable
    value: Any


@dataclass(frozen=True)
class Done:
    """A job finished: its return value (a generator's `return` value)."""

    key: Hashable
    value: Any


@dataclass(frozen=True)
class Failed:
    """A job failed: a one-line reason (its exception, or how its worker died), and the job's own
    exception when it raised a picklable one (None for crashes and stalls)."""

    key: Hashable
    reason: str
    error: BaseException | None = None

    def user_error(self) -> AvindexError:
        """What to raise for it: the job's own AvindexError as it was, else one with the reason."""
        return self.error if isinstance(self.error, AvindexError) else AvindexError(self.reason)


Event = Item | Done | Failed
# A job source may yield IDLE: no job just now, ask again shortly (the pool keeps serving the
# busy workers meanwhile). A source that ends (StopIteration) ends the pool once jobs finish.
IDLE = object()


@dataclass
class PoolLimits:
    """Bounds on a worker: silence before it counts as stalled, and its address space."""

    stall_seconds: float | None = 300.0
    memory_bytes: int | None = 8 << 30  # RLIMIT_AS: an allocation past it fails that job
    quiet: bool = False  # silence the worker's stdout/stderr (HDF5 prints error stacks)
    role: str = "decoder"  # what failure reasons call the worker ("decoder crashed (SIGSEGV)")


def _signal_name(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"{signal.Signals(-code).name}"
    return f"exit code {code}"


class _Outbox:
    """The worker's end of its socket, shared by the job loop and the log forwarder."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, message: tuple) -> None:
        with self._lock:  # a job's own threads may log while the loop sends an item
            self._conn.send(message)


class _ForwardLogs(logging.Handler):
    """Sends the worker's avindex warnings to the parent, which logs them as its own (so they
    reach the command's warning lines, once each, instead of a child's bare stderr)."""

    def __init__(self, outbox: _Outbox) -> None:
        super().__init__(logging.WARNING)
        self._outbox = outbox

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(OSError, ValueError):  # a parent gone: nobody to tell
            self._outbox.send(("log", record.name, (record.levelno, record.getMessage())))


def _worker_main(conn: Connection, limits: PoolLimits) -> None:
    """Worker process: run jobs from `conn` until it closes, streaming results back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if limits.memory_bytes:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
    outbox = _Outbox(conn)
    logger = logging.getLogger("avindex")
    logger.addHandler(_ForwardLogs(outbox))
    logger.propagate = False  # forwarded, not printed here as well
    outbox.send(("ready", None, None))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        key, fn, args = job
        try:
            # The job's module is imported now: its silence is timed from here, so the import
            # does not eat into the time allowed before its first item.
            outbox.send(("started", key, None))
            result = fn(*args)
            if inspect.isgenerator(result):
                while True:
                    try:
                        outbox.send(("item", key, next(result)))
                    except StopIteration as stop:
                        result = stop.value
                        break
            outbox.send(("done", key, result))
        except (EOFError, BrokenPipeError):
            return
        except AvindexError as exc:
            _send_failure(outbox, key, str(exc), exc)
        except MemoryError:
            _send_failure(outbox, key, "out of memory while decoding (limit reached)", None)
        except Exception as exc:  # whatever a file does, it fails that job only
            where = traceback.extract_tb(exc.__traceback__)[-1]
            text = f"{type(exc).__name__}: {exc}".splitlines()[0]
            where_text = f"{os.path.basename(where.filename)}:{where.lineno}"
            _send_failure(outbox, key, f"{text} (at {where_text})", exc)


def _send_failure(outbox: _Outbox, key: Hashable, reason: str, exc: BaseException | None) -> None:
    """Report a failed job, with its exception when that survives pickling both ways."""
    try:
        # Rebuilt here as the parent will: an exception whose __init__ takes other arguments than
        # it passes on pickles fine and fails to unpickle, which would end the parent's pool.
        pickle.loads(pickle.dumps(exc))
    except Exception:  # such an exception travels as its text only
        exc = None
    outbox.send(("failed", key, (reason, exc)))


def _as_event(kind: str, key: Hashable, value: Any, role: str) -> Event:
    """The consumer's event for a worker's message about a job."""
    if kind == "item":
        return Item(key, value)
    if kind == "done":
        return Done(key, value)
    if kind == "failed":
        return Failed(key, *value)
    # E.g. a worker started from another avindex version, installed while this one ran.
    return Failed(key, f"{role} sent an unknown message {kind!r}")


class _Process:
    """A worker interpreter, `python -m avindex.workers FD LIMITS`, talking over a socket.

    Not multiprocessing's spawn: its children re-import the parent's main script (a benchmark
    that imports torch made every decoder 270 MB) and cannot start from a script read on stdin.
    Not fork either: the parent may hold threads, CUDA and DALI state.
    """

    def __init__(self, limits: PoolLimits) -> None:
        parent, child = socket.socketpair()
        paths = [p for p in sys.path if p and os.path.exists(p)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        argv = [sys.executable, "-m", "avindex.workers", str(child.fileno())]
        argv.append(json.dumps(dataclasses.asdict(limits)))
        out = subprocess.DEVNULL if limits.quiet else None
        try:
            self.popen = subprocess.Popen(
                argv,
                pass_fds=[child.fileno()],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        except OSError:  # out of processes or descriptors: leave no socket behind
            parent.close()
            raise
        finally:
            child.close()
        self.conn = Connection(parent.detach())

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()

    @property
    def exitcode(self) -> int | None:
        return self.popen.returncode


@dataclass
class _Worker:
    process: Any
    conn: Connection
    job: Job | None = None
    last_heard: float = field(default_factory=time.monotonic)
    started: bool = False  # sent "ready": a death before that is a start-up failure


class WorkerPool:
    """Runs jobs in `workers` child processes; `events()` yields Item/Done/Failed as they come.

    Jobs are pulled lazily from `jobs` whenever a worker is idle, so a job source can decide at
    the last moment (e.g. claim a video). Per job, items arrive in order and end with exactly
    one Done or Failed.
    """

    def __init__(
        self,
        jobs: Iterable[Job],
        workers: int,
        limits: PoolLimits | None = None,
        buffer: int = 64,
    ) -> None:
        if workers < 1:
            raise AvindexError(f"--workers {workers}: must be at least 1")
        self._jobs = iter(jobs)
        self._limits = limits or PoolLimits()
        self._events: queue.Queue[Event | None] = queue.Queue(maxsize=max(1, buffer))
        self._closed = threading.Event()  # the consumer is gone: stop everything
        self._failed_starts = 0
        self._workers = [self._spawn() for _ in range(workers)]
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._dispatch, name="avindex-pool", daemon=True)
        self._thread.start()

    def _spawn(self) -> _Worker:
        process = _Process(self._limits)
        return _Worker(process, process.conn)

    def events(self) -> Iterator[Event]:
        """Events until every job is finished (blocks while workers are busy), or until close()."""
        while True:
            try:
                event = self._events.get(timeout=_POLL)
            except queue.Empty:
                if self._closed.is_set():  # closed from another thread: no end marker comes
                    return
                continue
            if event is None:
                if self._error is not None:
                    raise self._error
                return
            yield event

    def _put(self, event: Event | None) -> bool:
        """Hand an event to the consumer (waits while it is busy); False once it has closed."""
        while not self._closed.is_set():
            try:
                self._events.put(event, timeout=_POLL)
            except queue.Full:
                continue
            return True
        return False

    def _dispatch(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # surfaces in events() instead of vanishing with the thread
            self._error = exc
        finally:
            self._shutdown()
            self._put(None)  # the end marker, however full the queue is

    def _run(self) -> None:
        exhausted = False
        while not self._closed.is_set():
            for worker in self._workers:
                if worker.job is None and not exhausted:
                    job = next(self._jobs, None)
                    if job is None:
                        exhausted = True
                    if job is None or job is IDLE:
                        break
                    self._assign(worker, job)
            busy = [w for w in self._workers if w.job is not None]
            if exhausted and not busy:
                return
            ready = wait([w.conn for w in busy], _POLL)  # a dead worker's socket reads EOF
            for worker in busy:
                if worker.conn in ready:
                    self._receive(worker)
            self._check_stalls()

    def _assign(self, worker: _Worker, job: Job) -> None:
        """Send a job to an idle worker (replacing it first if it has died since its last job)."""
        if not worker.process.is_alive():
            worker.process.join()
            self._replace(worker, None)
        worker.job, worker.last_heard = job, time.monotonic()
        try:
            worker.conn.send((job.key, job.fn, job.args))
        except (OSError, ValueError) as exc:  # a dead pipe, or a job that cannot be pickled
            self._replace(worker, f"cannot start the job ({type(exc).__name__}: {exc})")

    def _receive(self, worker: _Worker) -> None:
        """Forward what one worker sent; a worker that died fails its job and is replaced."""
        try:
            while worker.conn.poll():
                kind, key, value = worker.conn.recv()
                if kind in ("ready", "started"):  # the job's silence is timed from its start
                    worker.started, self._failed_starts = True, 0
                    worker.last_heard = time.monotonic()
                    continue
                if kind == "log":  # `key` is the logger's name, `value` (level, message)
                    logging.getLogger(key).log(*value)
                    continue
                waited = time.monotonic()
                event = _as_event(kind, key, value, self._limits.role)
                if not self._put(event):
                    return
                if not isinstance(event, Item):
                    worker.job = None
                # Time spent waiting for the consumer is not the worker's silence.
                for other in self._workers:
                    other.last_heard += time.monotonic() - waited
                worker.last_heard = time.monotonic()
                if worker.job is None:
                    return
        except (EOFError, OSError, pickle.UnpicklingError):
            # The worker died (perhaps mid-message): wait for its exit status, fail its job.
            worker.process.join(5.0)
            worker.process.kill()
            worker.process.join()
            how = _signal_name(worker.process.exitcode)
            if not worker.started:
                self._failed_starts += 1
                if self._failed_starts >= _MAX_FAILED_STARTS:
                    raise AvindexError(
                        f"cannot start media worker processes ({how}); check that "
                        f"`{sys.executable} -m avindex.workers` can import avindex"
                    ) from None
            self._replace(worker, f"{self._limits.role} crashed ({how})")

    def _check_stalls(self) -> None:
        limit = self._limits.stall_seconds
        now = time.monotonic()
        for worker in self._workers:
            if limit and worker.job is not None and now - worker.last_heard > limit:
                worker.process.kill()
                worker.process.join()
                self._replace(worker, f"{self._limits.role} stalled (no progress for {limit:g} s)")

    def _replace(self, worker: _Worker, reason: str | None) -> None:
        """Start a fresh process in `worker`'s place; its job (if any) fails with `reason`."""
        job = worker.job
        worker.conn.close()
        fresh = self._spawn()
        worker.process, worker.conn, worker.job = fresh.process, fresh.conn, None
        if job is not None and reason is not None:
            self._put(Failed(job.key, reason))

    def _shutdown(self) -> None:
        for worker in self._workers:
            if self._closed.is_set() and worker.job is not None:
                worker.process.kill()  # an abandoned job: its worker would not read the stop
            with contextlib.suppress(OSError, BrokenPipeError):
                worker.conn.send(None)
        deadline = time.monotonic() + 5
        for worker in self._workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()

    def close(self) -> None:
        """Stop dispatching and end the workers (jobs still running are abandoned)."""
        self._closed.set()
        self._thread.join()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Sandbox:
    """A long-lived WorkerPool for one-shot calls from any thread (queries, uploads): each call
    runs in a child process, so a file that crashes or hangs its decoder fails that call only."""

    def __init__(self, workers: int = 1, limits: PoolLimits | None = None) -> None:
        self._submitted: queue.Queue[Job] = queue.Queue()
        self._waiting: dict[int, tuple[threading.Event, list]] = {}
        self._lock = threading.Lock()
        self._keys = itertools.count()
        self._closed = threading.Event()
        self._pool = WorkerPool(self._jobs(), workers, limits)
        self._router = threading.Thread(target=self._route, name="avindex-sandbox", daemon=True)
        self._router.start()

    def _jobs(self) -> Iterator[Job | object]:
        while not self._closed.is_set():
            try:
                yield self._submitted.get(timeout=_POLL / 4)
            except queue.Empty:
                yield IDLE

    def _route(self) -> None:
        try:
            for event in self._pool.events():
                if isinstance(event, Item):
                    continue  # calls return values; streamed items are not collected
                with self._lock:
                    done, box = self._waiting.pop(event.key)
                box.append(event)
                done.set()
        finally:  # the pool ended (closed, or broken): no caller may wait forever
            with self._lock:
                self._closed.set()
                waiting, self._waiting = self._waiting, {}
            for key, (done, box) in waiting.items():
                box.append(Failed(key, "the sandbox stopped before the call finished"))
                done.set()

    def run(self, fn: Callable[..., Any], *args: Any) -> Done | Failed:
        """`fn(*args)` in a worker: how it ended (its value, or why and with what it failed)."""
        key, done, box = next(self._keys), threading.Event(), []
        with self._lock:  # the router closes under the same lock: a call is failed or served
            if self._closed.is_set():
                raise AvindexError("internal: the sandbox is closed")
            self._waiting[key] = (done, box)
        self._submitted.put(Job(key, fn, args))
        done.wait()
        return box[0]

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in a worker: its return value; its own AvindexError is raised again, any
        other failure (a crash, a stall, a bug) as an AvindexError with the reason."""
        event = self.run(fn, *args)
        if isinstance(event, Failed):
            raise event.user_error()
        return event.value

    def close(self) -> None:
        """Stop the workers; calls still in progress fail."""
        self._closed.set()
        self._pool.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_isolated(fn: Callable[..., Any], *args: Any, limits: PoolLimits | None = None) -> Any:
    """`fn(*args)` in a child process: its return value, or AvindexError with the reason it failed
    (its own error, or the crash / stall / memory limit that ended it)."""
    with WorkerPool([Job(0, fn, args)], 1, limits) as pool:
        for event in pool.events():
            if isinstance(event, Failed):
                raise event.user_error()
            if isinstance(event, Done):
                return event.value
    raise AvindexError("internal: the isolated job ended without a result")  # pragma: no cover


__all__ = [
    "IDLE",
    "Done",
    "Event",
    "Failed",
    "Item",
    "Job",
    "PoolLimits",
    "Sandbox",
    "WorkerPool",
    "run_isolated",
]


if __name__ == "__main__":
    _worker_main(Connection(int(sys.argv[1])), PoolLimits(**json.loads(sys.argv[2])))
