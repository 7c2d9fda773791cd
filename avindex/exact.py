"""Exact cosine top-k folded block by block: the reference every index's recall is measured on."""

from __future__ import annotations

import faiss
import numpy as np


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Float32 rows (N, D) scaled to unit L2 norm (zero rows stay zero): inner product = cosine."""
    # One C-contiguous copy normalised in place by faiss: numpy's norm/divide/copy costs several
    # microseconds, a visible share of a single ~40 us query.
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(x)
    return x


class ExactTopK:
    """The exact top-k of fixed queries over vectors seen a block at a time (or partial results)."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        """Keep the best `k` inner products of each row of `queries` (normalised float32)."""
        self.queries = queries
        self.k = k
        self._heap = faiss.ResultHeap(len(queries), k, keep_max=True)

    def add_block(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Fold one block of (ids, normalised vectors) into the running top-k."""
        if not len(self.queries) or not len(ids):
            return
        kk = min(self.k, len(vecs))
        scores, pos = faiss.knn(self.queries, vecs, kk, metric=faiss.METRIC_INNER_PRODUCT)
        labels = np.where(pos >= 0, ids[np.maximum(pos, 0)], -1)
        self.add_result(scores, labels)

    def add_result(self, scores: np.ndarray, labels: np.ndarray) -> None:
        """Fold a top-k found elsewhere (another part of the data); narrower results are padded."""
        pad = self.k - labels.shape[1]
        if pad > 0:
            labels = np.pad(labels, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        self._heap.add_result(
            np.ascontiguousarray(scores, np.float32), np.ascontiguousarray(labels, np.int64)
        )

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the best k, best first; call once, after the last block."""
        self._heap.finalize()
        return self._heap.D, self._heap.I


def drop_self(labels: np.ndarray, query_ids: np.ndarray, k: int) -> np.ndarray:
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
