"""Sharded HDF5 store: round trip, id mapping, crash safety, concurrent writers, model checks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from storefactory import fake_video, make_meta

from avindex import store as store_module
from avindex.config import IndexConfig
from avindex.durable import WriterId
from avindex.errors import AvindexError
from avindex.index import build_index, load_index, search_vectors
from avindex.shard import ShardError, summarize
from avindex.store import (
    ClipRef,
    Store,
    StoreMeta,
    StoreWriter,
    VideoRecord,
    clear_tmp,
)


def test_round_trip_and_id_mapping(tmp_path: Path) -> None:
    videos = [fake_video(i, n) for i, n in enumerate([5, 0, 7, 3, 11])]
    with StoreWriter(tmp_path, make_meta(), shard_clips=10) as writer:
        for i, video in enumerate(videos):
            if i == 1:
                writer.add_failure(video[0], "shorter than one clip")
            else:
                writer.add_video(*video)
    store = Store(tmp_path)
    assert store.meta == make_meta()
    assert len(store.shards) >= 2  # shard_clips=10 forced more than one shard
    ok = [v for i, v in enumerate(videos) if i != 1]
    assert store.num_clips == sum(len(v[4]) for v in ok)

    # Ids follow shard order, shards follow writing order: concatenation is the write order.
    all_visual = np.concatenate([v[1] for v in ok])
    ids, vecs = map(np.concatenate, zip(*store.iter_blocks("visual", block_rows=4), strict=True))
    np.testing.assert_array_equal(ids, np.arange(store.num_clips))
    # float16 storage: relative error <= 2^-11 per value.
    np.testing.assert_allclose(vecs, all_visual, rtol=1e-3, atol=1e-3)

    expected_refs = [(v[0].path, float(t)) for v in ok for t in v[4]]
    refs = store.clips(np.arange(store.num_clips))
    assert [(r.path, r.t0) for r in refs] == expected_refs
    assert isinstance(store.clip(3), ClipRef)
    assert store.clip(3).path == expected_refs[3][0]

    pick = np.array([7, 2, 7, 20])
    np.testing.assert_allclose(
        store.vectors(pick, "audio"), np.concatenate([v[2] for v in ok])[pick], rtol=1e-3, atol=1e-3
    )

    table = store.videos()
    assert len(table) == 5
    failed = table[videos[1][0].key]
    assert (failed.status, failed.error, failed.n_clips) == ("failed", "shorter than one clip", 0)
    assert table[videos[4][0].key].n_clips == 11


def test_audio_blocks_skip_clips_without_audio(tmp_path: Path) -> None:
    videos = [fake_video(i, 6) for i in range(4)]
    with StoreWriter(tmp_path, make_meta()) as writer:
        for video in videos:
            writer.add_video(*video)
    store = Store(tmp_path)
    has_audio = np.concatenate([v[3] for v in videos])
    ids = np.concatenate([b[0] for b in store.iter_blocks("audio", block_rows=5)])
    np.testing.assert_array_equal(ids, np.nonzero(has_audio)[0])
    assert store.count("audio") == int(has_audio.sum())
    assert [c.has_audio for c in store.clips(np.arange(24))] == has_audio.tolist()


def test_block_iteration_equals_full_read(tmp_path: Path) -> None:
    with StoreWriter(tmp_path, make_meta(), shard_clips=50) as writer:
        for i in range(12):
            writer.add_video(*fake_video(i, 17))
    store = Store(tmp_path)
    blocks = list(store.iter_blocks("visual", block_rows=13))
    assert max(len(ids) for ids, _ in blocks) <= 13
    full = np.concatenate([b[1] for b in blocks])
    np.testing.assert_array_equal(full, store.vectors(np.arange(store.num_clips), "visual"))


def test_out_of_range_clip_is_user_error(tmp_path: Path) -> None:
    with StoreWriter(tmp_path, make_meta()) as writer:
        writer.add_video(*fake_video(0, 3))
    with pytest.raises(AvindexError, match="out of range"):
        Store(tmp_path).clip(3)


def test_incompatible_model_is_refused(tmp_path: Path) -> None:
    with StoreWriter(tmp_path, make_meta("aaa")) as writer:
        writer.add_video(*fake_video(0, 3))
    with pytest.raises(AvindexError, match="another model"):
        StoreWriter(tmp_path, make_meta("bbb"))
    # A shard copied in from elsewhere is caught by the reader too.
    other = tmp_path / "other"
    with StoreWriter(other, make_meta("bbb")) as writer:
        writer.add_video(*fake_video(1, 3))
    for shard in other.glob("shard-*.h5"):
        os.replace(shard, tmp_path / shard.name)
    with pytest.raises(AvindexError, match="model_sha256"):
        Store(tmp_path)


def test_leftover_tmp_and_unreadable_shard_are_not_visible(tmp_path: Path) -> None:
    with StoreWriter(tmp_path, make_meta()) as writer:
        writer.add_video(*fake_video(0, 4))
    # A writer that died mid-write on this host: its pid no longer exists.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = WriterId.current()
    tmp = tmp_path / f"shard-1.h5.{WriterId(me.host, dead.pid, 1).tag}-deadbeef.tmp"
    tmp.write_bytes(b"half a shard")
    # A .tmp of a live writer (this process) must survive clear_tmp.
    live = tmp_path / f"shard-2.h5.{me.tag}-cafef00d.tmp"
    live.write_bytes(b"being written")
    (tmp_path / "shard-99999999999999999999-x-1-00000000.h5").write_bytes(b"garbage")
    store = Store(tmp_path)
    assert store.num_clips == 4
    assert len(store.warnings) == 1 and "unreadable" in store.warnings[0]
    assert clear_tmp(tmp_path) == [tmp.name]
    assert live.exists() and not tmp.exists()


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path[:0] = [{tests!r}, {root!r}]
    from storefactory import fake_video, make_meta
    from avindex.store import Store, StoreWriter
    done = {{e.key for e in Store({store!r}).videos().values()}} if {resume} else set()
    with StoreWriter({store!r}, make_meta(), shard_clips=40) as writer:
        for i in range({start}, {stop}):
            video = fake_video(i, 7 + i % 5)
            if video[0].key in done:
                continue
            writer.add_video(*video)
            print(i, flush=True)
    """
)


