"""The store's videos as the server shows them: opaque ids and display names, never paths."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from avindex.store import Store

ID_CHARS = 16  # hex digits of a video id (64 bits of sha256 of the path: no collisions in practice)


@dataclass(frozen=True)
class Video:
    """One embedded video: its id (sent to clients), display name, server path and size."""

    id: str
    name: str
    path: str
    duration: float
    clips: int


def video_id(path: str) -> str:
    """Stable id of a stored video path (the same across restarts, reveals nothing of the path)."""
    return hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()[:ID_CHARS]


def display_names(paths: list[str]) -> dict[str, str]:
    """Each path relative to the folder all of them share (a lone video: its file name)."""
    if not paths:
        return {}
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return {p: os.path.relpath(p, root) for p in paths}


class Catalog:
    """Videos the store lists as embedded; the only files the server ever reads for a client."""

    def __init__(self, store: Store) -> None:
        """Index the store's embedded videos by id and by path."""
        done = [v for v in store.videos().values() if v.status == "done" and v.n_clips > 0]
        names = display_names(sorted({v.path for v in done}))
        self.by_id: dict[str, Video] = {}
        self.by_path: dict[str, Video] = {}
        for entry in sorted(done, key=lambda v: (v.path, v.mtime)):
            # A file embedded again after it changed keeps one id: the newest entry describes it.
            video = Video(
                video_id(entry.path), names[entry.path], entry.path, entry.duration, entry.n_clips
            )
            self.by_id[video.id] = video
            self.by_path[video.path] = video

    def __len__(self) -> int:
        return len(self.by_id)

    def get(self, video_id: str) -> Video | None:
        """The video with this id, or None (anything else a client sends is not a video)."""
        return self.by_id.get(video_id)

    def of_path(self, path: str) -> Video:
        """The video a clip's stored path belongs to."""
        return self.by_path[path]
