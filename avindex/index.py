"""faiss indexes over a store: factory by size and memory, streamed build, recall-tuned search."""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from avindex.config import IndexConfig
from avindex.devices import resolve_faiss_device
from avindex.errors import AvindexError
from avindex.store import MODALITIES, Store, check_modality

if TYPE_CHECKING:
    import faiss

INDEX_DIR = "index"
INDEX_JSON = "index.json"
INDEX_SCHEMA = 1
METRIC = "inner_product"  # on L2-normalised vectors: score = cosine similarity
GPU_MAX_K = (
    2048  # faiss GPU indexes return at most this many neighbours (and probe this many lists)
)
# Inverted lists are std::vectors that double when they grow, so a list may hold up to 2x its
# payload while vectors are added: memory estimates of IVF indexes use this factor.
IVF_GROWTH = 2.0
NLIST_MIN, NLIST_MAX = 16, 65_536
KMEANS_POINTS_PER_LIST = 39  # faiss warns below this many training points per centroid

Progress = Callable[[str, int, int], None]  # (modality, rows done, rows total)


@dataclass
class LoadedIndex:
    """A faiss index ready to search, with the device it lives on and its index.json entry."""

    index: faiss.Index
    modality: str
    device: str  # 'cpu' | 'cuda'
    entry: dict[str, Any]


def parse_size(text: str | int) -> int:
    """Bytes from '4G', '512M', '1.5g', '100k' or a plain integer."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match:
        raise AvindexError(f"--max-memory {text!r}: expected a size such as 4G, 512M or 1000000")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[match.group(2)]
    return int(float(match.group(1)) * scale)


def _nlist(n: int, cfg: IndexConfig) -> int:
    """About 4*sqrt(n) lists, but never more than the training sample can fit k-means to."""
    trainable = max(1, min(n, cfg.train_sample) // KMEANS_POINTS_PER_LIST)
    return int(max(1, min(NLIST_MAX, trainable, max(NLIST_MIN, 4 * math.sqrt(n)))))


def _working_bytes(d: int, cfg: IndexConfig) -> int:
    """Memory the build needs beside the index: the training sample and ~3 float32 blocks."""
    return 4 * d * (cfg.train_sample + 3 * cfg.block_rows)


def estimate_memory(factory: str, n: int, d: int) -> int:
    """Bytes an index of `n` vectors of dim `d` needs while it is built (see the formulas)."""
    match = re.fullmatch(r"(?:OPQ(\d+)(?:_(\d+))?,)?IVF(\d+),(Flat|PQ(\d+))", factory)
    if factory == "Flat":
        return n * (4 * d + 8)  # float32 vectors + int64 ids in the IndexIDMap
    if factory.startswith("HNSW"):
        m = int(factory[4:] or 32)
        return n * (4 * d + 8 * m + 8 + 16)  # vectors + 2M level-0 links + ids + levels
    if match is None:
        return n * (4 * d + 8)  # unknown string: assume uncompressed vectors
    nlist = int(match.group(3))
    if match.group(4) == "Flat":
        # Inverted lists hold the float32 vector and int64 id of each row; centroids beside.
        return int(IVF_GROWTH * n * (4 * d + 8)) + nlist * d * 4
    m = int(match.group(5))
    d_out = int(match.group(2) or d)
    # m one-byte PQ codes + int64 id per row; coarse centroids, OPQ matrix and PQ codebooks.
    return int(IVF_GROWTH * n * (m + 8)) + nlist * d_out * 4 + d * d_out * 4 + 256 * d_out * 4


def choose_factory(n: int, d: int, max_memory: int, cfg: IndexConfig | None = None) -> str:
    """The faiss factory string `auto` builds for n vectors of dim d within max_memory bytes.

    Exact Flat up to cfg.exact_limit vectors; IVF-Flat while it fits (rather than HNSW: it trains
    and adds in seconds on few cores, runs on faiss GPU, and nprobe tunes recall); OPQ + IVF-PQ
    with the largest code that fits beyond that.
    """
    cfg = cfg or IndexConfig()
    budget = max_memory - _working_bytes(d, cfg)
    if n <= cfg.exact_limit and estimate_memory("Flat", n, d) <= budget:
        return "Flat"
    nlist = _nlist(n, cfg)
    ivf_flat = f"IVF{nlist},Flat"
    if estimate_memory(ivf_flat, n, d) <= budget:
        return ivf_flat
    for m in (64, 48, 32, 24, 16, 8, 4):
        if m > d // 2 or d % m:
            continue  # each PQ sub-vector needs >= 2 dims and OPQ needs d_out divisible by m
        d_out = min(d, 4 * m)
        factory = f"OPQ{m}_{d_out},IVF{nlist},PQ{m}"
        if estimate_memory(factory, n, d) <= budget:
            return factory
    raise AvindexError(
        f"--max-memory {max_memory}: too small for {n} vectors of dim {d} "
        f"(the smallest index needs ~{estimate_memory(f'IVF{nlist},PQ4', n, d) >> 20} MiB "
        "plus the build's working set); give a larger --max-memory"
    )


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Float32 rows (N, D) scaled to unit L2 norm (zero rows stay zero): inner product = cosine."""
    import faiss

    # One C-contiguous copy normalised in place by faiss: numpy's norm/divide/copy costs several
    # microseconds, a visible share of a single ~40 us query.
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(x)
    return x