def _writer(store: Path, start: int, stop: int, resume: bool = False) -> subprocess.Popen:
    code = WRITER_SCRIPT.format(
        tests=str(Path(__file__).parent),
        root=str(Path(__file__).parent.parent),
        store=str(store),
        start=start,
        stop=stop,
        resume=resume,
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def _expected_rows(stop: int) -> list[tuple[str, float]]:
    return [(fake_video(i, 1)[0].path, float(t)) for i in range(stop) for t in range(7 + i % 5)]


def test_sigkill_mid_run_then_resume_gives_exact_clip_set(tmp_path: Path) -> None:
    proc = _writer(tmp_path, 0, 100_000)
    assert proc.stdout is not None
    for _ in range(150):  # let it write a few shards, then kill it wherever it is
        proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = Store(tmp_path)
    assert partial.warnings == []
    assert partial.num_clips > 0
    for shard in partial.shards:
        with h5py.File(shard.path, "r") as h5:
            assert len(h5["visual"]) == len(h5["t0"]) == len(h5["video"])
    clear_tmp(tmp_path)
    # Resume up to video 200, or past the last video the killed writer stored (a fast writer may
    # have gone beyond 200 before the kill).
    written = {c.path for c in partial.clips(np.arange(partial.num_clips))}
    stop = max(200, 1 + max(int(Path(path).stem[1:]) for path in written))  # /videos/v0042.mp4
    assert _writer(tmp_path, 0, stop, resume=True).wait() == 0
    store = Store(tmp_path)
    rows = [(c.path, c.t0) for c in store.clips(np.arange(store.num_clips))]
    assert len(rows) == len(set(rows))  # no duplicate rows
    assert sorted(rows) == sorted(_expected_rows(stop))
    assert not list(tmp_path.glob("*.tmp"))


def test_two_writers_at_once(tmp_path: Path) -> None:
    a, b = _writer(tmp_path, 0, 60), _writer(tmp_path, 60, 120)
    assert a.wait() == 0 and b.wait() == 0
    store = Store(tmp_path)
    names = store.shard_names
    assert len(names) == len(set(names)) >= 4
    assert names == sorted(names)
    rows = [(c.path, c.t0) for c in store.clips(np.arange(store.num_clips))]
    assert sorted(rows) == sorted(_expected_rows(120))


def test_shard_order_keeps_ids_stable(tmp_path: Path) -> None:
    with StoreWriter(tmp_path, make_meta()) as writer:
        writer.add_video(*fake_video(0, 5))
    first = Store(tmp_path)
    order = first.shard_names
    before = [(c.path, c.t0) for c in first.clips(np.arange(5))]
    # A concurrent writer's shard can sort before the known ones; shard_order keeps ids put.
    with StoreWriter(tmp_path, make_meta()) as writer:
        writer.add_video(*fake_video(1, 3))
    newer = Store(tmp_path).shard_names[-1]
    os.replace(tmp_path / newer, tmp_path / "shard-00000000000000000000-x-1-00000000.h5")
    store = Store(tmp_path, shard_order=order)
    assert [(c.path, c.t0) for c in store.clips(np.arange(5))] == before
    assert store.num_clips == 8
    assert Store(tmp_path).clip(0).path == fake_video(1, 1)[0].path
    with pytest.raises(AvindexError, match="missing"):
        Store(tmp_path, shard_order=["shard-nope.h5"])


def test_time_limit_flushes_a_shard(tmp_path: Path) -> None:
    writer = StoreWriter(tmp_path, make_meta(), shard_clips=10_000, shard_seconds=0.0)
    writer.add_video(*fake_video(0, 3))
    assert len(Store(tmp_path).shards) == 1  # flushed without close()
    writer.close()


def test_shard_of_failures_only_is_readable(tmp_path: Path) -> None:
    with StoreWriter(tmp_path, make_meta()) as writer:
        writer.add_failure(fake_video(0, 1)[0], "not a media file")
    store = Store(tmp_path)
    assert store.num_clips == 0 and len(store.shards) == 1
    assert list(store.iter_blocks("visual")) == []
    assert [e.status for e in store.videos().values()] == ["failed"]


def test_a_failed_shard_write_is_one_error_and_leaves_no_tmp(tmp_path, monkeypatch):
    """Disk full while writing: one AvindexError, no half shard, and close() does not retry."""
    meta = StoreMeta(model_sha256="m", visual_dim=4, audio_dim=4, hop=1.0)
    writer = StoreWriter(tmp_path, meta, shard_clips=1000, shard_seconds=1000)
    rows = np.ones((2, 4), np.float32)
    writer.add_video(VideoRecord("/v.mp4", 1, 0.0, 2.0), rows, rows, np.ones(2, bool), [0.0, 1.0])

    def full(path, *args):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module, "write_shard", full)
    with pytest.raises(AvindexError, match="No space left"):
        writer.flush()
    writer.close()
    assert list(tmp_path.iterdir()) == []


