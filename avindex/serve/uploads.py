"""Query uploads: saved under a neutral name in a private temporary folder, and measured against
the duration limit from packet timestamps alone (demuxing in a child process, no decoding)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import BinaryIO

from avindex.media import stream_seconds
from avindex.workers import Sandbox

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


def too_long(path: Path, kind: str, limit: float, sandbox: Sandbox) -> bool:
    """True when a sound or video query spans more than `limit` seconds (a picture never does).
    The upload is demuxed in the sandbox's child process: it is untrusted."""
    if kind == "image":
        return False
    stream = "audio" if kind == "audio" else "video"
    seconds = sandbox.call(stream_seconds, os.fspath(path), stream, limit)
    return seconds is not None and seconds > limit
