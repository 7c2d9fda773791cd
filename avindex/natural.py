"""Natural-looking synthetic videos for decode benchmarks: textured scenery under a moving camera,
textured objects crossing it, light film grain, encoded with the encoder's defaults (x264 / x265
preset medium: B-frames, b-pyramid, keyframe every 250 frames).

Flat synthetic frames decode several times faster than real footage (almost every macroblock is a
skip); these have texture at every scale, so decode costs what it costs on camera video.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import av
import numpy as np

from avindex.config import NaturalConfig
from avindex.errors import AvindexError
from avindex.synth import write_video

# Encoder defaults (what "x264 defaults" means), plus x265's log level.
ENCODERS = {
    "h264": ("libx264", {"preset": "medium"}),
    "hevc": ("libx265", {"preset": "medium", "x265-params": "log-level=error"}),
}
KEYINT = 250  # x264's and x265's default keyframe interval
_GRAIN_FIELDS = 8  # precomputed grain fields, cycled with offsets (cheaper than fresh noise)


def texture(height: int, width: int, rng: np.random.Generator, slope: float = 1.1) -> np.ndarray:
    """(height, width, 3) uint8 scenery: 1/f^slope noise per channel (natural images' spectrum),
    with a colour palette mixed across channels."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    falloff = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(height, width)) ** slope
    planes = []
    for _ in range(3):
        spectrum = rng.standard_normal(falloff.shape) + 1j * rng.standard_normal(falloff.shape)
        plane = np.fft.irfft2(spectrum * falloff, s=(height, width))
        planes.append((plane - plane.mean()) / (plane.std() + 1e-9))
    mix = rng.uniform(0.2, 1.0, (3, 3))
    image = np.tensordot(np.stack(planes, -1), mix / mix.sum(0), axes=1)
    return np.clip(128 + 45 * image, 0, 255).astype(np.uint8)


def _path(t: float, rng_phase: np.ndarray, amplitude: np.ndarray) -> np.ndarray:
    """A smooth wandering 2-D position at time t (sum of slow sines)."""
    freqs = np.array([0.05, 0.11, 0.23])
    return (amplitude * np.sin(2 * np.pi * freqs[:, None] * t + rng_phase)).sum(0)


def natural_frames(
    seconds: float, size: tuple[int, int], fps: float, seed: int
) -> Iterator[np.ndarray]:
    """HxWx3 uint8 frames: camera panning over textured scenery, objects moving across it."""
    width, height = size
    rng = np.random.default_rng(seed)
    margin_x, margin_y = width // 2, height // 2
    scene = texture(height + 2 * margin_y, width + 2 * margin_x, rng)
    sprites = []
    for _ in range(4):
        r = int(rng.uniform(0.08, 0.18) * height)
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        mask = (xx / rng.uniform(0.7, 1.3)) ** 2 + yy**2 <= r * r
        skin = texture(2 * r + 1, 2 * r + 1, rng, slope=0.9)
        velocity = rng.uniform(-0.25, 0.25, 2) * np.array([width, height])
        sprites.append((mask, skin, rng.uniform(0, 1, 2) * np.array([width, height]), velocity))
    grain = rng.integers(-3, 4, (_GRAIN_FIELDS, height + 8, width + 8), dtype=np.int16)
    # Three sines of a third of the margin each: the camera never leaves the scenery.
    phase, amplitude = rng.uniform(0, 2 * np.pi, (3, 2)), np.array([[margin_x, margin_y]]) / 3
    for i in range(round(seconds * fps)):
        t = i / fps
        offset = np.add(_path(t, phase, amplitude), (margin_x, margin_y))
        cx, cy = np.clip(offset, 0, (2 * margin_x, 2 * margin_y)).astype(int)
        frame = scene[cy : cy + height, cx : cx + width].copy()
        for mask, skin, start, velocity in sprites:
            x, y = (start + velocity * t) % [width, height]
            _paste(frame, mask, skin, int(x), int(y))
        noise = grain[i % _GRAIN_FIELDS, i % 7 : i % 7 + height, i % 5 : i % 5 + width]
        yield np.clip(frame.astype(np.int16) + noise[..., None], 0, 255).astype(np.uint8)


def _paste(frame: np.ndarray, mask: np.ndarray, skin: np.ndarray, x: int, y: int) -> None:
    """Draw a sprite (mask, texture) centred at (x, y), clipped to the frame."""
    r = mask.shape[0] // 2
    height, width = frame.shape[:2]
    x0, y0, x1, y1 = max(0, x - r), max(0, y - r), min(width, x + r + 1), min(height, y + r + 1)
    if x1 <= x0 or y1 <= y0:
        return
    m = mask[y0 - y + r : y1 - y + r, x0 - x + r : x1 - x + r]
    frame[y0:y1, x0:x1][m] = skin[y0 - y + r : y1 - y + r, x0 - x + r : x1 - x + r][m]


def natural_audio(seconds: float, rate: int, seed: int) -> np.ndarray:
    """(n, 2) float32: soft noise bed with passing tones (content for the audio encoder)."""
    rng = np.random.default_rng(seed + 1)
    n = round(seconds * rate)
    t = np.arange(n) / rate
    bed = np.cumsum(rng.standard_normal(n)).astype(np.float32)
    bed -= np.convolve(bed, np.ones(64) / 64, mode="same")
    tone = 0.1 * np.sin(2 * np.pi * (220 + 60 * np.sin(0.3 * t)) * t)
    mono = (0.05 * bed / (np.abs(bed).max() + 1e-9) + tone).astype(np.float32)
    return np.stack([mono, np.roll(mono, rate // 100)], -1)


def write_natural(path: str | os.PathLike, cfg: NaturalConfig, index: int) -> Path:
    """One natural-looking video (index picks its seed) with stereo 48 kHz AAC audio."""
    if cfg.codec not in ENCODERS:
        raise AvindexError(f"--codec {cfg.codec}: choose from {', '.join(ENCODERS)}")
    codec, options = ENCODERS[cfg.codec]
    seed = cfg.seed * 1000 + index
    frames = natural_frames(cfg.seconds, (cfg.width, cfg.height), cfg.fps, seed)
    audio = natural_audio(cfg.seconds, 48_000, seed)
    target = Path(path)
    once = target.with_name(f"{target.stem}.once{target.suffix}") if cfg.loops > 1 else target
    write_video(
        once,
        frames,
        cfg.fps,
        audio,
        48_000,
        video_codec=codec,
        video_options=options,
        keyint=KEYINT,
    )
    if cfg.loops > 1:
        loop_video(once, target, cfg.loops)
        once.unlink()
    return target


def loop_video(source: str | os.PathLike, out: str | os.PathLike, times: int) -> Path:
    """`out`: `source` played `times` times in a row, remuxed without re-encoding (each pass
    starts at the source's first keyframe), so a long benchmark file costs one short encode."""
    with av.open(os.fspath(source)) as src, av.open(os.fspath(out), "w") as dst:
        streams = {
            s.index: dst.add_stream_from_template(s)
            for s in src.streams
            if s.type in ("video", "audio")
        }
        spans = {}
        for stream in src.streams:
            if stream.index in streams:
                # The source's length in each stream's time base: the offset of the next pass.
                spans[stream.index] = round(src.duration / 1_000_000 / stream.time_base)
        last: dict[int, int] = {}
        for n in range(times):
            src.seek(0)
            for packet in src.demux(*[src.streams[i] for i in streams]):
                index = packet.stream.index
                if packet.dts is None or not packet.size:
                    continue
                shift = n * spans[index]
                if packet.dts + shift <= last.get(index, -(2**62)):
                    continue  # an audio priming packet overlapping the previous pass's end
                packet.pts = None if packet.pts is None else packet.pts + shift
                packet.dts += shift
                last[index] = packet.dts
                packet.stream = streams[index]
                dst.mux(packet)
    return Path(out)


def _write_one(args: tuple[str, NaturalConfig, int]) -> Path:
    return write_natural(*args)


def make_natural_corpus(
    out: str | os.PathLike, cfg: NaturalConfig, workers: int | None = None
) -> list[Path]:
    """`cfg.videos` natural-looking videos in `out` (encoded in parallel processes)."""
    if cfg.width < 16 or cfg.height < 16 or cfg.seconds < 1 or cfg.videos < 1:
        raise AvindexError("natural corpus: need videos >= 1, seconds >= 1 and sizes >= 16 px")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / f"natural_{i:03d}.mp4"), cfg, i) for i in range(cfg.videos)]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    if workers == 1:
        return [_write_one(job) for job in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_write_one, jobs))


__all__ = [
    "ENCODERS",
    "loop_video",
    "make_natural_corpus",
    "natural_frames",
    "texture",
    "write_natural",
]
