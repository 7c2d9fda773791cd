"""Damaged shards through Store, WorkQueue and `avindex check` (exit codes, one-line messages,
--repair moves and never deletes), and check's view of tmp files and claims."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_cli
from storefactory import fake_video, make_meta

from avindex import check as check_module
from avindex.catalog import entry_path, shard_names
from avindex.claims import ClaimDir, WorkQueue
from avindex.config import ClaimConfig
from avindex.durable import WriterId
from avindex.errors import AvindexError
from avindex.shard import verify_reading
from avindex.store import Store, StoreWriter

DAMAGES = ["truncated", "empty", "random-bytes", "videos-path", "ids-outside-table"]


def write_store(path: Path, shards: int = 3, per_shard: int = 2) -> list:
    """`shards` shards of `per_shard` videos (4 clips each); returns the records per shard."""
    records = []
    for s in range(shards):
        with StoreWriter(path, make_meta()) as writer:
            videos = [fake_video(s * per_shard + j, 4) for j in range(per_shard)]
            for video in videos:
                writer.add_video(*video)
        records.append([v[0] for v in videos])
    return records


def damage(path: Path, how: str) -> None:
    """Damage a shard file the way `how` says (the file keeps its name)."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif how == "videos-path":  # the header opens; the strings of videos/path are garbage
        with h5py.File(path, "r") as h5:
            offset = h5["videos/path"].id.get_offset()
            size = h5["videos/path"].id.get_storage_size()
        path.write_bytes(data[:offset] + b"\xff" * size + data[offset + size :])
    elif how == "ids-outside-table":  # readable HDF5 that breaks the shard's own rules
        with h5py.File(path, "r+") as h5:
            h5["video"][0] = 99


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_shard_is_skipped_reported_and_quarantined(tmp_path, capsys, monkeypatch, how):
    records = write_store(tmp_path)
    bad = tmp_path / shard_names(tmp_path)[1]
    damage(bad, how)
    original = bad.read_bytes()

    store = Store(tmp_path)  # opens, reads and maps without a traceback
    assert len(store.warnings) == 1 and bad.name in store.warnings[0]
    assert store.num_clips == 16
    assert sum(len(ids) for ids, _ in store.iter_blocks("visual")) == 16
    assert {c.path for c in store.clips(range(16))} == {r.path for r in records[0] + records[2]}
    with WorkQueue(tmp_path, [r for rs in records for r in rs]) as work:
        assert work.skipped == 4 and {work.next(), work.next()} == set(records[1])

    code, out, err = run_cli(["check", tmp_path], capsys, monkeypatch)
    assert code == 1, out + err
    (line,) = [x for x in out.splitlines() if x.startswith("problem:")]
    assert bad.name in line and "unreadable" in line
    assert out.splitlines()[-1].endswith("1 problems remain")

    code, out, _ = run_cli(["check", tmp_path, "--repair"], capsys, monkeypatch)
    assert code == 0 and "moved to quarantine/" in out
    moved = tmp_path / "quarantine" / bad.name
    assert moved.read_bytes() == original and not bad.exists()  # moved, never deleted
    assert "unreadable" in (tmp_path / "quarantine" / f"{bad.name}.reason.txt").read_text()
    assert not entry_path(tmp_path, bad.name).exists()
    assert Store(tmp_path).warnings == []
    assert run_cli(["check", tmp_path], capsys, monkeypatch)[0] == 0
    with WorkQueue(tmp_path, [r for rs in records for r in rs]) as work:
        assert {work.next(), work.next()} == set(records[1])  # embedded again by the next run