def _faiss_reason(exc: RuntimeError) -> str:
    """The human part of a faiss exception ('Error in <C++ signature> at file:line: Error: ...')."""
    return re.split(r"(?:Error|failed): ", str(exc).strip().splitlines()[-1])[-1]


def _new_index(factory: str, d: int) -> faiss.Index:
    """Empty index for a factory string; non-IVF indexes get an id map so ids = clip ids."""
    import faiss

    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise AvindexError(
            f"--factory {factory!r}: faiss cannot build it ({_faiss_reason(exc)}); "
            "use auto or a faiss index_factory string such as 'IVF1024,Flat'"
        ) from exc
    if faiss.try_extract_index_ivf(index) is None:
        index = faiss.IndexIDMap(index)  # IVF stores ids itself; Flat/HNSW need the map
    return index


def _tune_param(index: faiss.Index) -> tuple[str | None, list[int]]:
    """The search knob of an index and the values to try, smallest (fastest) first."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        top = min(ivf.nlist, GPU_MAX_K)
        # Steps of ~1.4x rather than 2x: near the target, doubling can overshoot by a lot.
        return "nprobe", sorted({min(top, v) for i in range(12) for v in (1 << i, (3 << i) // 2)})
    if "HNSW" in type(faiss.downcast_index(_base(index))).__name__:
        return "efSearch", [16, 32, 64, 128, 256, 512, 1024, 2048]
    return None, []


def _base(index: faiss.Index) -> faiss.Index:
    """The index inside an IndexIDMap (or the index itself)."""
    import faiss

    index = faiss.downcast_index(index)
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


def _set_params(index: faiss.Index, params: dict[str, int], device: str) -> None:
    import faiss

    space = faiss.GpuParameterSpace() if device == "cuda" else faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


def _to_device(index: faiss.Index, device: str) -> tuple[faiss.Index, str]:
    """Move an index to all GPUs when device is cuda and faiss supports its type there."""
    import faiss

    if device != "cuda" or "HNSW" in type(_base(index)).__name__:
        return index, "cpu"  # faiss has no GPU HNSW: it stays on the CPU
    return faiss.index_cpu_to_all_gpus(index), "cuda"


def _to_cpu(index: faiss.Index, device: str) -> faiss.Index:
    import faiss

    return faiss.index_gpu_to_cpu(index) if device == "cuda" else index


def _topk_merge(heap: Any, queries: np.ndarray, ids: np.ndarray, vecs: np.ndarray, k: int) -> None:
    """Fold one block into the exact top-k of `queries` (ResultHeap keeps the best so far)."""
    import faiss

    scores, pos = faiss.knn(queries, vecs, min(k, len(vecs)), metric=faiss.METRIC_INNER_PRODUCT)
    labels = np.where(pos >= 0, ids[np.maximum(pos, 0)], -1)
    if labels.shape[1] < k:  # a block smaller than k: pad with empty results
        pad = k - labels.shape[1]
        labels = np.pad(labels, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    heap.add_result(np.ascontiguousarray(scores), np.ascontiguousarray(labels))


def _drop_self(labels: np.ndarray, query_ids: np.ndarray, k: int) -> np.ndarray:
    """Top-k labels without the query's own clip (a stored vector always finds itself)."""
    out = np.full((len(labels), k), -1, np.int64)
    for row, (found, qid) in enumerate(zip(labels, query_ids, strict=True)):
        rest = found[found != qid][:k]
        out[row, : len(rest)] = rest
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row's true neighbours (ignoring -1) that were found."""
    hits = [
        len(set(f[f >= 0]) & set(t[t >= 0])) / max(1, (t >= 0).sum())
        for f, t in zip(found, truth, strict=True)
    ]
    return float(np.mean(hits)) if hits else 1.0


