"""`avindex embed --ray`: the embed runner on a Ray cluster, one actor per GPU (or N CPU actors).

Ray Data hands batches of pending videos to a pool of actors. Each actor builds its encoder (the
model and its DALI pipelines) once and embeds each batch exactly as a single `avindex embed`
does: decoders in child processes, shards of its own, every video under a claim. When an actor
dies, Ray restarts it and runs the batch again; the claims and the catalog make the retry skip
what the dead actor had written, so the store holds every clip once. The store folder must be on
a filesystem every node shares (see the README, "Scaling out").
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import ray

from avindex.catalog import Catalog, finished
from avindex.config import EmbedConfig
from avindex.devices import resolve_device
from avindex.embed import (
    EmbedReport,
    check_config,
    embed_records,
    encoder_session,
    store_meta,
)
from avindex.model import Checkpoint
from avindex.reader import video_records
from avindex.store import VideoRecord, clear_tmp


class EmbedActor:
    """One embedding process of the pool: its encoder lives as long as the actor."""

    def __init__(
        self,
        store_dir: str,
        checkpoint: Checkpoint,
        cfg: EmbedConfig,
        model_path: str | None,
        retry_failed: bool,
    ) -> None:
        device = resolve_device(cfg.device)
        self.store_dir, self.cfg, self.retry_failed = Path(store_dir), cfg, retry_failed
        self.meta = store_meta(checkpoint, cfg, model_path)
        self._session = encoder_session(checkpoint, device, cfg.batch_size)
        self.encoder = self._session.__enter__()  # closed with the actor's process

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Embed a batch of videos (path, size, mtime columns); one row back: its report."""
        records = [
            VideoRecord(str(path), int(size), float(mtime), 0.0)
            for path, size, mtime in zip(batch["path"], batch["size"], batch["mtime"], strict=True)
        ]
        report = embed_records(
            records, self.store_dir, self.encoder, self.meta, self.cfg, self.retry_failed
        )
        return {"report": np.array([json.dumps(report.to_dict())]), "pid": np.array([os.getpid()])}


def pending(records: Sequence[VideoRecord], store_dir: Path, retry_failed: bool) -> list:
    """Records the store's catalog does not hold yet (the actors check again under claims)."""
    catalog = Catalog(store_dir, rewrite=False)
    catalog.refresh()
    done = finished(catalog.summaries.values(), retry_failed)
    return [r for r in records if r.key not in done]


def actor_count(cfg: EmbedConfig, device: str) -> int:
    """Actors to start: one per GPU of the cluster, else cfg.ray_actors (default: one per
    decoders + one cores of the cluster)."""
    resources = ray.cluster_resources()
    if device == "cuda":
        return max(1, int(resources.get("GPU", 1)))
    if cfg.ray_actors:
        return cfg.ray_actors
    return max(1, int(resources.get("CPU", 1)) // (cfg.decode_workers + 1))


def embed_on_ray(
    paths: Sequence[Path],
    store_dir: Path,
    checkpoint: Checkpoint,
    cfg: EmbedConfig,
    address: str | None = None,
    retry_failed: bool = False,
    on_start: Callable[[int, int], None] | None = None,
    on_progress: Callable[[EmbedReport], None] | None = None,
    model_path: str | os.PathLike | None = None,
) -> EmbedReport:
    """Embed every video not yet in the store with a pool of Ray actors; progress on the driver.

    `address` is a Ray cluster's address (None: RAY_ADDRESS, or a Ray started for this run).
    """
    device = resolve_device(cfg.device)
    check_config(cfg)
    store_dir = store_dir.resolve()
    store_dir.mkdir(parents=True, exist_ok=True)
    clear_tmp(store_dir)
    started = time.perf_counter()
    records = video_records(paths)
    todo = pending(records, store_dir, retry_failed)
    report = EmbedReport(videos_skipped=len(records) - len(todo))
    if on_start:
        on_start(len(todo), report.videos_skipped)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    items = [{"path": r.path, "size": r.size, "mtime": r.mtime} for r in todo]
    if items:
        actors = actor_count(cfg, device)
        # Ray schedules the actors; their decoder processes are theirs (actor_count sizes them).
        per_actor = {"num_gpus": 1} if device == "cuda" else {"num_cpus": 1}
        results = ray.data.from_items(items).map_batches(
            EmbedActor,
            fn_constructor_args=(
                str(store_dir),
                checkpoint,
                cfg,
                None if model_path is None else str(model_path),
                retry_failed,
            ),
            batch_size=cfg.ray_batch_videos,
            compute=ray.data.ActorPoolStrategy(size=actors),
            **per_actor,
        )
        for row in results.iter_rows():
            # A retried batch counts what its dead actor had written as already done.
            report.merge(EmbedReport.from_dict(json.loads(row["report"])))
            if on_progress:
                on_progress(report)
    report.wall_seconds = time.perf_counter() - started
    return report


__all__ = ["EmbedActor", "actor_count", "embed_on_ray", "pending"]
