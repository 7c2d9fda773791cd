"""Video packets for NVDEC: which streams a session takes, Annex-B conversion, and which packets
no other frame refers to (those a clip does not need are never submitted).

Runs in the demux workers (PyAV only, no CUDA): the parent's NVDEC sessions receive ready
packets. Reference detection reads NAL unit headers only:

- H.264: a slice with nal_ref_idc == 0 is a non-reference picture (what libavcodec skips with
  skip_frame=NONREF);
- HEVC: sub-layer non-reference slices (TRAIL_N, TSA_N, STSA_N, RADL_N, RASL_N, RSV_VCL_N10/12/14)
  in the highest temporal sub-layer, which no picture of any sub-layer can refer to;
- other codecs: every packet is submitted.

A packet is dropped only if every NAL unit in it is such a slice or harmless side data (SEI,
access unit delimiter, filler): parameter sets and end-of-sequence units are always submitted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from fractions import Fraction

import av
from av.bitstream import BitStreamFilterContext

# Codecs avindex sends to NVDEC (8-bit 4:2:0 only, as every NVDEC generation decodes them);
# other codecs, bit depths and chroma formats stay on the PyAV path.
NVDEC_CODECS = frozenset({"h264", "hevc", "vp9"})
NVDEC_PIX_FMTS = frozenset({"yuv420p", "yuvj420p", "nv12"})
# Largest coded size NVDEC takes for these codecs (H.264: 4096x4096; HEVC/VP9 go to 8192).
NVDEC_MAX_SIDE = {"h264": 4096, "hevc": 8192, "vp9": 8192}
_TO_ANNEXB = {"h264": "h264_mp4toannexb", "hevc": "hevc_mp4toannexb"}

# H.264 NAL unit types: slices (1-5), and units a droppable packet may carry besides them.
_H264_SLICES = frozenset({1, 2, 3, 4, 5})
_H264_HARMLESS = frozenset({6, 9, 12})  # SEI, access unit delimiter, filler
# HEVC: VCL types are 0-31; the even types up to 14 are sub-layer non-reference pictures.
_HEVC_SLNR = frozenset({0, 2, 4, 6, 8, 10, 12, 14})
_HEVC_SPS = 33
_HEVC_HARMLESS = frozenset({35, 38, 39, 40})  # AUD, filler, prefix and suffix SEI


def nal_headers(data: bytes) -> Iterable[tuple[int, int]]:
    """(first, second) header bytes of each NAL unit of an Annex-B packet (0 when missing)."""
    at = data.find(b"\x00\x00\x01")
    while at >= 0:
        start = at + 3
        at = data.find(b"\x00\x00\x01", start)
        if start < len(data):
            yield data[start], data[start + 1] if start + 1 < len(data) else 0


class ReferenceFinder:
    """Tells, per Annex-B packet of one stream in decode order, whether no other frame can refer
    to it (so it may be left out when no clip needs it)."""

    def __init__(self, codec: str) -> None:
        self.codec = codec
        self.highest_tid = 0  # HEVC: highest temporal sub-layer (from the SPS)

    def droppable(self, data: bytes) -> bool:
        """True if the packet holds only non-reference slices (and harmless side data)."""
        if self.codec == "h264":
            return self._h264(data)
        if self.codec == "hevc":
            return self._hevc(data)
        return False

    @staticmethod
    def _h264(data: bytes) -> bool:
        slices = 0
        for first, _ in nal_headers(data):
            kind, ref_idc = first & 0x1F, (first >> 5) & 0x3
            if kind in _H264_SLICES:
                if ref_idc:
                    return False
                slices += 1
            elif kind not in _H264_HARMLESS:
                return False
        return slices > 0

    def _hevc(self, data: bytes) -> bool:
        slices, droppable = 0, True
        at = data.find(b"\x00\x00\x01")
        while at >= 0:
            start = at + 3
            at = data.find(b"\x00\x00\x01", start)
            if start + 1 >= len(data):
                continue
            kind, tid = (data[start] >> 1) & 0x3F, (data[start + 1] & 0x7) - 1
            if kind == _HEVC_SPS and start + 2 < len(data):
                # sps_video_parameter_set_id (4 bits), then sps_max_sub_layers_minus1 (3 bits).
                self.highest_tid = (data[start + 2] >> 1) & 0x7
            if kind < 32:
                slices += 1
                droppable &= kind in _HEVC_SLNR and tid == self.highest_tid
            elif kind not in _HEVC_HARMLESS:
                droppable = False
        return droppable and slices > 0


@dataclass(frozen=True)
class StreamHeader:
    """What an NVDEC session needs to know about a video before its first packet."""

    codec: str
    width: int
    height: int
    time_base: Fraction
    origin: float  # seconds of the first presented frame (t = 0 of the clips)
    extradata: bytes | None  # codec configuration for codecs sent without Annex-B conversion


@dataclass
class PacketBatch:
    """Packets for a session, in decode order: (payload, pts, needed by a clip)."""

    packets: list[tuple[bytes, int, bool]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.packets)


def nvdec_unsupported(stream: av.video.VideoStream, frame: av.VideoFrame | None) -> str | None:
    """Why NVDEC does not take this video (then PyAV decodes it), or None. `frame` is its first
    decoded frame: rotation, pixel format and size are read from it."""
    name = stream.codec_context.name
    if name not in NVDEC_CODECS:
        return f"codec {name} is decoded by PyAV"
    if frame is None:
        return "no frame decoded while probing the stream"
    if round(frame.rotation or 0) % 360:
        return f"rotated {round(frame.rotation) % 360} degrees (NVDEC output is not rotated)"
    if frame.format.name not in NVDEC_PIX_FMTS:
        return f"pixel format {frame.format.name} is decoded by PyAV"
    if max(frame.width, frame.height) > NVDEC_MAX_SIDE[name]:
        return f"{frame.width}x{frame.height} is larger than NVDEC decodes {name}"
    return None


def stream_header(
    stream: av.video.VideoStream, origin: float, frame: av.VideoFrame, export: PacketExport
) -> StreamHeader:
    """The header a session gets: codec, the first frame's size, timing, and the codec
    configuration where packets are not made self-contained by an Annex-B filter."""
    ctx = stream.codec_context
    extradata = None if export.filter else (ctx.extradata or None)
    return StreamHeader(ctx.name, frame.width, frame.height, stream.time_base, origin, extradata)


def first_frame(stream: av.video.VideoStream, packets: list[av.Packet]) -> av.VideoFrame | None:
    """The first frame the stream's decoder makes of `packets` (drained at once), or None. The
    decoder is reset afterwards, so PyAV can still decode the stream from its first packet."""
    decoder = stream.codec_context
    try:
        with contextlib.suppress(av.FFmpegError):
            for packet in [*packets, None]:
                for frame in decoder.decode(packet):
                    return frame
        return None
    finally:
        decoder.flush_buffers()


class PacketExport:
    """Planned packets of one stream -> Annex-B packets for a session; unneeded non-reference
    packets are dropped here, so they cost neither IPC nor NVDEC time."""

    def __init__(self, stream: av.video.VideoStream) -> None:
        name = stream.codec_context.name
        self.filter = (
            BitStreamFilterContext(_TO_ANNEXB[name], stream) if name in _TO_ANNEXB else None
        )
        self.refs = ReferenceFinder(name)
        self.batch = PacketBatch()
        self.dropped = 0  # non-reference packets no clip needed
        self.damaged = 0  # packets the filter rejected

    def add(self, packet: av.Packet, needed: bool) -> None:
        """Convert one planned packet (decode order); keep it unless nothing can need it. A
        packet the filter rejects (damaged) is left out, as PyAV skips what it cannot decode."""
        try:
            converted = self.filter.filter(packet) if self.filter else [packet]
        except av.FFmpegError:
            self.damaged += 1
            return
        for out in converted:
            self._keep(out, needed)

    def _keep(self, packet: av.Packet, needed: bool) -> None:
        data = bytes(packet)
        if not data:
            return
        if packet.pts is None:  # NVDEC output could not be placed in time: PyAV takes the video
            raise ValueError("a video packet without a timestamp (NVDEC cannot time its frame)")
        if not needed and self.refs.droppable(data):
            self.dropped += 1
            return
        self.batch.packets.append((data, packet.pts, needed))

    def flush(self) -> None:
        """End of stream: packets the filter still holds."""
        if self.filter:
            for out in self.filter.filter(None):
                self._keep(out, True)

    def take(self) -> PacketBatch:
        """The packets kept since the last take."""
        batch, self.batch = self.batch, PacketBatch()
        return batch


__all__ = [
    "NVDEC_CODECS",
    "PacketBatch",
    "PacketExport",
    "ReferenceFinder",
    "StreamHeader",
    "first_frame",
    "nal_headers",
    "nvdec_unsupported",
    "stream_header",
]
