"""Streaming clip decoding: one demux pass per file, only the frames clips need, audio on the
video's timeline.

A clip needs the frame nearest a target time. Video packets are held back only as long as it takes
to know each frame's neighbours in presentation order (a few packets: the reorder depth); a frame
whose time range holds no target is then decoded with libavcodec's skip_frame=NONREF, so the
decoder drops it when no other frame refers to it (for intra-only codecs it is not decoded at all).
Frames a clip needs are never skipped, so the chosen frames are exactly those of a full decode.

The same pass can instead hand the planned video packets out (Annex-B, see avindex.bitstream) for
an NVDEC session in the parent process to decode, reading the audio here; FramePicker is the one
frame-choice rule both paths use. See docs/architecture.md ("Decoding").
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import logging
import math
import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import NamedTuple

import av
import numpy as np

from avindex.bitstream import (
    PacketBatch,
    PacketExport,
    StreamHeader,
    first_frame,
    nvdec_unsupported,
    stream_header,
)
from avindex.config import AudioConfig, VideoConfig
from avindex.media import (
    EPS,
    MediaError,
    PacketClock,
    check_audio_rate,
    clip_starts,
    frame_to_rgb,
    mono,
    open_media,
    probe,
    reason,
    resampler,
    set_threads,
    start_pts,
    video_stream,
)

log = logging.getLogger(__name__)

# Audio chunks whose pts land this close to the end of the buffer are appended contiguously, so
# encoder rounding of pts never opens or overlaps tiny gaps (2 ms at 48 kHz).
_SNAP_SECONDS = 0.002
# Once video is this far (seconds) past a clip's audio window with no audio arriving, the audio
# track is treated as ended, so a short soundtrack cannot make chosen frames pile up unboundedly.
_MAX_AV_LAG = 10.0
# Codecs whose decoders honour skip_frame per packet, checked frame for frame against a full decode
# (tests/test_decode.py). Others are decoded whole.
SKIP_NONREF_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "mpeg4", "mpeg2video", "mpeg1video"})
# A frame is kept when a target lies within this many seconds of its time range: float rounding
# of pts * time_base can then only decode a frame more, never skip one a clip needs.
_TIME_SLACK = 1e-6
# Undecided packets beyond this many mean timestamps that do not behave; skipping then stops.
_MAX_LOOKAHEAD = 512
# Video packets a probe decoder may take to give the first frame (which tells whether NVDEC
# takes the video); a stream that gives none by then is decoded by PyAV.
_PROBE_LIMIT = 64
# read_moments(seek=True) lands this far before the first moment: the audio packets interleaved
# around the video keyframe it seeks to, and the audio decoder's warm-up, lie before the window.
_SEEK_MARGIN = 1.0


class Moment(NamedTuple):
    """What to read: the frame nearest `frame_time` and audio from `audio_start` (seconds, t=0 =
    first video frame)."""

    frame_time: float
    audio_start: float


class MomentData(NamedTuple):
    """One read moment: RGB frame (HxWx3 uint8), mono float32 audio window, and whether real
    audio was present in that window."""

    moment: Moment
    frame: np.ndarray | None
    audio: np.ndarray
    has_audio: bool


@dataclass
class DecodeStats:
    """What one read did: frames in the stream and decoded, the duration found, damage met."""

    frames_total: int = 0  # video packets demuxed
    frames_decoded: int = 0  # frames the decoder produced
    duration: float | None = None  # end of the last frame (read_clip_grid), seconds
    skipping: bool = False  # whether unneeded frames were skipped
    bad_packets: int = 0  # packets the decoder rejected (skipped)
    notes: list[str] = field(default_factory=list)

    @property
    def decoded_fraction(self) -> float:
        """Share of the stream's frames that were decoded."""
        return self.frames_decoded / self.frames_total if self.frames_total else 0.0


def clip_moment(t0: float, clip_seconds: float) -> Moment:
    """What the clip starting at `t0` reads: audio [t0, t0 + clip), the frame nearest its middle."""
    return Moment(frame_time=t0 + clip_seconds / 2, audio_start=t0)


