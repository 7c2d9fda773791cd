"""Retrieval metrics against plain per-query loops and brute-force chance levels."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from avindex.metrics import (
    chance_map,
    chance_recall_at_k,
    retrieval,
)


def _reference(q, g, ql, gl, ks, exclude_self, metric):
    """One query at a time with numpy argsort (the obvious implementation)."""
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
    recalls, aps = {k: [] for k in ks}, []
    for i in range(len(q)):
        scores = -((g - q[i]) ** 2).sum(1) if metric == "l2" else g @ q[i]
        idx = np.arange(len(g))
        if exclude_self:
            scores, idx = np.delete(scores, i), np.delete(idx, i)
        order = idx[np.argsort(-scores, kind="stable")]
        rel = gl[order] == ql[i]
        if not rel.any():
            continue
        for k in ks:
            recalls[k].append(rel[:k].any())
        hits = np.cumsum(rel)
        aps.append(np.sum(rel * hits / np.arange(1, len(rel) + 1)) / rel.sum())
    return {k: np.mean(v) for k, v in recalls.items()}, np.mean(aps)


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
@pytest.mark.parametrize("exclude_self", [False, True])
def test_retrieval_matches_reference(metric: str, exclude_self: bool) -> None:
    rng = np.random.default_rng(0)
    g = rng.normal(size=(60, 8)).astype(np.float32)
    gl = rng.integers(0, 5, size=60)
    q = g + rng.normal(scale=0.8, size=g.shape).astype(np.float32)
    ql = gl.copy()
    ql[:3] = 99  # queries without a relevant item are skipped
    res = retrieval(q, g, ql, gl, (1, 5, 10), exclude_self, metric)
    want_r, want_ap = _reference(q, g, ql, gl, (1, 5, 10), exclude_self, metric)
    for k in (1, 5, 10):
        assert res.recall[k] == pytest.approx(want_r[k], abs=1e-9)
    assert res.mean_ap == pytest.approx(want_ap, abs=1e-5)
    assert res.queries == 57 and res.skipped == 3


def test_perfect_and_to_dict() -> None:
    x = np.eye(4, dtype=np.float32)
    res = retrieval(x, x, np.arange(4), np.arange(4), (1,))
    assert res.recall[1] == 1.0 and res.mean_ap == 1.0
    assert res.to_dict()["R@1"] == 1.0 and res.to_dict()["chance_R@1"] == pytest.approx(0.25)


def test_chance_levels_match_enumeration() -> None:
    n, r = 6, 2
    rel = np.array([1] * r + [0] * (n - r), dtype=bool)
    hits_at, aps = {1: [], 3: []}, []
    for perm in itertools.permutations(range(n)):
        ranked = rel[list(perm)]
        for k in hits_at:
            hits_at[k].append(ranked[:k].any())
        hits = np.cumsum(ranked)
        aps.append(np.sum(ranked * hits / np.arange(1, n + 1)) / r)
    for k in hits_at:
        assert chance_recall_at_k(np.array([r]), n, k) == pytest.approx(np.mean(hits_at[k]))
    assert chance_map(np.array([r]), n) == pytest.approx(np.mean(aps))
