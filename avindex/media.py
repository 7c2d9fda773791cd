"""Media I/O with PyAV: probe files, stream frames + 48 kHz mono audio for clips, decode queries."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from avindex.config import AudioConfig, VideoConfig
from avindex.errors import AvindexError

if TYPE_CHECKING:
    import av

log = logging.getLogger(__name__)

# Tolerance of the clip-count formula (contract): float durations like 0.9999999 count as 1 s.
_EPS = 1e-6
# Audio chunks whose pts land this close to the end of the buffer are appended contiguously, so
# encoder rounding of pts never opens or overlaps tiny gaps (2 ms at 48 kHz).
_SNAP_SECONDS = 0.002
# Once video is this far (seconds) past a clip's audio window with no audio arriving, the audio
# track is treated as ended, so a short soundtrack cannot make chosen frames pile up unboundedly.
_MAX_AV_LAG = 10.0
# read_moments(seek=True) lands this far before the first moment: the audio packets interleaved
# around the video keyframe it seeks to, and the audio decoder's warm-up, lie before the window.
_SEEK_MARGIN = 1.0


class MediaError(AvindexError):
    """A media file that cannot be decoded (the message names the file and the reason)."""


class Moment(NamedTuple):
    """What to read: the frame nearest `frame_time` and audio from `audio_start` (seconds, t=0 =
    first video frame)."""

    frame_time: float
    audio_start: float


class MomentData(NamedTuple):
    """One read moment: RGB frame (HxWx3 uint8), mono float32 audio window, and whether real
    audio was present in that window."""

    moment: Moment
    frame: np.ndarray
    audio: np.ndarray
    has_audio: bool


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

    @property
    def usable(self) -> bool:
        """True when the file can be embedded."""
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        return {**asdict(self), "usable": self.usable}


def clip_starts(duration: float | None, hop: float, clip_seconds: float) -> np.ndarray:
    """Start times of the clips of a video of `duration` seconds (the one clip-count formula)."""
    if duration is None or duration + _EPS < clip_seconds:
        return np.zeros(0, dtype=np.float64)
    n = math.floor((duration - clip_seconds) / hop + _EPS) + 1
    return np.arange(n, dtype=np.float64) * hop


def clip_moment(t0: float, clip_seconds: float) -> Moment:
    """What the clip starting at `t0` reads: audio [t0, t0 + clip), the frame nearest its middle."""
    return Moment(frame_time=t0 + clip_seconds / 2, audio_start=t0)


def scaled_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) scaled so the shorter side equals `shorter`, aspect ratio kept."""
    scale = shorter / min(width, height)
    if width <= height:
        return shorter, max(1, round(height * scale))
    return max(1, round(width * scale)), shorter


def _open(path: str | os.PathLike) -> av.container.InputContainer:
    """Open a media file for reading, or raise MediaError with a one-line reason."""
    import av

    path = os.fspath(path)
    if not os.path.exists(path):
        raise MediaError(f"{path}: no such file")
    if os.path.isdir(path):
        raise MediaError(f"{path}: is a directory")
    if os.path.getsize(path) == 0:
        raise MediaError(f"{path}: empty file (0 bytes)")
    try:
        return av.open(path, metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError, OSError) as exc:
        raise MediaError(f"{path}: not a readable media file ({_reason(exc)})") from None


def _reason(exc: BaseException) -> str:
    """Short text of an FFmpeg/OS error without the path (the caller already names the file)."""
    text = getattr(exc, "strerror", None) or str(exc)
    return text.split(": '")[0].strip().rstrip(".;:")


def _video_stream(container: av.container.InputContainer, path: str) -> av.video.VideoStream:
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
        with _open(path) as container:
            _probe_container(container, path, info)
        if info.duration is not None and info.duration + _EPS < clip_seconds:
            raise MediaError(f"{path}: shorter than one clip ({info.duration:.3f} s)")
    except MediaError as exc:
        info.error = str(exc).removeprefix(f"{path}: ")
    return info


def _probe_container(container: av.container.InputContainer, path: str, info: MediaInfo) -> None:
    """Fill `info` from an open container: stream headers, a packet scan and one decoded frame."""
    info.container = _container_name(container, path)
    if container.streams.audio:
        audio = container.streams.audio[0]
        info.audio_codec = audio.codec_context.name
        info.sample_rate = audio.codec_context.sample_rate or None
        info.channels = audio.codec_context.channels or None
    stream = _video_stream(container, path)
    info.video_codec = stream.codec_context.name
    info.width, info.height = stream.codec_context.width, stream.codec_context.height
    first_frame, pts, durations = _scan_video(container, stream)
    if first_frame is None:
        raise MediaError(f"{path}: no decodable video frames")
    info.rotation = round(first_frame.rotation or 0) % 360
    info.width, info.height = first_frame.width, first_frame.height
    timing = _timing(pts, durations, stream.time_base, start_pts(stream, int(pts.min())))
    info.duration, info.avg_fps, info.variable_fps = timing
    info.n_frames = len(pts)


