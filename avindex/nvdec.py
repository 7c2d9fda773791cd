"""NVDEC decoding for embed: many sessions in flight, fed by the demux workers, frames picked and
preprocessed on the GPU.

    worker processes (PyAV): demux once, audio decoded there, video packets planned and
        converted to Annex-B (decode.read_for_nvdec)  --packets + clip audio-->
    router thread: hands each video's messages to its session thread
    session threads (cfg.nvdec_sessions, >= 2 per NVDEC engine): one decoder per video, fed
        without pause; decoded frames are picked by decode.FramePicker (the CPU path's rule) and
        the chosen ones scaled, centre-cropped and normalised in torch on the GPU
    --> ClipChunks with (3, crop, crop) CUDA tensors (Encoder takes them beside uint8 frames)

Why PyNvVideoCodec (documented behaviour; measured by `avindex bench` / benchmarks/gpu_check.sh,
which sweep 1-21 sessions):
- per-packet control: its core Decoder takes one packet at a time (PacketData, any buffer), so
  packets come from our one demux pass and non-reference packets no clip needs are never
  submitted. DALI's fn.decoders.video demuxes the encoded file itself (a second pass), decodes
  every packet of the frames it reads, and re-reads the file per call;
- one decoder object per video on its own thread, with the GIL released while decoding: as many
  sessions as wanted, each fed continuously, where DALI's batch decodes all its videos before
  the next batch starts (a long video holds up the batch);
- frames come back as GPU buffers (DLPack) on the CUDA stream we give it, so torch reads them
  without copies or cross-stream waits.

A video NVDEC does not take (codec, rotation, pixel format, size) is decoded by PyAV in its
worker (the same pass); a session error before its first clip sends the video to a PyAV job;
after clips were produced it fails that video with the reason. Both are counted as fallbacks.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from avindex.bitstream import PacketBatch, StreamHeader
from avindex.config import AudioConfig, EmbedConfig, VideoConfig
from avindex.decode import DecodeStats, FramePicker, Schedule, pts_seconds
from avindex.errors import AvindexError
from avindex.media import scaled_size
from avindex.reader import (
    CHUNK_CLIPS,
    DECODER,
    ClipChunk,
    ClipReader,
    VideoRead,
    decode_video,
    export_video,
)
from avindex.store import VideoRecord
from avindex.workers import IDLE, Done, Failed, Item, Job, PoolLimits, WorkerPool

log = logging.getLogger(__name__)

NVDEC = "nvdec"  # the decoder's name in reports
# Encoded packets and clip audio waiting for sessions, at most (the router pauses beyond it, and
# with it the demux workers): sessions drain without the router, so this never deadlocks.
MAX_BUFFERED_BYTES = 1 << 30
# A worker failure with this text is an NVDEC limit (not a bad file): PyAV takes the video.
NVDEC_UNFIT = "NVDEC cannot"


class NvdecError(RuntimeError):
    """A session could not decode a video (its frames go to PyAV, or the video fails)."""


class DecodeSession(Protocol):
    """One video's decoder: Annex-B packets in decode order in, frames in presentation order out.

    A returned frame is an RGB (3, H, W) uint8 tensor valid until the next call.
    """

    def decode(self, data: bytes, pts: int) -> list[tuple[int, torch.Tensor]]:
        """Submit one packet; (pts, frame) for the frames it completes."""

    def flush(self) -> list[tuple[int, torch.Tensor]]:
        """End of stream: the frames still held."""

    def close(self) -> None:
        """Free the decoder."""


SessionFactory = Callable[[StreamHeader, torch.device], DecodeSession]


def prepare_frame(rgb: torch.Tensor, video_cfg: VideoConfig) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, crop, crop) float32, as the CPU path prepares a frame: shorter side
    scaled to resize_shorter (bilinear, antialiased like swscale when shrinking), centre crop
    (an odd margin rounds the centre down-right, as DALI does), mean/std normalisation."""
    _, h, w = rgb.shape
    width, height = scaled_size(w, h, video_cfg.resize_shorter)
    x = rgb.unsqueeze(0).float()
    if (width, height) != (w, h):
        shrink = width < w
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=shrink)
    c = video_cfg.crop
    y0, x0 = (height - c + 1) // 2, (width - c + 1) // 2
    crop = x[0, :, y0 : y0 + c, x0 : x0 + c].clamp_(0, 255) / 255.0
    mean = torch.tensor(video_cfg.mean, device=rgb.device).view(3, 1, 1)
    std = torch.tensor(video_cfg.std, device=rgb.device).view(3, 1, 1)
    return ((crop - mean) / std).contiguous()


