"""Media files with PyAV: open and probe them, decode query sounds and pictures, and the helpers
every decoder shares (timestamps, frame conversion, mono mixdown, the limits on hostile input)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image, ImageOps, UnidentifiedImageError

from avindex.config import AudioConfig, VideoConfig
from avindex.errors import AvindexError
from avindex.workers import Done, Failed, Job, WorkerPool

# Tolerance of the clip-count formula (contract): float durations like 0.9999999 count as 1 s.
EPS = 1e-6
# Frames and pictures wider (or taller) than this are refused: scaled so the shorter side is 256,
# a 4096x16 frame would take 48 MiB, a 2000x1 picture 93 MiB. Panoramas (2:1) and ultra-wide
# (32:9) video are well inside.
MAX_ASPECT = 8.0
# Sample rates outside this range are not sound: a WAV header claiming 1 Hz would be resampled to
# 48 kHz at 48,000 samples per input sample.
MIN_AUDIO_RATE, MAX_AUDIO_RATE = 2_000, 1_536_000


class MediaError(AvindexError):
    """A media file that cannot be decoded (the message names the file and the reason)."""


@dataclass
class MediaInfo:
    """What `probe` found about one file; `error` is a one-line reason when it is unusable."""

    path: str
    size: int | None = None
    container: str | None = None
    duration: float | None = None  # end of the last video frame, from the first frame's pts
    n_frames: int | None = None
    video_codec: str | None = None
    width: int | None = None  # coded size; display size is swapped when rotation is +-90
    height: int | None = None
    rotation: int = 0  # counter-clockwise degrees to display upright (display matrix)
    avg_fps: float | None = None
    variable_fps: bool = False
    audio_codec: str | None = None
    sample_rate: int | None = None
    channels: int | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)  # usable, but e.g. its sound is not

    @property
    def usable(self) -> bool:
        """True when the file can be embedded."""
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        return {**asdict(self), "usable": self.usable}


def clip_starts(duration: float | None, hop: float, clip_seconds: float) -> np.ndarray:
    """Start times of the clips of a video of `duration` seconds (the one clip-count formula)."""
    if duration is None or duration + EPS < clip_seconds:
        return np.zeros(0, dtype=np.float64)
    n = math.floor((duration - clip_seconds) / hop + EPS) + 1
    return np.arange(n, dtype=np.float64) * hop


def scaled_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) scaled so the shorter side equals `shorter`, aspect ratio kept."""
    scale = shorter / min(width, height)
    if width <= height:
        return shorter, max(1, round(height * scale))
    return max(1, round(width * scale)), shorter


def check_aspect(width: int, height: int, path: str) -> None:
    """Refuse pictures whose sides differ by more than MAX_ASPECT (see there) in one line."""
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT * min(width, height):
        raise MediaError(
            f"{path}: {width}x{height} pixels: an aspect ratio beyond {MAX_ASPECT:g}:1 is not "
            "supported; crop it first"
        )


def open_media(path: str | os.PathLike) -> av.container.InputContainer:
    """Open a media file for reading, or raise MediaError with a one-line reason."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MediaError(f"{path}: no such file")
    if os.path.isdir(path):
        raise MediaError(f"{path}: is a directory")
    if os.path.getsize(path) == 0:
        raise MediaError(f"{path}: empty file (0 bytes)")
    try:
        return av.open(path, metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError, OSError, ValueError) as exc:
        raise MediaError(f"{path}: not a readable media file ({reason(exc)})") from None


def reason(exc: BaseException) -> str:
    """Short text of an FFmpeg/OS error without the path (the caller already names the file)."""
    text = getattr(exc, "strerror", None) or str(exc)
    return text.split(": '")[0].strip().rstrip(".;:")


def video_stream(container: av.container.InputContainer, path: str) -> av.video.VideoStream:
    """The first video stream, or MediaError saying why there is none."""
    if container.streams.video:
        return container.streams.video[0]
    if container.streams.audio:
        what = "no video stream (audio only)"
    else:
        what = "not a media file (no video or audio stream)"
    raise MediaError(f"{path}: {what}")


def start_pts(stream: av.stream.Stream, first_pts: int | None) -> int:
    """Pts of the first presented frame: the stream's start time (edit lists applied), else the
    first packet's."""
    if stream.start_time is not None:
        return stream.start_time
    return first_pts or 0


