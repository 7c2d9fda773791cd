"""The naive baseline, written the obvious way (as openl3 does): whole file in memory, numpy
spectrogram per clip, one torch call per clip and tower."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch

from avindex.bench.measure import best_rate
from avindex.media import MediaError, clip_starts, decode_audio
from avindex.model import Checkpoint
from avindex.pipelines import reference_frame, reference_log_spectrogram


def naive_embed(path: Path, checkpoint: Checkpoint, hop: float) -> tuple[np.ndarray, np.ndarray]:
    """(visual, audio) embeddings of every clip of one video, the obvious way."""
    acfg, vcfg, model = checkpoint.audio_cfg, checkpoint.video_cfg, checkpoint.model.eval()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    try:
        audio = decode_audio(path, acfg.sample_rate)
    except MediaError:
        audio = np.zeros(0, np.float32)
    visual, sound = [], []
    n = acfg.n_samples
    for t0 in clip_starts(len(frames) / fps, hop, acfg.clip_seconds):
        frame = frames[min(round((t0 + acfg.clip_seconds / 2) * fps), len(frames) - 1)]
        start = round(t0 * acfg.sample_rate)
        window = np.zeros(n, np.float32)
        piece = audio[start : start + n]
        window[: len(piece)] = piece
        x = torch.from_numpy(reference_frame(frame, vcfg))[None].to(model.device)
        spec = torch.from_numpy(reference_log_spectrogram(window, acfg))[None, None]
        with torch.inference_mode():
            visual.append(model.encode_visual(x)[0].cpu().numpy())
            sound.append(model.encode_audio(spec.to(model.device))[0].cpu().numpy())
    return np.stack(visual), np.stack(sound)


def naive_bench(
    paths: Sequence[Path],
    durations: Sequence[float],
    checkpoint: Checkpoint,
    hop: float,
    repeats: int,
) -> dict[str, Any]:
    """Seconds of video per second and clips/s of the naive pipeline over `paths`."""
    clips = [0]

    def run() -> float:
        clips[0] = sum(len(naive_embed(p, checkpoint, hop)[0]) for p in paths)
        return float(sum(durations))

    rate, seconds = best_rate(run, repeats)
    return {
        "videos": len(paths),
        "video_seconds": float(sum(durations)),
        "video_s_per_s": rate,
        "clips_per_s": clips[0] / seconds,
    }
