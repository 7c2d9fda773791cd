"""workers.py: jobs stream back in order; a crash, a hang, a memory blow-up or an exception in one
job fails that job only, and the pool goes on with fresh workers."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import defaultdict

import numpy as np
import pytest

from avindex.errors import AvindexError
from avindex.workers import (
    Done,
    Failed,
    Item,
    Job,
    PoolLimits,
    Sandbox,
    WorkerPool,
    _as_event,
    run_isolated,
)


def count_to(n: int):
    """A generator job: yields 0..n-1, returns n."""
    yield from range(n)
    return n


def crash(after: int):
    """Yields a little, then dies the way a native decoder bug does."""
    yield from range(after)
    os.kill(os.getpid(), signal.SIGSEGV)


def hang() -> None:
    time.sleep(3600)


def allocate(mib: int) -> int:
    return int(np.ones(mib << 18, np.float32).sum())  # mib MiB


def fail(message: str) -> None:
    raise AvindexError(message)


def finish_after(marker, seconds: float) -> None:
    """Works for `seconds`, then leaves `marker` behind (what an observer can see finished)."""
    time.sleep(seconds)
    marker.touch()


def warn_and_return(message: str) -> int:
    """Logs an avindex warning the way a decoder reports a damaged packet, then returns."""
    logging.getLogger("avindex.decode").warning("%s: skipped %d undecodable packets", message, 3)
    logging.getLogger("avindex.decode").info("not forwarded: below warning")
    return 7


def square(x: int) -> int:
    return x * x


class TwoPartError(Exception):
    """Pickles, but cannot be rebuilt: its __init__ takes two arguments and passes one on."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"{what}: {why}")


def fail_oddly() -> None:
    raise TwoPartError("frame 3", "bad slice")


def _collect(pool: WorkerPool) -> tuple[dict, dict]:
    items, ends = defaultdict(list), {}
    for event in pool.events():
        if isinstance(event, Item):
            assert event.key not in ends, "an item after its job ended"
            items[event.key].append(event.value)
        else:
            assert event.key not in ends, "two ends for one job"
            ends[event.key] = event
    return items, ends


def test_jobs_stream_in_order_and_a_crash_fails_only_its_job() -> None:
    jobs = [Job(("count", i), count_to, (i * 7,)) for i in range(6)]
    jobs.insert(2, Job("segv", crash, (3,)))
    jobs.insert(5, Job("error", fail, ("bad file: no video",)))
    jobs.append(Job("square", square, (12,)))
    with WorkerPool(jobs, workers=2) as pool:
        items, ends = _collect(pool)
    assert set(ends) == {j.key for j in jobs}
    for i in range(6):
        assert items[("count", i)] == list(range(i * 7))
        assert ends[("count", i)] == Done(("count", i), i * 7)
    assert isinstance(ends["segv"], Failed) and "SIGSEGV" in ends["segv"].reason
    error = ends["error"]
    assert isinstance(error, Failed) and error.reason == "bad file: no video"
    assert type(error.error) is AvindexError, "the job's own exception comes back"
    assert ends["segv"].error is None
    assert ends["square"] == Done("square", 144)


def test_a_stalled_worker_is_killed_and_replaced() -> None:
    jobs = [Job("hang", hang), Job("after", square, (3,))]
    with WorkerPool(jobs, workers=1, limits=PoolLimits(stall_seconds=4.0)) as pool:
        _, ends = _collect(pool)
    assert "stalled" in ends["hang"].reason and ends["after"] == Done("after", 9)


def test_memory_limit_fails_the_job_not_the_machine() -> None:
    limits = PoolLimits(memory_bytes=1 << 30)
    with pytest.raises(AvindexError, match="memory"):
        run_isolated(allocate, 4096, limits=limits)
    assert run_isolated(allocate, 16, limits=limits) == 16 << 18


