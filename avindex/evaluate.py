"""Retrieval quality of a store by class labels: R@k and mAP for audio->visual, visual->audio,
audio->audio and visual->visual, each beside chance (exact search over the stored embeddings)."""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from avindex.config import AudioConfig, EvalConfig, from_dict
from avindex.errors import AvindexError
from avindex.labels import VideoLabels, clip_labels, labels_by_path
from avindex.metrics import Retrieval, retrieval
from avindex.store import Store

DIRECTIONS = (("audio", "visual"), ("visual", "audio"), ("audio", "audio"), ("visual", "visual"))
KS = (1, 5, 10)


@dataclass
class Gallery:
    """The labelled clips of one modality: clip ids, float32 vectors and class labels."""

    ids: np.ndarray
    vectors: np.ndarray
    labels: np.ndarray


@dataclass
class EvalReport:
    """Per-direction retrieval results plus what was (not) covered by the labels."""

    store: str
    labels_file: str
    clips: int  # labelled clips (visual gallery)
    audio_clips: int  # labelled clips with real audio (audio gallery)
    unlabelled: int  # store clips whose video has no label
    classes: int
    results: dict[str, Retrieval] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        return {
            "store": self.store,
            "labels": self.labels_file,
            "clips": self.clips,
            "audio_clips": self.audio_clips,
            "unlabelled_clips": self.unlabelled,
            "classes": self.classes,
            "directions": {name: r.to_dict() for name, r in self.results.items()},
            "notes": self.notes,
        }


def labelled_gallery(
    store: Store, modality: str, labels: dict[str, VideoLabels], cfg: EvalConfig
) -> tuple[Gallery, int]:
    """Stream one modality's vectors, keeping labelled clips; (gallery, unlabelled clips).

    `labels` comes from `labels.labels_by_path`: per-second rows (clip [t0, t0+1) takes the label
    of second floor(t0 + 0.5)) or one class per video; a clip of an unlisted video or second
    (label -1) is unlabelled and left out."""
    clip_seconds = from_dict(AudioConfig, store.meta.audio_config).clip_seconds
    ids, vecs, labs = [], [], []
    unlabelled = 0
    for block_ids, block in store.iter_blocks(modality, cfg.block_rows):
        refs = store.clips(block_ids)
        groups: dict[str, list[int]] = defaultdict(list)
        for row, ref in enumerate(refs):
            groups[ref.path].append(row)
        for path, rows in groups.items():
            if path not in labels:
                unlabelled += len(rows)
                continue
            t0 = np.array([refs[r].t0 for r in rows])
            lab = clip_labels(labels[path], t0, clip_seconds)
            known = lab >= 0
            unlabelled += int((~known).sum())
            ids.append(block_ids[rows][known])
            vecs.append(block[rows][known])
            labs.append(lab[known])
    dim = store.meta.dim(modality)
    if not ids:
        return Gallery(
            np.zeros(0, np.int64), np.zeros((0, dim), np.float32), np.zeros(0)
        ), unlabelled
    return Gallery(np.concatenate(ids), np.concatenate(vecs), np.concatenate(labs)), unlabelled


def _sample(n: int, cfg: EvalConfig, salt: int) -> np.ndarray:
    """All positions, or a seeded sorted sample of cfg.max_queries of them."""
    if n <= cfg.max_queries:
        return np.arange(n)
    rng = np.random.default_rng([cfg.seed, salt])
    return np.sort(rng.choice(n, size=cfg.max_queries, replace=False))


def evaluate(
    store_dir: str | os.PathLike, labels_file: str | os.PathLike, cfg: EvalConfig | None = None
) -> EvalReport:
    """R@1/5/10 and mAP with chance for the four directions (queries sampled above max_queries)."""
    cfg = cfg or EvalConfig()
    if cfg.max_queries < 1:
        raise AvindexError(f"--max-queries {cfg.max_queries}: must be at least 1")
    store = Store(store_dir)
    if not store.shards:
        raise AvindexError(f"{store_dir}: store holds no shards; run `avindex embed` first")
    labels = labels_by_path(labels_file)
    visual, unlabelled = labelled_gallery(store, "visual", labels, cfg)
    audio, _ = labelled_gallery(store, "audio", labels, cfg)
    if len(visual.ids) == 0:
        raise AvindexError(
            f"{labels_file}: no video of {store_dir} is labelled; video paths in the labels "
            "file are relative to its folder (or absolute) and must name the embedded files"
        )
    galleries = {"visual": visual, "audio": audio}
    report = EvalReport(
        store=str(store_dir),
        labels_file=str(labels_file),
        clips=len(visual.ids),
        audio_clips=len(audio.ids),
        unlabelled=unlabelled,
        classes=len(np.unique(visual.labels)),
    )
    for salt, (src, dst) in enumerate(DIRECTIONS):
        query, gallery = galleries[src], galleries[dst]
        if len(query.ids) == 0 or len(gallery.ids) - (src == dst) < 1:
            report.notes.append(f"{src}->{dst}: skipped (no labelled clips with {src} or {dst})")
            continue
        pick = _sample(len(query.ids), cfg, salt)
        report.results[f"{src}->{dst}"] = retrieval(
            query.vectors[pick],
            gallery.vectors,
            query.labels[pick],
            gallery.labels,
            KS,
            exclude=pick if src == dst else None,  # same-modality: the query clip is not a hit
        )
    head = store.meta.model_config.get("head")
    if head == "l3":
        report.notes.append(
            "l3 head: audio and visual spaces are not aligned (cross-modal ~chance)"
        )
    if store.meta.model_source.get("random"):
        report.notes.append("store embedded with random untrained weights")
    if max(len(visual.ids), len(audio.ids)) > cfg.max_queries:
        report.notes.append(f"queries sampled: at most {cfg.max_queries} per direction")
    return report


def print_report(report: EvalReport) -> None:
    """The eval table (each direction above its chance row) and coverage notes, on stdout."""
    table = Table("direction", *(f"R@{k}" for k in KS), "mAP", "queries")
    for name, r in report.results.items():
        table.add_row(name, *(f"{r.recall[k]:.3f}" for k in KS), f"{r.mean_ap:.3f}", str(r.queries))
        chance = [f"{r.chance_recall[k]:.3f}" for k in KS] + [f"{r.chance_map:.3f}", ""]
        table.add_row("  chance", *chance, style="dim", end_section=True)
    console = Console()
    console.print(table)
    console.print(
        f"{report.clips} labelled clips ({report.audio_clips} with audio), {report.classes} "
        f"classes, {report.unlabelled} clips without labels"
    )
    for note in report.notes:
        console.print(f"note: {note}", highlight=False)


__all__ = [
    "DIRECTIONS",
    "EvalReport",
    "Gallery",
    "evaluate",
    "labelled_gallery",
    "print_report",
]