def set_threads(stream: av.stream.Stream, threads: int) -> None:
    """Let FFmpeg decode with `threads` threads (0 = automatic)."""
    if threads != 1:
        stream.thread_type = "AUTO"
        stream.thread_count = threads


class PacketClock:
    """Timestamps of a video stream's packets, read while demuxing: the duration and frame rate
    that `probe` reports and that decides how many clips a video has."""

    def __init__(self, time_base: Fraction) -> None:
        self.time_base = time_base
        self.pts: list[int] = []
        self.durations: list[int] = []
        self.last_seconds = 0.0  # presentation time of the newest counted packet

    @property
    def count(self) -> int:
        """Packets counted (the stream's frames)."""
        return len(self.pts)

    @property
    def first_pts(self) -> int | None:
        """Smallest timestamp seen."""
        return min(self.pts) if self.pts else None

    def add(self, packet: av.Packet) -> bool:
        """Count a packet; False for packets without a timestamp or payload (not frames)."""
        stamp = packet.pts if packet.pts is not None else packet.dts
        if stamp is None or packet.size == 0:
            return False
        self.pts.append(stamp)
        self.durations.append(packet.duration or 0)
        self.last_seconds = float(stamp * self.time_base)
        return True

    def timing(self, start: int) -> tuple[float, float, bool]:
        """(duration, average fps, variable frame rate?) from the first presented frame `start`."""
        pts = np.asarray(self.pts, dtype=np.int64)
        order = np.sort(pts)
        deltas = np.diff(order)
        typical = int(np.median(deltas)) if len(deltas) else 0
        last_duration = self.durations[int(np.argmax(pts))] or typical
        end = max(int(order[-1]) + last_duration, int(order[-1]) + 1)
        duration = float((end - start) * self.time_base)
        # Container timestamps are rounded (e.g. ms in WebM: 33/34 ms at 29.97 fps), so only a
        # spread beyond one tick and 5% of the typical frame interval counts as variable.
        tol = max(1.5, 0.05 * typical)
        variable = bool(len(deltas) and np.abs(deltas - typical).max() > tol)
        avg_fps = round(len(pts) / duration, 3) if duration > 0 else 0.0
        return duration, avg_fps, variable

    def duration(self, start: int) -> float:
        """End of the last frame, in seconds after `start`."""
        return self.timing(start)[0]


def _container_name(container: av.container.InputContainer, path: str) -> str:
    """Short container name: the file's extension when FFmpeg's format lists it, else its first."""
    names = container.format.name.split(",")
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    return ext if ext in names else names[0]


def probe(path: str | os.PathLike, clip_seconds: float | None = None) -> MediaInfo:
    """Describe a media file without decoding it whole; never raises for bad media."""
    path = os.fspath(path)
    clip_seconds = AudioConfig().clip_seconds if clip_seconds is None else clip_seconds
    info = MediaInfo(path=path)
    try:
        info.size = os.path.getsize(path) if os.path.isfile(path) else None
        with open_media(path) as container:
            _probe_container(container, path, info)
        if info.duration is not None and info.duration + EPS < clip_seconds:
            raise MediaError(f"{path}: shorter than one clip ({info.duration:.3f} s)")
    except MediaError as exc:
        info.error = str(exc).removeprefix(f"{path}: ")
    return info


def probe_files(
    paths: Sequence[str | os.PathLike], workers: int, clip_seconds: float | None = None
) -> list[MediaInfo]:
    """probe() of many files in child processes (in the order given): a file that crashes or
    hangs its demuxer gets that as its error instead of ending the caller."""
    if not paths:
        return []  # no worker to start
    jobs = [Job(i, probe, (os.fspath(p), clip_seconds)) for i, p in enumerate(paths)]
    infos: dict[int, MediaInfo] = {}
    with WorkerPool(jobs, max(1, min(workers, len(jobs)))) as pool:
        for event in pool.events():
            if isinstance(event, Done):
                infos[event.key] = event.value
            elif isinstance(event, Failed):
                infos[event.key] = MediaInfo(os.fspath(paths[event.key]), error=event.reason)
    return [infos[i] for i in range(len(paths))]