def _rows(store: Store, ids) -> list[tuple[str, float]]:
    return [(c.path, c.t0) for c in store.clips(ids)]


def test_a_video_stored_twice_is_shown_once_and_ids_stay_put(tmp_path: Path) -> None:
    """Two writers embedded videos 3 and 4 both (before claims existed): the later copies are
    hidden from blocks, counts and indexes; every id keeps pointing at the same row."""
    with StoreWriter(tmp_path, make_meta()) as writer:
        for i in range(5):
            writer.add_video(*fake_video(i, 4))
    before = Store(tmp_path)
    ids_before = np.arange(before.num_clips)
    rows_before = _rows(before, ids_before)
    with StoreWriter(tmp_path, make_meta()) as writer:
        for i in range(3, 8):
            writer.add_video(*fake_video(i, 4))
    store = Store(tmp_path)
    assert (store.num_clips, store.hidden_clips) == (40, 8)
    assert _rows(store, ids_before) == rows_before  # visible ids did not move
    hidden = np.arange(20, 28)  # videos 3 and 4 of the second shard
    visible = np.setdiff1d(np.arange(40), hidden)
    np.testing.assert_array_equal(store.visible(np.arange(40)), np.isin(np.arange(40), visible))
    has_audio = np.array([c.has_audio for c in store.clips(visible)])
    for modality, expected in (("visual", visible), ("audio", visible[has_audio])):
        ids = np.concatenate([b[0] for b in store.iter_blocks(modality, block_rows=3)])
        np.testing.assert_array_equal(ids, expected)
        assert store.count(modality) == len(ids)
    shown = _rows(store, visible)
    assert len(set(shown)) == len(shown) == 32
    assert store.videos()[fake_video(3, 4)[0].key].shard == store.shard_names[0]


def test_the_copy_in_the_first_shard_in_id_order_is_the_one_shown(tmp_path: Path) -> None:
    for _ in range(2):
        with StoreWriter(tmp_path, make_meta()) as writer:
            writer.add_video(*fake_video(0, 3))
    first, second = Store(tmp_path).shard_names
    by_name = Store(tmp_path)
    assert by_name.visible([0, 1, 2, 3, 4, 5]).tolist() == [True] * 3 + [False] * 3
    indexed_order = Store(tmp_path, shard_order=[second, first])  # e.g. the order of an index
    assert indexed_order.visible([0, 1, 2, 3, 4, 5]).tolist() == [True] * 3 + [False] * 3
    assert indexed_order.clip(0).shard == second


def test_an_index_of_a_store_with_copies_never_returns_a_hidden_clip(tmp_path: Path) -> None:
    for first in (0, 2):  # videos 2 and 3 are stored twice
        with StoreWriter(tmp_path, make_meta()) as writer:
            for i in range(first, first + 4):
                writer.add_video(*fake_video(i, 5))
    store = Store(tmp_path)
    build_index(tmp_path, IndexConfig(factory="Flat", device="cpu"), modality="visual")
    index = load_index(tmp_path, "visual", "cpu")
    assert index.index.ntotal == store.count("visual") == 30
    queries = store.vectors(np.arange(store.num_clips), "visual")
    _, ids = search_vectors(index, queries, 40)
    found = ids[ids >= 0]
    assert store.visible(found).all() and len(np.unique(found)) == 30


def test_string_headers_claiming_more_than_the_file_are_refused_at_once(tmp_path: Path) -> None:
    with StoreWriter(tmp_path, make_meta()) as writer:
        writer.add_video(*fake_video(0, 3))
    (path,) = tmp_path.glob("shard-*.h5")
    with h5py.File(path, "r") as h5:
        offset = h5["videos/status"].id.get_offset()
    data = bytearray(path.read_bytes())
    data[offset : offset + 4] = (1 << 31).to_bytes(4, "little")  # "this string is 2 GiB long"
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="strings outside the file"):
        summarize(path)
