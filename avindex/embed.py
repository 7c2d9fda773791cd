"""Bulk embedding: reader (child-process decoders) -> encoder (DALI + L3 towers) -> store writer.

    videos --ClipReader--> clip chunks --batches--> Encoder --> rows per video --> StoreWriter

A video's rows reach the writer only once all its clips are embedded and its decoder ended well;
the writer keeps whole videos and writes them as immutable shards, so a crash loses at most the
videos of the shard being filled. See docs/architecture.md ("Embedding").
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from avindex.claims import WorkQueue
from avindex.config import EmbedConfig, to_dict
from avindex.devices import resolve_device
from avindex.encoder import STAGES as STAGES_OF_ENCODER
from avindex.encoder import Encoder, torch_threads
from avindex.errors import AvindexError
from avindex.model import Checkpoint
from avindex.nvdec import NvdecClipReader, clip_reader
from avindex.reader import ClipChunk, ClipReader, VideoRead, video_records
from avindex.store import StoreMeta, StoreWriter, VideoRecord, clear_tmp

STAGES = ("decode", "wait", "preprocess", "model", "write")
_COUNTS = (  # EmbedReport fields that add up across runs
    "videos_done",
    "videos_failed",
    "videos_skipped",
    "clips",
    "fallbacks",
    "video_seconds",
    "frames_total",
    "frames_decoded",
)


@dataclass
class EmbedReport:
    """What one `embed` run did, with wall time split by stage (decode is summed over workers)
    and, per video, the decoder that served it and the share of its frames decoded."""

    videos_done: int = 0
    videos_failed: int = 0
    videos_skipped: int = 0
    clips: int = 0
    video_seconds: float = 0.0
    wall_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    failures: list[tuple[str, str]] = field(default_factory=list)
    decoders: dict[str, int] = field(default_factory=dict)  # decoder -> videos it served
    fallbacks: int = 0  # videos another decoder had to take over
    frames_total: int = 0
    frames_decoded: int = 0
    videos: list[dict[str, Any]] = field(default_factory=list)  # one row per video

    @property
    def realtime_factor(self) -> float:
        """Seconds of video embedded per second of wall time."""
        return self.video_seconds / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def clips_per_second(self) -> float:
        """Clips embedded per second of wall time."""
        return self.clips / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def decoded_fraction(self) -> float:
        """Share of all frames of the embedded videos that were decoded."""
        return self.frames_decoded / self.frames_total if self.frames_total else 0.0

    def add(self, read: VideoRead, clips: int) -> None:
        """Count one finished (or failed) video."""
        row = {"path": read.record.path, "clips": clips, "decoder": read.decoder}
        row["decoded_fraction"] = round(read.decoded_fraction, 4)
        if read.fallback:
            self.fallbacks += 1
            row["fallback"] = read.fallback
        if read.error:
            self.videos_failed += 1
            self.failures.append((read.record.path, read.error))
            row["error"] = read.error
        else:
            self.videos_done += 1
            self.clips += clips
            self.video_seconds += read.record.duration
            self.decoders[read.decoder] = self.decoders.get(read.decoder, 0) + 1
            self.frames_total += read.frames_total
            self.frames_decoded += read.frames_decoded
        self.stage_seconds["decode"] += read.seconds
        self.videos.append(row)

    def merge(self, other: EmbedReport) -> None:
        """Add another run's counts (a Ray actor's batch) to this report; wall time stays."""
        for name in _COUNTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for stage, seconds in other.stage_seconds.items():
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds
        for decoder, n in other.decoders.items():
            self.decoders[decoder] = self.decoders.get(decoder, 0) + n
        self.failures += other.failures
        self.videos += other.videos

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmbedReport:
        """Rebuild a report from to_dict() (derived rates are recomputed, not read)."""
        names = {f.name for f in fields(cls)}
        report = cls(**{k: v for k, v in data.items() if k in names})
        report.failures = [tuple(f) for f in report.failures]
        return report

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary, derived rates included."""
        out = asdict(self)
        out["realtime_factor"] = self.realtime_factor
        out["clips_per_second"] = self.clips_per_second
        out["decoded_fraction"] = self.decoded_fraction
        return out


@dataclass
class _Rows:
    """Embeddings of one video collected until its decoder has ended and every clip is back."""

    t0: list[np.ndarray] = field(default_factory=list)
    visual: list[np.ndarray] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)
    has_audio: list[np.ndarray] = field(default_factory=list)
    done: int = 0  # clips embedded
    read: VideoRead | None = None

    @property
    def complete(self) -> bool:
        return self.read is not None and (
            self.read.error is not None or self.done == self.read.clips
        )


