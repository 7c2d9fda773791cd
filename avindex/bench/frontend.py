"""Audio front end: DALI log-spectrograms/s against the plain numpy STFT, on the corpus's audio."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from avindex.bench.measure import sustained_rate
from avindex.config import AudioConfig, VideoConfig
from avindex.media import MediaError, decode_audio
from avindex.pipelines import Preprocessor, reference_log_spectrograms


def audio_batch(path: Path, audio_cfg: AudioConfig, batch: int) -> np.ndarray:
    """`batch` one-clip windows of a video's soundtrack (repeated when it is short), (B, n)."""
    n = audio_cfg.n_samples
    try:
        audio = decode_audio(path, audio_cfg.sample_rate)
    except MediaError:  # a video without sound: its clips are silent, which DALI handles alike
        audio = np.zeros(n, np.float32)
    windows = max(1, len(audio) // n)
    audio = np.resize(audio[: windows * n], windows * n).reshape(windows, n)
    return np.ascontiguousarray(audio[np.arange(batch) % windows])


def frontend_bench(
    path: Path,
    audio_cfg: AudioConfig,
    video_cfg: VideoConfig,
    batch: int,
    device: str,
    min_seconds: float,
    repeats: int,
) -> dict[str, Any]:
    """Spectrograms/s of the DALI Preprocessor and of the numpy reference on the same batch."""
    audio = audio_batch(path, audio_cfg, batch)
    pre = Preprocessor(audio_cfg, video_cfg, batch, device=device)
    dali = sustained_rate(lambda: len(pre.spectrograms(audio)), min_seconds, repeats, device)
    numpy = sustained_rate(
        lambda: len(reference_log_spectrograms(audio, audio_cfg)), min_seconds, repeats
    )
    # Sanity check that both compute the same thing (dB, loud bins only: the floor is exact).
    ref = reference_log_spectrograms(audio[:4], audio_cfg)
    got = pre.spectrograms(audio[:4]).cpu().numpy()[:, 0]
    loud = ref > audio_cfg.db_cutoff + 40
    diff = float(np.abs(got - ref)[loud].max()) if loud.any() else 0.0
    return {
        "batch": batch,
        "device": device,
        "dali_spectrograms_per_s": dali,
        "numpy_spectrograms_per_s": numpy,
        "max_abs_db_difference": diff,
    }
