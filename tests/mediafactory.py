"""Test media generator: a zoo of good and broken files with known properties (made by fixtures)."""

from __future__ import annotations

import math
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avindex.synth import write_video

TONE_HZ = 440.0  # continuous tone in every soundtrack (below the 4 kHz Nyquist of 8 kHz audio)
BURST_HZ = 1000.0  # louder burst at a known time, to check audio placement
BURST = (1.25, 1.5)  # seconds
MARK = 4  # the coded frame's top-left 1/MARK x 1/MARK block is white (shows rotation)


@dataclass(frozen=True)
class Spec:
    """One zoo file: how to make it and what probe/read_moments must find."""

    name: str
    fps: float = 25.0
    seconds: float = 3.0
    size: tuple[int, int] = (96, 64)  # coded (width, height)
    rate: int | None = 48_000  # audio sample rate; None = no audio track
    channels: int = 2
    rotation: int = 0
    vfr: bool = False
    video_codec: str = ""  # expected probe names
    audio_codec: str | None = None

    @property
    def n_frames(self) -> int:
        """Frames written (constant frame rate)."""
        return len(vfr_pts()) if self.vfr else round(self.seconds * self.fps)

    @property
    def duration(self) -> float:
        """End of the last frame."""
        if self.vfr:
            pts = vfr_pts()
            return float(pts[-1] + (pts[-1] - pts[-2]))
        return self.n_frames / (round(self.fps * 1001) / 1001)

    @property
    def clips(self) -> int:
        """Expected clips at hop 1 s (written independently of media.clip_starts)."""
        return math.floor(self.duration + 1e-6)


GOOD = [
    Spec("h264_aac.mp4", video_codec="h264", audio_codec="aac"),
    Spec("vp9_opus.webm", fps=29.97, channels=1, video_codec="vp9", audio_codec="opus"),
    Spec(
        "mpeg4_pcm.avi",
        seconds=2.0,
        rate=16_000,
        channels=1,
        video_codec="mpeg4",
        audio_codec="pcm_s16le",
    ),
    Spec(
        "mjpeg_pcm.mov",
        fps=23.976,
        seconds=2.5,
        rate=44_100,
        video_codec="mjpeg",
        audio_codec="pcm_s16le",
    ),
    Spec("fps23976.mp4", fps=23.976, video_codec="h264", audio_codec="aac"),
    Spec("fps2997.mp4", fps=29.97, seconds=2.0, video_codec="h264", audio_codec="aac"),
    Spec("fps60.mp4", fps=60.0, seconds=2.0, rate=44_100, video_codec="h264", audio_codec="aac"),
    Spec("vfr.mp4", vfr=True, video_codec="h264", audio_codec="aac"),
    Spec("audio8k_stereo.mp4", rate=8_000, video_codec="h264", audio_codec="aac"),
    Spec(
        "audio16k_mono.mkv",
        seconds=2.0,
        rate=16_000,
        channels=1,
        video_codec="h264",
        audio_codec="aac",
    ),
    Spec("audio51.mp4", channels=6, video_codec="h264", audio_codec="aac"),
    Spec("audio71.mp4", channels=8, video_codec="h264", audio_codec="aac"),
    Spec(
        "audio51_8k.avi",
        seconds=2.0,
        rate=8_000,
        channels=6,
        video_codec="mpeg4",
        audio_codec="pcm_s16le",
    ),
    Spec("odd_177x99.webm", seconds=2.0, size=(177, 99), video_codec="vp9", audio_codec="opus"),
    Spec("portrait_72x128.mp4", seconds=2.0, size=(72, 128), video_codec="h264", audio_codec="aac"),
    Spec(
        "rotated90.mp4",
        seconds=2.0,
        size=(128, 72),
        rotation=90,
        video_codec="h264",
        audio_codec="aac",
    ),
    Spec("no_audio.mp4", rate=None, video_codec="h264"),
]
BAD = {  # name -> substring of probe's error
    "zero_bytes.mp4": "empty",
    "truncated.mp4": "not a readable media file",
    "random_bytes.mp4": "not a readable media file",
    "text.mp4": "not a",
    "short.mp4": "shorter than one clip",
    "audio_only.mp4": "audio only",
}
CORRUPT_MIDDLE = "corrupt_middle.mp4"  # usable: damaged packets are skipped, all clips remain