def test_run_isolated_returns_or_raises_one_line() -> None:
    assert run_isolated(square, 5) == 25
    with pytest.raises(AvindexError, match="crashed"):
        run_isolated(crash, 0)


def test_jobs_are_pulled_lazily(tmp_path) -> None:
    """A job source is asked for the next job only when a worker is free (claims rely on it):
    when job i is asked for, at least i - workers jobs have finished."""
    workers, finished_when_asked = 2, []

    def source():
        for i in range(6):
            finished_when_asked.append(len(list(tmp_path.glob("done-*"))))
            yield Job(i, finish_after, (tmp_path / f"done-{i}", 0.3))

    with WorkerPool(source(), workers=workers) as pool:
        seen = [event.key for event in pool.events() if isinstance(event, Done)]
    assert sorted(seen) == list(range(6))
    # Asked for job i, a worker is idle: at most workers - 1 of the i jobs so far still run.
    assert all(done >= i - workers + 1 for i, done in enumerate(finished_when_asked))


def test_close_from_another_thread_ends_events_and_abandons_running_jobs() -> None:
    """A consumer thread waiting in events() returns once the pool is closed elsewhere, and
    close() does not wait for jobs still running (their workers are killed)."""
    pool = WorkerPool([Job(0, count_to, (3,)), Job(1, hang, ())], workers=2)
    seen: list = []
    consumer = threading.Thread(target=lambda: seen.extend(pool.events()), daemon=True)
    consumer.start()
    deadline = time.monotonic() + 30
    while not any(isinstance(e, Done) for e in seen) and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    pool.close()
    consumer.join(timeout=5)
    assert time.monotonic() - started < 3 and not consumer.is_alive()
    assert [e.key for e in seen if isinstance(e, Done)] == [0]


def test_an_exception_that_cannot_be_rebuilt_fails_its_call_only() -> None:
    with Sandbox(1) as sandbox:
        failed = sandbox.run(fail_oddly)
        assert isinstance(failed, Failed) and failed.error is None
        assert "TwoPartError: frame 3: bad slice" in failed.reason
        assert sandbox.call(square, 4) == 16  # the sandbox still serves


def test_sandbox_serves_calls_from_threads_and_survives_crashes() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from avindex.workers import Sandbox

    def one(i: int) -> object:
        try:
            return sandbox.call(crash if i % 4 == 0 else square, *((0,) if i % 4 == 0 else (i,)))
        except AvindexError as exc:
            return str(exc)

    with Sandbox(workers=2) as sandbox, ThreadPoolExecutor(4) as threads:
        results = list(threads.map(one, range(12)))
    for i, result in enumerate(results):
        assert result == ("decoder crashed (SIGSEGV)" if i % 4 == 0 else i * i)


def test_a_workers_warnings_are_logged_by_the_parent(caplog) -> None:
    """Warnings a job logs in its worker arrive on the parent's logger of the same name (the CLI
    prints them as warning lines), before the job's result; '%' in them is text, not a format."""
    with caplog.at_level(logging.INFO, logger="avindex"):
        assert run_isolated(warn_and_return, "/v/100%.mp4") == 7
    records = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert records == [
        ("avindex.decode", logging.WARNING, "/v/100%.mp4: skipped 3 undecodable packets")
    ]


def test_a_jobs_silence_is_timed_from_its_start_not_its_import() -> None:
    """Importing the job's module (1.2 s) and then its first item (1.2 s) each fit a 2 s stall
    limit; counted together they would not."""
    from slow_import_job import first_item_after

    assert run_isolated(first_item_after, 1.2, limits=PoolLimits(stall_seconds=2.0)) == 2


def test_a_message_of_an_unknown_kind_fails_its_job() -> None:
    """A worker of another avindex version (upgraded mid-run) sends what this one cannot read:
    that job fails with the reason instead of passing for a result."""
    event = _as_event("started-v9", 3, None, "decoder")
    assert isinstance(event, Failed) and event.key == 3
    assert event.reason == "decoder sent an unknown message 'started-v9'"