class _Sample:
    """Seeded training sample and recall queries, drawn in one streamed pass over the store."""

    def __init__(
        self, store: Store, modality: str, n_train: int, n_queries: int, cfg: IndexConfig
    ) -> None:
        total = store.count(modality)
        rng = np.random.default_rng(cfg.seed)
        train_pos = np.sort(rng.choice(total, size=min(n_train, total), replace=False))
        query_pos = np.sort(rng.choice(total, size=min(n_queries, total), replace=False))
        train, queries, query_ids = [], [], []
        seen = 0
        for ids, vecs in store.iter_blocks(modality, cfg.block_rows):
            span = slice(seen, seen + len(ids))
            t = train_pos[
                np.searchsorted(train_pos, span.start) : np.searchsorted(train_pos, span.stop)
            ]
            q = query_pos[
                np.searchsorted(query_pos, span.start) : np.searchsorted(query_pos, span.stop)
            ]
            train.append(vecs[t - seen])
            queries.append(vecs[q - seen])
            query_ids.append(ids[q - seen])
            seen += len(ids)
        d = store.meta.dim(modality)
        self.train = normalize_rows(np.concatenate(train) if train else np.zeros((0, d)))
        self.queries = normalize_rows(np.concatenate(queries) if queries else np.zeros((0, d)))
        self.query_ids = np.concatenate(query_ids) if query_ids else np.zeros(0, np.int64)


def _add_and_truth(
    index: faiss.Index | None,
    store: Store,
    modality: str,
    add_shards: Sequence[str] | None,
    sample: _Sample,
    cfg: IndexConfig,
    progress: Progress | None,
) -> np.ndarray:
    """Stream the store once: add blocks of `add_shards` to `index`, and fold every block into
    the exact top-(k+1) of the sample queries. Returns the exact top-k labels without self."""
    import faiss

    k = cfg.recall_k + 1
    heap = faiss.ResultHeap(len(sample.queries), k, keep_max=True)
    adding = set(add_shards) if add_shards is not None else None
    total = store.count(modality, add_shards)
    done = 0
    for shard in store.shard_names:
        for ids, vecs in store.iter_blocks(modality, cfg.block_rows, shards=[shard]):
            vecs = normalize_rows(vecs)
            if len(sample.queries):
                _topk_merge(heap, sample.queries, ids, vecs, k)
            if index is not None and (adding is None or shard in adding):
                index.add_with_ids(vecs, ids)
                done += len(ids)
                if progress:
                    progress(modality, done, total)
    heap.finalize()
    return _drop_self(heap.I, sample.query_ids, cfg.recall_k)


def _tune(
    index: faiss.Index, sample: _Sample, truth: np.ndarray, device: str, cfg: IndexConfig
) -> tuple[dict[str, int], float]:
    """Smallest nprobe/efSearch reaching cfg.target_recall recall@k (or the largest tried)."""
    name, values = _tune_param(index)
    k = cfg.recall_k
    params: dict[str, int] = {}
    recall = 1.0
    for value in values or [None]:
        if name is not None:
            params = {name: max(value, k) if name == "efSearch" else value}
            _set_params(index, params, device)
        if len(sample.queries):
            _, labels = index.search(sample.queries, k + 1)
            recall = recall_at_k(_drop_self(labels, sample.query_ids, k), truth)
        if recall >= cfg.target_recall:
            break
    return params, recall


def _index_dir(store_dir: str | os.PathLike[str]) -> Path:
    return Path(store_dir) / INDEX_DIR