def frame_code(index: int) -> tuple[int, int, int]:
    """RGB levels that encode a frame index (8 levels per channel, 32 apart for lossy codecs)."""
    return 32 * (index % 8) + 16, 32 * ((index // 8) % 8) + 16, 32 * ((index // 64) % 8) + 16


def decode_index(rgb: np.ndarray) -> int:
    """Frame index from a decoded frame (median colour of its bottom-right quarter)."""
    h, w = rgb.shape[:2]
    levels = np.round((np.median(rgb[h // 2 :, w // 2 :].reshape(-1, 3), axis=0) - 16) / 32)
    return int(levels[0] + 8 * levels[1] + 64 * levels[2])


def make_frames(n: int, size: tuple[int, int]) -> np.ndarray:
    """n frames (n,H,W,3): colour encodes the index, a white block marks the coded top-left."""
    width, height = size
    frames = np.empty((n, height, width, 3), dtype=np.uint8)
    codes = np.array([frame_code(i) for i in range(n)], dtype=np.uint8)
    frames[:] = codes[:, None, None, :]
    frames[:, : height // MARK, : width // MARK] = 255
    return frames


def channel_gains(channels: int) -> np.ndarray:
    """Per-channel amplitude: channel c gets (c+1)/channels, so a wrong downmix shows."""
    return (np.arange(channels) + 1) / channels


def mono_reference(t: np.ndarray, channels: int) -> np.ndarray:
    """The expected mono mix (mean of channels) of `soundtrack` at times `t`."""
    tone = 0.2 * np.sin(2 * np.pi * TONE_HZ * t)
    burst = 0.5 * np.sin(2 * np.pi * BURST_HZ * t) * ((t >= BURST[0]) & (t < BURST[1]))
    return channel_gains(channels).mean() * (tone + burst)


def soundtrack(seconds: float, rate: int, channels: int) -> np.ndarray:
    """(n, channels) float32: the tone plus burst, scaled per channel."""
    t = np.arange(round(seconds * rate)) / rate
    base = mono_reference(t, 1)
    return (base[:, None] * channel_gains(channels)[None, :]).astype(np.float32)


def vfr_pts() -> np.ndarray:
    """Known variable frame times (seconds): 20-100 ms steps up to about 3.1 s."""
    steps = np.tile([0.02, 0.05, 0.1, 0.033], 40)
    pts = np.r_[0.0, np.cumsum(steps)]
    return pts[pts <= 3.1]


def write_spec(path: Path, spec: Spec) -> None:
    """Write one good zoo file."""
    audio = None
    if spec.rate is not None:
        audio = soundtrack(spec.duration, spec.rate, spec.channels)
    write_video(
        path,
        make_frames(spec.n_frames, spec.size),
        spec.fps,
        audio,
        spec.rate or 48_000,
        pts=vfr_pts() if spec.vfr else None,
        rotation=spec.rotation,
    )


def write_bad(folder: Path) -> dict[str, Path]:
    """Write the broken files (and the corrupt-middle one); returns name -> path."""
    rng = np.random.default_rng(0)
    paths = {name: folder / name for name in [*BAD, CORRUPT_MIDDLE]}
    paths["zero_bytes.mp4"].write_bytes(b"")
    paths["random_bytes.mp4"].write_bytes(rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    paths["text.mp4"].write_text("this is not a video\n" * 50)
    write_spec(paths["short.mp4"], Spec("short.mp4", seconds=0.5))
    write_video(paths["audio_only.mp4"], None, 25, soundtrack(2.0, 48_000, 2))
    whole = folder / "whole.tmp.mp4"
    write_spec(whole, Spec("whole", seconds=4.0))
    data = whole.read_bytes()
    whole.unlink()
    paths["truncated.mp4"].write_bytes(data[: len(data) // 2])  # the index (moov) is at the end
    middle = bytearray(data)
    start = len(data) // 2
    middle[start : start + 2000] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    paths[CORRUPT_MIDDLE].write_bytes(bytes(middle))
    return paths


def write_wav(path: Path, seconds: float, rate: int, channels: int) -> Path:
    """16-bit PCM WAV with any channel count (the soundtrack, so its mono mix is known)."""
    samples = np.clip(soundtrack(seconds, rate, channels) * 32767, -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return path


def moving_frames(n: int, size: tuple[int, int]) -> np.ndarray:
    """n frames of smooth motion (drifting gradients and a moving disc): encoders use B-frames
    and references on it as they do on natural video."""
    width, height = size
    x, y = np.arange(width)[None, :], np.arange(height)[:, None]
    frames = np.empty((n, height, width, 3), dtype=np.uint8)
    for i in range(n):
        frames[i, ..., 0] = (x * 255 // width + 2 * i) % 256
        frames[i, ..., 1] = (y * 255 // height + i) % 256
        frames[i, ..., 2] = 96
        cx, cy = (width // 4 + 3 * i) % width, height // 2
        frames[i][(x - cx) ** 2 + (y - cy) ** 2 < (height // 6) ** 2] = 255
    return frames


def write_coded(
    path: Path, codec: str, options: dict[str, str], frames: np.ndarray, fps: float = 25.0
) -> Path:
    """A video-only file made with a given encoder and options (e.g. x264 defaults)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=round(fps), options=options)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def build_zoo(folder: Path) -> dict[str, tuple[Path, int | None]]:
    """Write every zoo file into `folder`: name -> (path, expected clips at hop 1 s, None = bad)."""
    folder.mkdir(parents=True, exist_ok=True)
    zoo: dict[str, tuple[Path, int | None]] = {}
    for spec in GOOD:
        write_spec(folder / spec.name, spec)
        zoo[spec.name] = (folder / spec.name, spec.clips)
    for name, path in write_bad(folder).items():
        zoo[name] = (path, 4 if name == CORRUPT_MIDDLE else None)
    return zoo