def _scan_video(
    container: av.container.InputContainer, stream: av.video.VideoStream
) -> tuple[av.VideoFrame | None, np.ndarray, np.ndarray]:
    """Demux every video packet (no decoding beyond the first frame): pts and durations."""
    import av

    first = None
    pts, durations = [], []
    try:
        for packet in container.demux(stream):
            if first is None:
                # A bad leading packet is skipped: a later one may decode.
                with contextlib.suppress(av.FFmpegError):
                    first = next(iter(packet.decode()), None)
            stamp = packet.pts if packet.pts is not None else packet.dts
            if stamp is None or packet.size == 0:
                continue
            pts.append(stamp)
            durations.append(packet.duration or 0)
    except av.FFmpegError:
        pass  # truncated or damaged tail: the packets read so far give the real length
    return first, np.asarray(pts, dtype=np.int64), np.asarray(durations, dtype=np.int64)


def _timing(
    pts: np.ndarray, durations: np.ndarray, time_base: Fraction, start: int
) -> tuple[float, float, bool]:
    """(duration, average fps, variable frame rate?) from packet timestamps in `time_base` units."""
    order = np.sort(pts)
    deltas = np.diff(order)
    typical = int(np.median(deltas)) if len(deltas) else 0
    last = int(np.argmax(pts))
    last_duration = int(durations[last]) or typical
    end = max(int(order[-1]) + last_duration, int(order[-1]) + 1)
    duration = float((end - start) * time_base)
    # Container timestamps are rounded (e.g. ms in WebM: 33/34 ms at 29.97 fps), so only a spread
    # beyond one tick and 5% of the typical frame interval counts as a variable frame rate.
    tol = max(1.5, 0.05 * typical)
    variable = bool(len(deltas) and np.abs(deltas - typical).max() > tol)
    avg_fps = round(len(pts) / duration, 3) if duration > 0 else 0.0
    return duration, avg_fps, variable


