"""faiss indexes over a store: factory by size and memory, a sampled training set, parts added in
parallel and merged on disk, recall-tuned search with an exact re-rank of compressed codes."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from avindex.config import IndexConfig
from avindex.devices import resolve_faiss_device
from avindex.errors import AvindexError
from avindex.exact import ExactTopK, drop_self, normalize_rows, recall_at_k
from avindex.index_files import (
    build_lock,
    checked_write,
    durable_write,
    entry_path,
    index_dir,
    new_file_name,
    read_index_info,
    remove_unreferenced,
    sync_file,
    temp_path,
    write_index_info,
)
from avindex.index_parts import (
    LocalRunner,
    PartTask,
    Runner,
    add_part,
    merge_on_disk,
    plan_parts,
    split_shards,
)
from avindex.store import MODALITIES, RowReader, Store, check_modality

METRIC = "inner_product"  # on L2-normalised vectors: score = cosine similarity
GPU_MAX_K = (
    2048  # faiss GPU indexes return at most this many neighbours (and probe this many lists)
)
# Inverted lists are std::vectors that double when they grow, so a list may hold up to 2x its
# payload while vectors are added: memory estimates of IVF indexes use this factor.
IVF_GROWTH = 2.0
NLIST_MIN, NLIST_MAX = 16, 65_536
KMEANS_POINTS_PER_LIST = 39  # faiss warns below this many training points per centroid
# From this many vectors the coarse quantizer is an HNSW graph: with ~4*sqrt(n) >= 12k lists a
# flat quantizer's exhaustive scan would dominate the cost of adding and of every search.
HNSW_QUANTIZER_FROM = 10_000_000
HNSW_M = 32
# The training sample may take 1/8 of --max-memory: k-means and OPQ hold a second copy of it.
SAMPLE_MEMORY_SHARE = 8
# Training rows are read in runs of consecutive rows (4 KiB at 128 fp16 dims), so a sample
# touches about 1/SAMPLE_RUN of the pages that scattered single rows would.
SAMPLE_RUN = 16
# OPQ rotation training: with faiss's defaults (50 rounds of 4 PQ iterations, 40 in the first,
# on up to 65,536 points) OPQ64_128 had not finished after 500 s on this 2-core machine (load
# average ~12). 10 rounds (10 iterations in the first) on 32,768 points are ~1/10 of that work
# (measured 480 s at the same load). The index's own PQ codebooks are trained with faiss's
# defaults afterwards, and the re-rank orders candidates exactly.
OPQ_ROUNDS = 10
OPQ_TRAIN_POINTS = 32_768
RERANK_BLOCK = 512  # queries re-ranked at a time (bounds the gathered candidate vectors)
MISSING_SCORE = float(np.finfo(np.float32).min)  # what faiss reports beside an id of -1

Progress = Callable[[str, int, int], None]  # (modality, rows done, rows total)
Rows = Callable[[np.ndarray], np.ndarray]  # clip ids -> their stored vectors (float32)


@dataclass
class LoadedIndex:
    """A faiss index ready to search, its device, index.json entry and re-rank source."""

    index: faiss.Index
    modality: str
    device: str  # 'cpu' | 'cuda'
    entry: dict[str, Any]
    rows: Rows | None = None  # stored vectors, when the entry asks for an exact re-rank


def parse_size(text: str | int) -> int:
    """Bytes from '4G', '512M', '1.5g', '100k' or a plain integer."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match:
        raise AvindexError(f"--max-memory {text!r}: expected a size such as 4G, 512M or 1000000")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[match.group(2)]
    return int(float(match.group(1)) * scale)


