"""distributed.py: RNG capture/restore, CPU thread shares, and the rank agreements (2 gloo
processes)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as td
import torch.multiprocessing as mp

from avindex.distributed import (
    Dist,
    agree_stop,
    capture_rng,
    model_threads,
    restore_rng,
    setup_dist,
    share_from_main,
)


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    """What capture_rng returns survives torch.save/torch.load(weights_only) and restores every
    generator, so a resumed run draws what the uninterrupted one would have."""
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _draws()
    torch.save(capture_rng(), tmp_path / "rng.pt")
    expected = _draws()
    _draws()
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected
    restore_rng(None)  # nothing saved: nothing changes


def test_model_threads_share_the_cores(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    assert model_threads(processes=1, decode_workers=2) == 14
    assert model_threads(processes=4, decode_workers=2) == 2
    assert model_threads(processes=16, decode_workers=2) == 1, "never below one"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert model_threads(processes=1, decode_workers=2) == 3, "an explicit setting wins"


def test_single_process_needs_no_group(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist = setup_dist("cpu")
    assert (dist.rank, dist.world, dist.main, dist.initialised) == (0, 1, True, False)
    assert agree_stop(True, dist) and not agree_stop(False, dist)
    assert share_from_main(0.25, dist) == 0.25


def _rank(rank: int, init: str, out: dict) -> None:
    td.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        dist = Dist(rank=rank, world=2, device="cpu", initialised=True)
        out[rank] = {
            "one_stops": agree_stop(rank == 1, dist),
            "none_stops": agree_stop(False, dist),
            "shared": share_from_main(0.5 if rank == 0 else float("nan"), dist),
        }
    finally:
        td.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_agree_on_stopping_and_take_rank_zeros_value(tmp_path: Path) -> None:
    """Any rank's reason to stop stops both; the validation criterion (rank 0 only) reaches
    rank 1, so both ranks take the same early-stopping decisions."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(f"file://{tmp_path / 'pg'}", out), nprocs=2, join=True)
        results = dict(out)
    for rank in (0, 1):
        assert results[rank] == {"one_stops": True, "none_stops": False, "shared": 0.5}
