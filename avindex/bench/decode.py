"""Decode bounds: PyAV decode-only of every frame and audio packet, and avindex's own decode."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from avindex.bench.measure import best_rate
from avindex.config import AudioConfig, EmbedConfig, VideoConfig


def decode_only(path: Path, threads: int) -> tuple[int, float]:
    """Decode every video frame and audio frame of a file, converting nothing: (frames, audio s)."""
    import av

    from avindex.media import set_threads

    frames, audio_seconds = 0, 0.0
    with av.open(str(path)) as container:
        streams = [s for s in (*container.streams.video[:1], *container.streams.audio[:1])]
        for stream in container.streams.video[:1]:
            set_threads(stream, threads)
        for packet in container.demux(*streams):
            for frame in packet.decode():
                if packet.stream.type == "video":
                    frames += 1
                else:
                    audio_seconds += frame.samples / frame.sample_rate
    return frames, audio_seconds


def read_clips(
    path: Path, duration: float, hop: float, audio_cfg: AudioConfig, video_cfg: VideoConfig
) -> int:
    """avindex's decode stage for one file (chosen frames scaled to RGB, 48 kHz mono windows)."""
    from avindex.decode import read_clip_grid

    return sum(1 for _ in read_clip_grid(path, hop, audio_cfg, video_cfg))


def _parallel(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> list[Any]:
    """Map `fn` over `items` with `workers` threads, as embed's background decoders run."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(fn, items))


def decode_bench(
    paths: Sequence[Path],
    durations: Sequence[float],
    audio_cfg: AudioConfig,
    video_cfg: VideoConfig,
    embed_cfg: EmbedConfig,
    repeats: int,
) -> dict[str, Any]:
    """Decode-only bound and avindex's decode stage on the same files with the same threads."""
    seconds = float(sum(durations))
    counts: list[tuple[int, float]] = []

    def bound() -> float:
        counts[:] = _parallel(lambda p: decode_only(p, embed_cfg.decode_threads), paths, workers)
        return seconds

    def ours() -> float:
        jobs = list(zip(paths, durations, strict=True))
        _parallel(
            lambda j: read_clips(j[0], j[1], embed_cfg.hop, audio_cfg, video_cfg), jobs, workers
        )
        return seconds

    workers = embed_cfg.decode_workers
    bound_rate, bound_s = best_rate(bound, repeats)
    ours_rate, _ = best_rate(ours, repeats)
    frames = sum(c[0] for c in counts)
    audio_seconds = sum(c[1] for c in counts)
    return {
        "workers": workers,
        "threads_per_decoder": embed_cfg.decode_threads,
        "video_seconds": seconds,
        "bound_video_s_per_s": bound_rate,
        "bound_frames_per_s": frames / bound_s,
        "bound_audio_s_per_s": audio_seconds / bound_s,
        "avindex_video_s_per_s": ours_rate,
        "avindex_clips_per_s": ours_rate / embed_cfg.hop,
    }