def pts_seconds(pts: int, time_base: Fraction) -> float:
    """A timestamp in seconds, computed exactly as PyAV's frame.time (so both decode paths see
    bit-identical times and break ties alike)."""
    return float(pts) * time_base.numerator / time_base.denominator


class Schedule:
    """The moments to read: an explicit list sorted by frame time, or the clip grid of a video
    whose length is learnt while reading (grid moments are added as the video advances)."""

    def __init__(
        self, moments: Sequence[Moment] | None, hop: float | None, clip_seconds: float
    ) -> None:
        self.hop, self.clip = hop, clip_seconds
        self.moments = list(moments or [])
        self.closed = hop is None  # an explicit list is complete from the start
        self.frame_times = np.array([m.frame_time for m in self.moments])
        # Earliest audio start among moments i.. (explicit moments' audio is not sorted).
        starts = np.array([m.audio_start for m in self.moments] + [math.inf])
        self.audio_floor = np.minimum.accumulate(starts[::-1])[::-1]

    def __len__(self) -> int:
        return len(self.moments)

    def extend_to(self, t: float) -> None:
        """Grid: add the moments whose frame time is at most `t`."""
        while not self.closed and self.hop is not None:
            t0 = len(self.moments) * self.hop
            if t0 + self.clip / 2 > t:
                return
            self.moments.append(clip_moment(t0, self.clip))

    def earliest_audio(self, i: int) -> float:
        """Earliest audio start (seconds) of moments i, i+1, ... (inf when none is left)."""
        if self.hop is not None:
            return i * self.hop
        return float(self.audio_floor[min(i, len(self.moments))])

    def has_target(self, lo: float, hi: float) -> bool:
        """Whether some moment's frame time T lies in (lo, hi] (grid: any grid time, unbounded)."""
        lo, hi = lo - _TIME_SLACK, hi + _TIME_SLACK
        if self.hop is not None:
            first = math.floor((lo - self.clip / 2) / self.hop) + 1 if math.isfinite(lo) else 0
            first = max(0, first)
            return first * self.hop + self.clip / 2 <= hi
        at = bisect.bisect_right(self.frame_times, lo)
        return at < len(self.frame_times) and self.frame_times[at] <= hi

    def confirmed(self, i: int, seen_end: float) -> bool:
        """Whether moment i is a clip of the video: explicit moments are; a grid clip is once the
        video is known to reach its end (or the grid was closed at the real duration)."""
        if self.closed:
            return i < len(self.moments)
        return self.moments[i].audio_start + self.clip <= seen_end + EPS * (self.hop or 1.0)

    def close(self, duration: float) -> None:
        """Grid: the video's duration is known; keep exactly its clips (the one clip formula)."""
        if self.closed:
            return
        self.closed = True
        n = len(clip_starts(duration, self.hop, self.clip))
        del self.moments[n:]
        while len(self.moments) < n:
            self.moments.append(clip_moment(len(self.moments) * self.hop, self.clip))


