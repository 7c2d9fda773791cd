"""What the server opens once at start-up: the store, its model and indexes (warmed by one
query of each kind), the video catalog and the clip media decoder."""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fastapi import HTTPException
from PIL import Image

from avindex.config import SearchConfig, ServeConfig
from avindex.errors import AvindexError
from avindex.queries import Query
from avindex.search import Hit, Result, Searcher
from avindex.serve.catalog import Catalog, Video
from avindex.serve.clipmedia import ClipMedia, wav_bytes
from avindex.serve.metrics import Metrics
from avindex.store import ClipRef


class ServeState:
    """One indexed store ready to answer: queries' media is read on the request threads, in
    parallel; the model and the index searches run one at a time on their own thread."""

    def __init__(
        self, store_dir: str | os.PathLike, cfg: ServeConfig, model: str | None = None
    ) -> None:
        """Open the store and load its model and indexes now, so the first request is fast."""
        self.cfg = cfg
        # Uploads decode at most max_upload_seconds of sound, whatever their timestamps claim.
        search_cfg = SearchConfig(
            k=cfg.k, device=cfg.device, max_query_seconds=cfg.max_upload_seconds
        )
        self.searcher = Searcher(store_dir, model, search_cfg)
        self.store = self.searcher.store
        self.audio_cfg = self.searcher.audio_cfg
        self.catalog = Catalog(self.store)
        self.media = ClipMedia(self.store, self.audio_cfg, cfg)
        self.metrics = Metrics()
        # The model, its preprocessing and faiss indexes are shared state: every search runs on
        # this one thread, one at a time (one thread also keeps per-thread library state and
        # allocator arenas from growing with the number of request threads: flatter RSS).
        self._searches = ThreadPoolExecutor(max_workers=1, thread_name_prefix="avindex-search")
        # Warm up here, on the main thread: on a busy 2-core machine, torch's intra-op threads
        # stalled sound and picture queries on the thread that ran the model first (measured
        # ~0.8 s instead of ~20 ms), so that thread must not be the search thread.
        self._warm_up()

    def _warm_up(self) -> None:
        """Load every index and run a silent sound and a grey picture through the model."""
        for modality in self.searcher.info["modalities"]:
            self.searcher.index(modality)
        with tempfile.TemporaryDirectory(prefix="avindex-serve-") as folder:
            sound, picture = Path(folder) / "silence.wav", Path(folder) / "grey.png"
            sound.write_bytes(wav_bytes(np.zeros(16_000), 16_000))  # 1 s
            Image.new("RGB", (64, 64), (128, 128, 128)).save(picture)
            # A wrong model is an AvindexError here (start-up fails with one line); a query the
            # store cannot answer (e.g. no audio index) only fails that query.
            self.searcher.run([Query("audio", str(sound)), Query("image", str(picture))], 1)

    def search(self, query: Query, k: int) -> Result:
        """Answer one query (its error, if any, is in Result.error): its media is read on the
        calling request thread, so a long upload does not hold up other searches."""
        gathered = self.searcher.gather([query])
        (result,) = self._searches.submit(self.searcher.answer, gathered, k).result()
        return result

    def clip(self, clip_id: int) -> ClipRef:
        """A stored clip, or HTTP 404 for an id the store does not have."""
        n = self.store.num_clips
        if not 0 <= clip_id < n:
            raise HTTPException(404, f"clip {clip_id}: no such clip (ids are 0..{n - 1})")
        return self.store.clip(clip_id)

    def video(self, video_id: str) -> Video:
        """A stored video by id, or HTTP 404 (ids only: nothing a client sends is a path)."""
        video = self.catalog.get(video_id)
        if video is None:
            raise HTTPException(404, f"video {video_id[:40]!r}: no such video in the store")
        return video

    def clip_video(self, clip: ClipRef | Hit) -> Video:
        """The catalog entry of a clip's video."""
        return self.catalog.of_path(clip.path)

    def media_bytes(self, clip_id: int, what: str) -> bytes:
        """A clip's 'frame' (JPEG), 'audio' (WAV) or 'spectrogram' (PNG); HTTP 404 when its
        video cannot be read on the server any more."""
        clip = self.clip(clip_id)
        make = {
            "frame": self.media.frame_jpeg,
            "audio": self.media.audio_wav,
            "spectrogram": self.media.spectrogram_png,
        }[what]
        try:
            return make(clip_id)
        except AvindexError as exc:
            video = self.clip_video(clip)
            reason = str(exc).replace(video.path, video.name)
            raise HTTPException(
                404, f"clip {clip_id}: its video cannot be read ({reason})"
            ) from None