def test_a_shard_damaged_after_cataloguing_fails_reads_in_one_line(tmp_path, capsys, monkeypatch):
    write_store(tmp_path, shards=2)
    bad = tmp_path / shard_names(tmp_path)[0]
    stat = bad.stat()
    data = bytearray(bad.read_bytes())
    data[800:-1200] = b"\xff" * (len(data) - 2000)
    bad.write_bytes(bytes(data))
    os.utime(bad, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # size and mtime as catalogued

    store = Store(tmp_path)
    for read in (
        lambda: list(store.iter_blocks("visual")),
        lambda: store.vectors([0], "audio"),
        lambda: store.clips([1]),
    ):
        with pytest.raises(AvindexError, match=f"{bad.name}: cannot read the shard.*avindex check"):
            read()
    assert run_cli(["check", tmp_path], capsys, monkeypatch)[0] == 1  # reads every row
    assert run_cli(["check", tmp_path, "--repair"], capsys, monkeypatch)[0] == 0
    assert (tmp_path / "quarantine" / bad.name).exists()


def test_an_indexed_shard_that_became_unreadable_is_one_error(tmp_path: Path) -> None:
    write_store(tmp_path, shards=2)
    order = shard_names(tmp_path)
    damage(tmp_path / order[0], "truncated")
    with pytest.raises(AvindexError, match=r"indexed shard is unreadable.*avindex check"):
        Store(tmp_path, shard_order=order)


def test_commands_print_each_unreadable_shard_once(tmp_path, capsys, monkeypatch) -> None:
    write_store(tmp_path)
    bad = shard_names(tmp_path)[2]
    damage(tmp_path / bad, "empty")
    code, _, err = run_cli(["index", tmp_path, "--modality", "visual"], capsys, monkeypatch)
    assert code == 0, err
    warnings = [x for x in err.splitlines() if x.startswith("avindex: warning:")]
    assert len(warnings) == 1 and bad in warnings[0] and "avindex check" in warnings[0]


def test_a_shard_of_another_model_is_quarantined_the_majority_kept(tmp_path, capsys, monkeypatch):
    write_store(tmp_path, shards=2)
    other = tmp_path / "other"
    with StoreWriter(other, make_meta("another-model")) as writer:
        writer.add_video(*fake_video(50, 3))
    (foreign,) = shard_names(other)
    os.replace(other / foreign, tmp_path / foreign)
    with pytest.raises(AvindexError, match="does not match the rest"):
        Store(tmp_path)
    code, out, _ = run_cli(["check", tmp_path], capsys, monkeypatch)
    assert code == 1 and f"problem: {foreign}: embedded with another model" in out
    assert run_cli(["check", tmp_path, "--repair"], capsys, monkeypatch)[0] == 0
    assert Store(tmp_path).num_clips == 16


def test_missing_catalog_entries_are_reported_and_rewritten(tmp_path, capsys, monkeypatch) -> None:
    write_store(tmp_path)
    name = shard_names(tmp_path)[0]
    entry_path(tmp_path, name).unlink()
    code, out, _ = run_cli(["check", tmp_path, "--json"], capsys, monkeypatch)
    report = json.loads(out)
    assert code == 1 and not report["clean"] and report["shards"] == report["good"] == 3
    (finding,) = report["findings"]
    assert name in finding["what"] and finding["problem"] and not finding["repaired"]
    assert run_cli(["check", tmp_path, "--repair"], capsys, monkeypatch)[0] == 0
    assert entry_path(tmp_path, name).exists()


def test_check_clears_only_what_dead_writers_left(tmp_path, capsys, monkeypatch) -> None:
    write_store(tmp_path, shards=1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = WriterId.current()
    gone = WriterId(me.host, dead.pid, 1)
    dead_tmp = tmp_path / f"shard-1.h5.{gone.tag}-00000000.tmp"
    live_tmp = tmp_path / f"shard-2.h5.{me.tag}-00000001.tmp"
    dead_tmp.write_bytes(b"half a shard")
    live_tmp.write_bytes(b"being written")
    cfg = ClaimConfig(ttl=5.0, heartbeat=0.1)
    stale = ClaimDir(tmp_path, cfg, uid="a" * 32)
    stale.me = gone
    stale.beat()
    stale_claim = stale.path(fake_video(7, 1)[0].key)
    stale.create(stale_claim, "held", fake_video(7, 1)[0].key)
    with WorkQueue(tmp_path, [fake_video(8, 1)[0]], cfg=cfg) as live:
        assert live.next() is not None  # a live claim, which check must leave alone
        code, out, _ = run_cli(["check", tmp_path], capsys, monkeypatch)
        assert code == 1
        assert f"problem: {dead_tmp.name}: tmp file left by a dead writer" in out
        assert f"note: {live_tmp.name}: being written by a live writer" in out
        assert "problem: claims/: 1 claims of dead writers" in out
        assert "note: claims/: 1 videos claimed by live writers" in out
        code, out, _ = run_cli(["check", tmp_path, "--repair"], capsys, monkeypatch)
        assert code == 0, out
        assert not dead_tmp.exists() and live_tmp.exists() and not stale_claim.exists()
        assert ClaimDir(tmp_path, cfg).sweep(remove=False).get("held") is not None
    live_tmp.unlink()
    assert run_cli(["check", tmp_path], capsys, monkeypatch)[0] == 0


def test_check_of_a_missing_store_is_a_one_line_error(tmp_path, capsys, monkeypatch) -> None:
    code, out, err = run_cli(["check", tmp_path / "nope"], capsys, monkeypatch)
    assert code == 2 and out == "" and err.count("\n") == 1 and "no such store" in err


def test_a_clean_store_checks_clean(tmp_path, capsys, monkeypatch) -> None:
    """Every shard is read whole in the isolated reader, block by block (so its stall limit is
    per block, and a big shard on a slow disk is not taken for one that hangs HDF5)."""
    write_store(tmp_path)
    read_with = []
    call = check_module.isolated.call
    monkeypatch.setattr(
        check_module.isolated, "call", lambda fn, path: (read_with.append(fn), call(fn, path))[1]
    )
    code, out, _ = run_cli(["check", tmp_path], capsys, monkeypatch)
    assert code == 0 and out.splitlines() == [f"{tmp_path}: 3 shards, 3 good; clean"]
    assert read_with == [verify_reading] * 3
