"""Search: encode queries (audio, image, video moment, clip id, vector) with the store's model,
search one modality's faiss index, and map the ids back to clips."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avindex.config import AudioConfig, SearchConfig, VideoConfig, from_dict
from avindex.decode import read_clip
from avindex.devices import resolve_device
from avindex.encoder import Encoder
from avindex.errors import AvindexError
from avindex.index import (
    GPU_MAX_K,
    LoadedIndex,
    indexed_store,
    load_index,
    normalize_rows,
    search_vectors,
)
from avindex.media import clip_starts, decode_audio, load_image
from avindex.model import Checkpoint, load_checkpoint, random_checkpoint
from avindex.queries import Query
from avindex.store import MODALITIES, ClipRef, StoreMeta
from avindex.workers import Sandbox


@dataclass(frozen=True)
class Hit:
    """One result row."""

    rank: int
    score: float
    id: int
    path: str
    t0: float
    has_audio: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        return {
            "rank": self.rank,
            "score": self.score,
            "id": self.id,
            "path": self.path,
            "t0": self.t0,
            "has_audio": self.has_audio,
        }


@dataclass
class Result:
    """A query's hits, or the one-line reason it failed; keeps the query's media for sheets."""

    query: Query | None
    description: str
    hits: list[Hit] = field(default_factory=list)
    error: str | None = None
    frame: np.ndarray | None = field(default=None, repr=False)  # query picture (image / video)
    audio: np.ndarray | None = field(default=None, repr=False)  # query windows (n, n_samples)
    clip: ClipRef | None = None  # clip queries: where the query's picture is
    vector: np.ndarray | None = field(default=None, repr=False)

    @property
    def searched(self) -> str | None:
        """Index searched (None when the query could not be parsed)."""
        return self.query.searched if self.query else None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        out: dict[str, Any] = {"query": self.query.to_dict() if self.query else None}
        out["description"] = self.description
        if self.error is not None:
            out["error"] = self.error
        else:
            out["results"] = [h.to_dict() for h in self.hits]
        return out


def resolve_model(
    store_dir: str | os.PathLike, meta: StoreMeta, model: str | None, device: str
) -> Checkpoint:
    """The store's model: --model CKPT, else what the store records (checkpoint path or random
    model), checked by sha256 against the model the store was embedded with."""

    source = meta.model_source
    spec = source.get("random")
    if model == "random" or (model is None and spec):
        if not spec:
            raise AvindexError(
                f"--model random: {store_dir} was not embedded with --model random; "
                "pass the checkpoint it was embedded with"
            )
        label = "--model random"
        # Stores written before presets were named recorded a `small` flag instead.
        preset = spec.get("preset") or ("small" if spec.get("small") else "paper")
        ckpt = random_checkpoint(
            spec["width"], spec["seed"], head=spec["head"], preset=preset, device=device
        )
    else:
        label = model or source.get("path")
        if label is None:
            raise AvindexError(
                f"{store_dir}: the store does not record its model; pass --model CKPT "
                "(the checkpoint given to `avindex embed`)"
            )
        if model is None and not Path(label).exists():
            raise AvindexError(
                f"{label}: the store's model checkpoint is missing; pass --model CKPT "
                "(the checkpoint given to `avindex embed`)"
            )
        ckpt = load_checkpoint(label, device)
    if ckpt.sha256 != meta.model_sha256:
        raise AvindexError(
            f"{label}: index built from another model (store {meta.model_sha256[:12]}, "
            f"model {ckpt.sha256[:12]}); pass the checkpoint the store was embedded with"
        )
    return ckpt


def audio_windows(samples: np.ndarray, audio_cfg: AudioConfig, hop: float) -> np.ndarray:
    """(n, n_samples) clip windows of a query: every `hop` s; shorter than a clip: zero padded."""

    n = audio_cfg.n_samples
    if len(samples) < n:
        return np.pad(samples, (0, n - len(samples)))[None, :].astype(np.float32)
    duration = len(samples) / audio_cfg.sample_rate
    starts = np.round(clip_starts(duration, hop, audio_cfg.clip_seconds) * audio_cfg.sample_rate)
    starts = np.minimum(starts.astype(np.int64), len(samples) - n)
    return np.stack([samples[s : s + n] for s in starts]).astype(np.float32)


@contextmanager
def _group_errors(group: list[Result]) -> Iterator[None]:
    """An AvindexError becomes the error of every result in `group`; other queries still run."""
    try:
        yield
    except AvindexError as exc:
        for r in group:
            r.error = str(exc)


class Searcher:
    """An indexed store opened once; answers batches of queries with its model and indexes.

    Query media are decoded in child processes (a file that crashes its decoder fails that query
    only) and embedded by the store's own model through `Encoder`, as the clips were.
    """

    def __init__(
        self,
        store_dir: str | os.PathLike,
        model: str | None = None,
        cfg: SearchConfig | None = None,
    ) -> None:
        """Open the store in its index's id order (the index must exist and match the store)."""
        self.dir = Path(store_dir)
        if not self.dir.is_dir():
            raise AvindexError(f"{self.dir}: no such store directory; run `avindex embed` first")
        self.store, self.info = indexed_store(self.dir)
        self.meta = self.store.meta
        self.model_arg = model
        self.cfg = cfg or SearchConfig()
        self.audio_cfg = from_dict(AudioConfig, self.meta.audio_config)
        self.video_cfg = from_dict(VideoConfig, self.meta.video_config)
        self._encoder: Encoder | None = None
        self._sandbox: Sandbox | None = None
        self._sandbox_lock = threading.Lock()
        self._indexes: dict[str, LoadedIndex] = {}

    def notes(self) -> list[str]:
        """Warnings worth printing beside results (unindexed clips, meaningless embeddings)."""
        notes = []
        missing = self.store.num_clips - int(self.info["num_clips"])
        if missing > 0:
            notes.append(
                f"{missing} clips are not indexed yet; run `avindex index {self.dir} --update`"
            )
        if self.meta.model_source.get("random"):
            notes.append("the store was embedded with random untrained weights: results are noise")
        if self.meta.model_config.get("head") == "l3":
            notes.append(
                "the store's model has the l3 head: its audio and visual embeddings are not "
                "aligned, so only same-modality search (--in = the query's modality) is meaningful"
            )
        return notes

    def encoder(self) -> Encoder:
        """The store's model and preprocessing, loaded on first use (clip/vector need none)."""
        if self._encoder is None:
            device = resolve_device(self.cfg.device)
            checkpoint = resolve_model(self.dir, self.meta, self.model_arg, device)
            self._encoder = Encoder(checkpoint, device, self.cfg.batch_size)
        return self._encoder

    def sandbox(self) -> Sandbox:
        """Child processes that decode query media, started on first use."""
        with self._sandbox_lock:  # gather() may run on several threads: start one sandbox
            if self._sandbox is None:
                self._sandbox = Sandbox(self.cfg.media_workers)
        return self._sandbox

    def index(self, modality: str) -> LoadedIndex:
        """One modality's index, loaded on first use."""
        if modality not in self._indexes:
            self._indexes[modality] = load_index(self.dir, modality, self.cfg.device)
        return self._indexes[modality]

    def run(self, queries: Sequence[Query | AvindexError], k: int | None = None) -> list[Result]:
        """Answer every query; a bad one becomes a Result with its error, the rest still run."""
        return self.answer(self.gather(queries), k)

    def gather(self, queries: Sequence[Query | AvindexError]) -> list[Result]:
        """Read every query's media (decoded in parallel child processes) or stored vector; a bad
        query becomes a Result with its error. Safe to call from several threads at once."""
        results = [
            Result(None, "invalid query", error=str(q))
            if isinstance(q, AvindexError)
            else Result(q, q.describe())
            for q in queries
        ]
        pending = [r for r in results if r.error is None]
        with ThreadPoolExecutor(max(1, self.cfg.media_workers)) as threads:
            list(threads.map(self._gather, pending))
        return results

    def answer(self, results: list[Result], k: int | None = None) -> list[Result]:
        """Embed the gathered queries and search the indexes (one thread at a time: the model
        and the indexes are shared state); returns `results`, filled in."""
        k = self.cfg.k if k is None else k
        pending = [r for r in results if r.error is None]
        self._encode([r for r in pending if r.vector is None])
        self._search(pending, k)
        return results

    def _gather(self, result: Result) -> None:
        """Read a query's media (or stored vector); a failure becomes that result's error."""
        q = result.query
        try:
            q.check()
            if q.kind == "audio":
                samples = self.sandbox().call(
                    decode_audio, q.value, self.audio_cfg.sample_rate, self.cfg.max_query_seconds
                )
                result.audio = audio_windows(samples, self.audio_cfg, self.meta.hop)
            elif q.kind == "image":
                result.frame = self.sandbox().call(load_image, q.value, self.video_cfg)
            elif q.kind == "video":
                data = self.sandbox().call(read_clip, q.value, q.at, self.audio_cfg, self.video_cfg)
                if q.modality == "audio" and not data.has_audio:
                    raise AvindexError(f"{q.value}: no audio at {q.at:g} s; use --by visual")
                result.frame, result.audio = data.frame, data.audio[None, :]
            elif q.kind == "clip":
                result.clip = self.store.clip(int(q.value))
                if q.modality == "audio" and not result.clip.has_audio:
                    raise AvindexError(f"--clip {q.value}: the clip has no audio; use --by visual")
                result.vector = self.store.vectors([result.clip.id], q.modality)[0]
            else:
                result.vector = load_vector(q.value, self.meta.dim(q.modality), q.modality)
        except AvindexError as exc:
            result.error = str(exc)

    def _encode(self, pending: list[Result]) -> None:
        """Embed the gathered media, batched through the store's model."""
        visual = [r for r in pending if r.query.modality == "visual"]
        audio = [r for r in pending if r.query.modality == "audio"]
        if not pending:
            return
        # A wrong --model is the command's error, not one query's: it stops the whole run.
        encoder = self.encoder()
        if visual:
            with _group_errors(visual):
                vecs = encoder.frames([r.frame for r in visual])
                for r, v in zip(visual, vecs, strict=True):
                    r.vector = v
        if audio:
            with _group_errors(audio):
                vecs = encoder.sounds(np.concatenate([r.audio for r in audio]))
                ends = np.cumsum([len(r.audio) for r in audio])
                # A long query is the mean of its clips' embeddings, re-normalised (cosine).
                means = np.stack([p.mean(axis=0) for p in np.split(vecs, ends[:-1])])
                for r, v in zip(audio, normalize_rows(means), strict=True):
                    r.vector = v

    def _search(self, done: list[Result], k: int) -> None:
        """One faiss search per index for all queries aimed at it; ids mapped back to clips.

        A failing index (e.g. the store has no audio index) fails only the queries aimed at it.
        """
        for modality in MODALITIES:
            group = [r for r in done if r.searched == modality]
            if group:
                with _group_errors(group):
                    self._search_group(modality, group, k)

    def _search_group(self, modality: str, group: list[Result], k: int) -> None:
        """Search one modality's index for every result of `group` and fill in their hits."""
        index = self.index(modality)
        if k < 1:
            raise AvindexError(f"-k {k}: must be at least 1")
        k = min(k, max(1, index.index.ntotal))  # no more results than the index holds
        rows = self._top_shown(index, np.stack([r.vector for r in group]), k)
        refs = {
            ref.id: ref for ref in self.store.clips(sorted({i for row in rows for _, i in row}))
        }
        for r, row in zip(group, rows, strict=True):
            r.hits = [
                Hit(rank, s, i, refs[i].path, refs[i].t0, refs[i].has_audio)
                for rank, (s, i) in enumerate(row, 1)
            ]

    def _top_shown(
        self, index: LoadedIndex, vectors: np.ndarray, k: int
    ) -> list[list[tuple[float, int]]]:
        """Each query's top k (score, clip id) among the clips the store shows.

        An index built before duplicates were hidden may still hold a hidden copy's rows: then
        fetch twice as many until k shown rows remain, or the index has no more to give.
        """
        total = index.index.ntotal
        most = max(k, min(total, GPU_MAX_K)) if index.device == "cuda" else total
        fetch = k
        while True:
            scores, ids = search_vectors(index, vectors, fetch)
            found = np.unique(ids[ids >= 0])
            shown = set(found[self.store.visible(found)].tolist())
            rows = [
                [(float(s), int(i)) for s, i in zip(row_scores, row_ids, strict=True) if i in shown]
                for row_scores, row_ids in zip(scores, ids, strict=True)
            ]
            # A row padded with -1 holds everything the index found for that query.
            short = [
                len(row) < k and (row_ids >= 0).all()
                for row, row_ids in zip(rows, ids, strict=True)
            ]
            if fetch >= most or not any(short):
                return [row[:k] for row in rows]
            fetch = min(most, 2 * fetch)

    def close(self) -> None:
        """Stop the media workers and the model's helper thread."""
        if self._sandbox is not None:
            self._sandbox.close()
        if self._encoder is not None:
            self._encoder.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_vector(path: str, dim: int, modality: str) -> np.ndarray:
    """A query vector from .npy: shape (D,) or (1, D); the header is checked before any data is
    read, so a file claiming 10^12 floats costs nothing."""
    try:
        with open(path, "rb") as fh:
            fmt = np.lib.format
            version = fmt.read_magic(fh)
            read_header = (
                fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            )
            shape, _, dtype = read_header(fh)
            if dtype.kind not in "fiu" or tuple(shape) not in ((dim,), (1, dim)):
                raise AvindexError(
                    f"{path}: vector of shape {tuple(shape)} ({dtype}); expected ({dim},) or "
                    f"(1, {dim}), the store's {modality} embedding size"
                )
            fh.seek(0)
            vec = np.load(fh, allow_pickle=False)
    except FileNotFoundError:
        raise AvindexError(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError) as exc:
        raise AvindexError(f"{path}: not a .npy array ({exc})") from None
    return vec.reshape(-1).astype(np.float32)


def search(
    store_dir: str | os.PathLike,
    queries: Sequence[Query | AvindexError],
    k: int | None = None,
    model: str | None = None,
    cfg: SearchConfig | None = None,
) -> list[Result]:
    """Answer queries against an indexed store (see Searcher)."""
    with Searcher(store_dir, model, cfg) as searcher:
        return searcher.run(queries, k)


__all__ = [
    "Hit",
    "Result",
    "Searcher",
    "audio_windows",
    "load_vector",
    "resolve_model",
    "search",
]
