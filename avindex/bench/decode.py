"""CPU decode bounds and avindex's decode stage on the same files in the same run: PyAV decoding
every frame, PyAV skipping non-reference frames (skip_frame=NONREF), and embed's own reader."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import av

from avindex.bench.measure import best_rate
from avindex.config import AudioConfig, EmbedConfig, VideoConfig
from avindex.media import set_threads
from avindex.reader import ClipReader, VideoRead
from avindex.store import VideoRecord


def decode_file(path: str, threads: int, skip_nonref: bool) -> tuple[int, float]:
    """Decode a file's video (every frame, or skip_frame=NONREF) and audio, converting nothing:
    (frames decoded, audio seconds)."""
    frames, audio_seconds = 0, 0.0
    with av.open(path) as container:
        streams = [*container.streams.video[:1], *container.streams.audio[:1]]
        for stream in container.streams.video[:1]:
            set_threads(stream, threads)
            stream.codec_context.skip_frame = "NONREF" if skip_nonref else "DEFAULT"
        for packet in container.demux(*streams):
            for frame in packet.decode():
                if packet.stream.type == "video":
                    frames += 1
                else:
                    audio_seconds += frame.samples / frame.sample_rate
    return frames, audio_seconds


def bound_layout(files: int, cores: int) -> tuple[int, int]:
    """(processes, FFmpeg threads each) that use every core: one process per file up to the
    core count, the cores shared out as frame threads (one long file gets them all)."""
    processes = max(1, min(files, cores))
    return processes, max(1, cores // processes)


def pyav_bound(
    paths: Sequence[Path], seconds: float, skip_nonref: bool, repeats: int
) -> dict[str, Any]:
    """Best-of-`repeats` rate of decode_file over every path on all cores."""
    processes, threads = bound_layout(len(paths), os.cpu_count() or 1)
    counts: list[tuple[int, float]] = []
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(int, range(processes)))  # start the processes outside the timing

        def run() -> float:
            jobs = [(str(p), threads, skip_nonref) for p in paths]
            counts[:] = list(pool.map(decode_file, *zip(*jobs, strict=True)))
            return seconds

        rate, took = best_rate(run, repeats)
    frames = sum(c[0] for c in counts)
    return {
        "processes": processes,
        "threads": threads,
        "video_s_per_s": rate,
        "frames_per_s": frames / took,
        "frames": frames,
        "audio_s_per_s": sum(c[1] for c in counts) / took,
    }


def read_all(
    paths: Sequence[Path],
    audio_cfg: AudioConfig,
    video_cfg: VideoConfig,
    cfg: EmbedConfig,
) -> list[VideoRead]:
    """embed's decode stage alone: every clip of every file through ClipReader (its processes,
    its threads), nothing embedded. Returns each video's VideoRead."""
    records = [(i, VideoRecord(str(p), 0, 0.0, 0.0)) for i, p in enumerate(paths)]
    with ClipReader(records, audio_cfg, video_cfg, cfg, len(records)) as reader:
        return [event for event in reader if isinstance(event, VideoRead)]


def decode_bench(
    paths: Sequence[Path],
    durations: Sequence[float],
    audio_cfg: AudioConfig,
    video_cfg: VideoConfig,
    embed_cfg: EmbedConfig,
    repeats: int,
) -> dict[str, Any]:
    """Decode-all and skip-non-reference bounds, and avindex's decode stage, same files."""
    seconds = float(sum(durations))
    reads: list[VideoRead] = []

    def ours() -> float:
        reads[:] = read_all(paths, audio_cfg, video_cfg, embed_cfg)
        return seconds

    ours_rate, _ = best_rate(ours, repeats)
    total = sum(r.frames_total for r in reads)
    return {
        "video_seconds": seconds,
        "decode_all": pyav_bound(paths, seconds, False, repeats),
        "skip_nonref": pyav_bound(paths, seconds, True, repeats),
        "avindex": {
            "workers": min(embed_cfg.decode_workers, len(paths)),
            "threads": ClipReader.threads_for(embed_cfg, len(paths)),
            "video_s_per_s": ours_rate,
            "clips_per_s": ours_rate / embed_cfg.hop,
            "decoded_fraction": sum(r.frames_decoded for r in reads) / total if total else 0.0,
            "failed": sum(1 for r in reads if r.error),
        },
    }
