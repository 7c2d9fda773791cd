"""Query uploads: saved under a neutral name in a private temporary folder, and measured against
the duration limit from packet timestamps alone (demuxing, no decoding)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import BinaryIO

import av

# The file's own extension helps FFmpeg guess formats that are hard to probe; anything else of
# the client's file name is used only in messages.
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,10}")
_NAME_CHARS = 80


def display_name(filename: str | None) -> str:
    """The client's file name as messages show it: the last part, printable, shortened."""
    base = re.split(r"[\\/]", filename or "")[-1]
    base = "".join(c for c in base if c.isprintable())[:_NAME_CHARS]
    return base or "upload"


def save_upload(source: BinaryIO, filename: str | None, folder: Path) -> Path:
    """Copy an uploaded file into `folder` as query<.ext> (the client never names server files)."""
    suffix = os.path.splitext(display_name(filename))[1]
    path = folder / ("query" + (suffix.lower() if _SUFFIX.fullmatch(suffix) else ""))
    with open(path, "wb") as out:
        shutil.copyfileobj(source, out)
    return path


def media_seconds(path: Path, stream_kind: str, limit: float) -> float | None:
    """Seconds spanned by the first `stream_kind` ('audio' | 'video') stream's packets, counted
    until they pass `limit`; None when the file has no such stream or cannot be opened (search
    then says why)."""
    try:
        container = av.open(os.fspath(path), metadata_errors="ignore")
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError):
        return None
    with container:
        streams = getattr(container.streams, stream_kind)
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


def too_long(path: Path, kind: str, limit: float) -> bool:
    """True when a sound or video query spans more than `limit` seconds (a picture never does)."""
    if kind == "image":
        return False
    seconds = media_seconds(path, "audio" if kind == "audio" else "video", limit)
    return seconds is not None and seconds > limit