class VideoJoin:
    """One video on its session: packets in, frames picked and prepared, joined with the audio
    the worker read, ClipChunks out in clip order."""

    def __init__(
        self,
        index: int,
        path: str,
        header: StreamHeader,
        session: DecodeSession,
        hop: float,
        audio_cfg: AudioConfig,
        video_cfg: VideoConfig,
    ) -> None:
        self.index, self.path, self.header, self.session = index, path, header, session
        self.video_cfg = video_cfg
        self.schedule = Schedule(None, hop, audio_cfg.clip_seconds)
        self.picker = FramePicker(self.schedule)
        self.frames: dict[int, torch.Tensor] = {}
        self.needed: dict[int, bool] = {}  # pts of submitted packets -> a clip may need it
        self.audio: list[tuple[float, np.ndarray, bool]] = []  # from clip next_out on
        self.next_out = 0
        self.decoded = 0  # frames the session produced

    def packets(self, batch: PacketBatch) -> None:
        """Submit a batch of packets; frames they complete are picked at once."""
        for data, pts, needed in batch.packets:
            self.needed[pts] = needed
            self._frames(self.session.decode(data, pts))

    def _frames(self, frames: list[tuple[int, torch.Tensor]]) -> None:
        for pts, rgb in frames:
            self.decoded += 1
            t = pts_seconds(pts, self.header.time_base) - self.header.origin
            # Only frames the planner marked can be chosen: prepare those (before the session
            # reuses the buffer); the others are not kept at all.
            item = prepare_frame(rgb, self.video_cfg) if self.needed.pop(pts, True) else None
            for moment, chosen in self.picker.add(t, item):
                self._place(moment, chosen)

    def _place(self, moment: int, chosen: torch.Tensor | None) -> None:
        if chosen is None:
            raise NvdecError("a frame a clip needs was not decoded (damaged stream)")
        self.frames[moment] = chosen

    def clip_audio(self, chunk: ClipChunk) -> None:
        """The worker's audio of the next clips (their frames are None)."""
        rows = zip(chunk.t0.tolist(), chunk.audio, chunk.has_audio.tolist(), strict=True)
        self.audio.extend(rows)

    def finish(self, duration: float) -> None:
        """The worker ended: drain the session, close the grid at the duration it found."""
        self._frames(self.session.flush())
        self.schedule.close(duration)
        for moment in [m for m in self.frames if m >= len(self.schedule)]:
            del self.frames[moment]  # grid moments past the real end are not clips
        for moment, chosen in self.picker.finish(self.path):
            self._place(moment, chosen)

    def ready(self) -> Iterator[ClipChunk]:
        """Clips whose frame and audio are both here, in order, in chunks (self.audio starts at
        clip next_out)."""
        while True:
            n = 0
            while n < min(len(self.audio), CHUNK_CLIPS) and self.next_out + n in self.frames:
                n += 1
            if n == 0:
                return
            rows, self.audio = self.audio[:n], self.audio[n:]
            frames = [self.frames.pop(self.next_out + i) for i in range(n)]
            self.next_out += n
            yield ClipChunk(
                video=self.index,
                t0=np.array([r[0] for r in rows]),
                frames=frames,
                audio=np.stack([r[1] for r in rows]),
                has_audio=np.array([r[2] for r in rows], dtype=bool),
            )


@dataclass
class _End:
    stats: DecodeStats
    seconds: float


@dataclass
class _Fail:
    reason: str


class _Video:
    """An NVDEC video between the router and its session thread."""

    def __init__(self, index: int, record: VideoRecord, header: StreamHeader) -> None:
        self.index, self.record, self.header = index, record, header
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.dead = False  # handed to PyAV: the router drops its remaining messages
        self.clips = 0
        self.started = time.perf_counter()


