"""augment.py: waveform and spectrogram augmentations of training batches."""

from __future__ import annotations

import numpy as np
import torch

from avindex.augment import mask_spectrograms, mix_background, shift_audio


def test_shift_rolls_each_window_within_the_limit() -> None:
    rng = np.random.default_rng(0)
    audio = np.tile(np.arange(100, dtype=np.float32), (50, 1))
    shifted = shift_audio(audio, rng, max_seconds=0.1, sample_rate=100)
    shifts = [int(np.argmax(row == 0)) for row in shifted]
    assert all(
        np.array_equal(np.roll(audio[0], s), row) for s, row in zip(shifts, shifted, strict=True)
    )
    signed = [(s + 50) % 100 - 50 for s in shifts]
    assert max(np.abs(signed)) <= 10 and len(set(signed)) > 5
    assert shift_audio(audio, rng, 0.0, 100) is audio


def test_background_comes_from_a_third_video() -> None:
    """Each pair gains the sound of a pair whose audio is from neither its frame's video nor its
    audio's video, so a negative never gains its frame's own sound."""
    rng = np.random.default_rng(1)
    n = 40
    frame_video = rng.integers(0, 5, n)
    audio_video = np.where(rng.random(n) < 0.5, frame_video, (frame_video + 1) % 5)
    audio = np.zeros((n, 5), np.float32)
    audio[np.arange(n), audio_video] = 1.0  # one-hot: which video a window's sound is from
    mixed = mix_background(audio, frame_video, audio_video, rng, max_gain=0.5)
    added = mixed - audio
    for i in range(n):
        sources = np.flatnonzero(added[i] > 0)
        assert len(sources) <= 1 and added[i].max() <= 0.5
        assert not set(sources) & {frame_video[i], audio_video[i]}
    assert (added.max(axis=1) > 0).mean() > 0.8, "most pairs got a background"
    assert mix_background(audio, frame_video, audio_video, rng, 0.0) is audio


def test_masks_cover_bands_with_each_spectrograms_mean() -> None:
    rng = np.random.default_rng(2)
    specs = torch.randn(6, 1, 64, 80) - 50
    masked = mask_spectrograms(specs, rng, masks=2)
    changed = masked != specs
    assert changed.any() and not torch.equal(masked, specs)
    for i in range(6):
        assert torch.allclose(masked[i][changed[i]], specs[i].mean().expand(int(changed[i].sum())))
        rows = changed[i, 0].all(dim=1).sum()  # frequency bands span every frame
        cols = changed[i, 0].all(dim=0).sum()  # time bands span every bin
        assert rows <= 2 * 64 // 8 and cols <= 2 * 80 // 8
    assert mask_spectrograms(specs, rng, 0) is specs
