"""The isolated shard reader: answers from a child process, survives shards that crash or hang
it, and is what keeps a damaged shard from stopping a command."""

from __future__ import annotations

from pathlib import Path

import pytest
from storefactory import crash, fake_video, hang, make_meta, slow_steps, verified

from avindex import isolated
from avindex import shard as shard_module
from avindex.shard import ShardError, summarize, verify_reading
from avindex.store import StoreWriter


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    with StoreWriter(tmp_path, make_meta()) as writer:
        writer.add_video(*fake_video(0, 3))
    (path,) = tmp_path.glob("shard-*.h5")
    return path


def test_answers_equal_reading_in_process(shard: Path) -> None:
    assert isolated.call(summarize, shard) == summarize(shard)
    assert isolated.call(verify_reading, shard) == verified(shard)


def test_a_shard_that_hangs_or_crashes_the_reader_is_one_shard_error(shard: Path) -> None:
    with pytest.raises(ShardError, match="shard reader stalled"):
        isolated.call(hang, shard, timeout=1.0)
    assert isolated.call(summarize, shard).rows == 3  # a new child took over
    with pytest.raises(ShardError, match=r"shard reader crashed \(SIGSEGV\)"):
        isolated.call(crash, shard)
    assert isolated.call(summarize, shard).rows == 3


def test_the_stall_limit_is_per_block_read_not_per_shard(shard: Path, monkeypatch) -> None:
    """A read that reports each block is never stalled while blocks keep coming, however long
    it takes in all; verify_reading (what `check` runs) reports each block."""
    assert isolated.call(slow_steps, shard, timeout=2.0) == "read"  # 4 s in all, 0.5 s gaps
    monkeypatch.setattr(shard_module, "VERIFY_ROWS", 2)
    steps = list(verify_reading(shard))  # 3 rows: blocks of 2 and 1, for each row dataset
    assert steps == [2, 3] * (len(steps) // 2) and len(steps) >= 6


def test_errors_of_the_function_come_back_as_shard_errors(tmp_path: Path) -> None:
    (tmp_path / "shard-x.h5").write_bytes(b"not hdf5")
    with pytest.raises(ShardError, match="file signature not found"):
        isolated.call(summarize, tmp_path / "shard-x.h5")
