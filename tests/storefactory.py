"""Made-up videos with fake embeddings for store, catalog, claims and check tests."""

from __future__ import annotations

import collections
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from avindex.catalog import Catalog
from avindex.shard import ShardSummary, verify_reading
from avindex.store import Store, StoreMeta, VideoRecord

DIM = 8


def make_meta(sha: str = "abc123", dim: int = DIM) -> StoreMeta:
    """A small store meta for tests."""
    return StoreMeta(
        model_sha256=sha,
        visual_dim=dim,
        audio_dim=dim,
        hop=1.0,
        model_config={"width": 0.125, "head": "contrastive"},
        embed_config={"hop": 1.0},
    )


def fake_video(i: int, n: int, dim: int = DIM, seed: int = 0):
    """(record, visual, audio, has_audio, t0) of a made-up video with n clips."""
    rng = np.random.default_rng(seed * 100_003 + i)
    record = VideoRecord(path=f"/videos/v{i:04d}.mp4", size=1000 + i, mtime=1.5e9 + i, duration=n)
    visual = rng.standard_normal((n, dim)).astype(np.float32)
    audio = rng.standard_normal((n, dim)).astype(np.float32)
    has_audio = (np.arange(n) + i) % 3 != 0
    t0 = np.arange(n, dtype=np.float64)
    return record, visual, audio, has_audio, t0


def clips_of(i: int) -> int:
    """Clip count of video i in multi-writer runs (varied, so rows are not interchangeable)."""
    return 2 + i % 4


def video_index(record: VideoRecord) -> int:
    """The i of a record made by fake_video."""
    return int(Path(record.path).stem[1:])


def corpus(n: int) -> list[VideoRecord]:
    """Records of videos 0..n-1 as multi-writer runs embed them."""
    return [fake_video(i, clips_of(i))[0] for i in range(n)]


def clip_rows(store_dir: Path) -> collections.Counter:
    """(video file name, t0) -> rows showing that clip: equal for stores of the same videos."""
    store = Store(store_dir)
    refs = store.clips(range(store.num_clips))
    return collections.Counter((Path(c.path).name, c.t0) for c in refs)


def copies_on_disk(store_dir: Path) -> collections.Counter:
    """How many shards hold rows of each video key (hidden duplicates included)."""
    catalog = Catalog(store_dir)
    catalog.refresh()
    copies: collections.Counter = collections.Counter()
    for summary in catalog.summaries.values():
        for key, n in zip(summary.videos.keys(), summary.videos.n_clips, strict=True):
            if n:
                copies[key] += 1
    return copies


def hang(path: Path) -> None:
    """Stands for a shard that makes HDF5 loop forever (isolated reader tests)."""
    time.sleep(3600)


def verified(path: Path) -> ShardSummary:
    """A shard's summary after reading every row (shard.verify_reading, run to its end)."""
    reading = verify_reading(path)
    while True:
        try:
            next(reading)
        except StopIteration as done:
            return done.value


def slow_steps(path: Path) -> Iterator[int]:
    """Stands for a big shard on a slow disk: 4 s in all, a block every 0.5 s; returns 'read'."""
    for step in range(8):
        time.sleep(0.5)
        yield step
    return "read"


def crash(path: Path) -> None:
    """Stands for a shard that crashes HDF5 (isolated reader tests)."""
    os.kill(os.getpid(), signal.SIGSEGV)
