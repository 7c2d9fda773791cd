"""What a result shows and plays: a stored clip's frame (JPEG), its sound with a little context
(WAV) and its spectrogram (PNG), decoded from the store's own videos and kept in a small cache."""

from __future__ import annotations

import dataclasses
import io
import threading
import wave
from functools import lru_cache

import numpy as np
from PIL import Image

from avindex.config import AudioConfig, ServeConfig, VideoConfig
from avindex.decode import Moment, MomentData, clip_moment, read_moments
from avindex.sheet import spectrogram_picture
from avindex.store import ClipRef, Store

JPEG_QUALITY = 85


def jpeg_bytes(picture: np.ndarray) -> bytes:
    """An RGB uint8 picture as JPEG."""
    out = io.BytesIO()
    Image.fromarray(picture).save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def png_bytes(picture: np.ndarray) -> bytes:
    """An RGB uint8 picture as PNG."""
    out = io.BytesIO()
    Image.fromarray(picture).save(out, format="PNG")
    return out.getvalue()


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """Mono float samples in [-1, 1] as a 16-bit PCM WAV file."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return out.getvalue()


class ClipMedia:
    """Frames, sounds and spectrograms of stored clips, a bounded number decoded at once."""

    def __init__(self, store: Store, audio_cfg: AudioConfig, cfg: ServeConfig) -> None:
        """Decode with the store's audio settings; `cfg` sizes thumbnails, context and cache."""
        self.store = store
        self.audio_cfg = audio_cfg
        self.context = cfg.audio_context
        self.thumb_cfg = VideoConfig(resize_shorter=cfg.thumb_height)
        # The sound played for a result: its clip with `context` seconds on either side.
        self.long_cfg = dataclasses.replace(
            audio_cfg, clip_seconds=audio_cfg.clip_seconds + 2 * cfg.audio_context
        )
        # Each decode holds a video's frames and sound: bound how many run together.
        self._slots = threading.BoundedSemaphore(cfg.media_workers)
        self.frame_jpeg = lru_cache(maxsize=cfg.media_cache)(self._frame_jpeg)
        self.audio_wav = lru_cache(maxsize=cfg.media_cache)(self._audio_wav)
        self.spectrogram_png = lru_cache(maxsize=cfg.media_cache)(self._spectrogram_png)

    def _read(
        self, clip: ClipRef, moment: Moment, audio_cfg: AudioConfig, frames: bool
    ) -> MomentData:
        """One moment of a clip's video (seeking to it; raises MediaError for unreadable files)."""
        with self._slots:
            reader = read_moments(
                clip.path, [moment], audio_cfg, self.thumb_cfg, frames=frames, seek=True
            )
            try:
                return next(reader)
            finally:
                reader.close()  # stop decoding: the rest of the file is not needed

    def _frame_jpeg(self, clip_id: int) -> bytes:
        """JPEG of the frame a clip was embedded with (the one nearest its middle)."""
        clip = self.store.clip(clip_id)
        moment = clip_moment(clip.t0, self.audio_cfg.clip_seconds)
        return jpeg_bytes(self._read(clip, moment, self.audio_cfg, frames=True).frame)

    def _audio_wav(self, clip_id: int) -> bytes:
        """WAV of the clip's sound with `context` seconds before and after (mono, store rate)."""
        clip = self.store.clip(clip_id)
        start = clip.t0 - self.context
        moment = Moment(clip.t0 + self.audio_cfg.clip_seconds / 2, max(0.0, start))
        audio = self._read(clip, moment, self.long_cfg, frames=False).audio
        if start < 0:  # the clip starts the video: no sound before it
            audio = audio[
                : round((self.long_cfg.clip_seconds + start) * self.audio_cfg.sample_rate)
            ]
        return wav_bytes(audio, self.audio_cfg.sample_rate)

    def _spectrogram_png(self, clip_id: int) -> bytes:
        """PNG spectrogram of the clip's 1 s of sound (what the audio tower heard)."""
        clip = self.store.clip(clip_id)
        moment = clip_moment(clip.t0, self.audio_cfg.clip_seconds)
        audio = self._read(clip, moment, self.audio_cfg, frames=False).audio
        return png_bytes(spectrogram_picture(audio[None, :], self.audio_cfg))
