"""The NVDEC session of avindex.nvdec: PyNvVideoCodec's core Decoder, one per video, fed one
Annex-B packet at a time on the caller's CUDA stream, frames out as RGB planar GPU tensors.

Imports PyNvVideoCodec (and with it the driver's NVDEC library) at the top: import this module
only where a GPU is present (avindex.nvdec.default_sessions does).
"""

from __future__ import annotations

import ctypes

import numpy as np
import PyNvVideoCodec as nvc
import torch

from avindex.bitstream import StreamHeader

_CODECS = {
    "h264": nvc.cudaVideoCodec.H264,
    "hevc": nvc.cudaVideoCodec.HEVC,
    "vp9": nvc.cudaVideoCodec.VP9,
}


# NVDEC engines of an H200 (NVIDIA's NVDEC support matrix), used when the driver does not say.
H200_ENGINES = 7


def decoder_engines(codec: str) -> int:
    """NVDEC engines of GPU 0 for `codec` (8-bit 4:2:0), as the driver reports them."""
    try:
        caps = nvc.GetDecoderCaps(
            gpuid=0,
            codec=_CODECS[codec],
            chromaformat=nvc.cudaVideoChromaFormat.YUV420,
            bitdepth=8,
        )
        return int(caps["num_decoder_engines"])
    except Exception:  # an older driver or binding without the field
        return H200_ENGINES


def _current_context() -> int:
    """The CUDA driver context current on this thread (torch's primary context), as an int."""
    libcuda = ctypes.CDLL("libcuda.so.1")
    context = ctypes.c_void_p()
    if libcuda.cuCtxGetCurrent(ctypes.byref(context)) != 0 or not context.value:
        raise RuntimeError("no current CUDA context for NVDEC")
    return context.value


class PyNvSession:
    """avindex.nvdec.DecodeSession on NVDEC through PyNvVideoCodec.

    The decoder writes its frames on the calling thread's current torch stream (given as the
    decoder's stream), so torch work queued after a decode call sees finished frames, and the
    next decode call cannot overwrite a frame before that work ran.
    """

    def __init__(self, header: StreamHeader, device: torch.device) -> None:
        torch.cuda.init()
        stream = torch.cuda.current_stream(device)
        self.decoder = nvc.CreateDecoder(
            gpuid=device.index or 0,
            codec=_CODECS[header.codec],
            cudacontext=_current_context(),
            cudastream=stream.cuda_stream,
            usedevicememory=True,
            outputColorType=nvc.OutputColorType.RGBP,
        )
        self.extradata = header.extradata  # VP9 in WebM needs none; kept for other codecs

    def decode(self, data: bytes, pts: int) -> list[tuple[int, torch.Tensor]]:
        """Submit one packet; (pts, RGB (3, H, W) uint8) for each frame it completes."""
        buffer = np.frombuffer(data, dtype=np.uint8)
        packet = nvc.PacketData()
        packet.bsl_data = buffer.ctypes.data  # read during Decode: `buffer` outlives the call
        packet.bsl = buffer.size
        packet.pts = pts
        return [(frame.getPTS(), _planar(frame)) for frame in self.decoder.Decode(packet)]

    def flush(self) -> list[tuple[int, torch.Tensor]]:
        """An empty packet ends the stream: the frames the decoder still holds."""
        packet = nvc.PacketData()
        packet.bsl_data, packet.bsl = 0, 0
        return [(frame.getPTS(), _planar(frame)) for frame in self.decoder.Decode(packet)]

    def close(self) -> None:
        """Drop the decoder (PyNvVideoCodec frees it with the object)."""
        self.decoder = None


def _planar(frame: object) -> torch.Tensor:
    """A decoded RGBP frame as a (3, H, W) uint8 tensor on the GPU (no copy)."""
    rgb = torch.from_dlpack(frame)
    return rgb.permute(2, 0, 1) if rgb.shape[-1] == 3 and rgb.shape[0] != 3 else rgb


__all__ = ["H200_ENGINES", "PyNvSession", "decoder_engines"]