def _probe_container(container: av.container.InputContainer, path: str, info: MediaInfo) -> None:
    """Fill `info` from an open container: stream headers, a packet scan, the first video frame
    and the first audio frame (decoded the way clips decode them)."""
    info.container = _container_name(container, path)
    audio = container.streams.audio[0] if container.streams.audio else None
    if audio is not None:
        info.audio_codec = audio.codec_context.name
        info.sample_rate = audio.codec_context.sample_rate or None
        info.channels = audio.codec_context.channels or None
        unusable = check_audio_rate(audio, path)
        if unusable is not None:
            info.warnings.append(unusable.removeprefix(f"{path}: "))
            audio = None
    stream = video_stream(container, path)
    info.video_codec = stream.codec_context.name
    info.width, info.height = stream.codec_context.width, stream.codec_context.height
    clock = PacketClock(stream.time_base)
    first_frame, heard = _scan(container, stream, audio, clock)
    if first_frame is None:
        raise MediaError(f"{path}: no decodable video frames")
    info.rotation = round(first_frame.rotation or 0) % 360
    info.width, info.height = first_frame.width, first_frame.height
    check_aspect(info.width, info.height, path)
    info.duration, info.avg_fps, info.variable_fps = clock.timing(
        start_pts(stream, clock.first_pts)
    )
    info.n_frames = clock.count
    if audio is not None and not heard:
        info.warnings.append("audio track has no decodable sound (clips get has_audio = false)")


def _scan(
    container: av.container.InputContainer,
    stream: av.video.VideoStream,
    audio: av.audio.AudioStream | None,
    clock: PacketClock,
) -> tuple[av.VideoFrame | None, bool]:
    """Demux every packet, decoding only the first video frame and the first audio frame:
    (first video frame, whether audio decoded to mono samples)."""
    first, heard = None, False
    mixer = resampler(AudioConfig().sample_rate)
    try:
        for packet in container.demux(*[s for s in (stream, audio) if s is not None]):
            if packet.stream is audio:
                if not heard and packet.size:
                    # A bad packet is skipped: a later one may decode.
                    with contextlib.suppress(av.FFmpegError):
                        heard = any(
                            len(mono(o)) for f in packet.decode() for o in mixer.resample(f)
                        )
                continue
            if first is None and packet.size:
                with contextlib.suppress(av.FFmpegError):
                    first = next(iter(packet.decode()), None)
            clock.add(packet)
    except av.FFmpegError:
        pass  # truncated or damaged tail: the packets read so far give the real length
    return first, heard


def stream_seconds(path: str | os.PathLike, kind: str, limit: float) -> float | None:
    """Seconds spanned by the first `kind` ('audio' | 'video') stream's packets, counted until they
    pass `limit` (demuxing only, no decoding); None when the file has no such stream or cannot be
    opened (a search then says why)."""
    try:
        container = open_media(path)
    except MediaError:
        return None
    with container:
        streams = getattr(container.streams, kind)
        if not streams:
            return None
        time_base = streams[0].time_base
        limit_ticks = float(limit / time_base)
        lo = hi = None
        try:
            for packet in container.demux(streams[0]):
                if packet.pts is None:
                    continue
                end = packet.pts + (packet.duration or 0)
                lo = packet.pts if lo is None else min(lo, packet.pts)
                hi = end if hi is None else max(hi, end)
                if hi - lo > limit_ticks:
                    break  # already too long: the rest of the file need not be read
        except av.FFmpegError:
            pass  # a damaged tail: the packets read so far give the length
    return None if lo is None else float((hi - lo) * time_base)


