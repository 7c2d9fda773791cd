"""A stand-in NVDEC session for tests without a GPU: PyAV decodes the same Annex-B packets."""

from __future__ import annotations

import av
import torch

from avindex.bitstream import StreamHeader


class PyAVSession:
    """Stand-in DecodeSession: PyAV decodes the Annex-B packets NVDEC would get (damaged packets
    are concealed, as NVDEC does: nothing is raised)."""

    def __init__(self, header: StreamHeader, device: torch.device) -> None:
        self.ctx = av.CodecContext.create(header.codec, "r")
        if header.extradata:
            self.ctx.extradata = header.extradata

    def _frames(self, frames: list) -> list[tuple[int, torch.Tensor]]:
        return [
            (f.pts, torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1)) for f in frames
        ]

    def decode(self, data: bytes, pts: int) -> list[tuple[int, torch.Tensor]]:
        packet = av.Packet(data)
        packet.pts = pts
        try:
            return self._frames(self.ctx.decode(packet))
        except av.FFmpegError:
            return []

    def flush(self) -> list[tuple[int, torch.Tensor]]:
        return self._frames(self.ctx.decode(None))

    def close(self) -> None:
        self.ctx = None