def _sample_cap(d: int, max_memory: int) -> int:
    """Most training vectors (float32) the memory budget allows."""
    return max(1, max_memory // (SAMPLE_MEMORY_SHARE * 4 * d))


def _nlist(n: int, d: int, max_memory: int) -> int:
    """About 4*sqrt(n) lists, but never more than a sample that fits in memory can train."""
    trainable = max(1, min(n, _sample_cap(d, max_memory)) // KMEANS_POINTS_PER_LIST)
    return int(max(1, min(NLIST_MAX, trainable, max(NLIST_MIN, 4 * math.sqrt(n)))))


def train_size(n: int, nlist: int, d: int, cfg: IndexConfig) -> int:
    """Training vectors: KMEANS_POINTS_PER_LIST per list, at least cfg.train_sample, within
    the memory budget's share and the data."""
    want = max(cfg.train_sample, KMEANS_POINTS_PER_LIST * nlist)
    return min(n, want, _sample_cap(d, cfg.max_memory))


def _working_bytes(d: int, n_train: int, cfg: IndexConfig) -> int:
    """Memory the build needs beside the index: the sample twice and ~3 float32 blocks."""
    return 4 * d * (2 * n_train + 3 * cfg.block_rows)


def estimate_memory(factory: str, n: int, d: int) -> int:
    """Bytes an index of `n` vectors of dim `d` needs while it is built (see the formulas)."""
    match = re.fullmatch(
        r"(?:OPQ(\d+)(?:_(\d+))?,)?IVF(\d+)(?:_HNSW(\d+))?,(Flat|PQ(\d+))", factory
    )
    if factory == "Flat":
        return n * (4 * d + 8)  # float32 vectors + int64 ids in the IndexIDMap
    if factory.startswith("HNSW"):
        m = int(factory[4:] or 32)
        return n * (4 * d + 8 * m + 8 + 16)  # vectors + 2M level-0 links + ids + levels
    if match is None:
        return n * (4 * d + 8)  # unknown string: assume uncompressed vectors
    nlist = int(match.group(3))
    d_out = int(match.group(2) or d)
    # Coarse centroids, plus their HNSW graph (2M level-0 links each) when there is one.
    coarse = nlist * (4 * d_out + 8 * int(match.group(4) or 0))
    if match.group(5) == "Flat":
        # Inverted lists hold the float32 vector and int64 id of each row.
        return int(IVF_GROWTH * n * (4 * d_out + 8)) + coarse
    m = int(match.group(6))
    # m one-byte PQ codes + int64 id per row; the OPQ matrix and PQ codebooks beside.
    return int(IVF_GROWTH * n * (m + 8)) + coarse + d * d_out * 4 + 256 * d_out * 4


def choose_factory(n: int, d: int, max_memory: int, cfg: IndexConfig | None = None) -> str:
    """The faiss factory string `auto` builds for n vectors of dim d within max_memory bytes.

    Exact Flat up to cfg.exact_limit vectors; IVF-Flat while it fits (rather than HNSW: it trains
    and adds in seconds on few cores, runs on faiss GPU, and nprobe tunes recall); OPQ + IVF-PQ
    with the largest code that fits beyond that (searched with an exact re-rank); past that, the
    largest code with its inverted lists on disk, larger than RAM. nlist grows as ~4*sqrt(n);
    from HNSW_QUANTIZER_FROM vectors the lists are found through an HNSW graph.
    """
    cfg = cfg or IndexConfig()
    nlist = _nlist(n, d, max_memory)
    n_train = min(n, max(cfg.train_sample, KMEANS_POINTS_PER_LIST * nlist))
    budget = max_memory - _working_bytes(d, min(n_train, _sample_cap(d, max_memory)), cfg)
    if n <= cfg.exact_limit and estimate_memory("Flat", n, d) <= budget:
        return "Flat"
    coarse = f"IVF{nlist}_HNSW{HNSW_M}" if n >= HNSW_QUANTIZER_FROM else f"IVF{nlist}"
    if estimate_memory(f"{coarse},Flat", n, d) <= budget:
        return f"{coarse},Flat"
    codes = [m for m in (64, 48, 32, 24, 16, 8, 4) if m <= d // 2 and not d % m]
    for m in codes:  # each PQ sub-vector needs >= 2 dims and OPQ needs d_out divisible by m
        factory = f"OPQ{m}_{min(d, 4 * m)},{coarse},PQ{m}"
        if estimate_memory(factory, n, d) <= budget:
            return factory
    # Larger than the budget: built in parts and merged on disk, the inverted lists stay there
    # (search memory-maps them); only the coarse quantizer and the OPQ/PQ tables live in RAM.
    factory = f"OPQ{codes[0]}_{min(d, 4 * codes[0])},{coarse},PQ{codes[0]}" if codes else None
    if factory is not None and estimate_memory(factory, 0, d) <= budget:
        return factory
    raise AvindexError(
        f"--max-memory {max_memory}: too small for {n} vectors of dim {d} "
        f"(the smallest index needs ~{estimate_memory(f'{coarse},PQ4', n, d) >> 20} MiB "
        "plus the build's working set); give a larger --max-memory"
    )


def _faiss_reason(exc: BaseException) -> str:
    """The human part of a faiss exception ('Error in <C++ signature> at file:line: Error: ...')."""
    return re.split(r"(?:Error|failed): ", str(exc).strip().splitlines()[-1])[-1]


def _new_index(factory: str, d: int) -> faiss.Index:
    """Empty index for a factory string; non-IVF indexes get an id map so ids = clip ids."""
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise AvindexError(
            f"--factory {factory!r}: faiss cannot build it ({_faiss_reason(exc)}); "
            "use auto or a faiss index_factory string such as 'IVF1024,Flat'"
        ) from exc
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            opq = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(opq, faiss.OPQMatrix):
                opq.niter = opq.niter_pq_0 = OPQ_ROUNDS
                opq.max_train_points = OPQ_TRAIN_POINTS
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ):
        # index_factory turns on polysemous training (a simulated annealing that reorders PQ
        # codes for Hamming-distance filtering, which search never uses here): without it an
        # OPQ64_128,IVF1264,PQ64 build of 100k vectors took 962 s instead of 1,499 s, same
        # recall (2 cores, load average ~15).
        faiss.downcast_index(ivf).do_polysemous_training = False
    if ivf is None:
        index = faiss.IndexIDMap(index)  # IVF stores ids itself; Flat/HNSW need the map
    return index


def _is_lossy(index: faiss.Index, factory: str) -> bool:
    """Whether the index keeps compressed codes (so an exact re-rank improves its results)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return ivf.code_size < 4 * index.d  # IVF-Flat keeps d float32 values per row
    return "PQ" in factory or "SQ" in factory


def _quantizer_is_hnsw(index: faiss.Index) -> bool:
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW)


def _tune_grid(index: faiss.Index, k: int) -> list[dict[str, int]]:
    """Search settings to try, fastest (lowest recall) first; [{}] for an exact index."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        top = min(ivf.nlist, GPU_MAX_K)
        # Steps of ~1.4x rather than 2x: near the target, doubling can overshoot by a lot.
        probes = sorted({min(top, v) for i in range(12) for v in (1 << i, (3 << i) // 2)})
        if _quantizer_is_hnsw(index):
            # The graph must find the nprobe nearest lists: explore ~2x as many candidates.
            return [{"nprobe": p, "quantizer_efSearch": max(64, 2 * p)} for p in probes]
        return [{"nprobe": p} for p in probes]
    if "HNSW" in type(faiss.downcast_index(_base(index))).__name__:
        return [{"efSearch": max(v, k)} for v in (16, 32, 64, 128, 256, 512, 1024, 2048)]
    return [{}]


def _base(index: faiss.Index) -> faiss.Index:
    """The index inside an IndexIDMap (or the index itself)."""
    index = faiss.downcast_index(index)
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


def _set_params(index: faiss.Index, params: dict[str, int], device: str) -> None:
    space = faiss.GpuParameterSpace() if device == "cuda" else faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


def _to_device(index: faiss.Index, device: str) -> tuple[faiss.Index, str]:
    """Move an index to all GPUs when device is cuda and faiss supports its type there."""
    on_cpu_only = "HNSW" in type(_base(index)).__name__ or _quantizer_is_hnsw(index)
    if device != "cuda" or on_cpu_only:
        return index, "cpu"  # faiss has no GPU HNSW: it stays on the CPU
    return faiss.index_cpu_to_all_gpus(index), "cuda"


def _sample(
    store: Store, modality: str, n: int, seed: int, run: int
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, normalised vectors) of n seeded random rows, read as runs of `run` rows.

    Only the sampled rows are read, never the whole modality: the runs start at random
    positions of random shards. They are read through h5py, not a memory map: the kernel maps
    ~100 KiB around each touched page, which counted ~1.9 GB in the build's RSS for a 200k
    sample of a 10M store.
    """
    total = store.count(modality)
    n = min(n, total)
    rng = np.random.default_rng(seed)
    runs = rng.choice(math.ceil(total / run), size=math.ceil(n / run), replace=False)
    positions = (runs[:, None] * run + np.arange(run)).ravel()
    positions = positions[positions < total]
    if len(positions) > n:  # the last run of the modality may be short: trim to exactly n
        positions = rng.choice(positions, n, replace=False)
    ids = store.ids_at(modality, np.sort(positions))
    return ids, normalize_rows(store.vectors(ids, modality))


def _train(
    index: faiss.Index,
    factory: str,
    sample: np.ndarray,
    shape: tuple[int, int, str],
    device: str,
    cfg: IndexConfig,
) -> None:
    """Train on the sample; on cuda the k-means assignments run on the GPUs."""
    ivf = faiss.try_extract_index_ivf(index)
    gpu_kmeans = None
    if device == "cuda" and ivf is not None:
        gpu_kmeans = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, ivf.metric_type))
        ivf.clustering_index = gpu_kmeans
    try:
        index.train(sample)
    except RuntimeError as exc:
        raise _fill_error(factory, shape, "train", exc, cfg) from exc
    finally:
        if gpu_kmeans is not None:
            ivf.clustering_index = None


def _fill_error(
    factory: str, shape: tuple[int, int, str], what: str, exc: BaseException, cfg: IndexConfig
) -> BaseException:
    """A faiss failure to train or fill a user's factory is a user error; with auto, a bug."""
    if cfg.factory == "auto":
        return exc  # auto sizes the index to the data: a failure here is a bug, not a user error
    n, d, modality = shape
    return AvindexError(
        f"--factory {factory!r}: faiss cannot {what} it with {n} {modality} vectors "
        f"({_faiss_reason(exc)}); use fewer inverted lists than vectors, e.g. "
        f"IVF{_nlist(n, d, cfg.max_memory)},Flat, or --factory auto"
    )


def _read(folder: Path, entry: dict[str, Any], modality: str) -> faiss.Index:
    """An index.json entry's index, memory-mapped where faiss can (lists, flat codes)."""
    path = entry_path(folder, entry, modality, "faiss")
    ivfdata = entry_path(folder, entry, modality, "ivfdata")
    if not path.exists():
        raise AvindexError(
            f"{path}: index file missing; rebuild with `avindex index {folder.parent}`"
        )
    if ivfdata is None:
        return _read_mmap(path)
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)  # lists are mapped below
    except RuntimeError as exc:
        raise AvindexError(
            f"{path}: cannot read the index ({_faiss_reason(exc)}); rebuild it"
        ) from exc
    ivf = faiss.try_extract_index_ivf(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
    size = ivfdata.stat().st_size if ivfdata.exists() else -1
    if not isinstance(lists, faiss.OnDiskInvertedLists) or size < lists.totsize:
        # A short file would be mapped anyway and crash the process (SIGBUS) when searched.
        raise AvindexError(
            f"{ivfdata}: inverted lists missing or truncated; "
            f"rebuild with `avindex index {folder.parent}`"
        )
    # The file name stored inside the index is ignored: the lists are where index.json says.
    lists.filename = str(ivfdata)
    lists.read_only = True
    lists.do_mmap()
    lists.prefetch_nthread = 0  # see _read_mmap
    return index


def _read_mmap(path: Path) -> faiss.Index:
    """Read an index memory-mapped where faiss can (flat codes and inverted lists), else plainly.

    OnDiskInvertedLists (what IO_FLAG_MMAP gives IVF indexes) launches up to 32 prefetch threads
    per search: one query per call ran ~20x slower than in memory (measured ~1,000 vs ~22,000
    queries/s, IVF1264,Flat nprobe 8, 100k x 128, 2 cores). The page cache prefetches anyway.
    """
    for flags in (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC, faiss.IO_FLAG_MMAP, 0):
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError:
            continue  # this index type cannot be mapped that way; try the next
        ivf = faiss.try_extract_index_ivf(index)
        lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
        if isinstance(lists, faiss.OnDiskInvertedLists):
            lists.prefetch_nthread = 0
        return index
    raise AvindexError(f"{path}: cannot read the index; rebuild it with `avindex index`")


def _empty_copy(folder: Path, entry: dict[str, Any], modality: str) -> faiss.Index:
    """The trained, empty IVF index of an entry (coarse quantizer, OPQ and PQ kept)."""
    index = faiss.read_index(str(entry_path(folder, entry, modality, "faiss")), faiss.IO_FLAG_MMAP)
    ivf = faiss.extract_index_ivf(index)
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(empty, True)
    empty.this.disown()  # owned by the index now
    index.ntotal = ivf.ntotal = 0
    return index


def _check_base(
    index: faiss.Index, entry: dict[str, Any], store: Store, modality: str, covered: list[str]
) -> None:
    """An index to extend must hold exactly the rows index.json and its shards say it does."""
    expected = store.count(modality, covered)
    if index.ntotal != entry["count"] or entry["count"] != expected:
        raise AvindexError(
            f"{store.dir}: the {modality} index holds {index.ntotal} vectors, index.json says "
            f"{entry['count']} and its shards hold {expected} (interrupted update?); "
            f"rebuild it with `avindex index {store.dir}`"
        )


@contextlib.contextmanager
def _uncommitted(folder: Path) -> Iterator[list[Path]]:
    """Collects a new generation's files; on failure removes those index.json does not name."""
    files: list[Path] = []
    try:
        yield files
    except BaseException:
        try:
            info = read_index_info(folder.parent)
            keep = {e.get(k) for e in info["modalities"].values() for k in ("file", "ivfdata")}
        except AvindexError:
            keep = set()
        for path in files:
            if path.name not in keep:
                path.unlink(missing_ok=True)
        raise


def _part_tasks(
    store: Store,
    modality: str,
    covered: int,
    start_file: Path,
    parts: int,
    queries: np.ndarray,
    tmp: Path,
    cfg: IndexConfig,
) -> list[PartTask]:
    """Parts adding the shards after the first `covered`; the covered ones are scanned only,
    for the exact top-k of the recall queries."""
    names = store.shard_names
    rows = store.shard_counts(modality).tolist()
    add = split_shards(names[covered:], rows[covered:], parts)
    scan_parts = math.ceil(sum(rows[:covered]) / max(1, cfg.part_rows))
    scan = split_shards(names[:covered], rows[:covered], scan_parts)
    return [
        PartTask(
            store_dir=str(store.dir),
            shard_order=tuple(names),
            modality=modality,
            shards=shards,
            add=adds,
            start_file=str(start_file),
            out_file=str(tmp / f"part-{i:05d}.faiss") if adds else "",
            queries=queries,
            k=cfg.recall_k + 1,
            block_rows=cfg.block_rows,
            threads=0,  # set by the runner that takes the tasks
        )
        for i, (shards, adds) in enumerate([(s, True) for s in add] + [(s, False) for s in scan])
    ]


@dataclass
class _Start:
    """What the parts start from: a trained empty index (or, for non-IVF updates, the old one)."""

    factory: str
    index: faiss.Index
    old: faiss.Index | None  # the index being extended (update), memory-mapped
    rerank: int
    train_vectors: int


def _starting_index(
    store: Store,
    modality: str,
    cfg: IndexConfig,
    device: str,
    base: tuple[int, dict[str, Any]] | None,
) -> _Start:
    """Train a new index on a sample (build), or reopen the one to extend (update)."""
    folder = index_dir(store.dir)
    n, d = store.count(modality), store.meta.dim(modality)
    if base is None:
        factory = cfg.factory
        if factory == "auto":
            factory = choose_factory(n, d, cfg.max_memory, cfg)
        index = _new_index(factory, d)
        n_train = 0
        if not index.is_trained:
            nlist = faiss.extract_index_ivf(index).nlist if _is_ivf(index) else 0
            n_train = train_size(n, nlist, d, cfg)
            sample = _sample(store, modality, n_train, cfg.seed, SAMPLE_RUN)[1]
            _train(index, factory, sample, (n, d, modality), device, cfg)
        rerank = cfg.rerank if _is_lossy(index, factory) else 0
        return _Start(factory, index, None, rerank, n_train)
    covered, entry = base
    old = _read(folder, entry, modality)
    _check_base(old, entry, store, modality, store.shard_names[:covered])
    # IVF: parts start from the trained empty index and are merged with the old lists;
    # other indexes are extended as a whole.
    index = _empty_copy(folder, entry, modality) if _is_ivf(old) else old
    return _Start(entry["factory"], index, old, entry["rerank"], 0)


def _add_parts(
    store: Store,
    modality: str,
    start: _Start,
    covered: int,
    sample: tuple[np.ndarray, np.ndarray],
    tmp: Path,
    runner: Runner | None,
    progress: Progress | None,
    cfg: IndexConfig,
) -> tuple[list[PartTask], np.ndarray]:
    """Run the parts (each adds its shards to a copy of the start index, in its own file);
    returns the tasks and the exact top-k of the sample queries (self excluded)."""
    n, d = store.count(modality), store.meta.dim(modality)
    n_add = n - store.count(modality, store.shard_names[:covered])
    workers = cfg.workers or os.cpu_count() or 1
    parts = 1
    if _is_ivf(start.index):
        need = estimate_memory(start.factory, n_add, d)
        parts = cfg.parts or plan_parts(n_add, need, cfg.max_memory, cfg.part_rows, workers)
    start_file = tmp / "start.faiss"
    checked_write(start_file, lambda p: faiss.write_index(start.index, p), "trained index")
    query_ids, queries = sample
    tasks = _part_tasks(store, modality, covered, start_file, parts, queries, tmp, cfg)
    runner = runner or LocalRunner(min(workers, len(tasks)))
    tasks = [dataclasses.replace(t, threads=runner.threads) for t in tasks]
    exact = ExactTopK(queries, cfg.recall_k + 1)
    done = 0
    if progress:
        progress(modality, 0, n_add)
    try:
        for result in runner.map(add_part, tasks):
            exact.add_result(result.scores, result.labels)
            done += result.added
            if progress:
                progress(modality, done, n_add)
    except RuntimeError as exc:
        raise _fill_error(start.factory, (n, d, modality), "fill", exc, cfg) from exc
    return tasks, drop_self(exact.finalize()[1], query_ids, cfg.recall_k)


def _index_modality(
    store: Store,
    modality: str,
    cfg: IndexConfig,
    device: str,
    base: tuple[int, dict[str, Any]] | None,
    runner: Runner | None,
    progress: Progress | None,
    new_files: list[Path],
) -> dict[str, Any]:
    """Build one modality's index (base None) or extend it with the shards after the `covered`
    ones of base = (covered, entry): train -> add parts -> merge -> tune -> entry.

    The new generation's files get new names (collected in new_files); nothing that index.json
    names is changed.
    """
    started = time.perf_counter()
    folder = index_dir(store.dir)
    covered, entry = base if base is not None else (0, None)
    start = _starting_index(store, modality, cfg, device, base)
    sample = _sample(store, modality, cfg.recall_queries, cfg.seed + 1, 1)
    tmp = temp_path(folder, modality)
    tmp.mkdir()
    try:
        tasks, truth = _add_parts(
            store, modality, start, covered, sample, tmp, runner, progress, cfg
        )
        files = _write_generation(folder, modality, start, tasks, tmp / "start.faiss", new_files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    d = store.meta.dim(modality)
    new_entry = {"factory": start.factory, "dim": d, "rerank": start.rerank, **files}
    loaded = _load(folder, new_entry, modality, "cpu", store, mapped=False)
    params, recall = _tune(loaded, sample[1], sample[0], truth, cfg)
    fields = {
        **new_entry,
        "count": int(loaded.index.ntotal),
        f"recall_at_{cfg.recall_k}": recall,
        "recall_queries": len(sample[0]),
        "recall_target_met": recall >= cfg.target_recall,
        "params": params,
        "parts": len([t for t in tasks if t.add]),
    }
    seconds = round(time.perf_counter() - started, 3)
    if entry is not None:
        return {**entry, **fields, "update_seconds": seconds}
    return {
        **fields,
        "train_vectors": start.train_vectors,
        "build_seconds": seconds,
        "device": device,
        "estimated_bytes": estimate_memory(start.factory, store.count(modality), d),
    }


def _is_ivf(index: faiss.Index) -> bool:
    return faiss.try_extract_index_ivf(index) is not None


def _write_generation(
    folder: Path,
    modality: str,
    start: _Start,
    tasks: list[PartTask],
    start_file: Path,
    new_files: list[Path],
) -> dict[str, str | None]:
    """Write the new generation's files under new names, durably; returns their entry fields.

    IVF: the old lists (update) and every part's lists are merged into one new .ivfdata file.
    Other indexes are built as one part, whose file becomes the index.
    """
    path = folder / new_file_name(modality, "faiss")
    parts = sorted(t.out_file for t in tasks if t.add)
    if not _is_ivf(start.index):
        new_files.append(path)
        durable_write(path, lambda p: os.replace(parts[0], p), "index")
        return {"file": path.name, "ivfdata": None}
    ivfdata = folder / new_file_name(modality, "ivfdata")
    new_files += [ivfdata, path]
    merged = faiss.read_index(str(start_file))
    sources = ([start.old] if start.old is not None else []) + [
        faiss.read_index(p, faiss.IO_FLAG_MMAP) for p in parts
    ]
    try:
        merge_on_disk(merged, sources, ivfdata)
        durable_write(path, lambda p: faiss.write_index(merged, p), "index")
    except RuntimeError as exc:  # e.g. the disk filled up while the lists were merged
        raise AvindexError(
            f"{ivfdata}: cannot write the inverted lists ({_faiss_reason(exc)}); free space and "
            "run again (the previous index is kept)"
        ) from exc
    finally:
        merged = sources = None  # unmaps the lists, so the fsync below covers every page
    sync_file(ivfdata, "inverted lists")
    return {"file": path.name, "ivfdata": ivfdata.name}


def _tune(
    loaded: LoadedIndex,
    queries: np.ndarray,
    query_ids: np.ndarray,
    truth: np.ndarray,
    cfg: IndexConfig,
) -> tuple[dict[str, int], float]:
    """Fastest settings reaching cfg.target_recall recall@k (or the best tried), measured
    through the same search (re-rank included) that queries use."""
    k = cfg.recall_k
    params: dict[str, int] = {}
    recall = 1.0
    for params in _tune_grid(loaded.index, k):
        _set_params(loaded.index, params, loaded.device)
        if len(queries):
            _, labels = _search(loaded, queries, k + 1)
            recall = recall_at_k(drop_self(labels, query_ids, k), truth)
        if recall >= cfg.target_recall:
            break
    return params, recall


def _shard_table(store: Store) -> list[dict[str, Any]]:
    return [{"name": s.name, "first_id": s.first_id, "count": s.rows} for s in store.shards]


def _commit(store: Store, entries: dict[str, Any], cfg: IndexConfig) -> dict[str, Any]:
    """Switch index.json to the new generation (one atomic rename)."""
    info = {
        "model_sha256": store.meta.model_sha256,
        "metric": METRIC,
        "normalized": True,
        "num_clips": store.num_clips,
        "shards": _shard_table(store),
        "max_memory": cfg.max_memory,
        "modalities": entries,
    }
    return write_index_info(index_dir(store.dir), info)


def _modalities(modality: str) -> list[str]:
    if modality == "both":
        return list(MODALITIES)
    return [check_modality(modality)]


def _current_info(store_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The index.json a build replaces, or None when there is none or it is unusable."""
    try:
        return read_index_info(store_dir)
    except AvindexError:
        return None


def build_index(
    store_dir: str | os.PathLike[str],
    cfg: IndexConfig | None = None,
    modality: str = "both",
    progress: Progress | None = None,
    runner: Runner | None = None,
) -> dict[str, Any]:
    """Build the index of each modality from scratch over every shard; returns index.json.

    Parts run on `runner` (default: processes of this machine, one per core).
    """
    cfg = cfg or IndexConfig()
    device = resolve_faiss_device(cfg.device)
    store = Store(store_dir)
    if not store.shards:
        raise AvindexError(f"{store_dir}: store holds no shards; run `avindex embed` first")
    folder = index_dir(store_dir)
    with build_lock(folder):
        old = _current_info(store_dir)
        with _uncommitted(folder) as new_files:
            entries = {}
            for name in _modalities(modality):
                if store.count(name):
                    entries[name] = _index_modality(
                        store, name, cfg, device, None, runner, progress, new_files
                    )
            if not entries:
                raise AvindexError(
                    f"{store_dir}: no {modality} rows to index (no clips with audio?)"
                )
            same = old and old["shards"] == _shard_table(store)
            if same and old["model_sha256"] == store.meta.model_sha256:
                entries = {**old["modalities"], **entries}  # keep the other modality's index
            info = _commit(store, entries, cfg)
        remove_unreferenced(folder, info)
    return info


def update_index(
    store_dir: str | os.PathLike[str],
    cfg: IndexConfig | None = None,
    modality: str = "both",
    progress: Progress | None = None,
    runner: Runner | None = None,
) -> dict[str, Any]:
    """Add the shards not yet indexed, after the covered ones (their ids never change).

    Every modality in index.json is updated (index.json records one shard list for all), so
    `modality` only checks that the named index exists.
    """
    cfg = cfg or IndexConfig()
    device = resolve_faiss_device(cfg.device)
    folder = index_dir(store_dir)
    if not (folder / "index.json").exists():
        read_index_info(store_dir)  # the one-line "store has no index" error
    with build_lock(folder):
        store, info = indexed_store(store_dir)
        entries = dict(info["modalities"])
        if modality != "both" and check_modality(modality) not in entries:
            raise AvindexError(
                f"{store_dir}: no {modality} index to update; build it without --update"
            )
        covered = len(info["shards"])
        if covered == len(store.shards):
            return info
        with _uncommitted(folder) as new_files:
            for name, entry in entries.items():
                entries[name] = _index_modality(
                    store, name, cfg, device, (covered, entry), runner, progress, new_files
                )
            info = _commit(store, entries, cfg)
        remove_unreferenced(folder, info)
    return info


def indexed_store(store_dir: str | os.PathLike[str]) -> tuple[Store, dict[str, Any]]:
    """The store opened in its index's id order, checked to be embedded by the index's model."""
    info = read_index_info(store_dir)
    store = Store(store_dir, shard_order=[s["name"] for s in info["shards"]])
    if store.meta.model_sha256 != info["model_sha256"]:
        raise AvindexError(
            f"{store_dir}: index was built from another model's embeddings "
            f"({info['model_sha256'][:12]} vs {store.meta.model_sha256[:12]}); "
            f"rebuild it with `avindex index {store_dir}`"
        )
    return store, info


def _load(
    folder: Path,
    entry: dict[str, Any],
    modality: str,
    device: str,
    store: Store | None,
    mapped: bool = True,
) -> LoadedIndex:
    """An entry's index on `device` with its search parameters (and re-rank rows if needed).

    Re-rank rows come from memory maps of the shards (fast single queries; the pages they touch
    count in RSS) or, with mapped=False (tuning inside a memory-bounded build), from h5py.
    """
    index = _read(folder, entry, modality)
    if "count" in entry and index.ntotal != entry["count"]:
        raise AvindexError(
            f"{folder}: the {modality} index holds {index.ntotal} vectors but index.json says "
            f"{entry['count']}; rebuild with `avindex index {folder.parent}`"
        )
    index, used = _to_device(index, device)
    _set_params(index, entry.get("params", {}), used)
    rows = None
    if entry["rerank"] and store is not None:
        rows = RowReader(store, modality) if mapped else partial(store.vectors, modality=modality)
    return LoadedIndex(index=index, modality=modality, device=used, entry=entry, rows=rows)


def load_index(
    store_dir: str | os.PathLike[str], modality: str, device: str = "auto"
) -> LoadedIndex:
    """Load one modality's index (memory-mapped on CPU) with its tuned search parameters."""
    info = read_index_info(store_dir)
    entry = info["modalities"].get(check_modality(modality))
    if entry is None:
        raise AvindexError(
            f"{store_dir}: no {modality} index; "
            f"run `avindex index {store_dir} --modality {modality}`"
        )
    resolved = resolve_faiss_device(device)
    store = indexed_store(store_dir)[0] if entry["rerank"] else None
    return _load(index_dir(store_dir), entry, modality, resolved, store)


def _search(loaded: LoadedIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of normalised queries; lossy indexes fetch k x rerank candidates and re-rank them
    exactly against the stored vectors."""
    if loaded.rows is None:
        return loaded.index.search(queries, k)
    wide = max(k, min(k * loaded.entry["rerank"], loaded.index.ntotal))
    if loaded.device == "cuda":
        wide = max(k, min(wide, GPU_MAX_K))
    _, candidates = loaded.index.search(queries, wide)
    return _rerank(loaded.rows, queries, candidates, k)


def _rerank(
    rows: Rows, queries: np.ndarray, candidates: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best k of each row's candidate ids by exact cosine with the stored vectors."""
    width = min(k, candidates.shape[1])
    scores = np.full((len(queries), k), MISSING_SCORE, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    for lo in range(0, len(queries), RERANK_BLOCK):
        cand = candidates[lo : lo + RERANK_BLOCK]
        valid = cand >= 0
        uniq, where = np.unique(cand[valid], return_inverse=True)
        vecs = normalize_rows(rows(uniq))
        exact = np.full(cand.shape, -np.inf, np.float32)
        query_rows = queries[lo : lo + RERANK_BLOCK][np.nonzero(valid)[0]]
        exact[valid] = np.einsum("ij,ij->i", query_rows, vecs[where])
        order = np.argsort(-exact, axis=1, kind="stable")[:, :width]
        best = np.take_along_axis(exact, order, axis=1)
        found = np.isfinite(best)
        scores[lo : lo + len(cand), :width] = np.where(found, best, MISSING_SCORE)
        ids[lo : lo + len(cand), :width] = np.where(found, np.take_along_axis(cand, order, 1), -1)
    return scores, ids


def search_vectors(
    index: LoadedIndex, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (cosine scores, clip ids) of each query row; missing results have id -1."""
    if k < 1:
        raise AvindexError(f"-k {k}: must be at least 1")
    if index.device == "cuda" and k > GPU_MAX_K:
        raise AvindexError(
            f"-k {k}: faiss GPU indexes return at most {GPU_MAX_K} results; "
            "use a smaller -k or --device cpu"
        )
    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    if queries.shape[1] != index.index.d:
        raise AvindexError(
            f"query vectors have dim {queries.shape[1]}, the {index.modality} index has "
            f"{index.index.d}; was the query encoded by the store's model?"
        )
    return _search(index, normalize_rows(queries), k)


__all__ = [
    "LoadedIndex",
    "build_index",
    "choose_factory",
    "estimate_memory",
    "indexed_store",
    "load_index",
    "normalize_rows",
    "parse_size",
    "read_index_info",
    "recall_at_k",
    "search_vectors",
    "train_size",
    "update_index",
]