class _Batches:
    """Clip chunks of many videos -> model batches of `size` clips, and back to whole videos."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.chunks: list[ClipChunk] = []
        self.held = 0
        self.videos: dict[int, _Rows] = {}

    def add_chunk(self, chunk: ClipChunk) -> bool:
        """Hold a chunk; True once a full batch is waiting."""
        self.videos.setdefault(chunk.video, _Rows())
        self.chunks.append(chunk)
        self.held += len(chunk)
        return self.held >= self.size

    def take(self) -> tuple[list[ClipChunk], list, np.ndarray]:
        """Everything held as one batch: (chunks, frames, audio)."""
        chunks, self.chunks, self.held = self.chunks, [], 0
        frames = [f for c in chunks for f in c.frames]
        return chunks, frames, np.concatenate([c.audio for c in chunks])

    def give_back(
        self, chunks: list[ClipChunk], visual: np.ndarray, audio: np.ndarray
    ) -> Iterator[int]:
        """Attach a batch's embeddings to their videos; yields videos that became complete."""
        at = 0
        for chunk in chunks:
            rows = self.videos[chunk.video]
            n = len(chunk)
            rows.t0.append(chunk.t0)
            rows.visual.append(visual[at : at + n])
            rows.audio.append(audio[at : at + n])
            rows.has_audio.append(chunk.has_audio)
            rows.done += n
            at += n
            if rows.complete:
                yield chunk.video

    def end_video(self, read: VideoRead) -> bool:
        """The decoder ended; a failed video's held clips are dropped. True if it is complete."""
        rows = self.videos.setdefault(read.video, _Rows())
        rows.read = read
        if read.error:
            self.chunks = [c for c in self.chunks if c.video != read.video]
            self.held = sum(len(c) for c in self.chunks)
        return rows.complete

    def pop(self, video: int) -> _Rows:
        return self.videos.pop(video)


@contextlib.contextmanager
def encoder_session(checkpoint: Checkpoint, device: str, batch_size: int) -> Iterator[Encoder]:
    """An Encoder for bulk embedding: on a CPU its towers run side by side with one torch
    thread each (see Encoder), restored afterwards."""
    threads = torch_threads(1) if device == "cpu" else contextlib.nullcontext()
    with threads, Encoder(checkpoint, device, batch_size) as encoder:
        yield encoder


def _store(writer: StoreWriter, rows: _Rows, dim: int, report: EmbedReport) -> None:
    """Hand a finished video to the writer (its rows, or its failure) and count it."""
    read = rows.read
    if read.error:
        writer.add_failure(read.record, read.error)
        report.add(read, 0)
        return
    writer.add_video(
        read.record,
        _stack(rows.visual, (0, dim)),
        _stack(rows.audio, (0, dim)),
        _stack(rows.has_audio, (0,)).astype(bool),
        _stack(rows.t0, (0,)).astype(np.float32),
    )
    report.add(read, rows.done)


