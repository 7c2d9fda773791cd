"""Store read primitives for sampling and re-ranking: ids_at and RowReader against Store.vectors."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from avindex.store import RowReader, Store, StoreMeta, StoreWriter, VideoRecord

DIM = 12


def write_rows(store_dir: Path, n: int, shard_clips: int, seed: int = 0) -> np.ndarray:
    """A store of n clips (every third one without audio); returns the visual rows written."""
    meta = StoreMeta(model_sha256="m", visual_dim=DIM, audio_dim=DIM, hop=1.0)
    rng = np.random.default_rng(seed)
    visual = rng.standard_normal((n, DIM)).astype(np.float32)
    with StoreWriter(store_dir, meta, shard_clips=shard_clips) as writer:
        for v, start in enumerate(range(0, n, 50)):
            stop = min(n, start + 50)
            rows = visual[start:stop]
            has_audio = np.arange(start, stop) % 3 != 0
            rec = VideoRecord(f"/v/{seed}-{v}.mp4", 1, 1.0, float(stop - start))
            writer.add_video(rec, rows, -rows, has_audio, np.arange(stop - start, dtype=float))
    return visual


def all_ids(store: Store, modality: str) -> np.ndarray:
    return np.concatenate([ids for ids, _ in store.iter_blocks(modality, 64)])


def test_ids_at_follows_iter_blocks_order(tmp_path: Path) -> None:
    write_rows(tmp_path, 1000, shard_clips=300)
    store = Store(tmp_path)
    assert len(store.shards) > 2
    for modality in ("visual", "audio"):
        ids = all_ids(store, modality)
        positions = np.random.default_rng(1).choice(len(ids), 200, replace=False)
        np.testing.assert_array_equal(store.ids_at(modality, positions), ids[positions])
        assert len(store.ids_at(modality, [])) == 0
        with pytest.raises(IndexError):
            store.ids_at(modality, [len(ids)])


def test_row_reader_equals_store_vectors(tmp_path: Path) -> None:
    visual = write_rows(tmp_path, 2000, shard_clips=700)
    store = Store(tmp_path)
    ids = np.random.default_rng(2).choice(2000, 500, replace=True)  # repeats, any order
    for modality in ("visual", "audio"):
        got = RowReader(store, modality)(ids)
        np.testing.assert_array_equal(got, store.vectors(ids, modality))
    np.testing.assert_array_equal(
        RowReader(store, "visual")(ids), visual[ids].astype(np.float16).astype(np.float32)
    )


def test_row_reader_reads_compressed_shards_through_h5py(tmp_path: Path) -> None:
    """A shard whose rows are not raw bytes on disk (here gzip) is read correctly anyway."""
    visual = write_rows(tmp_path, 400, shard_clips=1000)
    shard = next(tmp_path.glob("shard-*.h5"))
    with h5py.File(shard, "a") as h5:
        data = h5["visual"][:]
        del h5["visual"]
        h5.create_dataset("visual", data=data, chunks=(64, DIM), compression="gzip")
    store = Store(tmp_path)
    reader = RowReader(store, "visual")
    ids = np.arange(0, 400, 7)
    assert reader._map(0) is None  # not mappable: the h5py path serves it
    expect = visual[ids].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(reader(ids), expect)
