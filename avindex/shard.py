"""The shard file format: one immutable HDF5 file of clip rows and their videos table.

Writes a shard, summarises it (meta, row counts, videos table: what the catalog keeps) with every
check that needs only the header and the small columns, and verifies it completely.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from avindex.durable import WriterId
from avindex.errors import AvindexError

SCHEMA_VERSION = 1
SHARD_GLOB = "shard-*.h5"
MODALITIES = ("visual", "audio")
CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: large enough for fast block reads, small for random rows
VERIFY_ROWS = 65_536  # rows per read when verifying a shard completely
VIDEO_COLUMNS = ("path", "size", "mtime", "duration", "n_clips", "status", "error")
STATUSES = ("done", "failed")
# What h5py raises for damaged files: truncated (OSError), missing objects (KeyError), bad
# attributes or strings (ValueError, TypeError), broken trees or chunks (RuntimeError, IndexError).
READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError)
# Row datasets: name -> dtype kinds accepted (f float, b bool, i/u integer).
_ROW_KINDS = {"visual": "f", "audio": "f", "has_audio": "b", "t0": "f", "video": "iu"}
_COLUMN_KINDS = {"size": "iu", "mtime": "f", "duration": "f", "n_clips": "iu"}


VideoKey = tuple[str, int, float]  # VideoRecord.key: (path, size, mtime)


class ShardError(Exception):
    """Why a shard cannot be used, in one line."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (h5py messages may span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def check_modality(modality: str) -> str:
    """Validate a modality name ('visual' or 'audio')."""
    if modality not in MODALITIES:
        raise AvindexError(f"modality {modality!r}: expected one of {', '.join(MODALITIES)}")
    return modality


