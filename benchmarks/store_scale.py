"""Store at scale: time to find the pending videos and to open a Store, with vs without the catalog.

Builds a store of many tiny shards (default 10,000 shards x 32 videos x 2 clips, 8-d rows, no
catalog), then measures in this order:

- pending set by opening every shard in this process (`shard.summarize` on each: meta, shapes,
  videos table), which is what finding the pending set cost before the catalog (the previous
  `Store(...).videos()` opened every shard twice);
- the first `Store` open of the uncatalogued store: every shard read through the isolated reader
  and every entry written (the one-off cost of upgrading a store written before the catalog);
- pending set with the catalog (catalog read + done set), the same through `WorkQueue` (what
  `embed` calls: also starts the heartbeat and sweeps claims), and `Store` open with the catalog;
- a catalog refresh when nothing changed (what a writer pays to look for new shards).

Usage: python benchmarks/store_scale.py [--shards 10000] [--videos 32] [--keep DIR]
Prints and writes JSON (default benchmarks/results/store_scale.json). Page cache warm throughout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from avindex.catalog import CATALOG_DIR, Catalog, finished, shard_names
from avindex.claims import WorkQueue
from avindex.durable import WriterId
from avindex.shard import (
    BufferedVideo,
    StoreMeta,
    VideoRecord,
    summarize,
    write_shard,
)
from avindex.store import Store

META = StoreMeta(model_sha256="bench-store-scale", visual_dim=8, audio_dim=8, hop=1.0)
CLIPS = 2


def record(shard: int, video: int) -> VideoRecord:
    """The made-up source video `video` of shard `shard`."""
    return VideoRecord(f"/corpus/{shard:06d}/video-{video:03d}.mp4", 1000 + video, 1.7e9, 2.0)


def build(folder: Path, shards: int, videos: int) -> float:
    """Write `shards` shards of `videos` videos (no fsync: building is not measured); seconds.

    One process: a parallel build (two spawned workers) once died in libhdf5 with a segfault.
    """
    started = time.perf_counter()
    writer = WriterId.current()
    rows = np.zeros((CLIPS, META.visual_dim), np.float16)
    for s in range(shards):
        batch = [
            BufferedVideo(
                record(s, v), "done", "", rows, rows, np.ones(CLIPS, bool), np.arange(2.0)
            )
            for v in range(videos)
        ]
        write_shard(folder / f"shard-{s:020d}-{writer.tag}-00000000.h5", META, batch, writer)
    return time.perf_counter() - started


def timed(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    """Median and min of `repeats` runs of fn, in seconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4)}


def pending_opening_every_shard(folder: Path, records: list[VideoRecord]) -> list[VideoRecord]:
    """Records not done, found by opening every shard in this process (no catalog)."""
    done = finished([summarize(folder / name) for name in shard_names(folder)])
    return [r for r in records if r.key not in done]


def pending_from_catalog(folder: Path, records: list[VideoRecord]) -> list[VideoRecord]:
    """Records not done, found through the catalog."""
    catalog = Catalog(folder)
    catalog.refresh()
    done = finished(catalog.summaries.values())
    return [r for r in records if r.key not in done]


def run(folder: Path, shards: int, videos: int, repeats: int) -> dict:
    """Build the store in `folder` and measure; returns the results."""
    build_s = build(folder, shards, videos)
    records = [record(s, v) for s in range(shards) for v in range(videos)]
    records += [record(shards + s, v) for s in range(shards // 10) for v in range(videos)]
    expected = len(records) - shards * videos
    results: dict = {"build_s": round(build_s, 1), "records": len(records), "pending": expected}
    assert len(pending_opening_every_shard(folder, records)) == expected
    results["pending_opening_every_shard"] = timed(
        lambda: pending_opening_every_shard(folder, records), max(1, repeats - 1)
    )
    results["store_open_first_writes_catalog"] = timed(lambda: Store(folder), 1)
    assert len(pending_from_catalog(folder, records)) == expected
    results["pending_with_catalog"] = timed(lambda: pending_from_catalog(folder, records), repeats)

    def work_queue() -> None:
        with WorkQueue(folder, records) as work:
            assert work.remaining == expected

    results["work_queue_open_with_catalog"] = timed(work_queue, repeats)
    results["store_open_with_catalog"] = timed(lambda: Store(folder), repeats)
    catalog = Catalog(folder)
    catalog.refresh()
    results["catalog_refresh_nothing_new"] = timed(catalog.refresh, repeats)
    results["ratio_pending_every_shard_over_catalog"] = round(
        results["pending_opening_every_shard"]["median_s"]
        / results["pending_with_catalog"]["median_s"],
        1,
    )
    results["ratio_pending_every_shard_over_store_open_with_catalog"] = round(
        results["pending_opening_every_shard"]["median_s"]
        / results["store_open_with_catalog"]["median_s"],
        1,
    )
    results["catalog_bytes"] = sum(p.stat().st_size for p in (folder / CATALOG_DIR).iterdir())
    results["shard_bytes"] = sum(p.stat().st_size for p in folder.glob("shard-*.h5"))
    return results


def main() -> None:
    """Parse flags, build, measure, print and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--videos", type=int, default=32, help="videos per shard")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="build the store here and keep it")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "store_scale.json"
    )
    args = parser.parse_args()
    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="avindex-store-scale-")) if args.keep is None else args.keep
    folder = root / "store"
    folder.mkdir(parents=True, exist_ok=False)
    try:
        results = run(folder, args.shards, args.videos, args.repeats)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    report = {
        "shards": args.shards,
        "videos_per_shard": args.videos,
        "clips_per_video": CLIPS,
        "results": results,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "h5py": h5py.version.version,
            "hdf5": h5py.version.hdf5_version,
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