def _frame_to_rgb(
    frame: av.VideoFrame, shorter: int, reformatter: av.video.reformatter.VideoReformatter
) -> np.ndarray:
    """RGB uint8 HxWx3 with the shorter side scaled to `shorter` (one swscale pass), upright."""
    width, height = scaled_size(frame.width, frame.height, shorter)
    # A reused reformatter keeps its swscale context: frame.to_ndarray(width=...) builds a new one
    # per call, ~50x slower on small frames (measured 6.8 vs 0.14 ms at 128x96 -> 171x128).
    rgb = reformatter.reformat(frame, width=width, height=height, format="rgb24").to_ndarray()
    turns = round((frame.rotation or 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def _reformatter() -> av.video.reformatter.VideoReformatter:
    """A swscale reformatter to reuse for every frame of one stream."""
    from av.video.reformatter import VideoReformatter

    return VideoReformatter()


def _mono(frame: av.AudioFrame) -> np.ndarray:
    """Planar float audio frame -> mono float32 (mean of the channels)."""
    samples = frame.to_ndarray()
    return samples.mean(axis=0, dtype=np.float32) if samples.shape[0] > 1 else samples[0]


def _resampler(sample_rate: int) -> av.AudioResampler:
    """Resampler to planar float at `sample_rate`, keeping the channels (downmixed by `_mono`)."""
    import av

    return av.AudioResampler(format="fltp", rate=sample_rate)


class _AudioTimeline:
    """Rolling mono buffer on the video timeline (sample index 0 = first video frame)."""

    def __init__(self, sample_rate: int) -> None:
        self.rate = sample_rate
        self.buf = np.zeros(sample_rate, dtype=np.float32)
        self.origin = 0  # timeline index of buf[0]
        self.used = 0  # valid samples in buf
        self.first: int | None = None  # timeline index range that held real audio
        self.last = 0

    @property
    def end(self) -> int:
        """Timeline index just after the newest buffered sample."""
        return self.origin + self.used

    def add(self, samples: np.ndarray, start: int | None) -> None:
        """Place `samples` at timeline index `start` (None or within the snap: contiguous)."""
        if self.first is None:
            start = 0 if start is None else start
            self.origin, self.used, self.first = start, 0, start
        elif start is None or abs(start - self.end) <= _SNAP_SECONDS * self.rate:
            start = self.end
        skip = max(0, self.origin - start)  # samples before the retained window are not needed
        samples, start = samples[skip:], start + skip
        offset = start - self.origin
        need = offset + len(samples)
        if need > len(self.buf):
            grown = np.zeros(max(need, 2 * len(self.buf)), dtype=np.float32)
            grown[: self.used] = self.buf[: self.used]
            self.buf = grown
        if offset > self.used:
            self.buf[self.used : offset] = 0.0  # a gap in the track is silence
        self.buf[offset:need] = samples
        self.used = max(self.used, need)
        self.last = max(self.last, start + len(samples))

    def window(self, start: int, n: int) -> tuple[np.ndarray, bool]:
        """Samples [start, start+n), zero padded, and whether any real audio lies in it."""
        out = np.zeros(n, dtype=np.float32)
        lo, hi = max(start, self.origin), min(start + n, self.end)
        if hi > lo:
            out[lo - start : hi - start] = self.buf[lo - self.origin : hi - self.origin]
        real = self.first is not None and start < self.last and start + n > self.first
        return out, bool(real)

    def drop_before(self, index: int) -> None:
        """Forget samples before timeline index `index`."""
        cut = min(max(0, index - self.origin), self.used)
        if cut:
            self.buf[: self.used - cut] = self.buf[cut : self.used]
            self.used -= cut
            self.origin += cut


class _MomentReader:
    """Streaming state of `read_moments`: picks frames by pts, buffers audio, releases moments."""

    def __init__(
        self, moments: list[Moment], t0: float, audio_cfg: AudioConfig, video_cfg: VideoConfig
    ) -> None:
        self.moments, self.t0, self.shorter = moments, t0, video_cfg.resize_shorter
        self.rate, self.n_samples = audio_cfg.sample_rate, audio_cfg.n_samples
        starts = np.array([round(m.audio_start * self.rate) for m in moments] + [2**62])
        self.keep_from = np.minimum.accumulate(starts[::-1])[::-1]  # earliest audio still needed
        self.chosen: dict[int, np.ndarray] = {}
        self.next_frame = 0  # first moment without a chosen frame
        self.next_out = 0  # first moment not yet yielded
        self.prev: tuple[float, av.VideoFrame] | None = None
        # The last converted frame, kept alive with its pixels: an id() alone could match a later
        # frame that reuses a freed frame's address.
        self.converted: tuple[av.VideoFrame, np.ndarray] | None = None
        self.reformatter = _reformatter()
        self.audio = _AudioTimeline(self.rate)
        self.resampler = _resampler(self.rate)
        self.audio_done = False
        self.video_time = -1e-3  # so a first frame without pts lands at t = 0

    def add_video(self, frame: av.VideoFrame) -> None:
        """Assign `frame` or the previous one (whichever is nearer) to moments it passes."""
        # PyAV's float .time avoids Fraction arithmetic per frame; without pts keep decode order.
        t = frame.time - self.t0 if frame.pts is not None else self.video_time + 1e-3
        while self.next_frame < len(self.moments) and self.moments[self.next_frame].frame_time <= t:
            target = self.moments[self.next_frame].frame_time
            use_prev = self.prev is not None and target - self.prev[0] <= t - target
            self._choose(self.prev[1] if use_prev else frame)
        self.prev, self.video_time = (t, frame), t

    def _choose(self, frame: av.VideoFrame) -> None:
        """Convert `frame` (once, even when several moments pick it) for the next moment."""
        if self.converted is None or self.converted[0] is not frame:
            self.converted = (frame, _frame_to_rgb(frame, self.shorter, self.reformatter))
        self.chosen[self.next_frame] = self.converted[1]
        self.next_frame += 1

    def skip_frames(self) -> None:
        """Audio-only reading: every moment's frame is None, so moments wait for audio alone."""
        self.chosen = dict.fromkeys(range(len(self.moments)))
        self.next_frame = len(self.moments)

    def add_audio(self, frame: av.AudioFrame | None) -> None:
        """Resample a decoded audio frame (None flushes) onto the timeline."""
        for out in self.resampler.resample(frame):
            start = None
            if out.pts is not None:
                start = round((out.time - self.t0) * self.rate)
            self.audio.add(_mono(out), start)

    def finish(self, path: str) -> None:
        """End of file: flush audio, give remaining moments the last frame."""
        self.add_audio(None)
        self.audio_done = True
        if self.prev is None and self.next_frame < len(self.moments):
            raise MediaError(f"{path}: no decodable video frames")
        while self.next_frame < len(self.moments):
            self._choose(self.prev[1])

    def ready(self) -> Iterator[MomentData]:
        """Yield, in request order, moments whose frame is chosen and whose audio is complete."""
        while self.next_out < self.next_frame:
            moment = self.moments[self.next_out]
            start = round(moment.audio_start * self.rate)
            end_time = (start + self.n_samples) / self.rate
            waiting = self.audio.end < start + self.n_samples and not self.audio_done
            if waiting and self.video_time - end_time < _MAX_AV_LAG:
                return
            audio, has_audio = self.audio.window(start, self.n_samples)
            frame = self.chosen.pop(self.next_out)
            self.next_out += 1
            self.audio.drop_before(int(self.keep_from[self.next_out]))
            yield MomentData(moment, frame, audio, has_audio)


def _set_threads(stream: av.stream.Stream, threads: int) -> None:
    """Let FFmpeg decode with `threads` threads (0 = automatic)."""
    if threads != 1:
        stream.thread_type = "AUTO"
        stream.thread_count = threads


def _packets(container: av.container.InputContainer, streams: list, path: str) -> Iterator:
    """Demux packets of `streams` in file order; a damaged tail ends the stream with a warning."""
    import av

    try:
        yield from container.demux(*streams)
    except av.FFmpegError as exc:
        log.warning("%s: stopped reading at a damaged part (%s)", path, _reason(exc))


def read_moments(
    path: str | os.PathLike,
    moments: Sequence[Moment],
    audio_cfg: AudioConfig,
    video_cfg: VideoConfig,
    threads: int = 1,
    frames: bool = True,
    seek: bool = False,
) -> Iterator[MomentData]:
    """Read frames and audio windows for `moments` (sorted by frame_time) in one streaming pass.

    frames=False reads the audio alone (MomentData.frame is None), for frames decoded elsewhere
    (NVDEC); the audio is still placed on the video stream's timeline. seek=True first seeks to
    the keyframe before the earliest moment, so a moment late in a long file is read without
    decoding everything before it (a few moments of one file, e.g. a result to show).
    """
    import av

    path = os.fspath(path)
    moments = [Moment(float(m[0]), float(m[1])) for m in moments]
    if any(b.frame_time < a.frame_time for a, b in itertools.pairwise(moments)):
        raise ValueError("read_moments: moments must be sorted by frame_time")
    if not moments:
        return
    with _open(path) as container:
        video = _video_stream(container, path)
        audio = container.streams.audio[0] if container.streams.audio else None
        _set_threads(video, threads)
        origin = start_pts(video, None)
        t0 = float(origin * video.time_base)
        first = min(min(m.frame_time, m.audio_start) for m in moments) - _SEEK_MARGIN
        if seek and first > 0:
            with contextlib.suppress(av.FFmpegError):  # unseekable: read from the start
                container.seek(origin + int(first / video.time_base), stream=video)
        reader = _MomentReader(moments, t0, audio_cfg, video_cfg)
        reader.audio_done = audio is None
        if not frames:
            reader.skip_frames()
        streams = [s for s in (video if frames else None, audio) if s is not None]
        bad = 0
        for packet in _packets(container, streams, path):
            try:
                decoded = packet.decode()
            except av.FFmpegError:
                bad += 1  # a corrupt packet: skip it, the decoder recovers at the next keyframe
                continue
            for frame in decoded:
                if packet.stream is video:
                    reader.add_video(frame)
                else:
                    reader.add_audio(frame)
            yield from reader.ready()
        if bad:
            log.warning("%s: skipped %d undecodable packets", path, bad)
        reader.finish(path)
        yield from reader.ready()


def decode_audio(path: str | os.PathLike, sample_rate: int) -> np.ndarray:
    """Whole soundtrack of a (short) audio or video file as mono float32 at `sample_rate`."""
    import av

    path = os.fspath(path)
    with _open(path) as container:
        if not container.streams.audio:
            raise MediaError(f"{path}: no audio stream")
        resampler = _resampler(sample_rate)
        chunks = []
        for packet in _packets(container, [container.streams.audio[0]], path):
            try:
                frames = packet.decode()
            except av.FFmpegError:
                continue  # corrupt packet: skip, as for video
            chunks += [_mono(out) for frame in frames for out in resampler.resample(frame)]
        chunks += [_mono(out) for out in resampler.resample(None)]
    if not chunks:
        raise MediaError(f"{path}: no decodable audio")
    return np.concatenate(chunks)


def load_image(path: str | os.PathLike, video_cfg: VideoConfig | None = None) -> np.ndarray:
    """An image file as RGB uint8 HxWx3, upright (EXIF), shorter side scaled like video frames."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = os.fspath(path)
    shorter = (video_cfg or VideoConfig()).resize_shorter
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            image = image.resize(scaled_size(*image.size, shorter), Image.Resampling.BILINEAR)
    except FileNotFoundError:
        raise MediaError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise MediaError(f"{path}: not a readable image ({_reason(exc)})") from None
    return np.asarray(image, dtype=np.uint8)


__all__ = [
    "MediaError",
    "MediaInfo",
    "Moment",
    "MomentData",
    "clip_moment",
    "clip_starts",
    "decode_audio",
    "load_image",
    "probe",
    "read_moments",
    "scaled_size",
    "start_pts",
]
