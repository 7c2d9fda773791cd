"""Index at scale: `auto` on N synthetic clustered stored vectors; recall, build time, peak RSS.

Example: .venv/bin/python benchmarks/index_scale.py --n 1000000 --dim 128 --max-memory 4G
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from avindex.bench.corpus import write_vector_store
from avindex.config import IndexConfig
from avindex.errors import AvindexError
from avindex.index import build_index, load_index, parse_size, search_vectors
from avindex.store import Store

CLIPS_PER_VIDEO = 10_000  # vectors generated and buffered at a time while writing the store
POLL_SECONDS = 5.0  # how often the parent checks that the build child is still alive


def write_synthetic_store(store: Path, n: int, d: int, clusters: int, seed: int) -> None:
    """n vectors around `clusters` random centres (clusters=0: plain Gaussian), made in chunks."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(1, clusters), d)).astype(np.float32)

    def blocks() -> Iterator[np.ndarray]:
        for start in range(0, n, CLIPS_PER_VIDEO):
            m = min(CLIPS_PER_VIDEO, n - start)
            noise = rng.standard_normal((m, d)).astype(np.float32)
            yield noise if clusters == 0 else centers[rng.integers(0, clusters, m)] + 0.6 * noise

    write_vector_store(store, blocks(), shard_clips=100_000)


def _build(store: str, max_memory: int, results: mp.Queue) -> None:
    """Child process: build with default settings (so its peak RSS is the build's alone)."""
    start = time.perf_counter()
    try:
        info = build_index(store, IndexConfig(max_memory=max_memory), modality="visual")
    except AvindexError as exc:
        sys.exit(f"avindex: error: {exc}")  # one line and exit code 1, as the CLI would
    results.put((info, time.perf_counter() - start))


def wait_for_build(child: mp.Process, results: mp.Queue) -> tuple[dict, float]:
    """The build child's (index.json, seconds); exits with a message if the child died first."""
    while True:
        try:
            return results.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if child.exitcode is None:
                continue
        # The child may have put its result just before exiting: one last short look.
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            sys.exit(
                f"index build child exited with code {child.exitcode} and no result "
                "(negative = killed by that signal, e.g. -9 by the OOM killer at a small "
                "--max-memory; 1 = its error is printed above)"
            )


def search_rate(store: Path, nq: int = 2000, k: int = 10) -> float:
    """Queries/s of the tuned index on stored vectors (one batched call)."""
    s = Store(store)
    ids = np.random.default_rng(1).choice(s.num_clips, nq, replace=False)
    queries = s.vectors(np.sort(ids), "visual")
    loaded = load_index(store, "visual", "cpu")
    start = time.perf_counter()
    search_vectors(loaded, queries, k)
    return nq / (time.perf_counter() - start)


def main() -> None:
    """Write the store, build in a child process, print and save the numbers."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--clusters", type=int, default=1000, help="0 = unclustered Gaussian")
    ap.add_argument("--max-memory", default="4G")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store", help="store directory to (re)use; default: a temporary one")
    ap.add_argument("--json", dest="json_out", help="write the results here")
    args = ap.parse_args()
    budget = parse_size(args.max_memory)
    store = Path(args.store or tempfile.mkdtemp(prefix="avindex-scale-"))
    try:
        t = time.perf_counter()
        if not list(store.glob("shard-*.h5")):
            write_synthetic_store(store, args.n, args.dim, args.clusters, args.seed)
        write_s = time.perf_counter() - t
        results: mp.Queue = mp.get_context("spawn").Queue()
        child = mp.get_context("spawn").Process(target=_build, args=(str(store), budget, results))
        child.start()
        info, build_s = wait_for_build(child, results)
        child.join()
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
        entry = info["modalities"]["visual"]
        result = {
            "n": args.n,
            "dim": args.dim,
            "clusters": args.clusters,
            "factory": entry["factory"],
            "params": entry["params"],
            "recall_at_10": entry["recall_at_10"],
            "recall_queries": entry["recall_queries"],
            "build_seconds": round(build_s, 1),
            "store_write_seconds": round(write_s, 1),
            "peak_rss_bytes": peak,
            "max_memory_bytes": budget,
            "peak_rss_within_budget": peak <= budget,
            "estimated_index_bytes": entry["estimated_bytes"],
            "search_queries_per_s": round(search_rate(store), 1),
        }
        print(json.dumps(result, indent=2))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(result, indent=2))
    finally:
        if not args.store:
            shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
