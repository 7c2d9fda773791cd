"""Index build vectors/s and search queries/s (at measured recall@10) against raw faiss."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from avindex.bench.corpus import clustered_vectors, write_vector_store
from avindex.bench.measure import best_rate, paired_rates
from avindex.config import IndexConfig
from avindex.index import build_index, load_index, recall_at_k, search_vectors
from avindex.store import Store

K = 10
ROUNDS = 4  # alternating bursts of avindex and raw faiss search


def _unit(x: np.ndarray) -> np.ndarray:
    """A unit-length float32 copy of the rows, the raw-faiss way (inner product = cosine)."""
    x = np.array(x, dtype=np.float32)
    faiss.normalize_L2(x)
    return x


def _raw_index(factory: str, params: dict[str, int], base: np.ndarray, cfg: IndexConfig) -> Any:
    """The same factory built directly with faiss: train on the same sample size, add, set knobs."""
    index = faiss.index_factory(base.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(cfg.seed)
        sample = rng.choice(len(base), size=min(cfg.train_sample, len(base)), replace=False)
        index.train(base[np.sort(sample)])
    index.add(base)
    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)
    return index


def index_bench(
    workdir: Path, n: int, d: int, queries: int, seed: int, repeats: int, min_seconds: float
) -> dict[str, Any]:
    """avindex build/search on a store of n synthetic vectors against raw faiss on the same ones."""
    cfg = IndexConfig(device="cpu")
    data = clustered_vectors(n + queries, d, seed)
    store = workdir / "index-store"
    write_vector_store(store, (data[i : i + 10_000] for i in range(0, n, 10_000)), n)
    # Raw faiss gets the vectors exactly as stored (float16), so both index the same numbers.
    base = _unit(np.concatenate([v for _, v in Store(store).iter_blocks("visual")]))
    q = data[n:]
    info: dict[str, Any] = {}

    def build() -> float:
        shutil.rmtree(store / "index", ignore_errors=True)
        info.update(build_index(store, cfg, modality="visual")["modalities"]["visual"])
        return n

    ours_build, _ = best_rate(build, repeats)
    factory, params = info["factory"], info["params"]
    raw: list[Any] = []

    def raw_build() -> float:
        raw[:] = [_raw_index(factory, params, base, cfg)]
        return n

    raw_build_rate, _ = best_rate(raw_build, repeats)
    loaded = load_index(store, "visual", "cpu")
    exact = faiss.IndexFlatIP(d)
    exact.add(base)
    truth = exact.search(_unit(q), K)[1]
    ours_ids = search_vectors(loaded, q, K)[1]
    raw_ids = raw[0].search(_unit(q), K)[1]
    single = [q[i : i + 1] for i in range(min(len(q), 100))]
    batch_ours, batch_raw = paired_rates(
        lambda: len(search_vectors(loaded, q, K)[1]),
        lambda: len(raw[0].search(_unit(q), K)[1]),
        min_seconds,
        ROUNDS,
    )
    one_ours, one_raw = paired_rates(
        lambda: sum(len(search_vectors(loaded, r, K)[1]) for r in single),
        lambda: sum(len(raw[0].search(_unit(r), K)[1]) for r in single),
        min_seconds,
        ROUNDS,
    )
    return {
        "vectors": n,
        "dim": d,
        "factory": factory,
        "params": params,
        "build_vectors_per_s": ours_build,
        "raw_build_vectors_per_s": raw_build_rate,
        "recall_at_10": recall_at_k(ours_ids, truth),
        "raw_recall_at_10": recall_at_k(raw_ids, truth),
        "queries": len(q),
        "batch_queries_per_s": batch_ours,
        "raw_batch_queries_per_s": batch_raw,
        "single_queries_per_s": one_ours,
        "raw_single_queries_per_s": one_raw,
    }