_COMPAT_FIELDS = ("model_sha256", "visual_dim", "audio_dim", "hop")


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
    preset: str | None = None  # the model's preset (None: unknown, e.g. an older store)

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
            "preset": self.preset or "",
        }

    @classmethod
    def from_attrs(cls, attrs: Any) -> StoreMeta:
        """Rebuild from a shard's HDF5 attributes (or the same dict read back from JSON)."""
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
            preset=str(attrs.get("preset", "")) or None,
        )

    def fingerprint(self) -> str:
        """Short digest of every attribute: shards of one run share it, the catalog stores it."""
        text = json.dumps(self.to_attrs(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def compat_key(self) -> tuple:
        """What shards sharing a store must agree on (model, dimensions, hop)."""
        return tuple(getattr(self, name) for name in _COMPAT_FIELDS)

    def mismatch(self, other: StoreMeta) -> str | None:
        """Why `other` cannot share a store with this meta, or None when compatible."""
        for name in _COMPAT_FIELDS:
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
    def key(self) -> VideoKey:
        """Resume key: a file whose size or mtime changed is embedded again."""
        return (self.path, self.size, self.mtime)


@dataclass(frozen=True)
class VideoEntry(VideoRecord):
    """One row of a shard's videos table: the record plus what embedding made of it."""

    n_clips: int
    status: str  # 'done' | 'failed'
    error: str
    shard: str


@dataclass
class BufferedVideo:
    """One video waiting in a writer for its shard: the record, its outcome and its clip rows."""

    record: VideoRecord
    status: str
    error: str
    visual: np.ndarray
    audio: np.ndarray
    has_audio: np.ndarray
    t0: np.ndarray

    @property
    def n_clips(self) -> int:
        """Clips (rows) of this video."""
        return len(self.t0)


@dataclass(frozen=True)
class VideoTable:
    """A shard's videos table as plain columns (one list per column, one item per video)."""

    path: list[str]
    size: list[int]
    mtime: list[float]
    duration: list[float]
    n_clips: list[int]
    status: list[str]
    error: list[str]

    def __len__(self) -> int:
        return len(self.path)

    def keys(self) -> Iterator[VideoKey]:
        """The resume key of each video, in table order."""
        return zip(self.path, self.size, self.mtime, strict=True)

    def entries(self, shard: str) -> list[VideoEntry]:
        """The table as VideoEntry rows of shard `shard`."""
        return [
            VideoEntry(p, s, m, d, n, st, e, shard)
            for p, s, m, d, n, st, e in zip(*self.columns(), strict=True)
        ]

    def columns(self) -> list[list[Any]]:
        """Columns in VIDEO_COLUMNS order."""
        return [getattr(self, c) for c in VIDEO_COLUMNS]

    @classmethod
    def from_columns(cls, columns: dict[str, Any]) -> VideoTable:
        """Table from columns of any sequence type, converted to plain Python values and checked:
        equal lengths, known statuses; raises ValueError/TypeError/KeyError when they are not."""
        table = cls(
            path=list(map(str, columns["path"])),
            size=list(map(int, columns["size"])),
            mtime=list(map(float, columns["mtime"])),
            duration=list(map(float, columns["duration"])),
            n_clips=list(map(int, columns["n_clips"])),
            status=list(map(str, columns["status"])),
            error=list(map(str, columns["error"])),
        )
        lengths = {len(c) for c in table.columns()}
        if len(lengths) > 1:
            raise ValueError(f"videos table columns differ in length {sorted(lengths)}")
        bad = set(table.status) - set(STATUSES)
        if bad:
            raise ValueError(f"videos table has unknown status {sorted(bad)[0]!r}")
        return table


@dataclass(frozen=True)
class ShardSummary:
    """What the store needs to know of a shard without reading its rows."""

    meta: StoreMeta
    rows: int
    audio_rows: int  # rows with real audio (what an audio index holds)
    videos: VideoTable


def new_shard_name(writer: WriterId) -> str:
    """A shard name no other writer uses; names sort by creation time."""
    return f"shard-{time.time_ns():020d}-{writer.tag}-{uuid.uuid4().hex[:8]}.h5"


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


def write_shard(
    path: Path, meta: StoreMeta, videos: Sequence[BufferedVideo], writer: WriterId
) -> ShardSummary:
    """Write `videos` (in order, rows concatenated) as a shard at `path`; returns its summary."""
    table = VideoTable.from_columns(
        {
            "path": [v.record.path for v in videos],
            "size": [v.record.size for v in videos],
            "mtime": [v.record.mtime for v in videos],
            "duration": [v.record.duration for v in videos],
            "n_clips": [v.n_clips for v in videos],
            "status": [v.status for v in videos],
            "error": [v.error for v in videos],
        }
    )
    has_audio = np.concatenate([v.has_audio for v in videos]).astype(bool)
    with h5py.File(path, "w") as h5:
        for key, value in meta.to_attrs().items():
            h5.attrs[key] = value
        h5.attrs["writer"] = writer.tag
        h5.attrs["created"] = time.time()
        _write_rows(h5, "visual", np.concatenate([v.visual for v in videos]).astype(np.float16))
        _write_rows(h5, "audio", np.concatenate([v.audio for v in videos]).astype(np.float16))
        _write_rows(h5, "has_audio", has_audio)
        _write_rows(h5, "t0", np.concatenate([v.t0 for v in videos]).astype(np.float32))
        video_ids = [np.full(v.n_clips, i, np.int32) for i, v in enumerate(videos)]
        _write_rows(h5, "video", np.concatenate(video_ids))
        group = h5.create_group("videos")
        str_type = h5py.string_dtype("utf-8")
        group.create_dataset("path", data=table.path, dtype=str_type)
        group.create_dataset("size", data=np.array(table.size, np.int64))
        group.create_dataset("mtime", data=np.array(table.mtime, np.float64))
        group.create_dataset("duration", data=np.array(table.duration, np.float64))
        group.create_dataset("n_clips", data=np.array(table.n_clips, np.int64))
        group.create_dataset("status", data=table.status, dtype=str_type)
        group.create_dataset("error", data=table.error, dtype=str_type)
    return ShardSummary(meta, len(has_audio), int(has_audio.sum()), table)


def read_meta(h5: h5py.File, path: Path) -> StoreMeta:
    """A shard's meta; a schema this version cannot read is a user error (upgrade avindex)."""
    version = int(h5.attrs.get("schema_version", -1))
    if version > SCHEMA_VERSION:
        raise AvindexError(
            f"{path}: store schema {version}, this avindex reads {SCHEMA_VERSION}; "
            "upgrade avindex or embed again"
        )
    if version < 1:
        raise ShardError(f"no valid schema_version attribute ({version})")
    return StoreMeta.from_attrs(h5.attrs)


def _open(path: Path) -> h5py.File:
    return h5py.File(path, "r", locking=False)


def summarize(path: Path) -> ShardSummary:
    """Summary of a shard after every check that reads only the header and the small columns
    (shapes, dtypes, dims vs meta, video ids vs the videos table); raises ShardError."""
    try:
        with _open(path) as h5:
            return _summarize(h5, path)
    except READ_ERRORS as exc:
        raise ShardError(one_line(exc)) from exc


def _summarize(h5: h5py.File, path: Path) -> ShardSummary:
    meta = read_meta(h5, path)
    rows = int(h5["visual"].shape[0]) if h5["visual"].ndim else -1
    shapes = {
        "visual": (rows, meta.visual_dim),
        "audio": (rows, meta.audio_dim),
        "has_audio": (rows,),
        "t0": (rows,),
        "video": (rows,),
    }
    for name, shape in shapes.items():
        data = h5[name]
        if data.shape != shape:
            raise ShardError(f"dataset {name} has shape {data.shape}, expected {shape}")
        if data.dtype.kind not in _ROW_KINDS[name]:
            raise ShardError(f"dataset {name} has dtype {data.dtype}")
    group = h5["videos"]
    for name, kinds in _COLUMN_KINDS.items():
        if group[name].dtype.kind not in kinds or group[name].ndim != 1:
            raise ShardError(f"dataset videos/{name} has dtype {group[name].dtype}")
    for name in ("path", "status", "error"):
        _check_strings(group[name], path)
    columns = {c: group[c].asstr()[:] for c in ("path", "status", "error")}
    columns.update({c: group[c][:] for c in _COLUMN_KINDS})
    table = VideoTable.from_columns(columns)
    video = h5["video"][:]
    if len(video) and (video.min() < 0 or video.max() >= len(table)):
        raise ShardError(f"video ids outside the videos table (0..{len(table) - 1})")
    counts = np.bincount(video, minlength=len(table)).tolist()
    if counts != table.n_clips:
        raise ShardError("videos table n_clips does not match the rows of each video")
    if any(n and s != "done" for n, s in zip(counts, table.status, strict=True)):
        raise ShardError("a failed video has rows")
    return ShardSummary(meta, rows, int(h5["has_audio"][:].sum()), table)


# On-disk header of one variable-length string: its length, then the global heap object holding it.
_VLEN_HEADER = np.dtype([("length", "<u4"), ("heap", "<u8"), ("index", "<u4")])


def _check_strings(data: h5py.Dataset, path: Path) -> None:
    """Refuse a string dataset whose headers claim more bytes than the file holds: HDF5 would
    allocate every claimed length (up to 4 GiB a string) before it failed. Applies to the
    contiguous layout avindex writes; other layouts are left to HDF5."""
    if data.dtype.kind != "O" or data.ndim != 1:
        raise ShardError(f"dataset {data.name} is not a list of strings")
    offset = data.id.get_offset()
    if offset is None or data.id.get_storage_size() != data.shape[0] * _VLEN_HEADER.itemsize:
        return
    size = path.stat().st_size
    with open(path, "rb") as fh:
        fh.seek(offset)
        raw = fh.read(data.shape[0] * _VLEN_HEADER.itemsize)
    headers = np.frombuffer(raw, _VLEN_HEADER, count=len(raw) // _VLEN_HEADER.itemsize)
    used = headers["length"] > 0
    if (
        len(headers) != data.shape[0]
        or int(headers["length"].sum(dtype=np.uint64)) > size
        or (headers["heap"][used] >= size).any()
    ):
        raise ShardError(f"dataset {data.name} is damaged (strings outside the file)")


def verify_reading(path: Path) -> Iterator[int]:
    """Read every row of every dataset of a shard, block by block: yields the rows read after each
    block (a stall timer watching it sees a big shard on a slow disk progress) and returns the
    shard's summary; raises ShardError."""
    try:
        with _open(path) as h5:
            summary = _summarize(h5, path)
            for name in _ROW_KINDS:
                data = h5[name]
                for start in range(0, summary.rows, VERIFY_ROWS):
                    block = data[start : start + VERIFY_ROWS]
                    if name == "t0" and not np.isfinite(block).all():
                        raise ShardError("dataset t0 holds values that are not finite")
                    yield start + len(block)
            return summary
    except READ_ERRORS as exc:
        raise ShardError(one_line(exc)) from exc
