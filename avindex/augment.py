"""Training augmentations that DALI does not do: circular audio shifts, another video's sound as
background, SpecAugment masks (the paper's crop, flip, jitter and gain are in pipelines.py)."""

from __future__ import annotations

import numpy as np
import torch

from avindex.config import AugmentConfig


def shift_audio(
    audio: np.ndarray, rng: np.random.Generator, max_seconds: float, sample_rate: int
) -> np.ndarray:
    """Roll each (n_samples,) window by a random offset of up to `max_seconds` either way."""
    limit = round(max_seconds * sample_rate)
    if limit <= 0:
        return audio
    shifts = rng.integers(-limit, limit + 1, len(audio))
    return np.stack([np.roll(a, int(s)) for a, s in zip(audio, shifts, strict=True)])


def mix_background(
    audio: np.ndarray,
    frame_video: np.ndarray,
    audio_video: np.ndarray,
    rng: np.random.Generator,
    max_gain: float,
) -> np.ndarray:
    """Add to each pair's audio the audio of a pair from a third video (neither the frame's nor
    the audio's, so a negative never gains its frame's own sound) at a gain uniform in
    [0, max_gain]; pairs without such a third video stay as they are."""
    if max_gain <= 0:
        return audio
    out = audio.copy()
    for i in range(len(audio)):
        others = np.flatnonzero((audio_video != frame_video[i]) & (audio_video != audio_video[i]))
        if len(others):
            out[i] += rng.uniform(0.0, max_gain) * audio[rng.choice(others)]
    return out


def mask_spectrograms(specs: torch.Tensor, rng: np.random.Generator, masks: int) -> torch.Tensor:
    """SpecAugment: `masks` time bands (up to 1/8 of the frames each) and `masks` frequency bands
    (up to 1/8 of the bins each) per (1, F, T) spectrogram, set to that spectrogram's mean."""
    if masks <= 0:
        return specs
    n, _, n_freq, n_time = specs.shape
    out = specs.clone()
    means = specs.mean(dim=(1, 2, 3))
    for i in range(n):
        for size, axis in ((n_time, 3), (n_freq, 2)):
            for _ in range(masks):
                width = int(rng.integers(0, size // 8 + 1))
                start = int(rng.integers(0, size - width + 1))
                out[i].narrow(axis - 1, start, width).fill_(means[i])
    return out


def augment_batch_audio(
    audio: np.ndarray,
    frame_video: np.ndarray,
    audio_video: np.ndarray,
    rng: np.random.Generator,
    cfg: AugmentConfig,
    sample_rate: int,
) -> np.ndarray:
    """The waveform augmentations of one batch of pairs, in order: shift, then background."""
    audio = shift_audio(audio, rng, cfg.audio_shift, sample_rate)
    return mix_background(audio, frame_video, audio_video, rng, cfg.background_mix)
