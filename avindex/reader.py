"""The embed reader: videos decoded into clips in child processes, many videos at once.

Each video is one job in a WorkerPool: one demux pass (decode.read_clip_grid) that sends its clips
back in small chunks and ends with what the decode found (duration, frames decoded). A video whose
decoder fails, crashes or stalls ends with its reason; its chunks already sent are to be dropped
by the consumer. On CUDA, avindex.nvdec reads through the same workers with `export_video` jobs
(audio and Annex-B video packets) and decodes the frames on NVDEC. See docs/architecture.md
("Embedding").
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avindex.bitstream import PacketBatch, StreamHeader
from avindex.config import AudioConfig, EmbedConfig, VideoConfig
from avindex.decode import DecodeStats, MomentData, read_clip_grid, read_for_nvdec
from avindex.store import VideoRecord
from avindex.workers import Done, Failed, Item, Job, PoolLimits, WorkerPool

CHUNK_CLIPS = 8  # clips per message from a worker: few messages, little latency
DECODER = "pyav"  # the CPU decoder's name in reports


@dataclass
class ClipChunk:
    """Consecutive clips of one video: frames (HxWx3 uint8), audio windows, has_audio, starts."""

    video: int
    t0: np.ndarray  # (n,) float64
    frames: list[np.ndarray]
    audio: np.ndarray  # (n, n_samples) float32
    has_audio: np.ndarray  # (n,) bool

    def __len__(self) -> int:
        return len(self.t0)


@dataclass
class VideoRead:
    """How a video's decode ended: its record (with the duration found), clips sent, and stats;
    `error` is the one-line reason it failed (its clips must then be dropped)."""

    video: int
    record: VideoRecord
    clips: int = 0
    error: str | None = None
    decoder: str = DECODER
    frames_total: int = 0
    frames_decoded: int = 0
    seconds: float = 0.0  # wall time the worker spent on it
    notes: list[str] = field(default_factory=list)
    fallback: str | None = None  # why another decoder than the device's took this video

    @property
    def decoded_fraction(self) -> float:
        """Share of the video's frames that were decoded."""
        return self.frames_decoded / self.frames_total if self.frames_total else 0.0


def decode_video(
    path: str, hop: float, audio_cfg: AudioConfig, video_cfg: VideoConfig, threads: int
) -> Iterator[ClipChunk]:
    """Worker job: every clip of one video in chunks; returns its DecodeStats and wall time."""
    started = time.perf_counter()
    stats = DecodeStats()
    yield from _chunked(read_clip_grid(path, hop, audio_cfg, video_cfg, threads, stats=stats))
    return stats, time.perf_counter() - started


def export_video(
    path: str, hop: float, audio_cfg: AudioConfig, video_cfg: VideoConfig
) -> Iterator[StreamHeader | str | PacketBatch | ClipChunk]:
    """Worker job for NVDEC: a StreamHeader, then Annex-B PacketBatches between ClipChunks of
    the clips' audio (frames None); a video NVDEC does not take yields why (a str) and then
    ClipChunks with frames, as decode_video. Returns its DecodeStats and wall time."""
    started = time.perf_counter()
    stats = DecodeStats()
    yield from _chunked(read_for_nvdec(path, hop, audio_cfg, video_cfg, stats=stats))
    return stats, time.perf_counter() - started


def _chunked(items: Iterable) -> Iterator:
    """Moments packed CHUNK_CLIPS at a time into ClipChunks; anything else passes through."""
    chunk: list[MomentData] = []
    for item in items:
        if not isinstance(item, MomentData):
            yield item
            continue
        chunk.append(item)
        if len(chunk) == CHUNK_CLIPS:
            yield _pack(chunk)
            chunk = []
    if chunk:
        yield _pack(chunk)