class FramePicker:
    """The frame-choice rule of every decode path: each moment gets the decoded frame nearest its
    frame time, ties to the earlier frame. Frames arrive in presentation order with their time;
    `item` is whatever the caller keeps for a frame (a PyAV frame, a GPU tensor)."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.next = 0  # first moment without a chosen frame
        self.prev: tuple[float, object] | None = None

    def add(self, t: float, item: object) -> list[tuple[int, object]]:
        """Take the frame at time `t`: (moment, chosen item) for every moment it settles."""
        self.schedule.extend_to(t)
        moments = self.schedule.moments
        chosen = []
        while self.next < len(moments) and moments[self.next].frame_time <= t:
            target = moments[self.next].frame_time
            use_prev = self.prev is not None and target - self.prev[0] <= t - target
            chosen.append((self.next, self.prev[1] if use_prev else item))
            self.next += 1
        self.prev = (t, item)
        return chosen

    def finish(self, path: str) -> list[tuple[int, object]]:
        """End of the video (its schedule closed): moments still open get the last frame."""
        self.next = min(self.next, len(self.schedule))
        if self.prev is None and self.next < len(self.schedule):
            raise MediaError(f"{path}: no decodable video frames")
        chosen = [(i, self.prev[1]) for i in range(self.next, len(self.schedule))]
        self.next = len(self.schedule)
        return chosen


class _FramePlanner:
    """Decides for each video packet, in decode order, whether a clip may need its frame.

    A frame is needed when a target time falls in its cell (half-way to the previous frame,
    half-way to the next, in presentation order). Both neighbours of a packet are known once a
    packet with a dts at or past the next pts has been read: every packet with a smaller pts has
    a smaller dts and was demuxed before it. Packets without timestamps, non-increasing dts or
    pts < dts stop the skipping for the rest of the file (then every frame is decoded).
    """

    def __init__(
        self, schedule: Schedule, time_base: Fraction, origin: float, enabled: bool
    ) -> None:
        self.schedule, self.time_base, self.origin = schedule, time_base, origin
        self.enabled = enabled
        self.held: deque[av.Packet] = deque()
        self.seen: list[int] = []  # sorted pts of every packet read
        self.max_dts: int | None = None

    def _seconds(self, pts: int) -> float:
        return float(pts * self.time_base) - self.origin

    def add(self, packet: av.Packet) -> Iterator[tuple[av.Packet, bool]]:
        """Hold `packet`; yield (packet, needed) for every packet that can now be decided."""
        if self.enabled and not self._orderly(packet):
            self.enabled = False
        if not self.enabled:
            yield from self.flush(everything=True)
            yield packet, True
            return
        bisect.insort(self.seen, packet.pts)
        self.max_dts = packet.dts
        self.held.append(packet)
        while self.held and self._decidable(self.held[0].pts):
            head = self.held.popleft()
            yield head, self._needed(head.pts)
        if len(self.held) > _MAX_LOOKAHEAD:
            self.enabled = False
            yield from self.flush(everything=True)

    def _orderly(self, packet: av.Packet) -> bool:
        pts, dts = packet.pts, packet.dts
        if pts is None or dts is None or pts < dts:
            return False
        if self.max_dts is not None and dts <= self.max_dts:
            return False
        at = bisect.bisect_left(self.seen, pts)
        return at == len(self.seen) or self.seen[at] != pts  # a repeated pts: no clear cells

    def _decidable(self, pts: int) -> bool:
        after = bisect.bisect_right(self.seen, pts)
        return after < len(self.seen) and self.max_dts >= self.seen[after]

    def _needed(self, pts: int) -> bool:
        at = bisect.bisect_left(self.seen, pts)
        t = self._seconds(pts)
        lo = (self._seconds(self.seen[at - 1]) + t) / 2 if at > 0 else -math.inf
        hi = (t + self._seconds(self.seen[at + 1])) / 2 if at + 1 < len(self.seen) else math.inf
        return self.schedule.has_target(lo, hi)

    def flush(self, everything: bool = False) -> Iterator[tuple[av.Packet, bool]]:
        """End of stream (or skipping stopped): decide every held packet."""
        while self.held:
            head = self.held.popleft()
            yield head, everything or self._needed(head.pts)


class _AudioTimeline:
    """Mono audio placed on the video timeline (sample 0 = first video frame), kept as segments:
    a gap, however long a damaged timestamp claims it to be, costs no memory."""

    def __init__(self, sample_rate: int) -> None:
        self.rate = sample_rate
        self.segments: deque[tuple[int, np.ndarray]] = deque()  # (start, samples), arrival order
        self.end = 0  # timeline index just after the newest sample
        self.first: int | None = None  # timeline range that held real audio
        self.last = 0

    def add(self, samples: np.ndarray, start: int | None) -> None:
        """Place `samples` at timeline index `start` (None or within the snap: contiguous)."""
        if self.first is None:
            start = 0 if start is None else start
            self.first = start
        elif start is None or abs(start - self.end) <= _SNAP_SECONDS * self.rate:
            start = self.end
        if len(samples):
            self.segments.append((start, samples))
        self.end = max(self.end, start + len(samples))
        self.last = self.end

    def window(self, start: int, n: int) -> tuple[np.ndarray, bool]:
        """Samples [start, start+n), zero padded (later samples win where segments overlap), and
        whether any real audio lies in it."""
        out = np.zeros(n, dtype=np.float32)
        for seg_start, samples in self.segments:
            lo, hi = max(start, seg_start), min(start + n, seg_start + len(samples))
            if hi > lo:
                out[lo - start : hi - start] = samples[lo - seg_start : hi - seg_start]
        real = self.first is not None and start < self.last and start + n > self.first
        return out, bool(real)

    def drop_before(self, index: int) -> None:
        """Forget segments that end before timeline index `index`."""
        while self.segments and self.segments[0][0] + len(self.segments[0][1]) <= index:
            self.segments.popleft()


class _MomentReader:
    """Streaming state of a read: picks decoded frames by time, buffers audio, releases moments.

    Without frames (the NVDEC path reads its frames elsewhere) each moment's frame is None and
    the grid grows with the video packets' times instead of decoded frames'."""

    def __init__(
        self,
        path: str,
        schedule: Schedule,
        origin: float,
        audio_cfg: AudioConfig,
        video_cfg: VideoConfig,
        stats: DecodeStats,
    ) -> None:
        self.path, self.schedule, self.origin = path, schedule, origin
        self.shorter = video_cfg.resize_shorter
        self.rate, self.n_samples = audio_cfg.sample_rate, audio_cfg.n_samples
        self.stats = stats
        self.picker = FramePicker(schedule)
        self.chosen: dict[int, np.ndarray | None] = {}
        self.next_out = 0  # first moment not yet yielded
        # The last converted frame, kept alive with its pixels: an id() alone could match a later
        # frame that reuses a freed frame's address.
        self.converted: tuple[av.VideoFrame, np.ndarray] | None = None
        self.reformatter = av.video.reformatter.VideoReformatter()
        self.audio = _AudioTimeline(self.rate)
        self.resampler = resampler(self.rate)
        self.audio_done = False
        self.frames = True
        self.video_time = -1e-3  # so a first frame without pts lands at t = 0
        self.seen_end = -math.inf  # latest presentation time of a video packet read

    def add_video(self, frame: av.VideoFrame) -> None:
        """Assign `frame` or the previous decoded one (whichever is nearer) to moments it passes."""
        self.stats.frames_decoded += 1
        # PyAV's float .time avoids Fraction arithmetic per frame; without pts keep decode order.
        t = frame.time - self.origin if frame.pts is not None else self.video_time + 1e-3
        for moment, chosen in self.picker.add(t, frame):
            self._choose(moment, chosen)
        self.video_time = t

    def _choose(self, moment: int, frame: av.VideoFrame) -> None:
        """Convert `frame` (once, even when several moments pick it) for `moment`."""
        if self.converted is None or self.converted[0] is not frame:
            self.converted = (frame, frame_to_rgb(frame, self.shorter, self.reformatter, self.path))
        self.chosen[moment] = self.converted[1]

    def skip_frames(self) -> None:
        """Audio-only reading: every moment's frame is None, so moments wait for audio alone."""
        self.frames = False

    def video_packet(self, seconds: float) -> None:
        """A video packet at `seconds` was read (audio-only reading: the grid reaches it)."""
        self.seen_end = max(self.seen_end, seconds)
        if not self.frames:
            self.video_time = self.seen_end
            self.schedule.extend_to(self.seen_end)

    def add_audio(self, frame: av.AudioFrame | None) -> None:
        """Resample a decoded audio frame (None flushes) onto the timeline."""
        for out in self.resampler.resample(frame):
            start = None if out.pts is None else round((out.time - self.origin) * self.rate)
            self.audio.add(mono(out), start)

    def finish(self, duration: float | None) -> None:
        """End of file: flush audio, close a grid at `duration`, give remaining moments the last
        frame."""
        self.add_audio(None)
        self.audio_done = True
        if duration is not None:
            self.schedule.close(duration)
        if not self.frames:
            return
        for i in range(len(self.schedule), self.picker.next):
            self.chosen.pop(i, None)  # grid moments past the real end are not clips
        for moment, frame in self.picker.finish(self.path):
            self._choose(moment, frame)

    def _settled(self) -> int:
        """Moments whose frame is known (all of them when reading audio only)."""
        return self.picker.next if self.frames else len(self.schedule)

    def ready(self) -> Iterator[MomentData]:
        """Yield, in order, moments whose frame is chosen and whose audio is complete."""
        moments = self.schedule.moments
        while self.next_out < min(self._settled(), len(moments)):
            moment = moments[self.next_out]
            if not self.schedule.confirmed(self.next_out, self.seen_end):
                return
            start = round(moment.audio_start * self.rate)
            end_time = (start + self.n_samples) / self.rate
            waiting = self.audio.end < start + self.n_samples and not self.audio_done
            if waiting and self.video_time - end_time < _MAX_AV_LAG:
                return
            audio, has_audio = self.audio.window(start, self.n_samples)
            frame = self.chosen.pop(self.next_out, None)
            self.next_out += 1
            keep = self.schedule.earliest_audio(self.next_out)
            self.audio.drop_before(
                round(keep * self.rate) if math.isfinite(keep) else self.audio.end
            )
            yield MomentData(moment, frame, audio, has_audio)


