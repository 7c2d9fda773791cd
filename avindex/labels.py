"""Labels files (`video,second,label` or `video,label` CSV): read hostile files safely, write them,
and look up the class of a clip."""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avindex.durable import write_durably
from avindex.errors import AvindexError

# Seconds beyond this (about 116 days) are refused: no real video is that long, and a hostile
# `second` must not decide how much memory a lookup table takes.
MAX_SECOND = 10_000_000
# Integer labels keep their value when every label is an integer that fits int64 comfortably.
_INTEGER = re.compile(r"-?[0-9]{1,18}")


@dataclass(frozen=True)
class VideoLabels:
    """The labelled seconds of one video (sorted) and their classes, stored sparsely: memory
    grows with the rows of the file, never with the value of a second."""

    seconds: np.ndarray  # int64, sorted, unique
    classes: np.ndarray  # int64, class of each listed second

    @property
    def length(self) -> int:
        """Seconds up to the last listed one (a `video,label` row counts as second 0)."""
        return int(self.seconds[-1]) + 1

    def at(self, seconds: np.ndarray) -> np.ndarray:
        """Class of each whole second, clamped to [0, last listed]; -1 where none is listed."""
        wanted = np.clip(np.asarray(seconds, dtype=np.int64), 0, self.length - 1)
        pos = np.minimum(np.searchsorted(self.seconds, wanted), len(self.seconds) - 1)
        return np.where(self.seconds[pos] == wanted, self.classes[pos], -1)

    def dense(self) -> np.ndarray:
        """Class of every second from 0 to the last listed one (-1 for unlisted seconds)."""
        return self.at(np.arange(self.length))


def clip_labels(labels: VideoLabels, t0: np.ndarray, clip_seconds: float = 1.0) -> np.ndarray:
    """Label of each clip starting at `t0`: the second holding the clip's centre (clamped to the
    listed seconds, so one `video,label` row labels every clip of its video)."""
    centre = np.floor(np.asarray(t0, dtype=np.float64) + clip_seconds / 2)
    return labels.at(np.clip(centre, 0, MAX_SECOND).astype(np.int64))


def load_labels(path: str | os.PathLike) -> dict[str, VideoLabels]:
    """Read a labels CSV: `video,second,label` (rows per second) or `video,label` (whole video).

    Returns video (as written, relative to the file's folder) -> its labels. Integer labels keep
    their value; other names get ids in sorted order. Anything a hostile file can hold (binary
    bytes, huge seconds, an empty file, missing columns, short rows) is a one-line AvindexError
    naming the file (and the row)."""
    path = Path(path)
    table: dict[str, dict[int, str]] = {}
    try:
        for video, second, label in _rows(path):
            table.setdefault(video, {})[second] = label
    except OSError as exc:
        raise AvindexError(f"{path}: cannot read labels ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise AvindexError(
            f"{path}: not a text CSV (undecodable bytes); labels are UTF-8 text with a header "
            "'video,second,label' or 'video,label'"
        ) from None
    except csv.Error as exc:
        raise AvindexError(f"{path}: not a readable CSV ({exc}); check the file") from None
    if not table:
        raise AvindexError(f"{path}: no label rows; add rows 'video,second,label' under the header")
    names = sorted({n for per in table.values() for n in per.values()})
    numeric = all(_INTEGER.fullmatch(n) for n in names)
    ids = {n: int(n) if numeric else i for i, n in enumerate(names)}
    out = {}
    for video, per in table.items():
        seconds = np.array(sorted(per), dtype=np.int64)
        out[video] = VideoLabels(seconds, np.array([ids[per[s]] for s in seconds], np.int64))
    return out


def _rows(path: Path) -> Iterator[tuple[str, int, str]]:
    """(video, second, label) of every data row, checked; streamed, not listed."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or ())
        if not {"video", "label"} <= fields:
            raise AvindexError(
                f"{path}: labels need a header 'video,second,label' or 'video,label'"
                + ("" if reader.fieldnames else " (the file is empty)")
            )
        for row, r in enumerate(reader, start=2):  # row 1 is the header
            video, label = r.get("video") or "", r.get("label")
            if not video or label is None or not label.strip():
                raise AvindexError(
                    f"{path}: row {row} is missing fields; each row needs a video and a label"
                )
            yield video, _second(path, row, r.get("second")), label.strip()


def _second(path: Path, row: int, text: str | None) -> int:
    """The row's second (0 for a per-video label); non-integer, negative or absurd ones are
    errors."""
    text = (text or "").strip()
    if not text:
        return 0
    if not (text.isascii() and text.isdigit()):
        raise AvindexError(
            f"{path}: row {row}: second {text!r} is not a whole number of seconds from 0"
        )
    if len(text) > len(str(MAX_SECOND)) or int(text) > MAX_SECOND:
        raise AvindexError(
            f"{path}: row {row}: second {text} is beyond {MAX_SECOND:,} (116 days); "
            "seconds count from the start of the video"
        )
    return int(text)


def labels_by_path(path: str | os.PathLike) -> dict[str, VideoLabels]:
    """load_labels keyed by resolved absolute video path (relative names are under the file's
    folder), to match the paths that embedding and training record."""
    base = Path(path).resolve().parent
    out = {}
    for video, per in load_labels(path).items():
        try:
            out[str((base / video).resolve())] = per
        except (OSError, ValueError) as exc:  # NUL bytes, names too long for the file system
            raise AvindexError(
                f"{path}: video {video[:80]!r} is not a usable path ({exc})"
            ) from None
    return out


def write_labels(path: str | os.PathLike, labels: dict[str, np.ndarray]) -> Path:
    """Write `video,second,label` rows (video relative to the labels file's folder) from each
    video's class per second, atomically."""
    path = Path(path)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["video", "second", "label"])
            for video, per_second in labels.items():
                writer.writerows([video, s, int(c)] for s, c in enumerate(per_second))

    write_durably(path, write)
    return path


__all__ = [
    "MAX_SECOND",
    "VideoLabels",
    "clip_labels",
    "labels_by_path",
    "load_labels",
    "write_labels",
]
