"""Index a store in parts: each part adds a run of shards to a copy of the trained index (in its
own process), and the parts' inverted lists are merged into one file on disk."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np

from avindex.errors import AvindexError
from avindex.exact import ExactTopK, normalize_rows
from avindex.index_files import checked_write
from avindex.store import Store
from avindex.workers import Done, Failed, Job, PoolLimits, WorkerPool


@dataclass(frozen=True)
class PartTask:
    """One part: add `shards` to the index in `start_file` (or only scan them for the truth)."""

    store_dir: str
    shard_order: tuple[str, ...]  # the index's id order, so every part numbers clips alike
    modality: str
    shards: tuple[str, ...]  # a contiguous run of shards
    add: bool  # False: shards already indexed, scanned only for the exact top-k of the queries
    start_file: str  # the trained empty index (IVF), or the index to extend (Flat, HNSW)
    out_file: str  # where this part's index goes (only when add)
    queries: np.ndarray  # normalised recall queries
    k: int
    block_rows: int
    threads: int  # faiss threads in a worker process; 0: leave the process's setting


@dataclass(frozen=True)
class PartResult:
    """What a part did: rows added, its index file, the exact top-k of the queries over it."""

    added: int
    out_file: str | None
    scores: np.ndarray
    labels: np.ndarray


def add_part(task: PartTask) -> PartResult:
    """Stream a part's shards once: add them to the index and fold them into the exact top-k."""
    if task.threads:
        faiss.omp_set_num_threads(task.threads)
    store = Store(task.store_dir, shard_order=list(task.shard_order))
    index = faiss.read_index(task.start_file) if task.add else None
    exact = ExactTopK(task.queries, task.k)
    added = 0
    for ids, vecs in store.iter_blocks(task.modality, task.block_rows, shards=task.shards):
        vecs = normalize_rows(vecs)
        exact.add_block(ids, vecs)
        if index is not None:
            index.add_with_ids(vecs, ids)
            added += len(ids)
    if index is not None:
        checked_write(Path(task.out_file), lambda p: faiss.write_index(index, p), "index part")
    scores, labels = exact.finalize()
    return PartResult(added, task.out_file if index is not None else None, scores, labels)


def split_shards(shards: Sequence[str], rows: Sequence[int], parts: int) -> list[tuple[str, ...]]:
    """At most `parts` contiguous runs of shards holding about equal numbers of rows."""
    total = sum(rows)
    if not shards:
        return []
    parts = max(1, min(parts, len(shards)))
    runs: list[list[str]] = [[]]
    seen = 0
    for name, n in zip(shards, rows, strict=True):
        # Start a new run once this one has its share (by the middle of the shard).
        if runs[-1] and len(runs) < parts and seen + n / 2 > total * len(runs) / parts:
            runs.append([])
        runs[-1].append(name)
        seen += n
    return [tuple(r) for r in runs]


class Runner(Protocol):
    """Runs part tasks somewhere and yields their results as they finish."""

    threads: int  # faiss threads each task may use

    def map(
        self, fn: Callable[[PartTask], PartResult], tasks: Sequence[PartTask]
    ) -> Iterable[PartResult]:
        """Run fn on every task; results in any order."""
        ...


class LocalRunner:
    """Part tasks in `workers` processes of this machine, or in this process when workers <= 1."""

    def __init__(self, workers: int) -> None:
        """`workers` processes share the cores (faiss threads split between them)."""
        self.workers = max(1, workers)
        self.threads = 0 if self.workers == 1 else max(1, (os.cpu_count() or 1) // self.workers)

    def map(
        self, fn: Callable[[PartTask], PartResult], tasks: Sequence[PartTask]
    ) -> Iterator[PartResult]:
        """Run the tasks; a task that fails or whose worker dies (e.g. killed for memory) is one
        AvindexError."""
        if self.workers == 1:
            yield from map(fn, tasks)
            return
        # Fresh interpreters, not forks: faiss's OpenMP threads do not survive a fork of a
        # process that used them. A part sends nothing until it is done: no stall limit, and the
        # memory it may take is --max-memory's business.
        limits = PoolLimits(stall_seconds=None, memory_bytes=None, role="index part")
        jobs = [Job(i, fn, (task,)) for i, task in enumerate(tasks)]
        with WorkerPool(jobs, self.workers, limits) as pool:
            for event in pool.events():
                if isinstance(event, Failed):
                    raise AvindexError(
                        f"{event.reason}; give a smaller --max-memory or more --parts, or fewer "
                        "--workers"
                    )
                if isinstance(event, Done):
                    yield event.value


def plan_parts(rows: int, part_bytes: int, max_memory: int, part_rows: int, workers: int) -> int:
    """Parts for `rows` rows: about `part_rows` each, and small enough that `workers` parts in
    memory at once (`part_bytes` for all rows together) stay within `max_memory`."""
    by_rows = math.ceil(rows / max(1, part_rows))
    by_memory = math.ceil(workers * part_bytes / max(1, max_memory))
    return max(1, by_rows, by_memory)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send C-level stdout to stderr: faiss prints progress lines there, and `--json` must
    keep stdout for the JSON alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def merge_on_disk(index: faiss.Index, sources: Sequence[faiss.Index], ivfdata: Path) -> None:
    """Fill the trained empty IVF `index` with the inverted lists of `sources`, in order, kept in
    the file `ivfdata` (an OnDiskInvertedLists that searches memory-map).

    The body of faiss.contrib.ondisk.merge_ondisk, taking loaded indexes instead of file names:
    merge_ondisk reads its inputs with IO_FLAG_MMAP, which leaves the lists of an index that is
    itself merged on disk unmapped (a crash), so `--update` could not pass the previous index.
    """
    ivf = faiss.extract_index_ivf(index)
    if index.ntotal:
        raise ValueError("merge_on_disk needs an empty trained index")
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata))
    inputs = faiss.InvertedListsPtrVector()
    for source in sources:
        inputs.push_back(faiss.extract_index_ivf(source).invlists)
    with _stdout_to_stderr():
        ntotal = lists.merge_from_multiple(inputs.data(), inputs.size(), False, False)
    index.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # the index owns (and unmaps) the lists now
