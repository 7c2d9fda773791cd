"""Catalog: entries equal a full read of their shards, stale or missing entries fall back to the
shard and are rewritten, and a crash between entry and shard leaves a consistent store."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from storefactory import corpus, fake_video, make_meta, verified

from avindex import catalog as catalog_module
from avindex import durable
from avindex import store as store_module
from avindex.catalog import CATALOG_DIR, Catalog, entry_path, shard_names
from avindex.check import check_store
from avindex.claims import WorkQueue
from avindex.errors import AvindexError
from avindex.store import Store, StoreWriter, clear_tmp

WORKER = Path(__file__).parent / "store_worker.py"


def write_store(path: Path, videos: int = 16, shard_clips: int = 8) -> None:
    """Several shards of made-up videos, every fourth a failure."""
    with StoreWriter(path, make_meta(), shard_clips=shard_clips) as writer:
        for i in range(videos):
            video = fake_video(i, 1 + i % 5)
            if i % 4 == 3:
                writer.add_failure(video[0], f"broken file {i}")
            else:
                writer.add_video(*video)


def test_entries_equal_a_full_read_of_every_shard(tmp_path: Path, monkeypatch) -> None:
    write_store(tmp_path)
    names = shard_names(tmp_path)
    assert len(names) >= 3
    catalog = Catalog(tmp_path)
    catalog.read(names)
    assert (catalog.from_catalog, catalog.from_shards) == (len(names), 0)
    for name in names:
        assert catalog.summaries[name] == verified(tmp_path / name)

    # Opening the store, its counts and its videos table come from the catalog: no shard opened.
    full = Store(tmp_path)
    expected = (full.num_clips, full.count("audio"), full.videos())
    assert full.count("audio") == sum(catalog.summaries[n].audio_rows for n in names)
    assert full.count("audio") == sum(len(ids) for ids, _ in full.iter_blocks("audio"))

    def no_shard_reads(path):
        raise AssertionError(f"opened {path}")

    monkeypatch.setattr(catalog_module, "summarize", no_shard_reads)
    monkeypatch.setattr(store_module.h5py, "File", no_shard_reads)
    store = Store(tmp_path)
    assert (store.num_clips, store.count("audio"), store.videos()) == expected


def test_shard_without_entry_is_read_and_its_entry_rewritten(tmp_path: Path) -> None:
    write_store(tmp_path)
    names = shard_names(tmp_path)
    for name in names[:2]:  # as a store written before the catalog existed
        entry_path(tmp_path, name).unlink()
    entry = entry_path(tmp_path, names[2])
    entry.write_text("{not json")  # damaged
    os.utime(tmp_path / names[3], ns=(1, 1))  # shard replaced: size/mtime no longer match
    catalog = Catalog(tmp_path)
    catalog.refresh()
    assert (catalog.from_catalog, catalog.from_shards) == (len(names) - 4, 4)
    again = Catalog(tmp_path)
    again.refresh()
    assert (again.from_catalog, again.from_shards) == (len(names), 0)
    assert again.summaries == catalog.summaries


def test_entry_without_its_shard_is_ignored(tmp_path: Path) -> None:
    write_store(tmp_path)
    before = Store(tmp_path).videos()
    name = shard_names(tmp_path)[0]
    (tmp_path / name).rename(tmp_path / "elsewhere.h5")
    assert entry_path(tmp_path, name).exists()
    store = Store(tmp_path)
    assert store.warnings == []
    assert set(store.videos()) < set(before)
    assert name not in store.shard_names


def test_crash_between_entry_and_rename_leaves_the_video_pending(tmp_path: Path, monkeypatch):
    """The rename after the entry fails: no shard, no tmp, an orphan entry readers ignore."""
    (record, *rows) = fake_video(0, 4)
    real_replace = os.replace

    def crash_on_shard(src, dst):
        if str(dst).endswith(".h5"):
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(durable.os, "replace", crash_on_shard)
    writer = StoreWriter(tmp_path, make_meta())
    writer.add_video(record, *rows)
    with pytest.raises(AvindexError, match="cannot write a shard"):
        writer.flush()
    monkeypatch.undo()
    entries = list((tmp_path / CATALOG_DIR).glob("shard-*.json"))
    assert len(entries) == 1 and shard_names(tmp_path) == []
    assert not list(tmp_path.rglob("*.tmp"))
    assert Store(tmp_path).num_clips == 0
    with WorkQueue(tmp_path, [record]) as work:
        assert work.next() == record
    report = check_store(tmp_path, repair=True)
    assert report.clean and any("missing shard" in f.what for f in report.findings)
    assert not entries[0].exists()


def test_entry_write_failure_keeps_the_shard(tmp_path: Path, monkeypatch, caplog) -> None:
    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module, "write_entry", fail)
    with (
        caplog.at_level(logging.WARNING, "avindex.store"),
        StoreWriter(tmp_path, make_meta()) as writer,
    ):
        writer.add_video(*fake_video(0, 3))
    assert "cannot write the catalog entry" in caplog.text
    monkeypatch.undo()
    catalog = Catalog(tmp_path)
    catalog.refresh()
    assert catalog.from_shards == 1 and len(catalog.summaries) == 1
    assert entry_path(tmp_path, shard_names(tmp_path)[0]).exists()


def _worker(store: Path, mode: str, videos: int = 1) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(WORKER), str(store), str(videos), mode]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_sigkill_after_the_entry_before_the_rename(tmp_path: Path) -> None:
    proc = _worker(tmp_path, "crash-after-entry")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(list((tmp_path / CATALOG_DIR).glob("shard-*.json"))) == 1
    (tmp,) = tmp_path.glob("shard-*.tmp")  # the half-renamed shard of the dead writer
    store = Store(tmp_path)
    assert store.num_clips == 0 and store.warnings == []
    assert clear_tmp(tmp_path) == [tmp.name]
    with WorkQueue(tmp_path, corpus(1)) as work:
        assert work.skipped == 0 and work.next() == corpus(1)[0]


def test_sigkill_after_the_shard_before_its_claims_say_done(tmp_path: Path) -> None:
    proc = _worker(tmp_path, "crash-after-flush")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    claims = list((tmp_path / "claims").glob("*.claim"))
    assert len(claims) == 1 and json.loads(claims[0].read_text())["state"] == "held"
    with WorkQueue(tmp_path, corpus(1)) as work:
        assert work.skipped == 1 and work.next() is None
