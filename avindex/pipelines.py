"""DALI preprocessing (CPU or GPU): frames -> normalised crops, audio -> log-spectrograms."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray
from PIL import Image

from avindex.config import AudioConfig, AugmentConfig, VideoConfig
from avindex.errors import AvindexError
from avindex.media import scaled_size


def dali_hann_window(length: int) -> np.ndarray:
    """The Hann window fn.spectrogram uses by default: 0.5 - 0.5 cos(2 pi (n + 0.5) / N).

    Checked numerically against DALI 2.4 (relative error ~1e-7); numpy's symmetric np.hanning
    differs by ~0.3% of the peak power, so the reference must use this one.
    """
    n = np.arange(length, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * (n + 0.5) / length)


def reference_log_spectrograms(audio_batch: np.ndarray, audio_cfg: AudioConfig) -> np.ndarray:
    """Numpy STFT of (B, n_samples) audio -> (B, n_freq, n_frames) float32 dB re amplitude 1."""
    audio_batch = np.asarray(audio_batch, dtype=np.float64)
    n_frames = (audio_batch.shape[-1] - audio_cfg.window_length) // audio_cfg.window_step + 1
    starts = audio_cfg.window_step * np.arange(n_frames)
    windows = audio_batch[:, starts[:, None] + np.arange(audio_cfg.window_length)[None, :]]
    # rfft with n > window_length zero-pads at the end, which is what DALI does with nfft > window.
    spec = np.fft.rfft(windows * dali_hann_window(audio_cfg.window_length), n=audio_cfg.n_fft)
    power = spec.real**2 + spec.imag**2
    floor = 10.0 ** (audio_cfg.db_cutoff / 10.0)
    return (10.0 * np.log10(np.maximum(power, floor))).transpose(0, 2, 1).astype(np.float32)


def reference_log_spectrogram(audio: np.ndarray, audio_cfg: AudioConfig) -> np.ndarray:
    """Numpy STFT of one (n_samples,) clip -> (n_freq, n_frames) float32 dB re amplitude 1."""
    return reference_log_spectrograms(np.asarray(audio)[None, :], audio_cfg)[0]


def reference_frame(frame: np.ndarray, video_cfg: VideoConfig) -> np.ndarray:
    """Plain PIL/numpy eval preprocessing of one HxWx3 uint8 frame -> (3, crop, crop) float32."""
    h, w = frame.shape[:2]
    if min(h, w) != video_cfg.resize_shorter:
        size = scaled_size(w, h, video_cfg.resize_shorter)
        frame = np.asarray(Image.fromarray(frame).resize(size, Image.BILINEAR))
        h, w = frame.shape[:2]
    c = video_cfg.crop
    # An odd margin puts the centre on a half pixel; DALI rounds it up, and so does this.
    y0, x0 = (h - c + 1) // 2, (w - c + 1) // 2
    crop = frame[y0 : y0 + c, x0 : x0 + c].astype(np.float32) / 255.0
    mean, std = np.asarray(video_cfg.mean, np.float32), np.asarray(video_cfg.std, np.float32)
    return ((crop - mean) / std).transpose(2, 0, 1)


def _copy_to_torch(dali_out: Any, out: torch.Tensor) -> torch.Tensor:
    """Copy one dense DALI output into `out` (the single, unavoidable copy) and return `out`.

    DALI reuses its output buffers on the next run, so a zero-copy view would be overwritten under
    the caller; one copy straight into torch-owned memory (device-to-device on CUDA) is the minimum.
    """
    dense = dali_out.as_tensor()
    stream = torch.cuda.current_stream() if out.is_cuda else None
    feed_ndarray(dense, out.view(dense.shape()), cuda_stream=stream)
    return out


def _device_id(device: str) -> int | None:
    """DALI device_id for a torch device; None builds a CPU-only pipeline (no CUDA needed)."""
    if device == "cpu":
        return None
    return torch.cuda.current_device()


def _normalise(frames: Any, video_cfg: VideoConfig, layout: str, **crop_args: Any) -> Any:
    """fn.crop_mirror_normalize to float with VideoConfig mean/std (given on the 0..1 scale)."""
    return fn.crop_mirror_normalize(
        frames,
        dtype=types.FLOAT,
        output_layout=layout,
        mean=[255.0 * m for m in video_cfg.mean],
        std=[255.0 * s for s in video_cfg.std],
        **crop_args,
    )


def _frame_graph(frames: Any, video_cfg: VideoConfig, augment: AugmentConfig | None) -> Any:
    """Scaled HWC uint8 frames -> (3, crop, crop) float: centre crop, or train augmentation
    (random crop, or random resized crop, then jitter and flip)."""
    c = video_cfg.crop
    if augment is None:
        return _normalise(frames, video_cfg, "CHW", crop=(c, c))
    # Crop first so the colour jitter touches only crop x crop pixels.
    if augment.min_crop_area < 1.0:
        frames = fn.random_resized_crop(
            frames, size=(c, c), random_area=(augment.min_crop_area, 1.0)
        )
    else:
        frames = fn.crop(
            frames,
            crop=(c, c),
            crop_pos_x=fn.random.uniform(range=(0.0, 1.0)),
            crop_pos_y=fn.random.uniform(range=(0.0, 1.0)),
        )
    if augment.brightness_jitter > 0 or augment.saturation_jitter > 0:
        frames = fn.color_twist(
            frames,
            brightness=_random_factor(augment.brightness_jitter),
            saturation=_random_factor(augment.saturation_jitter),
        )
    return _normalise(frames, video_cfg, "CHW", mirror=fn.random.coin_flip(probability=0.5))


def _random_factor(spread: float) -> Any:
    """A per-sample factor uniform in [1 - spread, 1 + spread]; 1.0 when the spread is zero."""
    # DALI rejects the empty range [1, 1), and a constant skips a random draw.
    return fn.random.uniform(range=(1.0 - spread, 1.0 + spread)) if spread > 0 else 1.0


def _spectrogram_graph(audio: Any, audio_cfg: AudioConfig, augment: AugmentConfig | None) -> Any:
    """(n_samples,) float audio -> (n_freq, n_frames) dB re amplitude 1.0, optional random gain."""
    if augment is not None and augment.volume_jitter > 0:
        gain = _random_factor(augment.volume_jitter)  # one factor for the whole sample (paper)
        audio = audio * (gain.gpu() if audio.device == "gpu" else gain)
    # power=2 with multiplier 10 equals 20*log10(magnitude) and skips a sqrt per bin.
    spec = fn.spectrogram(
        audio,
        nfft=audio_cfg.n_fft,
        window_length=audio_cfg.window_length,
        window_step=audio_cfg.window_step,
        center_windows=False,
        power=2,
        layout="ft",
    )
    return fn.to_decibels(spec, multiplier=10.0, reference=1.0, cutoff_db=audio_cfg.db_cutoff)


class Preprocessor:
    """DALI pipelines (external sources for frames and audio) producing model-ready tensors."""

    def __init__(
        self,
        audio_cfg: AudioConfig,
        video_cfg: VideoConfig,
        batch_size: int,
        device: str = "cpu",
        train: bool = False,
        seed: int = 0,
        threads: int = 2,
        augment: AugmentConfig | None = None,
    ) -> None:
        """Configure; pipelines build on first use (`augment` defaults to AugmentConfig() if
        train)."""
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', not {device!r}")
        if video_cfg.crop > video_cfg.resize_shorter:
            raise AvindexError(
                f"crop {video_cfg.crop} > resize_shorter {video_cfg.resize_shorter}; "
                "choose a crop no larger than the scaled shorter side"
            )
        self.audio_cfg, self.video_cfg = audio_cfg, video_cfg
        self.batch_size, self.device, self.train = batch_size, device, train
        self.seed, self.threads = seed, threads
        self.augment = (augment or AugmentConfig()) if train else None
        # Keyed by (frames?, audio?, resize?). Resizing an already-scaled frame costs ~8x the
        # crop+normalise (measured ~7000 vs ~800 frames/s at batch 64 on 2 cores), so frames that
        # arrive scaled (PyAV path) skip fn.resize in a pipeline of their own.
        self._pipes: dict[tuple[bool, bool, bool], Any] = {}

    def __call__(
        self, frames: Sequence[np.ndarray], audio: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """frames (B x HxWx3 uint8) + audio (B, n_samples) float32 -> (B,3,crop,crop), (B,1,F,T)."""
        if len(frames) != len(audio):
            raise ValueError(f"{len(frames)} frames but {len(audio)} audio clips")
        out = self._run(frames, audio)
        return out[0], out[1]

    def frames(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """Frames only (image queries): B x HxWx3 uint8 -> (B, 3, crop, crop) float32."""
        return self._run(frames, None)[0]

    def spectrograms(self, audio: np.ndarray) -> torch.Tensor:
        """Audio only (audio queries, NVDEC frames): (B, n_samples) float32 -> (B, 1, F, T)."""
        return self._run(None, audio)[0]

    def _run(self, frames: Sequence[np.ndarray] | None, audio: np.ndarray | None) -> list[Any]:
        """Check the batch, feed the matching pipeline, copy its outputs into torch tensors."""
        n = len(frames) if frames is not None else len(audio)  # type: ignore[arg-type]
        if not 0 < n <= self.batch_size:
            raise ValueError(f"batch of {n}; expected 1..{self.batch_size}")
        acfg, c = self.audio_cfg, self.video_cfg.crop
        if audio is not None:
            audio = np.ascontiguousarray(audio, dtype=np.float32)  # one contiguous batch
            if audio.shape != (n, acfg.n_samples):
                raise ValueError(f"audio {audio.shape}; expected ({n}, {acfg.n_samples})")
        short = self.video_cfg.resize_shorter
        resize = frames is not None and any(min(f.shape[:2]) != short for f in frames)
        key = (frames is not None, audio is not None, resize)
        if key not in self._pipes:
            self._pipes[key] = self._build(*key)
        pipe = self._pipes[key]
        shapes = []
        if frames is not None:
            # DALI takes dense arrays only; PyAV rows are padded to aligned line sizes.
            pipe.feed_input("frames", [np.ascontiguousarray(f) for f in frames], layout="HWC")
            shapes.append((n, 3, c, c))
        if audio is not None:
            pipe.feed_input("audio", audio)
            shapes.append((n, 1, acfg.n_freq, acfg.n_frames))
        outs = pipe.run()
        return [
            _copy_to_torch(o, torch.empty(s, dtype=torch.float32, device=self.device))
            for o, s in zip(outs, shapes, strict=True)
        ]

    def _build(self, with_frames: bool, with_audio: bool, resize: bool) -> Any:
        """Build one DALI pipeline; prefetch depth 1 since feed_input with a deeper one breaks."""
        gpu = self.device == "cuda"

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.threads,
            device_id=_device_id(self.device),
            seed=self.seed,
            prefetch_queue_depth=1,
        )
        def pipeline() -> tuple[Any, ...]:
            outputs = []
            if with_frames:
                frames = fn.external_source(name="frames", dtype=types.UINT8, ndim=3)
                frames = frames.gpu() if gpu else frames
                if resize:
                    frames = fn.resize(frames, resize_shorter=self.video_cfg.resize_shorter)
                outputs.append(_frame_graph(frames, self.video_cfg, self.augment))
            if with_audio:
                audio = fn.external_source(name="audio", dtype=types.FLOAT, ndim=1)
                audio = audio.gpu() if gpu else audio
                outputs.append(_spectrogram_graph(audio, self.audio_cfg, self.augment))
            return tuple(outputs)

        pipe = pipeline()
        pipe.build()
        return pipe