def _stack(parts: list[np.ndarray], empty: tuple[int, ...]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(empty, np.float32)


def _events(
    reader: ClipReader | NvdecClipReader, seconds: dict[str, float]
) -> Iterator[ClipChunk | VideoRead]:
    """The reader's events, timing how long the consumer waits for them."""
    iterator = iter(reader)
    while True:
        waited = time.perf_counter()
        event = next(iterator, None)
        seconds["wait"] += time.perf_counter() - waited
        if event is None:
            return
        yield event


def run_embed(
    videos: Iterable[VideoRecord],
    writer: StoreWriter,
    encoder: Encoder,
    cfg: EmbedConfig,
    on_progress: Callable[[EmbedReport], None] | None = None,
    report: EmbedReport | None = None,
    expected: int | None = None,
) -> EmbedReport:
    """Embed `videos` (taken lazily, as decoders become free) into `writer`: decoders run ahead
    in child processes while the encoder embeds batches that mix clips of several videos.
    `expected` (at most how many videos come, when known) lets fewer videos than decoders
    share out every core. Counts go into `report` (a new one by default) and it is returned."""
    report = report or EmbedReport()
    seconds = report.stage_seconds
    started = time.perf_counter()
    batches = _Batches(cfg.batch_size)

    def write(video: int) -> None:
        began = time.perf_counter()
        _store(writer, batches.pop(video), encoder.dim, report)
        seconds["write"] += time.perf_counter() - began
        if on_progress:
            on_progress(report)

    def embed_batch() -> None:
        chunks, frames, audio = batches.take()
        visual, sound = encoder.clips(frames, audio)
        for video in batches.give_back(chunks, visual, sound):
            write(video)

    checkpoint = encoder.checkpoint
    before = dict(encoder.seconds)
    acfg, vcfg = checkpoint.audio_cfg, checkpoint.video_cfg
    with clip_reader(enumerate(videos), acfg, vcfg, cfg, encoder.device, expected) as reader:
        for event in _events(reader, seconds):
            if isinstance(event, ClipChunk):
                if batches.add_chunk(event):
                    embed_batch()
            elif batches.end_video(event):
                write(event.video)
        if batches.held:
            embed_batch()
    for stage in STAGES_OF_ENCODER:
        seconds[stage] += encoder.seconds[stage] - before[stage]
    if batches.videos:  # pragma: no cover - every video ends with a VideoRead
        raise AvindexError(f"internal: {len(batches.videos)} videos never completed")
    report.wall_seconds += time.perf_counter() - started
    return report


def claimed(work: WorkQueue, first: VideoRecord | None = None) -> Iterator[VideoRecord]:
    """Videos this writer may embed now, claimed one at a time as decoders become free (`first`
    already claimed); ends when the rest is done or held by other live writers."""
    if first is not None:
        yield first
    while (record := work.next()) is not None:
        yield record


def model_source(checkpoint: Checkpoint, model_path: str | os.PathLike | None) -> dict:
    """How `search` can rebuild the model: random_checkpoint's arguments, or the checkpoint path."""
    if checkpoint.untrained:
        return {
            "random": {
                "preset": checkpoint.preset,
                "width": checkpoint.model_cfg.width,
                "seed": checkpoint.extra["seed"],
                "head": checkpoint.model_cfg.head,
            }
        }
    return {"path": str(Path(model_path).resolve())} if model_path is not None else {}


def store_meta(
    checkpoint: Checkpoint, cfg: EmbedConfig, model_path: str | os.PathLike | None = None
) -> StoreMeta:
    """What every shard written with this model and hop records (and what resume checks)."""
    dim = checkpoint.model.embed_dim
    return StoreMeta(
        model_sha256=checkpoint.sha256,
        visual_dim=dim,
        audio_dim=dim,
        hop=cfg.hop,
        model_config=to_dict(checkpoint.model_cfg),
        audio_config=to_dict(checkpoint.audio_cfg),
        video_config=to_dict(checkpoint.video_cfg),
        embed_config=to_dict(cfg),
        model_source=model_source(checkpoint, model_path),
        preset=checkpoint.preset,
    )


def check_config(cfg: EmbedConfig) -> None:
    """Settings below their minimum are one-line user errors."""
    for flag, value, low in (
        ("--hop", cfg.hop, 1e-3),
        ("--batch-size", cfg.batch_size, 1),
        ("--workers", cfg.decode_workers, 1),
    ):
        if value < low:
            raise AvindexError(f"{flag} {value}: must be at least {low}")


def embed_records(
    records: Sequence[VideoRecord],
    store_dir: Path,
    encoder: Encoder,
    meta: StoreMeta,
    cfg: EmbedConfig,
    retry_failed: bool = False,
    on_start: Callable[[int, int], None] | None = None,
    on_progress: Callable[[EmbedReport], None] | None = None,
) -> EmbedReport:
    """Embed the videos of `records` that the store does not hold yet, each under a claim, into
    shards of this writer; returns when the rest is done (by this or any other writer)."""
    with WorkQueue(store_dir, records, retry_failed) as work:
        if on_start:
            on_start(work.remaining, work.skipped)
        report = EmbedReport(videos_skipped=work.skipped)
        shards = StoreWriter(
            store_dir, meta, cfg.shard_clips, cfg.shard_seconds, on_flush=work.written
        )
        with shards as writer:
            run_embed(claimed(work), writer, encoder, cfg, on_progress, report, work.remaining)
            # The rest is held by other writers: with this writer's rows on disk (so nobody
            # waits for us), wait for them to finish or die, and take over what they leave.
            while (record := work.next(wait=True, before_wait=writer.flush)) is not None:
                left = work.remaining + 1  # this record, and what may be left after it
                run_embed(claimed(work, record), writer, encoder, cfg, on_progress, report, left)
    return report


def embed_paths(
    paths: Sequence[Path],
    store_dir: Path,
    checkpoint: Checkpoint,
    cfg: EmbedConfig,
    retry_failed: bool = False,
    on_start: Callable[[int, int], None] | None = None,
    on_progress: Callable[[EmbedReport], None] | None = None,
    model_path: str | os.PathLike | None = None,
) -> EmbedReport:
    """Embed every video not yet in the store; finished shards survive any crash of this run.

    `model_path` (the checkpoint file) is recorded in the store so `search` can find the model.
    """
    device = resolve_device(cfg.device)
    check_config(cfg)
    store_dir.mkdir(parents=True, exist_ok=True)
    clear_tmp(store_dir)
    meta = store_meta(checkpoint, cfg, model_path)
    with encoder_session(checkpoint, device, cfg.batch_size) as encoder:
        return embed_records(
            video_records(paths), store_dir, encoder, meta, cfg, retry_failed, on_start, on_progress
        )


__all__ = [
    "EmbedReport",
    "check_config",
    "claimed",
    "embed_paths",
    "embed_records",
    "encoder_session",
    "model_source",
    "run_embed",
    "store_meta",
]
