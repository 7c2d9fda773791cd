"""Timing helpers: best-of-N rates (shared machines are noisy) and a description of the machine."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any

import av
import numpy as np
import torch


def sync(device: str) -> None:
    """Wait for queued CUDA work, so host clocks time finished work."""
    if device == "cuda":
        torch.cuda.synchronize()


def best_rate(run: Callable[[], float], repeats: int) -> tuple[float, float]:
    """Call `run` (returns units done) `repeats` times: the best units/s and that run's seconds.

    The best of several runs is the rate the code reaches when nothing else steals the CPU.
    """
    best, best_s = 0.0, 0.0
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        units = run()
        seconds = time.perf_counter() - started
        if seconds > 0 and units / seconds > best:
            best, best_s = units / seconds, seconds
    return best, best_s


def sustained_rate(
    step: Callable[[], int], min_seconds: float, repeats: int, device: str = "cpu"
) -> float:
    """Best over `repeats` of units/s while calling `step` (returns units) for >= min_seconds.

    One untimed call first keeps one-off costs (allocation, kernel selection) out of the rate.
    """
    step()
    sync(device)

    def run() -> float:
        units, started = 0, time.perf_counter()
        while time.perf_counter() - started < min_seconds:
            units += step()
        sync(device)
        return units

    return best_rate(run, repeats)[0]


def paired_rates(
    a: Callable[[], int], b: Callable[[], int], min_seconds: float, rounds: int
) -> tuple[float, float]:
    """Best units/s of `a` and of `b` (each returns units), run in alternating bursts of at
    least min_seconds / rounds, so load that comes and goes hits both alike."""
    best = [0.0, 0.0]
    a()
    b()
    for _ in range(max(1, rounds)):
        for i, step in enumerate((a, b)):
            units, started = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - started) < min_seconds / rounds:
                units += step()
            best[i] = max(best[i], units / elapsed)
    return best[0], best[1]


def _cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine(device: str) -> dict[str, Any]:
    """CPU, GPU, load and library versions: what a reader needs to compare numbers across runs."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "device": device,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "av": av.__version__,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    for name, module in (("dali", "nvidia.dali"), ("faiss", "faiss")):
        try:
            info[name] = __import__(module, fromlist=["__version__"]).__version__
        except Exception:  # a missing or broken optional library is reported, not fatal
            info[name] = None
    return info
