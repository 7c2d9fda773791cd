"""GPU decode bounds: NVDEC decode of every frame (DALI mixed decoder), and of chosen frames."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from avindex.config import AudioConfig, VideoConfig

# Whole-file decode keeps every frame on the GPU: files above this many decoded bytes are skipped.
MAX_DECODED_BYTES = 8 << 30


def _decode_all_pipeline(device: str, threads: int) -> Any:
    """One-file pipeline: encoded bytes -> every frame (F, H, W, 3), decoded by `device`."""
    from nvidia.dali import fn, pipeline_def, types

    from avindex.pipelines import _device_id

    @pipeline_def(
        batch_size=1,
        num_threads=threads,
        device_id=_device_id("cuda" if device == "mixed" else "cpu"),
        prefetch_queue_depth=1,
    )
    def pipeline() -> Any:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=True)
        return fn.decoders.video(encoded, device=device)

    pipe = pipeline()
    pipe.build()
    return pipe


def decode_all_frames(pipe: Any, path: Path) -> int:
    """Decode every frame of one file with a `_decode_all_pipeline`; returns the frame count."""
    encoded = np.fromfile(path, dtype=np.uint8)
    pipe.feed_input("encoded", [encoded])
    (frames,) = pipe.run()
    return int(frames.shape()[0][0])


def nvdec_bench(
    paths: Sequence[Path],
    durations: Sequence[float],
    sizes: Sequence[tuple[int, int, int]],
    audio_cfg: AudioConfig,
    video_cfg: VideoConfig,
    hop: float,
    device: str = "mixed",
    threads: int = 4,
) -> dict[str, Any]:
    """Frames/s decoding whole files, and clips/s of GpuFrameDecoder (one frame per clip).

    `sizes` holds (frames, width, height) per file; `device` 'cpu' runs the same code with
    DALI's CPU decoder (VP8/VP9/MJPEG only), which is how it is tested without a GPU.
    """
    keep = [i for i, (n, w, h) in enumerate(sizes) if n * w * h * 3 <= MAX_DECODED_BYTES]
    pipe = _decode_all_pipeline(device, threads)
    decode_all_frames(pipe, paths[keep[0]])  # warm-up: decoder and pipeline start
    started = time.perf_counter()
    frames = sum(decode_all_frames(pipe, paths[i]) for i in keep)
    seconds = time.perf_counter() - started
    video_seconds = float(sum(durations[i] for i in keep))
    out: dict[str, Any] = {
        "device": device,
        "videos": len(keep),
        "skipped_too_large": len(paths) - len(keep),
        "frames_per_s": frames / seconds,
        "video_s_per_s": video_seconds / seconds,
    }
    if device == "mixed":
        out.update(_chosen_frames(paths, durations, audio_cfg, video_cfg, hop))
    return out


def _chosen_frames(
    paths: Sequence[Path],
    durations: Sequence[float],
    audio_cfg: AudioConfig,
    video_cfg: VideoConfig,
    hop: float,
) -> dict[str, Any]:
    """GpuFrameDecoder on the frame of each clip (scaled, cropped, normalised on the GPU),
    timed with the packet scan that picks the frame indices."""
    import torch

    from avindex.embed import clip_moments
    from avindex.pipelines import GpuFrameDecoder, frame_indices

    decoder = GpuFrameDecoder(video_cfg)

    def embed_frames(path: Path, duration: float) -> int:
        times = [m.frame_time for m in clip_moments(duration, hop, audio_cfg.clip_seconds)]
        return len(decoder(str(path), frame_indices(str(path), times)))

    embed_frames(paths[0], durations[0])  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    clips = sum(embed_frames(p, d) for p, d in zip(paths, durations, strict=True))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {
        "chosen_clips_per_s": clips / seconds,
        "chosen_video_s_per_s": float(sum(durations)) / seconds,
    }
