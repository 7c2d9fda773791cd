"""Sharded HDF5 embedding store: shards written atomically, read in blocks, ids mapped to clips."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from avindex.config import EmbedConfig
from avindex.errors import AvindexError

if TYPE_CHECKING:
    import h5py

SCHEMA_VERSION = 1
SHARD_GLOB = "shard-*.h5"
TMP_SUFFIX = ".tmp"
MODALITIES = ("visual", "audio")
CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: large enough for fast block reads, small for random rows
STALE_TMP_SECONDS = 3600.0  # a foreign .tmp older than this belongs to a dead writer
_VIDEO_COLUMNS = ("path", "size", "mtime", "duration", "n_clips", "status", "error")


@dataclass(frozen=True)
class StoreMeta:
    """What all shards of one store must agree on: the model, its configs, dims and the clip hop."""

    model_sha256: str
    visual_dim: int
    audio_dim: int
    hop: float
    model_config: dict[str, Any] = field(default_factory=dict)
    audio_config: dict[str, Any] = field(default_factory=dict)
    video_config: dict[str, Any] = field(default_factory=dict)
    embed_config: dict[str, Any] = field(default_factory=dict)
    # How to get the model back for queries: {"path": checkpoint} or {"random": {...}}; search
    # checks the rebuilt model's sha256 against model_sha256, so this is a hint, not identity.
    model_source: dict[str, Any] = field(default_factory=dict)

    def dim(self, modality: str) -> int:
        """Embedding size of one modality."""
        return self.audio_dim if check_modality(modality) == "audio" else self.visual_dim

    def to_attrs(self) -> dict[str, Any]:
        """HDF5 attributes (configs as JSON strings)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "model_sha256": self.model_sha256,
            "visual_dim": self.visual_dim,
            "audio_dim": self.audio_dim,
            "hop": self.hop,
            "model_config": json.dumps(self.model_config),
            "audio_config": json.dumps(self.audio_config),
            "video_config": json.dumps(self.video_config),
            "embed_config": json.dumps(self.embed_config),
            "model_source": json.dumps(self.model_source),
        }

    @classmethod
    def from_attrs(cls, attrs: Any) -> StoreMeta:
        """Rebuild from a shard's HDF5 attributes."""
        return cls(
            model_sha256=str(attrs["model_sha256"]),
            visual_dim=int(attrs["visual_dim"]),
            audio_dim=int(attrs["audio_dim"]),
            hop=float(attrs["hop"]),
            model_config=json.loads(attrs["model_config"]),
            audio_config=json.loads(attrs["audio_config"]),
            video_config=json.loads(attrs["video_config"]),
            embed_config=json.loads(attrs["embed_config"]),
            model_source=json.loads(attrs.get("model_source", "{}")),
        )

    def mismatch(self, other: StoreMeta) -> str | None:
        """Why `other` cannot share a store with this meta, or None when compatible."""
        for name in ("model_sha256", "visual_dim", "audio_dim", "hop"):
            if getattr(self, name) != getattr(other, name):
                return f"{name} {getattr(other, name)!r} != {getattr(self, name)!r}"
        return None


@dataclass(frozen=True)
class VideoRecord:
    """A source video as the store identifies it: resolved path, size and mtime (resume key)."""

    path: str
    size: int
    mtime: float
    duration: float

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], duration: float) -> VideoRecord:
        """Record for a file on disk (absolute resolved path, current size and mtime)."""
        resolved = Path(path).resolve()
        st = resolved.stat()
        return cls(str(resolved), int(st.st_size), float(st.st_mtime), float(duration))

    @property
    def key(self) -> tuple[str, int, float]:
        """Resume key: a file whose size or mtime changed is embedded again."""
        return (self.path, self.size, self.mtime)


@dataclass(frozen=True)
class VideoEntry(VideoRecord):
    """One row of a shard's videos table: the record plus what embedding made of it."""

    n_clips: int
    status: str  # 'done' | 'failed'
    error: str
    shard: str


@dataclass(frozen=True)
class ClipRef:
    """Where a clip id points: its video, start time, whether real audio was present, its shard."""

    id: int
    path: str
    t0: float
    has_audio: bool
    shard: str


def check_modality(modality: str) -> str:
    """Validate a modality name ('visual' or 'audio')."""
    if modality not in MODALITIES:
        raise AvindexError(f"modality {modality!r}: expected one of {', '.join(MODALITIES)}")
    return modality


