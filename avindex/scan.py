"""Find media files under the paths a user gives (folders are searched recursively)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from avindex.errors import AvindexError

# Extensions picked up when scanning folders; files named explicitly are always taken, so a user can
# point at anything FFmpeg reads.
MEDIA_EXTENSIONS = frozenset(
    {
        ".mp4",
        ".m4v",
        ".mov",
        ".mkv",
        ".webm",
        ".avi",
        ".mpg",
        ".mpeg",
        ".ts",
        ".mts",
        ".m2ts",
        ".flv",
        ".wmv",
        ".ogv",
        ".3gp",
        ".3g2",
        ".mxf",
        ".asf",
        ".vob",
        ".dv",
    }
)


@dataclass
class Inputs:
    """What a list of user paths holds: media files found, and paths that do not exist."""

    paths: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def scan_inputs(inputs: Iterable[str | Path]) -> Inputs:
    """Sorted absolute media paths under the given files and folders, and the missing paths."""
    found: set[Path] = set()
    missing = []
    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            found.update(
                p.resolve()
                for p in path.rglob("*")
                if p.suffix.lower() in MEDIA_EXTENSIONS
                and p.is_file()
                and not p.name.startswith(".")
            )
        elif path.exists():
            found.add(path.resolve())
        else:
            missing.append(str(raw))
    return Inputs(sorted(found), missing)


def find_media(inputs: Iterable[str | Path]) -> list[Path]:
    """Media paths under the given files and folders; a missing path is a one-line error."""
    scanned = scan_inputs(inputs)
    if scanned.missing:
        raise AvindexError(f"{scanned.missing[0]}: no such file or folder; check the path")
    return scanned.paths


def select_part(paths: Sequence[Path], part: str | None) -> list[Path]:
    """The share K of N (`part` = "K/N", K from 0) of `paths`, by a stable hash of each path, so N
    processes on N machines given the same inputs split them without talking to each other."""
    if part is None:
        return list(paths)
    try:
        k, n = (int(v) for v in part.split("/"))
    except ValueError:
        raise AvindexError(f"--part {part!r}: expected K/N, e.g. 0/4 (K from 0 to N-1)") from None
    if not 0 <= k < n:
        raise AvindexError(f"--part {part}: K must be 0..{n - 1} and N at least 1")
    return [p for p in paths if _bucket(p, n) == k]


def _bucket(path: Path, n: int) -> int:
    """Stable share of a path: the same on every machine and Python (unlike hash())."""
    digest = hashlib.blake2b(str(path).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n