def _pack(data: list) -> ClipChunk:
    return ClipChunk(
        video=-1,  # the reader fills in the video index
        t0=np.array([d.moment.audio_start for d in data]),
        frames=[d.frame for d in data],
        audio=np.stack([d.audio for d in data]),
        has_audio=np.array([d.has_audio for d in data], dtype=bool),
    )


class ClipReader:
    """Clips of many videos, decoded in up to `cfg.decode_workers` child processes; iterate to
    get ClipChunk and VideoRead events (per video: its chunks in order, then its VideoRead)."""

    def __init__(
        self,
        videos: Iterable[tuple[int, VideoRecord]],
        audio_cfg: AudioConfig,
        video_cfg: VideoConfig,
        cfg: EmbedConfig,
        expected: int | None = None,
    ) -> None:
        """`videos` are taken lazily, as decoders become free; `expected` (their number, when
        known) lets fewer videos than decoders share out every core."""
        self.records: dict[int, VideoRecord] = {}
        self.sent: dict[int, int] = {}
        threads = self.threads_for(cfg, expected)
        jobs = self._jobs(videos, audio_cfg, video_cfg, cfg.hop, threads)
        limits = PoolLimits(cfg.decode_stall_seconds, cfg.decode_memory_bytes)
        buffer = max(2, cfg.prefetch_batches * cfg.batch_size // CHUNK_CLIPS)
        workers = cfg.decode_workers if expected is None else min(cfg.decode_workers, expected)
        self.pool = WorkerPool(jobs, max(1, workers), limits, buffer=buffer)

    @staticmethod
    def threads_for(cfg: EmbedConfig, expected: int | None) -> int:
        """FFmpeg threads per decoder: cfg.decode_threads, or (0) the cores over the decoders
        that have a video (a single long file is decoded with every core)."""
        if cfg.decode_threads > 0:
            return cfg.decode_threads
        workers = cfg.decode_workers if expected is None else min(cfg.decode_workers, expected)
        return max(1, (os.cpu_count() or 1) // max(1, workers))

    def _jobs(
        self,
        videos: Iterable[tuple[int, VideoRecord]],
        audio_cfg: AudioConfig,
        video_cfg: VideoConfig,
        hop: float,
        threads: int,
    ) -> Iterator[Job]:
        for index, record in videos:
            self.records[index] = record
            self.sent[index] = 0
            yield Job(index, decode_video, (record.path, hop, audio_cfg, video_cfg, threads))

    def __iter__(self) -> Iterator[ClipChunk | VideoRead]:
        for event in self.pool.events():
            index = event.key
            record = self.records[index]
            if isinstance(event, Item):
                chunk: ClipChunk = event.value
                chunk.video = index
                self.sent[index] += len(chunk)
                yield chunk
                continue
            del self.records[index]
            clips = self.sent.pop(index)
            if isinstance(event, Failed):
                yield VideoRead(index, record, clips, error=event.reason)
            elif isinstance(event, Done):
                stats, seconds = event.value
                done = VideoRecord(record.path, record.size, record.mtime, stats.duration or 0.0)
                yield VideoRead(
                    index,
                    done,
                    clips,
                    frames_total=stats.frames_total,
                    frames_decoded=stats.frames_decoded,
                    seconds=seconds,
                    notes=stats.notes,
                )

    def close(self) -> None:
        """Stop the workers."""
        self.pool.close()

    def __enter__(self) -> ClipReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def video_records(paths: Iterable[Path]) -> list[VideoRecord]:
    """Store identity of each file (resolved path, size, mtime); a vanished file gets size -1
    (its decode then fails with the reason)."""
    out = []
    for path in paths:
        try:
            out.append(VideoRecord.from_file(path, 0.0))
        except OSError:
            out.append(VideoRecord(str(Path(path).resolve()), -1, 0.0, 0.0))
    return out


__all__ = [
    "CHUNK_CLIPS",
    "ClipChunk",
    "ClipReader",
    "VideoRead",
    "decode_video",
    "export_video",
    "video_records",
]