def _chunk_rows(n: int, row_bytes: int) -> int:
    """Rows per chunk so one chunk is about CHUNK_BYTES, never more than the dataset holds."""
    return max(1, min(n, CHUNK_BYTES // max(1, row_bytes)))


def _write_rows(h5: h5py.File, name: str, data: np.ndarray) -> None:
    """Write a dataset chunked by rows when it is not empty (HDF5 cannot chunk zero rows)."""
    if len(data) == 0:
        h5.create_dataset(name, data=data)
        return
    row_bytes = data.itemsize * int(np.prod(data.shape[1:], dtype=np.int64))
    chunks = (_chunk_rows(len(data), row_bytes), *data.shape[1:])
    h5.create_dataset(name, data=data, chunks=chunks)


def _fsync_path(path: Path) -> None:
    """Flush a file or directory to disk so a rename after it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StoreWriter:
    """Buffers whole videos and writes them as immutable shards (tmp file + atomic rename)."""

    def __init__(
        self,
        store_dir: str | os.PathLike[str],
        meta: StoreMeta,
        shard_clips: int = EmbedConfig.shard_clips,
        shard_seconds: float = EmbedConfig.shard_seconds,
    ) -> None:
        """Open `store_dir` (created if missing) for writing; refuses a store of another model."""
        self.dir = Path(store_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.shard_clips = shard_clips
        self.shard_seconds = shard_seconds
        self.shards_written: list[str] = []
        existing = sorted(self.dir.glob(SHARD_GLOB))
        if existing:
            _check_compatible(meta, existing[0])
        self._host = _host_tag()
        self._write_failed = False
        self._reset()

    def _reset(self) -> None:
        self._videos: list[tuple[VideoRecord, int, str, str]] = []  # record, n_clips, status, error
        self._rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
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
        self._videos.append((record, n, "done", ""))
        self._rows.append(
            (
                visual.astype(np.float16),
                audio.astype(np.float16),
                np.asarray(has_audio, dtype=bool),
                np.asarray(t0, dtype=np.float32),
            )
        )
        self._n_rows += n
        self._after_add()

    def add_failure(self, record: VideoRecord, reason: str) -> None:
        """Record a video that could not be embedded, with its one-line reason."""
        self._videos.append((record, 0, "failed", reason))
        self._rows.append(
            (
                np.zeros((0, self.meta.visual_dim), np.float16),
                np.zeros((0, self.meta.audio_dim), np.float16),
                np.zeros(0, bool),
                np.zeros(0, np.float32),
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
        """Write the buffered videos as one shard now; returns its file name (None if empty)."""
        if not self._videos:
            return None
        name = f"shard-{time.time_ns():020d}-{self._host}-{os.getpid()}-{uuid.uuid4().hex[:8]}.h5"
        final = self.dir / name
        tmp = self.dir / (name + TMP_SUFFIX)
        try:
            self._write_shard(tmp)
            _fsync_path(tmp)
            os.replace(tmp, final)
        except OSError as exc:
            self._write_failed = True  # close() must not retry and bury this error
            raise AvindexError(
                f"{self.dir}: cannot write a shard ({exc.strerror or exc}); free space or fix "
                "permissions and run again: finished shards are kept and resume skips them"
            ) from exc
        finally:
            if tmp.exists():
                tmp.unlink()
        _fsync_path(self.dir)
        self.shards_written.append(name)
        self._reset()
        return name

    def _write_shard(self, path: Path) -> None:
        import h5py

        video_ids = np.concatenate(
            [np.full(len(r[3]), i, np.int32) for i, r in enumerate(self._rows)]
        )
        with h5py.File(path, "w") as h5:
            for key, value in self.meta.to_attrs().items():
                h5.attrs[key] = value
            h5.attrs["writer"] = f"{self._host}:{os.getpid()}"
            h5.attrs["created"] = time.time()
            for col, name in enumerate(("visual", "audio", "has_audio", "t0")):
                _write_rows(h5, name, np.concatenate([r[col] for r in self._rows]))
            _write_rows(h5, "video", video_ids)
            table = h5.create_group("videos")
            str_type = h5py.string_dtype("utf-8")
            recs = self._videos
            table.create_dataset("path", data=[r.path for r, *_ in recs], dtype=str_type)
            table.create_dataset("size", data=np.array([r.size for r, *_ in recs], np.int64))
            table.create_dataset("mtime", data=np.array([r.mtime for r, *_ in recs], np.float64))
            table.create_dataset(
                "duration", data=np.array([r.duration for r, *_ in recs], np.float64)
            )
            table.create_dataset("n_clips", data=np.array([x[1] for x in recs], np.int64))
            table.create_dataset("status", data=[x[2] for x in recs], dtype=str_type)
            table.create_dataset("error", data=[x[3] for x in recs], dtype=str_type)

    def close(self) -> None:
        """Flush whatever is buffered (whole videos only), unless writing already failed."""
        if not self._write_failed:
            self.flush()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        # Buffered entries are complete videos, so they are kept even when the caller failed.
        self.close()


def _read_meta(path: Path) -> StoreMeta:
    import h5py

    with h5py.File(path, "r", locking=False) as h5:
        version = int(h5.attrs.get("schema_version", -1))
        if version > SCHEMA_VERSION or version < 1:
            raise AvindexError(
                f"{path}: store schema {version}, this avindex reads {SCHEMA_VERSION}; "
                "upgrade avindex or embed again"
            )
        return StoreMeta.from_attrs(h5.attrs)


def _check_compatible(meta: StoreMeta, shard: Path) -> None:
    try:
        other = _read_meta(shard)
    except (OSError, KeyError):
        return  # an unreadable shard is reported by Store, it says nothing about compatibility
    why = other.mismatch(meta)
    if why:
        raise AvindexError(
            f"{shard.parent}: store was embedded with another model or settings ({why}); "
            "use a new --store directory or remove the old shards"
        )


@dataclass
class _Shard:
    name: str
    path: Path
    rows: int
    first_id: int
    meta: StoreMeta
    _cols: dict[str, np.ndarray] | None = None


class Store:
    """Read-only view of a store directory; clip ids are global rows, shards in `shard_order`."""

    def __init__(
        self, store_dir: str | os.PathLike[str], shard_order: Sequence[str] | None = None
    ) -> None:
        """Open the complete shards of `store_dir`; `shard_order` fixes the id order of known ones.

        Shards named in `shard_order` come first in that order (an index records it, so ids never
        shift); other shards follow sorted by name (= creation time). Unreadable shards are listed
        in `warnings` and skipped.
        """
        self.dir = Path(store_dir)
        if not self.dir.is_dir():
            raise AvindexError(f"{self.dir}: no such store directory; run `avindex embed` first")
        self.warnings: list[str] = []
        self.blocks_read = 0  # blocks served by iter_blocks; tests use it to check streaming
        self.max_block_rows = 0
        names = sorted(p.name for p in self.dir.glob(SHARD_GLOB))
        ordered = list(shard_order or [])
        missing = [n for n in ordered if n not in names]
        if missing:
            raise AvindexError(
                f"{self.dir}: shard {missing[0]} is missing ({len(missing)} in all); "
                "rebuild the index with `avindex index`"
            )
        known = set(ordered)
        ordered += [n for n in names if n not in known]
        self.shards: list[_Shard] = []
        first = 0
        for name in ordered:
            path = self.dir / name
            try:
                meta, rows = self._open_shard(path)
            except (OSError, KeyError, ValueError) as exc:
                if name in known:
                    raise AvindexError(
                        f"{path}: indexed shard is unreadable ({exc}); rebuild the index"
                    ) from exc
                self.warnings.append(f"{path}: unreadable shard skipped ({exc})")
                continue
            if self.shards:
                why = self.shards[0].meta.mismatch(meta)
                if why:
                    raise AvindexError(
                        f"{path}: shard does not match the rest of the store ({why}); "
                        "move it to its own store directory"
                    )
            self.shards.append(_Shard(name, path, rows, first, meta))
            first += rows
        self.num_clips = first
        self._starts = np.array([s.first_id for s in self.shards], np.int64)

    @staticmethod
    def _open_shard(path: Path) -> tuple[StoreMeta, int]:
        import h5py

        meta = _read_meta(path)
        with h5py.File(path, "r", locking=False) as h5:
            return meta, int(h5["visual"].shape[0])

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

    def _columns(self, shard: _Shard) -> dict[str, np.ndarray]:
        """Small per-clip columns and the videos table of a shard, read once and cached."""
        if shard._cols is None:
            import h5py

            with h5py.File(shard.path, "r", locking=False) as h5:
                shard._cols = {
                    "video": h5["video"][:],
                    "t0": h5["t0"][:],
                    "has_audio": h5["has_audio"][:],
                    "paths": np.array(h5["videos/path"].asstr()[:], dtype=object),
                }
        return shard._cols

    def _select(self, shards: Sequence[str] | None) -> list[_Shard]:
        if shards is None:
            return self.shards
        wanted = set(shards)
        return [s for s in self.shards if s.name in wanted]

    def count(self, modality: str, shards: Sequence[str] | None = None) -> int:
        """Rows iter_blocks yields for a modality: all clips, or for audio those with real audio."""
        chosen = self._select(shards)
        if check_modality(modality) == "visual":
            return sum(s.rows for s in chosen)
        return sum(int(self._columns(s)["has_audio"].sum()) for s in chosen)

    def iter_blocks(
        self,
        modality: str,
        block_rows: int = 65_536,
        shards: Sequence[str] | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream (ids int64, vectors float32) blocks in id order; audio skips clips without audio.

        Only one block is in memory at a time; `shards` limits the walk to those shard names.
        """
        import h5py

        check_modality(modality)
        for shard in self._select(shards):
            mask = self._columns(shard)["has_audio"] if modality == "audio" else None
            with h5py.File(shard.path, "r", locking=False) as h5:
                data = h5[modality]
                for start in range(0, shard.rows, block_rows):
                    stop = min(start + block_rows, shard.rows)
                    vectors = data[start:stop].astype(np.float32)
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
        counts = np.array([self.count(modality, [s.name]) for s in self.shards], np.int64)
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

    def vectors(self, ids: Sequence[int] | np.ndarray, modality: str) -> np.ndarray:
        """Vectors (len(ids), D) float32 of the given clip ids, in the order given."""
        import h5py

        ids = np.asarray(ids, dtype=np.int64)
        where = self._locate(ids)
        out = np.zeros((len(ids), self.meta.dim(check_modality(modality))), np.float32)
        for s in np.unique(where):
            shard = self.shards[s]
            pos = np.nonzero(where == s)[0]
            rows = ids[pos] - shard.first_id
            uniq, inverse = np.unique(rows, return_inverse=True)  # h5py wants increasing rows
            with h5py.File(shard.path, "r", locking=False) as h5:
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

    def videos(self) -> dict[tuple[str, int, float], VideoEntry]:
        """Union of all shards' videos tables keyed by (path, size, mtime); 'done' wins ties."""
        import h5py

        out: dict[tuple[str, int, float], VideoEntry] = {}
        for shard in self.shards:
            with h5py.File(shard.path, "r", locking=False) as h5:
                table = h5["videos"]
                cols = {
                    c: table[c].asstr()[:] if c in ("path", "status", "error") else table[c][:]
                    for c in _VIDEO_COLUMNS
                }
            for i in range(len(cols["path"])):
                entry = VideoEntry(
                    path=str(cols["path"][i]),
                    size=int(cols["size"][i]),
                    mtime=float(cols["mtime"][i]),
                    duration=float(cols["duration"][i]),
                    n_clips=int(cols["n_clips"][i]),
                    status=str(cols["status"][i]),
                    error=str(cols["error"][i]),
                    shard=shard.name,
                )
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
        import h5py

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
    """Remove leftover shard .tmp files of dead writers; returns the names removed.

    Other writers may be busy in the same store, so a .tmp is removed only when its writer was a
    process of this host that no longer runs, or when it is older than `max_age` seconds.
    """
    host = _host_tag()
    removed = []
    for tmp in Path(store_dir).glob(SHARD_GLOB + TMP_SUFFIX):
        parts = tmp.name.split("-")  # shard-<time>-<host>-<pid>-<uuid>.h5.tmp
        try:
            stale = time.time() - tmp.stat().st_mtime > max_age
            dead = len(parts) == 5 and parts[2] == host and not _pid_alive(int(parts[3]))
        except (OSError, ValueError):
            continue
        if stale or dead:
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return removed


def _host_tag() -> str:
    """Host name without '-' so shard names split cleanly into their parts."""
    return socket.gethostname().replace("-", "_").replace("/", "_") or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