def _message_bytes(message: object) -> int:
    if isinstance(message, PacketBatch):
        return sum(len(p[0]) for p in message.packets)
    if isinstance(message, ClipChunk):
        return message.audio.nbytes
    return 0


_STOP = object()


class NvdecClipReader:
    """ClipReader's interface over NVDEC: iterate for ClipChunk and VideoRead events (per video:
    its chunks in order, then its VideoRead, whose decoder is 'nvdec' or 'pyav')."""

    def __init__(
        self,
        videos: Iterable[tuple[int, VideoRecord]],
        audio_cfg: AudioConfig,
        video_cfg: VideoConfig,
        cfg: EmbedConfig,
        sessions: SessionFactory,
        device: torch.device,
        expected: int | None = None,
    ) -> None:
        """`videos` are taken lazily; `expected` (their number, when known) sizes the pool."""
        if cfg.nvdec_sessions < 1:
            raise AvindexError(f"--sessions {cfg.nvdec_sessions}: must be at least 1")
        self.audio_cfg, self.video_cfg, self.cfg = audio_cfg, video_cfg, cfg
        self.make_session, self.device = sessions, device
        self.records: dict[int, VideoRecord] = {}
        self.fallback_reason: dict[int, str] = {}  # videos PyAV decodes, and why
        self.sent: dict[int, int] = {}  # clips of PyAV-decoded videos
        self.retry: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.lock = threading.Condition()
        self.open_nvdec = 0  # NVDEC jobs whose outcome is not known yet
        self.buffered = 0
        self.out: queue.Queue = queue.Queue(maxsize=max(2, cfg.prefetch_batches * 8))
        self.assign: queue.SimpleQueue = queue.SimpleQueue()
        self.videos: dict[int, _Video] = {}
        self.finished_sessions = 0
        self.closed = threading.Event()
        limits = PoolLimits(cfg.decode_stall_seconds, cfg.decode_memory_bytes)
        # No more demux workers than sessions: every video being demuxed has a session free or
        # one that finishes without more packets (so the byte bound cannot deadlock).
        workers = cfg.nvdec_sessions if expected is None else min(cfg.nvdec_sessions, expected)
        self.pool = WorkerPool(self._jobs(videos), max(1, workers), limits, buffer=256)
        self.threads = [threading.Thread(target=self._route, name="avindex-nvdec-router")]
        self.threads += [
            threading.Thread(target=self._serve, name=f"avindex-nvdec-{i}", daemon=True)
            for i in range(cfg.nvdec_sessions)
        ]
        for thread in self.threads:
            thread.daemon = True
            thread.start()

    def _jobs(self, videos: Iterable[tuple[int, VideoRecord]]) -> Iterator[Job | object]:
        """NVDEC jobs for every video, PyAV jobs for those a session gave back; ends once no
        NVDEC video can still give one back."""
        pending = iter(videos)
        hop, acfg, vcfg = self.cfg.hop, self.audio_cfg, self.video_cfg
        while not self.closed.is_set():
            with contextlib.suppress(queue.Empty):
                index = self.retry.get_nowait()
                threads = ClipReader.threads_for(self.cfg, None)
                args = (self.records[index].path, hop, acfg, vcfg, threads)
                yield Job((index, DECODER), decode_video, args)
                continue
            nxt = next(pending, None)
            if nxt is not None:
                index, record = nxt
                self.records[index] = record
                with self.lock:
                    self.open_nvdec += 1
                yield Job((index, NVDEC), export_video, (record.path, hop, acfg, vcfg))
                continue
            with self.lock:
                if self.open_nvdec == 0 and self.retry.empty():
                    return
            yield IDLE

    def _resolved(self) -> None:
        """An NVDEC job's outcome is known (done, failed or handed to PyAV)."""
        with self.lock:
            self.open_nvdec -= 1

    def _route(self) -> None:
        try:
            for event in self.pool.events():
                self._route_event(event)
        except BaseException as exc:  # surfaces in __iter__
            self._put(exc)
        finally:
            for _ in range(self.cfg.nvdec_sessions):
                self.assign.put(_STOP)

    def _route_event(self, event: Item | Done | Failed) -> None:
        index, kind = event.key
        video = self.videos.get(index) if kind == NVDEC else None
        if video is not None:
            message: object = event.value if isinstance(event, Item) else None
            if isinstance(event, Done):
                message = _End(*event.value)
            elif isinstance(event, Failed):
                message = _Fail(event.reason)
            if not isinstance(event, Item):
                self.videos.pop(index)  # the job ended: nothing more will come for it
            self._enqueue(video, message)
            return
        if isinstance(event, Item):
            value = event.value
            if isinstance(value, StreamHeader):
                video = _Video(index, self.records[index], value)
                self.videos[index] = video
                self.assign.put(video)
            elif isinstance(value, str):  # the worker decodes this video's frames with PyAV
                self.fallback_reason[index] = value
                self.sent[index] = 0
                self._resolved()
            else:
                value.video = index
                self.sent[index] += len(value)
                self._put(value)
            return
        demux_error = kind == NVDEC and index not in self.fallback_reason
        self._put(self._pyav_read(index, event))
        if demux_error:
            self._resolved()  # failed before its header: the file's fault, not NVDEC's

    def _pyav_read(self, index: int, event: Done | Failed) -> VideoRead:
        record = self.records.pop(index)
        clips = self.sent.pop(index, 0)
        why = self.fallback_reason.pop(index, None)
        if isinstance(event, Failed):
            return VideoRead(index, record, clips, error=event.reason, fallback=why)
        stats, seconds = event.value
        return VideoRead(
            index,
            VideoRecord(record.path, record.size, record.mtime, stats.duration or 0.0),
            clips,
            frames_total=stats.frames_total,
            frames_decoded=stats.frames_decoded,
            seconds=seconds,
            notes=stats.notes,
            fallback=why,
        )

    def _enqueue(self, video: _Video, message: object) -> None:
        """Queue a message for a video's session (waits while too much is buffered)."""
        size = _message_bytes(message)
        with self.lock:
            while self.buffered > MAX_BUFFERED_BYTES and not self.closed.is_set():
                self.lock.wait(0.2)
            if video.dead:
                return  # handed to PyAV meanwhile
            self.buffered += size
            video.inbox.put((message, size))

    def _take(self, video: _Video) -> object:
        message, size = video.inbox.get()
        with self.lock:
            self.buffered -= size
            self.lock.notify_all()
        return message

    def _put(self, event: object) -> None:
        while not self.closed.is_set():
            with contextlib.suppress(queue.Full):
                self.out.put(event, timeout=0.2)
                return

    def _serve(self) -> None:
        """A session thread: one video at a time, each on a fresh decoder."""
        try:
            stream = None
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
                stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                while (video := self.assign.get()) is not _STOP:
                    self._decode(video, stream)
        except BaseException as exc:  # surfaces in __iter__
            self._put(exc)
        finally:
            with self.lock:
                self.finished_sessions += 1
                last = self.finished_sessions == self.cfg.nvdec_sessions
            if last:
                self._put(_STOP)

    def _decode(self, video: _Video, stream: torch.cuda.Stream | None) -> None:
        """Feed one video's packets to a new session until its worker ends."""
        session: DecodeSession | None = None
        try:
            session = self.make_session(video.header, self.device)
            join = VideoJoin(
                video.index,
                video.record.path,
                video.header,
                session,
                self.cfg.hop,
                self.audio_cfg,
                self.video_cfg,
            )
            while True:
                message = self._take(video)
                if isinstance(message, _Fail):
                    self._worker_failed(video, message.reason)
                    return
                if isinstance(message, PacketBatch):
                    join.packets(message)
                elif isinstance(message, ClipChunk):
                    join.clip_audio(message)
                elif isinstance(message, _End):
                    join.finish(message.stats.duration or 0.0)
                self._emit(video, join, stream)
                if isinstance(message, _End):
                    self._done(video, join, message)
                    return
        except Exception as exc:  # the session's or the stream's: not the demux's
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if video.clips == 0:
                self._give_to_pyav(video, f"NVDEC session failed before the first clip: {reason}")
            else:
                self._finish(video, error=f"NVDEC failed after {video.clips} clips: {reason}")
        finally:
            if session is not None:
                with contextlib.suppress(Exception):
                    session.close()

    def _emit(self, video: _Video, join: VideoJoin, stream: torch.cuda.Stream | None) -> None:
        chunks = list(join.ready())
        if not chunks:
            return
        if stream is not None:
            # The consumer reads these on its own stream: the allocator must not reuse their
            # memory for this stream's next frames before that read is done.
            stream.synchronize()
            consumer = torch.cuda.default_stream(self.device)
            for chunk in chunks:
                for frame in chunk.frames:
                    frame.record_stream(consumer)
        for chunk in chunks:
            video.clips += len(chunk)
            self._put(chunk)

    def _done(self, video: _Video, join: VideoJoin, end: _End) -> None:
        record, stats = video.record, end.stats
        done = VideoRecord(record.path, record.size, record.mtime, stats.duration or 0.0)
        self._finish(
            video,
            record=done,
            frames_total=stats.frames_total,
            frames_decoded=join.decoded,
            notes=stats.notes,
        )

    def _worker_failed(self, video: _Video, reason: str) -> None:
        """The demux worker failed: an NVDEC limit sends the video to PyAV (before its first
        clip), anything else is the file's fault and fails it."""
        if NVDEC_UNFIT in reason and video.clips == 0:
            self._give_to_pyav(video, reason)
        else:
            self._finish(video, error=reason)

    def _finish(self, video: _Video, **fields: object) -> None:
        """The video's VideoRead (done or failed) from its session."""
        fields.setdefault("record", video.record)
        record = fields.pop("record")
        seconds = time.perf_counter() - video.started
        self._put(
            VideoRead(video.index, record, video.clips, decoder=NVDEC, seconds=seconds, **fields)
        )
        self.records.pop(video.index, None)
        self._resolved()

    def _give_to_pyav(self, video: _Video, why: str) -> None:
        """No clip was produced: a PyAV job decodes the video instead (its remaining NVDEC
        messages are dropped)."""
        with self.lock:
            video.dead = True
            with contextlib.suppress(queue.Empty):
                while True:
                    self.buffered -= video.inbox.get_nowait()[1]
            self.lock.notify_all()
        self.fallback_reason[video.index] = why
        self.sent[video.index] = 0
        self.retry.put(video.index)
        self._resolved()

    def __iter__(self) -> Iterator[ClipChunk | VideoRead]:
        while True:
            event = self.out.get()
            if event is _STOP:
                return
            if isinstance(event, BaseException):
                raise event
            yield event

    def close(self) -> None:
        """Stop the workers and the session threads."""
        self.closed.set()
        with self.lock:
            self.lock.notify_all()
        self.pool.close()

    def __enter__(self) -> NvdecClipReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_sessions() -> tuple[SessionFactory | None, str]:
    """The NVDEC session maker of this machine, or None and why there is none."""
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    try:
        from avindex.nvdec_session import PyNvSession
    except Exception as exc:  # not installed, or no driver / NVDEC library: PyAV decodes
        return None, f"PyNvVideoCodec unavailable ({type(exc).__name__}: {exc})".splitlines()[0]
    return PyNvSession, "PyNvVideoCodec"


def clip_reader(
    videos: Iterable[tuple[int, VideoRecord]],
    audio_cfg: AudioConfig,
    video_cfg: VideoConfig,
    cfg: EmbedConfig,
    device: str,
    expected: int | None = None,
) -> ClipReader | NvdecClipReader:
    """The reader for `device`: NVDEC sessions on CUDA (cfg.nvdec, PyNvVideoCodec present),
    PyAV decoder processes otherwise. `expected`: the number of videos, when known."""
    if device == "cuda" and cfg.nvdec:
        sessions, why = default_sessions()
        if sessions is not None:
            target = torch.device("cuda", torch.cuda.current_device())
            return NvdecClipReader(videos, audio_cfg, video_cfg, cfg, sessions, target, expected)
        log.warning("NVDEC not used: %s; frames are decoded by PyAV", why)
    return ClipReader(videos, audio_cfg, video_cfg, cfg, expected)


__all__ = [
    "NVDEC",
    "DecodeSession",
    "NvdecClipReader",
    "NvdecError",
    "SessionFactory",
    "VideoJoin",
    "clip_reader",
    "default_sessions",
    "prepare_frame",
]
