"""Index at scale: build N synthetic clustered stored vectors in parts within a memory budget.

Measures, for each build: the factory `auto` chose, build seconds, peak memory of every process
involved (the build process, its part workers and Ray's processes, sampled together), the
recall@10 the build measured (and kept in index.json), recall@10 on other queries against an
exact scan, and queries/s batched and one at a time (exact re-rank included).

Examples:
  python benchmarks/index_scale.py --n 10000000 --max-memory 4G --workers 2
  python benchmarks/index_scale.py --n 1000000 --compare-ray   # Ray (2 workers) vs one process
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from avindex.bench.corpus import write_vector_store
from avindex.config import IndexConfig, replace
from avindex.errors import AvindexError
from avindex.exact import ExactTopK, normalize_rows
from avindex.index import (
    LoadedIndex,
    build_index,
    load_index,
    parse_size,
    recall_at_k,
    search_vectors,
)
from avindex.store import Store

CLIPS_PER_VIDEO = 10_000  # vectors generated and buffered at a time while writing the store
SHARD_CLIPS = 100_000
POLL_SECONDS = 5.0  # how often the parent checks that the build child is still alive
SAMPLE_SECONDS = 0.25  # memory sampling period of the process tree
POINTS_PER_CLUSTER = 1_000  # default density: clusters grow with n


def synthetic_blocks(n: int, d: int, clusters: int, seed: int) -> Iterator[np.ndarray]:
    """n vectors around `clusters` random centres (0: plain Gaussian), CLIPS_PER_VIDEO at a time."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(1, clusters), d)).astype(np.float32)
    for start in range(0, n, CLIPS_PER_VIDEO):
        m = min(CLIPS_PER_VIDEO, n - start)
        noise = rng.standard_normal((m, d)).astype(np.float32)
        yield noise if clusters == 0 else centers[rng.integers(0, clusters, m)] + 0.6 * noise


def held_out_queries(nq: int, d: int, clusters: int, seed: int) -> np.ndarray:
    """Queries from the store's distribution (same centres) that are not in the store."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(1, clusters), d)).astype(np.float32)
    noise = np.random.default_rng(seed + 1_000_003).standard_normal((nq, d)).astype(np.float32)
    return noise if clusters == 0 else centers[rng.integers(0, clusters, nq)] + 0.6 * noise


def _tree(root: int) -> list[int]:
    """The pid and every descendant pid of `root` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _memory(pid: int) -> tuple[int, int, int]:
    """(RSS, PSS, peak RSS) bytes of one process; PSS splits shared pages among their users,
    the peak (VmHWM) is the kernel's own high-water mark, so short peaks are not missed."""
    values = {"Rss:": 0, "Pss:": 0, "VmHWM:": 0}
    for name in (f"/proc/{pid}/smaps_rollup", f"/proc/{pid}/status"):
        try:
            with open(name) as f:
                for line in f:
                    key = line.split(maxsplit=1)[0] if line.strip() else ""
                    if key in values:
                        values[key] = int(line.split()[1]) * 1024
        except OSError:
            pass  # the process ended between listing and reading
    return values["Rss:"], values["Pss:"], values["VmHWM:"]


class TreeMemory:
    """Memory of a process and all its descendants, sampled in a thread: the peak of the summed
    RSS and PSS, and the sum of each process's own peak RSS (an upper bound on the true peak
    of the sum, which sampling may miss)."""

    def __init__(self, root: int) -> None:
        """Start sampling the tree under `root`."""
        self.root = root
        self.peak_rss = self.peak_pss = self.peak_processes = 0
        self.process_peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = _tree(self.root)
            samples = {p: _memory(p) for p in pids}
            rss = sum(v[0] for v in samples.values())
            pss = sum(v[1] for v in samples.values())
            for pid, (_, _, hwm) in samples.items():
                self.process_peaks[pid] = max(self.process_peaks.get(pid, 0), hwm)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_processes = max(self.peak_processes, len(pids))
            self._stop.wait(SAMPLE_SECONDS)

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join()


def _build(store: str, cfg: IndexConfig, use_ray: bool, results: mp.Queue) -> None:
    """Child process: one build (so the memory measured is the build's alone)."""
    runner = None
    if use_ray:
        import ray

        from avindex.index_ray import RayRunner

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        runner = RayRunner()
    start = time.perf_counter()
    try:
        info = build_index(store, cfg, modality="visual", runner=runner)
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
        try:  # the child may have put its result just before exiting: one last short look
            return results.get(timeout=1.0)
        except queue.Empty:
            sys.exit(
                f"index build child exited with code {child.exitcode} and no result "
                "(negative = killed by that signal, e.g. -9 by the OOM killer; "
                "1 = its error is printed above)"
            )