def _packets(container: av.container.InputContainer, streams: list, path: str) -> Iterator:
    """Demux packets of `streams` in file order; a damaged tail ends the stream with a warning."""
    try:
        yield from container.demux(*streams)
    except av.FFmpegError as exc:
        log.warning("%s: stopped reading at a damaged part (%s)", path, reason(exc))


def _decode(
    decoder: av.codec.context.CodecContext, packet: av.Packet, stats: DecodeStats
) -> list[av.frame.Frame]:
    """Frames of one packet; a corrupt packet is counted and skipped (the decoder recovers at
    the next keyframe)."""
    try:
        return decoder.decode(packet)
    except av.FFmpegError:
        stats.bad_packets += 1
        return []


class _PyAVFrames:
    """Planned video packets decoded here: needed frames fully, the others with
    skip_frame=NONREF (an intra-only codec's unneeded frames are not sent at all)."""

    def __init__(
        self,
        video: av.video.VideoStream,
        planner: _FramePlanner,
        reader: _MomentReader,
        stats: DecodeStats,
    ) -> None:
        self.video, self.planner, self.reader, self.stats = video, planner, reader, stats
        self.decoder = video.codec_context
        self.intra_only = self.decoder.codec.intra_only

    def add(self, packet: av.Packet) -> None:
        """Plan one demuxed packet and decode those now decided."""
        for held, needed in self.planner.add(packet):
            self._decode(held, needed)

    def _decode(self, packet: av.Packet, needed: bool) -> None:
        if not needed and self.intra_only:
            return
        self.decoder.skip_frame = "DEFAULT" if needed else "NONREF"
        for frame in _decode(self.decoder, packet, self.stats):
            self.reader.add_video(frame)

    def flush(self) -> None:
        """End of stream: decode the packets still held, then drain the decoder."""
        for held, needed in self.planner.flush():
            self._decode(held, needed)
        self.decoder.skip_frame = "DEFAULT"
        try:
            for frame in self.decoder.decode(None):
                frame.time_base = frame.time_base or self.video.time_base  # draining gives none
                self.reader.add_video(frame)
        except av.FFmpegError:
            self.stats.bad_packets += 1


