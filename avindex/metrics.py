"""Retrieval metrics (recall@k, mAP) for query/gallery embeddings with labels, beside chance."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

METRICS = ("cosine", "ip", "l2")
_BLOCK_ELEMENTS = 1 << 24  # scores held at once: bounds memory for large galleries


@dataclass
class Retrieval:
    """Recall@k and mAP over the queries that have at least one relevant gallery item."""

    recall: dict[int, float]
    mean_ap: float
    chance_recall: dict[int, float]
    chance_map: float
    queries: int  # queries scored (those with a relevant item)
    skipped: int = 0  # queries without any relevant item in the gallery
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON (keys like R@1, mAP, chance_R@1)."""
        out: dict[str, Any] = {f"R@{k}": v for k, v in self.recall.items()}
        out["mAP"] = self.mean_ap
        out.update({f"chance_R@{k}": v for k, v in self.chance_recall.items()})
        out["chance_mAP"] = self.chance_map
        out["queries"] = self.queries
        out["skipped"] = self.skipped
        return out


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()


def _scores(q: torch.Tensor, g: torch.Tensor, metric: str) -> torch.Tensor:
    """Higher is better for every metric (l2 returns the negative squared distance)."""
    if metric == "l2":
        return 2 * q @ g.t() - (q * q).sum(1, keepdim=True) - (g * g).sum(1)[None, :]
    return q @ g.t()


def chance_recall_at_k(n_relevant: np.ndarray, gallery_size: int, k: int) -> float:
    """Mean over queries of P(a random ranking has a relevant item in the top k)."""
    n = gallery_size
    probs = [
        1.0 - math.exp(_log_comb(n - int(r), k) - _log_comb(n, k)) if n - int(r) >= k else 1.0
        for r in n_relevant
    ]
    return float(np.mean(probs)) if probs else float("nan")


def chance_map(n_relevant: np.ndarray, gallery_size: int) -> float:
    """Mean over queries of the expected average precision of a random ranking (exact)."""
    n = gallery_size
    harmonic = float(np.sum(1.0 / np.arange(1, n + 1)))
    # E[AP] = (1/N) * (H_N + (R-1)/(N-1) * (N - H_N)), summing E[precision@k] over relevant ranks.
    vals = [
        (harmonic + ((int(r) - 1) / (n - 1) if n > 1 else 0.0) * (n - harmonic)) / n
        for r in n_relevant
    ]
    return float(np.mean(vals)) if vals else float("nan")


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def retrieval(
    query: np.ndarray | torch.Tensor,
    gallery: np.ndarray | torch.Tensor,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    ks: tuple[int, ...] = (1, 5, 10),
    exclude_self: bool = False,
    metric: str = "cosine",
    exclude: np.ndarray | None = None,
) -> Retrieval:
    """Rank the gallery for every query; an item is relevant when its label equals the query's.

    exclude_self: query i and gallery i are the same item (same-modality search), so gallery i is
    left out of query i's ranking. exclude: the same for a sample of queries, the gallery row of
    each query. metric: cosine (rows normalised first), ip, or l2.
    """
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: expected one of {METRICS}")
    q, g = _as_tensor(query), _as_tensor(gallery)
    if metric == "cosine":
        q = torch.nn.functional.normalize(q, dim=1)
        g = torch.nn.functional.normalize(g, dim=1)
    ql = torch.as_tensor(np.asarray(query_labels))
    gl = torch.as_tensor(np.asarray(gallery_labels))
    if exclude_self:
        if q.shape[0] != g.shape[0]:
            raise ValueError("exclude_self needs query and gallery to be the same items")
        exclude = np.arange(q.shape[0])
    skip = torch.as_tensor(np.asarray(exclude, dtype=np.int64)) if exclude is not None else None
    if skip is not None and skip.shape != (q.shape[0],):
        raise ValueError(f"exclude has shape {tuple(skip.shape)}; expected ({q.shape[0]},)")
    n_gallery = g.shape[0] - int(skip is not None)
    first_hit, ap, n_rel = [], [], []
    block = max(1, _BLOCK_ELEMENTS // max(1, g.shape[0]))
    for start in range(0, q.shape[0], block):
        stop = min(start + block, q.shape[0])
        scores = _scores(q[start:stop], g, metric)
        if skip is not None:
            scores[torch.arange(stop - start), skip[start:stop]] = -math.inf
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        if skip is not None:
            order = order[:, :n_gallery]  # the excluded item sorts last
        rel = gl[order] == ql[start:stop, None]
        hits = rel.cumsum(dim=1)
        ranks = torch.arange(1, n_gallery + 1)
        count = hits[:, -1]
        first_hit.append(torch.where(count > 0, rel.float().argmax(dim=1), n_gallery))
        ap.append((rel * hits / ranks).sum(dim=1) / count.clamp(min=1))
        n_rel.append(count)
    first = torch.cat(first_hit).numpy()
    aps = torch.cat(ap).numpy()
    counts = torch.cat(n_rel).numpy()
    keep = counts > 0
    return Retrieval(
        recall={k: float(np.mean(first[keep] < k)) if keep.any() else float("nan") for k in ks},
        mean_ap=float(np.mean(aps[keep])) if keep.any() else float("nan"),
        chance_recall={k: chance_recall_at_k(counts[keep], n_gallery, k) for k in ks},
        chance_map=chance_map(counts[keep], n_gallery),
        queries=int(keep.sum()),
        skipped=int((~keep).sum()),
    )