def read_index_info(store_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The store's index.json; a store without one, or with a corrupt one, is a user error."""
    path = _index_dir(store_dir) / INDEX_JSON
    if not path.exists():
        raise AvindexError(f"{store_dir}: store has no index; run `avindex index {store_dir}`")
    try:
        info = json.loads(path.read_bytes())
    except ValueError:  # JSONDecodeError / UnicodeDecodeError: a hand edit, a full disk
        info = None
    if not isinstance(info, dict):
        raise AvindexError(
            f"{path}: corrupt index.json (not an index description); "
            f"rebuild the index with `avindex index {store_dir}`"
        )
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


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def _build_modality(
    store: Store,
    modality: str,
    cfg: IndexConfig,
    device: str,
    progress: Progress | None,
) -> dict[str, Any] | None:
    """Build, tune and save one modality's index; None when the store has no rows for it."""
    import faiss

    n = store.count(modality)
    if n == 0:
        return None
    d = store.meta.dim(modality)
    started = time.perf_counter()
    factory = cfg.factory if cfg.factory != "auto" else choose_factory(n, d, cfg.max_memory, cfg)
    index = _new_index(factory, d)
    n_train = cfg.train_sample if not index.is_trained else 0
    sample = _Sample(store, modality, n_train, cfg.recall_queries, cfg)
    index, used = _to_device(index, device)
    try:
        if not index.is_trained:
            index.train(sample.train)
        del sample.train
        truth = _add_and_truth(index, store, modality, None, sample, cfg, progress)
    except RuntimeError as exc:
        if cfg.factory == "auto":
            raise  # auto sizes the index to the data: a failure here is a bug, not a user error
        raise AvindexError(
            f"--factory {factory!r}: faiss cannot train or fill it with {n} {modality} vectors "
            f"({_faiss_reason(exc)}); use fewer inverted lists than vectors, e.g. "
            f"IVF{_nlist(n, cfg)},Flat, or --factory auto"
        ) from exc
    params, recall = _tune(index, sample, truth, used, cfg)
    cpu_index = _to_cpu(index, used)
    file = f"{modality}.faiss"
    _atomic_write(_index_dir(store.dir) / file, lambda p: faiss.write_index(cpu_index, p))
    return {
        "file": file,
        "factory": factory,
        "dim": d,
        "count": int(cpu_index.ntotal),
        **_quality(recall, len(sample.queries), params, cfg),
        "build_seconds": round(time.perf_counter() - started, 3),
        "device": used,
        "estimated_bytes": estimate_memory(factory, n, d),
    }


def _quality(recall: float, queries: int, params: dict[str, int], cfg: IndexConfig) -> dict:
    """index.json fields for the measured recall and the search parameters tuned to reach it."""
    return {
        f"recall_at_{cfg.recall_k}": recall,
        "recall_queries": queries,
        "recall_target_met": recall >= cfg.target_recall,
        "params": params,
    }


def _shard_table(store: Store) -> list[dict[str, Any]]:
    return [{"name": s.name, "first_id": s.first_id, "count": s.rows} for s in store.shards]


def _write_info(store: Store, entries: dict[str, Any], cfg: IndexConfig) -> dict[str, Any]:
    info = {
        "schema": INDEX_SCHEMA,
        "model_sha256": store.meta.model_sha256,
        "metric": METRIC,
        "normalized": True,
        "num_clips": store.num_clips,
        "shards": _shard_table(store),
        "max_memory": cfg.max_memory,
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "modalities": entries,
    }
    path = _index_dir(store.dir) / INDEX_JSON
    _atomic_write(path, lambda p: Path(p).write_text(json.dumps(info, indent=2)))
    return info


def _modalities(modality: str) -> list[str]:
    if modality == "both":
        return list(MODALITIES)
    return [check_modality(modality)]


def build_index(
    store_dir: str | os.PathLike[str],
    cfg: IndexConfig | None = None,
    modality: str = "both",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Build the index of each modality from scratch over every shard; returns index.json."""
    cfg = cfg or IndexConfig()
    device = resolve_faiss_device(cfg.device)
    store = Store(store_dir)
    if not store.shards:
        raise AvindexError(f"{store_dir}: store holds no shards; run `avindex embed` first")
    _index_dir(store_dir).mkdir(exist_ok=True)
    entries = {}
    for name in _modalities(modality):
        entry = _build_modality(store, name, cfg, device, progress)
        if entry is not None:
            entries[name] = entry
    if not entries:
        raise AvindexError(f"{store_dir}: no {modality} rows to index (no clips with audio?)")
    try:  # keep the other modality's index when it covers exactly the same shards
        old = read_index_info(store_dir)
    except AvindexError:
        old = None
    if old and old["shards"] == _shard_table(store):
        entries = {**old["modalities"], **entries}
    return _write_info(store, entries, cfg)


def update_index(
    store_dir: str | os.PathLike[str],
    cfg: IndexConfig | None = None,
    modality: str = "both",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Add the shards not yet indexed, after the covered ones (their ids never change).

    Every modality in index.json is updated (index.json records one shard list for all), so
    `modality` only checks that the named index exists.
    """
    import faiss

    cfg = cfg or IndexConfig()
    device = resolve_faiss_device(cfg.device)
    store, info = indexed_store(store_dir)
    covered = len(info["shards"])
    new = store.shard_names[covered:]
    entries = dict(info["modalities"])
    missing = [m for m in _modalities(modality) if m not in entries and modality != "both"]
    if missing:
        raise AvindexError(f"{store_dir}: no {modality} index to update; build it without --update")
    if not new:
        return info
    for name in list(entries):
        started = time.perf_counter()
        entry = entries[name]
        index = faiss.read_index(str(_index_dir(store_dir) / entry["file"]))
        index, used = _to_device(index, device)
        sample = _Sample(store, name, 0, cfg.recall_queries, cfg)
        truth = _add_and_truth(index, store, name, new, sample, cfg, progress)
        params, recall = _tune(index, sample, truth, used, cfg)
        cpu_index = _to_cpu(index, used)
        path = _index_dir(store_dir) / entry["file"]
        _atomic_write(path, lambda p, ix=cpu_index: faiss.write_index(ix, p))
        entries[name] = {
            **entry,
            "count": int(cpu_index.ntotal),
            **_quality(recall, len(sample.queries), params, cfg),
            "update_seconds": round(time.perf_counter() - started, 3),
        }
    return _write_info(store, entries, cfg)


def _no_prefetch_threads(index: faiss.Index) -> None:
    """Stop mapped inverted lists from starting prefetch threads on every search call.

    OnDiskInvertedLists (what IO_FLAG_MMAP gives IVF indexes) launches up to 32 threads per
    search: one query per call ran ~20x slower than in memory (measured ~1,000 vs ~22,000
    queries/s, IVF1264,Flat nprobe 8, 100k x 128, 2 cores). The page cache prefetches anyway.
    """
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
    if isinstance(lists, faiss.OnDiskInvertedLists):
        lists.prefetch_nthread = 0


def _read_mmap(path: str) -> faiss.Index:
    """Read an index memory-mapped where faiss can (flat codes and inverted lists), else plainly."""
    import faiss

    for flags in (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC, faiss.IO_FLAG_MMAP, 0):
        try:
            index = faiss.read_index(path, flags)
        except RuntimeError:
            continue  # this index type cannot be mapped that way; try the next
        _no_prefetch_threads(index)
        return index
    raise AvindexError(f"{path}: cannot read the index; rebuild it with `avindex index`")


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
    path = _index_dir(store_dir) / entry["file"]
    if not path.exists():
        raise AvindexError(f"{path}: index file missing; rebuild with `avindex index {store_dir}`")
    resolved = resolve_faiss_device(device)
    import faiss

    index = _read_mmap(str(path)) if resolved == "cpu" else faiss.read_index(str(path))
    if index.ntotal != entry["count"]:
        raise AvindexError(
            f"{path}: holds {index.ntotal} vectors but index.json says {entry['count']} "
            f"(interrupted update?); rebuild with `avindex index {store_dir}`"
        )
    index, used = _to_device(index, resolved)
    _set_params(index, entry["params"], used)
    return LoadedIndex(index=index, modality=modality, device=used, entry=entry)


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
    scores, ids = index.index.search(normalize_rows(queries), k)
    return scores, ids