def measured_build(store: Path, cfg: IndexConfig, use_ray: bool) -> dict[str, Any]:
    """Build in a child process while sampling the memory of its whole process tree."""
    shutil.rmtree(store / "index", ignore_errors=True)
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    child = ctx.Process(target=_build, args=(str(store), cfg, use_ray, results))
    child.start()
    memory = TreeMemory(child.pid)
    info, build_s = wait_for_build(child, results)
    child.join()
    memory.stop()
    entry = info["modalities"]["visual"]
    return {
        "runner": "ray (2 local CPUs)"
        if use_ray
        else f"processes (workers={cfg.workers or 'all'})",
        "factory": entry["factory"],
        "params": entry["params"],
        "rerank": entry["rerank"],
        "parts": entry["parts"],
        "train_vectors": entry["train_vectors"],
        "recall_at_10": entry["recall_at_10"],
        "recall_queries": entry["recall_queries"],
        "build_seconds": round(build_s, 1),
        "peak_rss_all_processes_bytes": memory.peak_rss,
        "peak_pss_all_processes_bytes": memory.peak_pss,
        "sum_of_process_peak_rss_bytes": sum(memory.process_peaks.values()),
        "max_single_process_peak_rss_bytes": max(memory.process_peaks.values(), default=0),
        "peak_processes": memory.peak_processes,
        "processes_seen": len(memory.process_peaks),
        "estimated_index_bytes": entry["estimated_bytes"],
    }


def exact_neighbours(store: Path, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids of `queries` by one streamed scan of the store."""
    exact = ExactTopK(normalize_rows(queries), k)
    for ids, vecs in Store(store).iter_blocks("visual", 65_536):
        exact.add_block(ids, normalize_rows(vecs))
    return exact.finalize()[1]


def search_figures(store: Path, queries: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Recall@10 on held-out queries and queries/s, batched and one at a time."""
    loaded = load_index(store, "visual", "cpu")
    found = search_vectors(loaded, queries, 10)[1]
    start = time.perf_counter()
    search_vectors(loaded, queries, 10)
    batch = len(queries) / (time.perf_counter() - start)
    return {
        "held_out_recall_at_10": round(recall_at_k(found, truth), 4),
        "held_out_queries": len(queries),
        "batch_queries_per_s": round(batch, 1),
        "single_queries_per_s": round(single_rate(loaded, queries[:300]), 1),
        # One faiss thread: on a loaded machine a 1-query search waits for its descheduled
        # second OpenMP thread (measured 45 vs 6,400 queries/s at load average ~15).
        "single_queries_per_s_1_thread": round(single_rate(loaded, queries[:300], threads=1), 1),
    }


def single_rate(loaded: LoadedIndex, queries: np.ndarray, threads: int = 0) -> float:
    """Queries/s one query per call, with `threads` faiss threads (0: faiss's default)."""
    default = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads or default)
    try:
        start = time.perf_counter()
        for q in queries:
            search_vectors(loaded, q[None], 10)
        return len(queries) / (time.perf_counter() - start)
    finally:
        faiss.omp_set_num_threads(default)


def main() -> None:
    """Write the store (streamed), build, measure, print and save the numbers."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument(
        "--clusters", type=int, help=f"default n/{POINTS_PER_CLUSTER}; 0 = unclustered Gaussian"
    )
    ap.add_argument("--max-memory", default="4G")
    ap.add_argument("--workers", type=int, default=0, help="part processes (0: one per core)")
    ap.add_argument("--parts", type=int, default=0, help="0: by size and memory")
    ap.add_argument("--factory", default="auto")
    ap.add_argument("--compare-ray", action="store_true", help="one process vs Ray, 2 workers")
    ap.add_argument("--queries", type=int, default=1000, help="held-out queries")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store", help="store directory to (re)use; default: a temporary one")
    ap.add_argument("--json", dest="json_out", help="write the results here")
    args = ap.parse_args()
    clusters = args.clusters if args.clusters is not None else args.n // POINTS_PER_CLUSTER
    cfg = IndexConfig(
        factory=args.factory,
        max_memory=parse_size(args.max_memory),
        workers=args.workers,
        parts=args.parts,
    )
    store = Path(args.store or tempfile.mkdtemp(prefix="avindex-scale-"))
    try:
        write_s = None  # a store given with --store and already written is reused
        if not list(store.glob("shard-*.h5")):
            t = time.perf_counter()
            blocks = synthetic_blocks(args.n, args.dim, clusters, args.seed)
            write_vector_store(store, blocks, shard_clips=SHARD_CLIPS)
            write_s = round(time.perf_counter() - t, 1)
        queries = held_out_queries(args.queries, args.dim, clusters, args.seed)
        t = time.perf_counter()
        truth = exact_neighbours(store, queries, 10)
        exact_s = time.perf_counter() - t
        runs = []
        if args.compare_ray:
            one = replace(cfg, workers=1, parts=1)
            runs.append(
                {**measured_build(store, one, False), **search_figures(store, queries, truth)}
            )
            two = replace(cfg, parts=args.parts or 2)
            runs.append(
                {**measured_build(store, two, True), **search_figures(store, queries, truth)}
            )
        else:
            runs.append(
                {**measured_build(store, cfg, False), **search_figures(store, queries, truth)}
            )
        result = {
            "n": args.n,
            "dim": args.dim,
            "clusters": clusters,
            "max_memory_bytes": cfg.max_memory,
            "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "store_write_seconds": write_s,
            "exact_scan_seconds": round(exact_s, 1),
            "runs": runs,
        }
        if args.compare_ray:
            result["ray_vs_one_process_build_speedup"] = round(
                runs[0]["build_seconds"] / runs[1]["build_seconds"], 2
            )
        print(json.dumps(result, indent=2))
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(json.dumps(result, indent=2))
    finally:
        if not args.store:
            shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