class _NoFrames:
    """Audio-only reading: video packets only count (their times bound the clips)."""

    def add(self, packet: av.Packet) -> None:
        """Nothing to decode."""

    def flush(self) -> None:
        """Nothing held."""


class _Exporter:
    """Planned video packets handed out as Annex-B for an NVDEC session in the parent."""

    def __init__(self, planner: _FramePlanner, export: PacketExport) -> None:
        self.planner, self.export = planner, export

    def add(self, packet: av.Packet) -> None:
        """Plan one demuxed packet; the decided ones go to the export batch."""
        for held, needed in self.planner.add(packet):
            self.export.add(held, needed)

    def flush(self) -> None:
        """End of stream: every held packet goes out."""
        for held, needed in self.planner.flush():
            self.export.add(held, needed)
        self.export.flush()


# Packets per batch sent to an NVDEC session: few messages, a session never waits long.
EXPORT_BATCH = 16


def _read(
    path: str | os.PathLike,
    schedule: Schedule,
    audio_cfg: AudioConfig,
    video_cfg: VideoConfig,
    threads: int,
    mode: str,
    skip: bool,
    stats: DecodeStats,
    seek: bool = False,
) -> Iterator[MomentData | StreamHeader | PacketBatch | str]:
    """The one demux pass behind read_moments, read_clip_grid and read_for_nvdec.

    mode 'frames' decodes frames here, 'audio' reads audio only, 'export' yields a StreamHeader
    (or, for a video NVDEC does not take, the reason as a str, then decodes frames here), then
    PacketBatches between the audio-only moments. seek=True starts at the keyframe before the
    earliest moment.
    """
    path = os.fspath(path)
    with open_media(path) as container:
        video = video_stream(container, path)
        audio = container.streams.audio[0] if container.streams.audio else None
        if seek:
            _seek_before(container, video, schedule.moments)
        unusable = check_audio_rate(audio, path) if audio is not None else None
        if unusable is not None:
            log.warning("%s", unusable)
            stats.notes.append(unusable)
            audio = None  # not sound avindex can use: the clips get has_audio = False
        set_threads(video, threads)
        demux = _DemuxPass(path, container, video, audio, schedule, audio_cfg, video_cfg, stats)
        yield from demux.run(mode, skip)