def frame_to_rgb(
    frame: av.VideoFrame, shorter: int, reformatter: VideoReformatter, path: str
) -> np.ndarray:
    """RGB uint8 HxWx3 with the shorter side scaled to `shorter` (one swscale pass), upright."""
    check_aspect(frame.width, frame.height, path)
    width, height = scaled_size(frame.width, frame.height, shorter)
    # A reused reformatter keeps its swscale context: frame.to_ndarray(width=...) builds a new one
    # per call, ~50x slower on small frames (measured 6.8 vs 0.14 ms at 128x96 -> 171x128).
    rgb = reformatter.reformat(frame, width=width, height=height, format="rgb24").to_ndarray()
    turns = round((frame.rotation or 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def resampler(sample_rate: int) -> av.AudioResampler:
    """Resampler to packed float at `sample_rate`, keeping the channels (mixed down by `mono`).

    Packed, not planar: PyAV reads a planar frame of 8 or more channels out of bounds (a
    segmentation fault on 7.1 AAC and on 8- to 63-channel WAV).
    """
    return av.AudioResampler(format="flt", rate=sample_rate)


def mono(frame: av.AudioFrame) -> np.ndarray:
    """Packed float audio frame -> mono float32 (the mean of the channels)."""
    channels = len(frame.layout.channels)
    samples = frame.to_ndarray().reshape(-1, channels)
    return samples[:, 0].copy() if channels == 1 else samples.mean(axis=1, dtype=np.float32)


def check_audio_rate(stream: av.audio.AudioStream, path: str) -> str | None:
    """Why an audio stream cannot be used as sound (its rate is not an audio rate), or None."""
    rate = stream.codec_context.sample_rate
    if not MIN_AUDIO_RATE <= rate <= MAX_AUDIO_RATE:
        return (
            f"{path}: audio sample rate {rate} Hz is outside {MIN_AUDIO_RATE}-{MAX_AUDIO_RATE} "
            "Hz; its sound is not used"
        )
    return None


def decode_audio(
    path: str | os.PathLike, sample_rate: int, max_seconds: float | None = None
) -> np.ndarray:
    """Soundtrack of an audio or video file as mono float32 at `sample_rate`, at most its first
    `max_seconds` (decoding stops there, so a long or lying file costs bounded memory)."""
    path = os.fspath(path)
    limit = round(max_seconds * sample_rate) if max_seconds is not None else None
    with open_media(path) as container:
        if not container.streams.audio:
            raise MediaError(f"{path}: no audio stream")
        stream = container.streams.audio[0]
        unusable = check_audio_rate(stream, path)
        if unusable is not None:
            raise MediaError(unusable.replace("its sound is not used", "not usable as sound"))
        mixer = resampler(sample_rate)
        chunks, total = [], 0
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError:
                continue  # corrupt packet: skip, as for video
            new = [mono(out) for frame in frames for out in mixer.resample(frame)]
            chunks += new
            total += sum(len(c) for c in new)
            if limit is not None and total >= limit:
                break
        else:
            chunks += [mono(out) for out in mixer.resample(None)]
    if not chunks or not any(len(c) for c in chunks):
        raise MediaError(f"{path}: no decodable audio")
    samples = np.concatenate(chunks)
    return samples[:limit] if limit is not None else samples


def load_image(path: str | os.PathLike, video_cfg: VideoConfig | None = None) -> np.ndarray:
    """An image file as RGB uint8 HxWx3, upright (EXIF), shorter side scaled like video frames."""
    path = os.fspath(path)
    shorter = (video_cfg or VideoConfig()).resize_shorter
    try:
        with Image.open(path) as image:
            check_aspect(*image.size, path)  # from the header, before decoding any pixel
            # JPEG can decode at 1/2..1/8 scale: a 50 Mpixel photo never sits whole in memory.
            image.draft("RGB", scaled_size(*image.size, shorter))
            image = ImageOps.exif_transpose(image).convert("RGB")
            image = image.resize(scaled_size(*image.size, shorter), Image.Resampling.BILINEAR)
    except FileNotFoundError:
        raise MediaError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaError(f"{path}: not a readable image ({reason(exc)})") from None
    return np.asarray(image, dtype=np.uint8)


__all__ = [
    "EPS",
    "MAX_ASPECT",
    "MediaError",
    "MediaInfo",
    "PacketClock",
    "check_aspect",
    "check_audio_rate",
    "clip_starts",
    "decode_audio",
    "frame_to_rgb",
    "load_image",
    "mono",
    "open_media",
    "probe",
    "probe_files",
    "reason",
    "resampler",
    "scaled_size",
    "set_threads",
    "start_pts",
    "stream_seconds",
    "video_stream",
]
