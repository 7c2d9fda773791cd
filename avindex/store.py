"""Sharded HDF5 embedding store: writers flush immutable shards (with their catalog entries), the
reader maps global clip ids to shard rows and shows each video's clips once."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from avindex.catalog import CATALOG_DIR, Catalog, shard_names, write_entry
from avindex.config import EmbedConfig
from avindex.durable import STALE_TMP_SECONDS, TMP_SUFFIX, WriterId, durable_tmp, stale_tmp
from avindex.errors import AvindexError
from avindex.shard import (
    MODALITIES,
    READ_ERRORS,
    SHARD_GLOB,
    BufferedVideo,
    ShardSummary,
    StoreMeta,
    VideoEntry,
    VideoKey,
    VideoRecord,
    check_modality,
    new_shard_name,
    one_line,
    write_shard,
)

CLAIMS_DIR = "claims"  # per-video claims of running writers (avindex.claims)

log = logging.getLogger("avindex.store")


@dataclass(frozen=True)
class ClipRef:
    """Where a clip id points: its video, start time, whether real audio was present, its shard."""

    id: int
    path: str
    t0: float
    has_audio: bool
    shard: str


class StoreWriter:
    """Buffers whole videos and writes them as immutable shards (tmp file + atomic rename)."""

    def __init__(
        self,
        store_dir: str | os.PathLike[str],
        meta: StoreMeta,
        shard_clips: int = EmbedConfig.shard_clips,
        shard_seconds: float = EmbedConfig.shard_seconds,
        on_flush: Callable[[list[VideoKey]], None] | None = None,
    ) -> None:
        """Open `store_dir` (created if missing) for writing; refuses a store of another model.

        `on_flush(keys)` is called after each shard is durably in place with the keys of the
        videos it holds (e.g. `WorkQueue.written`, which releases their claims).
        """
        self.dir = Path(store_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.shard_clips = shard_clips
        self.shard_seconds = shard_seconds
        self.on_flush = on_flush
        self.shards_written: list[str] = []
        self._check_compatible()
        self._writer = WriterId.current()
        self._write_failed = False
        self._reset()

    def _check_compatible(self) -> None:
        """Compare with the first readable shard (an unreadable one says nothing about models)."""
        catalog = Catalog(self.dir)
        for name in shard_names(self.dir):
            catalog.read([name])
            if name in catalog.summaries:
                why = catalog.summaries[name].meta.mismatch(self.meta)
                if why:
                    raise AvindexError(
                        f"{self.dir}: store was embedded with another model or settings ({why}); "
                        "use a new --store directory or remove the old shards"
                    )
                return

    def _reset(self) -> None:
        self._videos: list[BufferedVideo] = []
        self._n_rows = 0
        self._first_at: float | None = None

    def add_video(
        self,
        record: VideoRecord,
        visual: np.ndarray,
        audio: np.ndarray,
        has_audio: np.ndarray,
        t0: np.ndarray,
    ) -> None:
        """Buffer all clips of one video; flushes a shard when it is full or old enough."""
        n = len(t0)
        visual = np.asarray(visual)
        audio = np.asarray(audio)
        if visual.shape != (n, self.meta.visual_dim) or audio.shape != (n, self.meta.audio_dim):
            raise ValueError(
                f"{record.path}: embeddings {visual.shape}/{audio.shape} do not match "
                f"{n} clips of dims {self.meta.visual_dim}/{self.meta.audio_dim}"
            )
        if len(has_audio) != n:
            raise ValueError(f"{record.path}: has_audio has {len(has_audio)} rows, expected {n}")
        self._videos.append(
            BufferedVideo(
                record=record,
                status="done",
                error="",
                visual=visual.astype(np.float16),
                audio=audio.astype(np.float16),
                has_audio=np.asarray(has_audio, dtype=bool),
                t0=np.asarray(t0, dtype=np.float32),
            )
        )
        self._n_rows += n
        self._after_add()

    def add_failure(self, record: VideoRecord, reason: str) -> None:
        """Record a video that could not be embedded, with its one-line reason."""
        self._videos.append(
            BufferedVideo(
                record=record,
                status="failed",
                error=reason,
                visual=np.zeros((0, self.meta.visual_dim), np.float16),
                audio=np.zeros((0, self.meta.audio_dim), np.float16),
                has_audio=np.zeros(0, bool),
                t0=np.zeros(0, np.float32),
            )
        )
        self._after_add()

    def _after_add(self) -> None:
        now = time.monotonic()
        if self._first_at is None:
            self._first_at = now
        if self._n_rows >= self.shard_clips or now - self._first_at >= self.shard_seconds:
            self.flush()

    def flush(self) -> str | None:
        """Write the buffered videos as one shard now; returns its file name (None if empty).

        Order: shard to a tmp file, its catalog entry (durably), fsync, rename into place, fsync
        the folder, then `on_flush`. A crash before the rename leaves only an entry whose shard
        does not exist, which readers ignore.
        """
        if not self._videos:
            return None
        name = new_shard_name(self._writer)
        try:
            with durable_tmp(self.dir / name) as tmp:
                summary = write_shard(tmp, self.meta, self._videos, self._writer)
                self._write_entry(name, summary, tmp.stat())
        except OSError as exc:
            self._write_failed = True  # close() must not retry and bury this error
            raise AvindexError(
                f"{self.dir}: cannot write a shard ({exc.strerror or one_line(exc)}); free space "
                "or fix permissions and run again: finished shards are kept and resume skips them"
            ) from exc
        keys = [v.record.key for v in self._videos]
        self.shards_written.append(name)
        self._reset()
        if self.on_flush:
            self.on_flush(keys)
        return name

    def _write_entry(self, name: str, summary: ShardSummary, stat: os.stat_result) -> None:
        """The catalog entry; failing to write it does not fail the shard (readers rebuild it)."""
        try:
            write_entry(self.dir, name, summary, stat)
        except OSError as exc:
            log.warning("%s: cannot write the catalog entry of %s (%s)", self.dir, name, exc)

    def close(self) -> None:
        """Flush whatever is buffered (whole videos only), unless writing already failed."""
        if not self._write_failed:
            self.flush()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        # Buffered entries are complete videos, so they are kept even when the caller failed.
        self.close()


@dataclass
class _Shard:
    name: str
    path: Path
    first_id: int
    summary: ShardSummary
    hidden: np.ndarray  # indices into the videos table of copies shown by an earlier shard
    _cols: dict[str, np.ndarray] | None = None
    _visible: np.ndarray | None = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return self.summary.rows

    @property
    def meta(self) -> StoreMeta:
        return self.summary.meta


class Store:
    """Read-only view of a store directory; clip ids are global rows, shards in `shard_order`.

    A video held by more than one shard (written twice before claims existed, or by a writer that
    lost its claim) is shown once: the copy in the first shard in id order. The other copies'
    rows keep their ids but are skipped by `iter_blocks` and `count` (so no index holds them) and
    `visible` says which ids they are.
    """

    def __init__(
        self, store_dir: str | os.PathLike[str], shard_order: Sequence[str] | None = None
    ) -> None:
        """Open the complete shards of `store_dir`; `shard_order` fixes the id order of known ones.

        Shards named in `shard_order` come first in that order (an index records it, so ids never
        shift); other shards follow sorted by name (= creation time). Unreadable shards are logged
        (logger `avindex.store`), listed in `warnings` and skipped; an unreadable shard named in
        `shard_order` is an error.
        """
        self.dir = Path(store_dir)
        if not self.dir.is_dir():
            raise AvindexError(f"{self.dir}: no such store directory; run `avindex embed` first")
        self.blocks_read = 0  # blocks served by iter_blocks; tests use it to check streaming
        self.max_block_rows = 0
        names = shard_names(self.dir)
        ordered = list(shard_order or [])
        present = set(names)
        missing = [n for n in ordered if n not in present]
        if missing:
            raise AvindexError(
                f"{self.dir}: shard {missing[0]} is missing ({len(missing)} in all); "
                "rebuild the index with `avindex index`"
            )
        known = set(ordered)
        ordered += [n for n in names if n not in known]
        catalog = Catalog(self.dir)
        catalog.read(ordered)
        self.warnings = [
            f"{self.dir / n}: unreadable shard skipped ({why})" for n, why in catalog.errors.items()
        ]
        for name in ordered:
            if name in known and name in catalog.errors:
                raise AvindexError(
                    f"{self.dir / name}: indexed shard is unreadable ({catalog.errors[name]}); "
                    f"run `avindex check {self.dir} --repair`, then rebuild the index"
                )
        self.shards: list[_Shard] = []
        first = 0
        for name in (n for n in ordered if n in catalog.summaries):
            summary = catalog.summaries[name]
            if self.shards:
                why = self.shards[0].meta.mismatch(summary.meta)
                if why:
                    raise AvindexError(
                        f"{self.dir / name}: shard does not match the rest of the store ({why}); "
                        "move it to its own store directory"
                    )
            self.shards.append(_Shard(name, self.dir / name, first, summary, np.zeros(0, int)))
            first += summary.rows
        self.num_clips = first
        self._starts = np.array([s.first_id for s in self.shards], np.int64)
        self.hidden_clips = self._hide_duplicates()

    def _hide_duplicates(self) -> int:
        """Mark every copy of a video after its first (in id order) hidden; returns hidden rows."""
        seen: set[VideoKey] = set()
        hidden_rows = 0
        for shard in self.shards:
            table = shard.summary.videos
            hidden = []
            for i, (key, n) in enumerate(zip(table.keys(), table.n_clips, strict=True)):
                if n == 0:
                    continue  # failures have no rows to hide
                if key in seen:
                    hidden.append(i)
                    hidden_rows += n
                else:
                    seen.add(key)
            shard.hidden = np.array(hidden, np.int64)
        return hidden_rows

    @property
    def meta(self) -> StoreMeta:
        """The store's shared meta (raises for a store with no shards)."""
        if not self.shards:
            raise AvindexError(f"{self.dir}: store holds no shards; run `avindex embed` first")
        return self.shards[0].meta

    @property
    def shard_names(self) -> list[str]:
        """Shard file names in id order."""
        return [s.name for s in self.shards]

    @contextlib.contextmanager
    def _reading(self, shard: _Shard) -> Iterator[None]:
        """Turn a read error of a damaged shard into one line naming it and what to do."""
        try:
            yield
        except READ_ERRORS as exc:
            raise AvindexError(
                f"{shard.path}: cannot read the shard ({one_line(exc)}); "
                f"run `avindex check {self.dir}`"
            ) from exc

    def _columns(self, shard: _Shard) -> dict[str, np.ndarray]:
        """Small per-clip columns and the video paths of a shard, read once and cached."""
        if shard._cols is None:
            with self._reading(shard), h5py.File(shard.path, "r", locking=False) as h5:
                cols = {
                    "video": h5["video"][:],
                    "t0": h5["t0"][:],
                    "has_audio": h5["has_audio"][:],
                }
            if any(len(c) != shard.rows for c in cols.values()):
                raise AvindexError(
                    f"{shard.path}: shard changed since it was catalogued; "
                    f"run `avindex check {self.dir}`"
                )
            cols["paths"] = np.array(shard.summary.videos.path, dtype=object)
            shard._cols = cols
        return shard._cols

    def _visible_rows(self, shard: _Shard) -> np.ndarray | None:
        """Row mask of a shard's visible rows (None when it hides none)."""
        if not len(shard.hidden):
            return None
        if shard._visible is None:
            shard._visible = ~np.isin(self._columns(shard)["video"], shard.hidden)
        return shard._visible

    def _mask(self, shard: _Shard, modality: str) -> np.ndarray | None:
        """Rows of a shard that `iter_blocks` yields (None: all of them)."""
        visible = self._visible_rows(shard)
        if modality == "visual":
            return visible
        has_audio = self._columns(shard)["has_audio"]
        return has_audio if visible is None else has_audio & visible

    def _select(self, shards: Sequence[str] | None) -> list[_Shard]:
        if shards is None:
            return self.shards
        wanted = set(shards)
        return [s for s in self.shards if s.name in wanted]

    def count(self, modality: str, shards: Sequence[str] | None = None) -> int:
        """Rows iter_blocks yields for a modality: visible clips, for audio those with real audio.

        Answered from the catalog; only shards hiding duplicate copies are read.
        """
        return int(self.shard_counts(modality, shards).sum())

    def shard_counts(self, modality: str, shards: Sequence[str] | None = None) -> np.ndarray:
        """count() of each shard (in store order), in one pass over the shards."""
        check_modality(modality)
        return np.array(
            [
                (shard.rows if modality == "visual" else shard.summary.audio_rows)
                if not len(shard.hidden)
                else int(self._mask(shard, modality).sum())
                for shard in self._select(shards)
            ],
            np.int64,
        )

    def iter_blocks(
        self,
        modality: str,
        block_rows: int = 65_536,
        shards: Sequence[str] | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream (ids int64, vectors float32) blocks in id order; audio skips clips without audio,
        both skip hidden duplicate copies.

        Only one block is in memory at a time; `shards` limits the walk to those shard names.
        """
        check_modality(modality)
        for shard in self._select(shards):
            mask = self._mask(shard, modality)
            for start in range(0, shard.rows, block_rows):
                stop = min(start + block_rows, shard.rows)
                with self._reading(shard), h5py.File(shard.path, "r", locking=False) as h5:
                    vectors = h5[modality][start:stop].astype(np.float32)
                ids = np.arange(start, stop, dtype=np.int64) + shard.first_id
                if mask is not None:
                    keep = mask[start:stop]
                    vectors, ids = vectors[keep], ids[keep]
                self.blocks_read += 1
                self.max_block_rows = max(self.max_block_rows, stop - start)
                if len(ids):
                    yield ids, vectors

    def ids_at(self, modality: str, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """Clip ids of the rows at `positions` (0-based, in iter_blocks order) of a modality.

        Lets a caller draw random rows of a modality without reading any vector: only the small
        has_audio column of the shards involved is read (audio skips clips without audio).
        """
        pos = np.asarray(positions, dtype=np.int64)
        counts = self.shard_counts(modality)
        starts = np.concatenate([[0], np.cumsum(counts)])
        if len(pos) and (pos.min() < 0 or pos.max() >= starts[-1]):
            raise IndexError(f"{modality} row positions must lie in 0..{starts[-1] - 1}")
        where = np.searchsorted(starts, pos, side="right") - 1
        ids = np.empty(len(pos), np.int64)
        for s in np.unique(where):
            shard, sel = self.shards[s], where == s
            local = pos[sel] - starts[s]
            if modality == "audio":
                local = np.flatnonzero(self._columns(shard)["has_audio"])[local]
            ids[sel] = shard.first_id + local
        return ids

    def _locate(self, ids: np.ndarray) -> np.ndarray:
        """Shard index of each clip id; out-of-range ids are a user error."""
        ids = np.asarray(ids, dtype=np.int64)
        bad = (ids < 0) | (ids >= self.num_clips)
        if bad.any():
            raise AvindexError(
                f"{self.dir}: clip id {int(ids[bad][0])} out of range (store has "
                f"{self.num_clips} clips, ids 0..{self.num_clips - 1})"
            )
        return np.searchsorted(self._starts, ids, side="right") - 1

    def visible(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Whether each clip id is shown (False for a hidden duplicate copy of a video)."""
        ids = np.asarray(ids, dtype=np.int64)
        where = self._locate(ids)
        out = np.ones(len(ids), bool)
        for s in np.unique(where):
            mask = self._visible_rows(self.shards[s])
            if mask is not None:
                pos = np.nonzero(where == s)[0]
                out[pos] = mask[ids[pos] - self.shards[s].first_id]
        return out

    def vectors(self, ids: Sequence[int] | np.ndarray, modality: str) -> np.ndarray:
        """Vectors (len(ids), D) float32 of the given clip ids, in the order given."""
        ids = np.asarray(ids, dtype=np.int64)
        where = self._locate(ids)
        out = np.zeros((len(ids), self.meta.dim(check_modality(modality))), np.float32)
        for s in np.unique(where):
            shard = self.shards[s]
            pos = np.nonzero(where == s)[0]
            rows = ids[pos] - shard.first_id
            uniq, inverse = np.unique(rows, return_inverse=True)  # h5py wants increasing rows
            with self._reading(shard), h5py.File(shard.path, "r", locking=False) as h5:
                out[pos] = h5[modality][uniq].astype(np.float32)[inverse]
        return out

    def clips(self, ids: Sequence[int] | np.ndarray) -> list[ClipRef]:
        """ClipRef of each clip id, in the order given."""
        ids = np.asarray(ids, dtype=np.int64)
        where = self._locate(ids)
        refs = []
        for cid, s in zip(ids.tolist(), where.tolist(), strict=True):
            shard = self.shards[s]
            cols = self._columns(shard)
            row = cid - shard.first_id
            refs.append(
                ClipRef(
                    id=cid,
                    path=str(cols["paths"][cols["video"][row]]),
                    t0=float(cols["t0"][row]),
                    has_audio=bool(cols["has_audio"][row]),
                    shard=shard.name,
                )
            )
        return refs

    def clip(self, clip_id: int) -> ClipRef:
        """ClipRef of one clip id."""
        return self.clips([clip_id])[0]

    def videos(self) -> dict[VideoKey, VideoEntry]:
        """Union of all shards' videos tables keyed by (path, size, mtime); 'done' wins ties and
        among copies the first shard's (the shown one) wins. Answered from the catalog."""
        out: dict[VideoKey, VideoEntry] = {}
        for shard in self.shards:
            for entry in shard.summary.videos.entries(shard.name):
                if entry.key not in out or out[entry.key].status != "done":
                    out[entry.key] = entry
        return out


@dataclass(frozen=True)
class _RawRows:
    """A shard's vectors as raw bytes: every file offset viewed as the start of one row."""

    rows: np.ndarray  # (file size - row bytes + 1, row bytes) uint8 view of the mapped file
    offsets: np.ndarray  # byte offset of each chunk
    chunk_rows: int
    dtype: np.dtype


class RowReader:
    """Rows of one modality by clip id, gathered from read-only maps of the shards' raw data.

    `Store.vectors` opens each shard file per call (~0.3 ms a shard): re-ranking one query's
    candidates spread over many shards would cost milliseconds. HDF5 keeps uncompressed chunks
    as plain row-major bytes, so a row is one slice of a memory-mapped file; a dataset stored any
    other way (filters, missing chunks, offsets outside the file) is read through h5py instead.
    """

    def __init__(self, store: Store, modality: str) -> None:
        """Reader over `store`'s shards (in its id order); files are mapped on first use."""
        self.store = store
        self.modality = check_modality(modality)
        self._maps: dict[int, _RawRows | None] = {}

    def _map(self, s: int) -> _RawRows | None:
        """Shard `s` mapped as raw rows, or None when it must be read through h5py."""
        if s not in self._maps:
            self._maps[s] = self._layout(self.store.shards[s].path)
        return self._maps[s]

    def _layout(self, path: Path) -> _RawRows | None:
        with h5py.File(path, "r", locking=False) as h5:
            data = h5[self.modality]
            rows, dim = data.shape
            row_bytes = dim * data.dtype.itemsize
            if data.dtype.kind != "f" or data.dtype.byteorder == ">" or rows == 0:
                return None
            if data.chunks is None:
                offsets, chunk_rows = [data.id.get_offset()], rows
            elif data.id.get_create_plist().get_nfilters() or data.chunks[1:] != (dim,):
                return None
            else:
                chunk_rows = data.chunks[0]
                infos = [
                    data.id.get_chunk_info_by_coord((c, 0)) for c in range(0, rows, chunk_rows)
                ]
                offsets = [i.byte_offset if i.filter_mask == 0 else None for i in infos]
            dtype = data.dtype
        size = path.stat().st_size
        ends = [
            o + min(chunk_rows, rows - c * chunk_rows) * row_bytes
            for c, o in enumerate(offsets)
            if o is not None
        ]
        if len(ends) < len(offsets) or max(ends) > size:
            return None  # an unallocated or filtered chunk, or a damaged file: use h5py
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        # Every byte offset as the start of one row: rows at any offset are a single gather.
        rows_view = np.lib.stride_tricks.as_strided(
            raw, shape=(size - row_bytes + 1, row_bytes), strides=(1, 1), writeable=False
        )
        return _RawRows(rows_view, np.asarray(offsets, np.int64), chunk_rows, dtype)

    def __call__(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Vectors (len(ids), D) float32 of the given clip ids, in the order given."""
        ids = np.asarray(ids, dtype=np.int64)
        where = self.store._locate(ids)
        out = np.empty((len(ids), self.store.meta.dim(self.modality)), np.float32)
        for s in np.unique(where):
            sel = np.nonzero(where == s)[0]
            layout = self._map(int(s))
            if layout is None:
                out[sel] = self.store.vectors(ids[sel], self.modality)
                continue
            rows = ids[sel] - self.store.shards[s].first_id
            start = layout.offsets[rows // layout.chunk_rows]
            start += (rows % layout.chunk_rows) * layout.rows.shape[1]
            out[sel] = layout.rows[start].view(layout.dtype)
        return out


def clear_tmp(store_dir: str | os.PathLike[str], max_age: float = STALE_TMP_SECONDS) -> list[str]:
    """Remove leftover tmp files of dead writers (shards, catalog entries, claims); returns their
    paths relative to the store.

    Other writers may be busy in the same store, so a tmp is removed only when its writer was a
    process of this host that no longer runs, or when it is older than `max_age` seconds.
    """
    removed = []
    for tmp in tmp_files(store_dir):
        if stale_tmp(tmp, max_age):
            tmp.unlink(missing_ok=True)
            removed.append(str(tmp.relative_to(store_dir)))
    return removed


def tmp_files(store_dir: str | os.PathLike[str]) -> list[Path]:
    """Tmp files in a store's folders (shards, catalog entries, claims), live writers' too."""
    root = Path(store_dir)
    folders = [f for f in (root, root / CATALOG_DIR, root / CLAIMS_DIR) if f.is_dir()]
    return [tmp for folder in folders for tmp in sorted(folder.glob("*" + TMP_SUFFIX))]


__all__ = [
    "MODALITIES",
    "SHARD_GLOB",
    "ClipRef",
    "Store",
    "StoreMeta",
    "StoreWriter",
    "VideoEntry",
    "VideoKey",
    "VideoRecord",
    "check_modality",
    "clear_tmp",
    "tmp_files",
]