class _DemuxPass:
    """One pass over a file's packets: audio decoded here, video frames decoded here, skipped, or
    exported as packets (NVDEC), clips released as they complete."""

    def __init__(
        self,
        path: str,
        container: av.container.InputContainer,
        video: av.video.VideoStream,
        audio: av.audio.AudioStream | None,
        schedule: Schedule,
        audio_cfg: AudioConfig,
        video_cfg: VideoConfig,
        stats: DecodeStats,
    ) -> None:
        self.path, self.container, self.video, self.audio = path, container, video, audio
        self.schedule, self.clip_seconds, self.stats = schedule, audio_cfg.clip_seconds, stats
        self.origin = float(start_pts(video, None) * video.time_base)
        self.reader = _MomentReader(path, schedule, self.origin, audio_cfg, video_cfg, stats)
        self.reader.audio_done = audio is None
        self.clock = PacketClock(video.time_base)
        self.export: PacketExport | None = None
        self.handler: _PyAVFrames | _NoFrames | _Exporter = _NoFrames()
        self.skip = False

    def run(self, mode: str, skip: bool) -> Iterator[MomentData | StreamHeader | PacketBatch | str]:
        """Demux to the end, then drain the decoders and release the last clips."""
        self.skip = skip
        # Export decides where frames are decoded once the first frame is known.
        pending: list[av.Packet] | None = [] if mode == "export" else None
        if mode == "frames":
            self.handler = self._frames_here()
        else:
            self.reader.skip_frames()
        if pending is not None:
            self.reader.frames = True  # until the first frame says where frames are decoded
        streams = [s for s in (self.video, self.audio) if s is not None]
        for packet in _packets(self.container, streams, self.path):
            if packet.size == 0:
                continue  # end-of-stream markers: the decoders are drained below
            if packet.stream is self.audio:
                for frame in _decode(self.audio.codec_context, packet, self.stats):
                    self.reader.add_audio(frame)
            elif pending is None:
                self._count(packet)
                self.handler.add(packet)
            else:
                self._count(packet)
                pending.append(packet)
                n = len(pending)
                # Probe at 1, 2, 4, ... packets: usually the first (a keyframe) is enough.
                probed = first_frame(self.video, pending) if n & (n - 1) == 0 else None
                if probed is not None or n >= _PROBE_LIMIT:
                    yield from self._start(probed, pending)
                    pending = None
            if self.export is not None and len(self.export.batch) >= EXPORT_BATCH:
                yield self.export.take()
            yield from self.reader.ready()
        if pending is not None:  # a stream shorter than the probe needed
            yield from self._start(first_frame(self.video, pending), pending)
        yield from self._finish()

    def _count(self, packet: av.Packet) -> None:
        if self.clock.add(packet):
            self.stats.frames_total += 1
            self.reader.video_packet(self.clock.last_seconds - self.origin)

    def _frames_here(self) -> _PyAVFrames:
        codec = self.video.codec_context
        codec_skips = codec.name in SKIP_NONREF_CODECS or codec.codec.intra_only
        self.stats.skipping = self.skip and codec_skips
        planner = _FramePlanner(
            self.schedule, self.video.time_base, self.origin, self.stats.skipping
        )
        return _PyAVFrames(self.video, planner, self.reader, self.stats)

    def _start(
        self, probed: av.VideoFrame | None, held: list[av.Packet]
    ) -> Iterator[StreamHeader | str]:
        """Decide where the frames are decoded, once the first frame is known; then hand over
        the packets held meanwhile."""
        why = nvdec_unsupported(self.video, probed)
        if why is not None:
            self.handler = self._frames_here()
            yield why
        else:
            self.reader.skip_frames()
            self.schedule.extend_to(self.reader.seen_end)
            self.stats.skipping = True  # timestamps permitting: the planner says
            self.export = PacketExport(self.video)
            planner = _FramePlanner(self.schedule, self.video.time_base, self.origin, True)
            self.handler = _Exporter(planner, self.export)
            yield stream_header(self.video, self.origin, probed, self.export)
        for packet in held:
            self.handler.add(packet)

    def _finish(self) -> Iterator[MomentData | PacketBatch]:
        """Drain the decoders (also after a damaged tail ended the demuxing early), check the
        video's length, release the remaining clips."""
        self.handler.flush()
        if self.export is not None:
            if len(self.export.batch):
                yield self.export.take()
            self.stats.skipping = self.handler.planner.enabled
        elif isinstance(self.handler, _PyAVFrames):
            self.stats.skipping = self.stats.skipping and self.handler.planner.enabled
        if self.audio is not None:
            _drain_audio(self.audio, self.reader, self.stats)
        if self.stats.bad_packets:
            log.warning("%s: skipped %d undecodable packets", self.path, self.stats.bad_packets)
        clock = self.clock
        duration = clock.duration(start_pts(self.video, clock.first_pts)) if clock.count else None
        if not self.schedule.closed:
            if duration is None or (self.reader.frames and self.reader.picker.prev is None):
                raise MediaError(f"{self.path}: no decodable video frames")
            if duration + EPS < self.clip_seconds:
                raise MediaError(f"{self.path}: shorter than one clip ({duration:.3f} s)")
        self.stats.duration = duration
        self.reader.finish(duration)
        yield from self.reader.ready()


