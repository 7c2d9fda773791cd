"""Writers killed at random for the multi-writer tests: SIGKILL at seeded moments, then restart."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections.abc import Callable


def kill_and_restart(
    procs: list[subprocess.Popen],
    start: Callable[[], subprocess.Popen],
    rounds: int,
    rng: random.Random,
    pause: tuple[float, float],
) -> int:
    """`rounds` times: wait a random pause, SIGKILL a random writer if it still runs, start a new
    one in its place (`procs` is updated); returns how many were killed while running."""
    kills = 0
    for _ in range(rounds):
        time.sleep(rng.uniform(*pause))
        victim = rng.randrange(len(procs))
        if procs[victim].poll() is None:
            procs[victim].send_signal(signal.SIGKILL)
            kills += 1
        procs[victim].wait()
        procs[victim] = start()
    return kills
