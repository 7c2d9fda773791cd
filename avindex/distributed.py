"""Process setup for training: torchrun/DDP ranks, stop agreement, RNG state, CPU threads."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from avindex.devices import resolve_device


@dataclass
class Dist:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    initialised: bool = False  # we called init_process_group (and must destroy it)

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, logs and runs validation."""
        return self.rank == 0


def setup_dist(device: str) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    resolved = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if resolved == "cuda":
        torch.cuda.set_device(local)
        resolved = f"cuda:{local}"
    dist = Dist(rank, world, local, resolved)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if resolved.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
        dist.initialised = True
    return dist


def capture_rng() -> dict[str, Any]:
    """Global RNG states (python, numpy, torch, CUDA) in a form torch.load(weights_only) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any] | None) -> None:
    """Undo capture_rng (missing parts are left alone)."""
    if not state:
        return
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_threads(processes: int, decode_workers: int) -> int:
    """CPU threads for the model: this process's share of the cores minus the decoders' (at least
    one). On 2 busy cores, two model threads took twice the CPU time per step of one (OpenMP
    threads spin against the decode and DALI threads). An explicit OMP_NUM_THREADS wins."""
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // processes - decode_workers)


def agree_stop(stop: bool, dist: Dist) -> bool:
    """Every rank stops at the same step: any rank's reason to stop stops them all."""
    if dist.world == 1:
        return stop
    flag = torch.tensor([1.0 if stop else 0.0], device=dist.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def share_from_main(value: float, dist: Dist) -> float:
    """Rank 0's value on every rank (validation runs on rank 0 alone; every rank must then take
    the same decisions from it)."""
    if dist.world == 1:
        return value
    shared = torch.tensor([value], dtype=torch.float64, device=dist.device)
    torch.distributed.broadcast(shared, src=0)
    return float(shared.item())