def _seek_before(
    container: av.container.InputContainer, video: av.video.VideoStream, moments: list[Moment]
) -> None:
    """Start demuxing at the keyframe before the earliest moment (less _SEEK_MARGIN), so a few
    moments late in a long file are read without decoding everything before them. The planner
    then knows no frame before that keyframe, which only widens what it decodes."""
    first = min(min(m.frame_time, m.audio_start) for m in moments) - _SEEK_MARGIN
    if first > 0:
        with contextlib.suppress(av.FFmpegError):  # unseekable: read from the start
            container.seek(start_pts(video, None) + int(first / video.time_base), stream=video)


def _drain_audio(audio: av.audio.AudioStream, reader: _MomentReader, stats: DecodeStats) -> None:
    """End of the audio stream: frames the decoder still holds."""
    try:
        for frame in audio.codec_context.decode(None):
            frame.time_base = frame.time_base or audio.time_base  # draining gives none
            reader.add_audio(frame)
    except av.FFmpegError:
        stats.bad_packets += 1


def read_moments(
    path: str | os.PathLike,
    moments: Sequence[Moment],
    audio_cfg: AudioConfig,
    video_cfg: VideoConfig,
    threads: int = 1,
    frames: bool = True,
    skip: bool = True,
    stats: DecodeStats | None = None,
    seek: bool = False,
) -> Iterator[MomentData]:
    """Read frames and audio windows for `moments` (sorted by frame_time) in one streaming pass.

    frames=False reads the audio alone (MomentData.frame is None), for frames decoded elsewhere
    (NVDEC); the audio is still placed on the video stream's timeline. skip=False decodes every
    frame (the reference the skipping is checked against, and the decode-all bound). seek=True
    starts at the keyframe before the earliest moment (a few moments of a long file, e.g. a
    result to show).
    """
    moments = [Moment(float(m[0]), float(m[1])) for m in moments]
    if any(b.frame_time < a.frame_time for a, b in itertools.pairwise(moments)):
        raise ValueError("read_moments: moments must be sorted by frame_time")
    if not moments:
        return
    schedule = Schedule(moments, None, audio_cfg.clip_seconds)
    stats = stats or DecodeStats()
    mode = "frames" if frames else "audio"
    yield from _read(path, schedule, audio_cfg, video_cfg, threads, mode, skip, stats, seek)


