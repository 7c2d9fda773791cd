"""Find media files under the paths a user gives (folders are searched recursively)."""

from __future__ import annotations

from collections.abc import Iterable
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


def find_media(inputs: Iterable[str | Path]) -> list[Path]:
    """Sorted absolute media paths under the given files and folders; a missing path is an error."""
    found: set[Path] = set()
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
            raise AvindexError(f"{path}: no such file or folder; check the path")
    return sorted(found)