def read_clip_grid(
    path: str | os.PathLike,
    hop: float,
    audio_cfg: AudioConfig,
    video_cfg: VideoConfig,
    threads: int = 1,
    skip: bool = True,
    stats: DecodeStats | None = None,
) -> Iterator[MomentData]:
    """Every clip of a video (t0 = 0, hop, 2 hop, ...) in one pass, without probing it first.

    The clips are exactly those of `clip_starts(duration, hop)` for the duration `probe` finds;
    `stats` receives that duration, the frames decoded and whether frames were skipped.
    """
    schedule = Schedule(None, hop, audio_cfg.clip_seconds)
    yield from _read(
        path, schedule, audio_cfg, video_cfg, threads, "frames", skip, stats or DecodeStats()
    )


def read_for_nvdec(
    path: str | os.PathLike,
    hop: float,
    audio_cfg: AudioConfig,
    video_cfg: VideoConfig,
    stats: DecodeStats | None = None,
) -> Iterator[MomentData | StreamHeader | PacketBatch | str]:
    """The clip grid of a video, in one pass, with its frames left to an NVDEC session.

    Yields first a StreamHeader, then PacketBatches (Annex-B, decode order, non-reference
    packets no clip needs left out) between the clips' audio (MomentData with frame None), which
    are exactly read_clip_grid's clips. A video NVDEC does not take yields the reason (a str)
    instead of the header, then read_clip_grid's clips with their frames.
    """
    schedule = Schedule(None, hop, audio_cfg.clip_seconds)
    yield from _read(
        path, schedule, audio_cfg, video_cfg, 1, "export", True, stats or DecodeStats()
    )


def read_clip(
    path: str | os.PathLike, t0: float, audio_cfg: AudioConfig, video_cfg: VideoConfig
) -> MomentData:
    """The clip of a video starting at `t0` (a query by video moment), after checking that the
    video is long enough to have it."""
    path = os.fspath(path)
    info = probe(path, audio_cfg.clip_seconds)
    if info.error:
        raise MediaError(f"{path}: {info.error}")
    last = info.duration - audio_cfg.clip_seconds
    if t0 > last + EPS:
        raise MediaError(
            f"{path}: is {info.duration:.2f} s long, so a clip starts at 0..{last:.2f} s, "
            f"not {t0:g}"
        )
    (data,) = read_moments(path, [clip_moment(t0, audio_cfg.clip_seconds)], audio_cfg, video_cfg)
    return data


__all__ = [
    "SKIP_NONREF_CODECS",
    "DecodeStats",
    "FramePicker",
    "Moment",
    "MomentData",
    "Schedule",
    "clip_moment",
    "pts_seconds",
    "read_clip",
    "read_clip_grid",
    "read_for_nvdec",
    "read_moments",
]
