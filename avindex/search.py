"""Search: encode queries (audio, image, video moment, clip id, vector) with the store's model,
search one modality's faiss index, and map the ids back to clips."""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from avindex.config import AudioConfig, SearchConfig, VideoConfig, from_dict
from avindex.errors import AvindexError
from avindex.store import MODALITIES

if TYPE_CHECKING:
    from avindex.index import LoadedIndex
    from avindex.model import Checkpoint
    from avindex.pipelines import Preprocessor
    from avindex.store import ClipRef, StoreMeta

KINDS = ("audio", "image", "video", "clip", "vector")
PATH_KINDS = ("audio", "image", "video", "vector")
# Queries that carry one modality are that modality; a video moment, a stored clip or a vector is
# queried by its picture unless --by says otherwise (so by default they behave like an image).
_NATIVE = {"audio": "audio", "image": "visual"}
DEFAULT_BY = "visual"


def other_modality(modality: str) -> str:
    """The modality that is not `modality` (cross-modal search target)."""
    return "audio" if modality == "visual" else "visual"


def _check_choice(flag: str, value: str | None) -> None:
    if value is not None and value not in MODALITIES:
        raise AvindexError(f"{flag} {value!r}: expected one of {', '.join(MODALITIES)}")


@dataclass(frozen=True)
class Query:
    """One query: its kind, value (path or clip id), --at (video), --by (its embedding), --in."""

    kind: str
    value: str
    at: float | None = None
    by: str | None = None
    target: str | None = None

    @property
    def modality(self) -> str:
        """The query's embedding: audio files audio, images visual, others --by (default visual)."""
        return self.by or _NATIVE.get(self.kind, DEFAULT_BY)

    @property
    def searched(self) -> str:
        """The index searched: --in, else the other modality (cross-modal)."""
        return self.target or other_modality(self.modality)

    def check(self) -> None:
        """Raise AvindexError for an inconsistent query (before any file is read)."""
        if self.kind not in KINDS:
            raise AvindexError(f"query kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        _check_choice("--by", self.by)
        _check_choice("--in", self.target)
        native = _NATIVE.get(self.kind)
        if self.by is not None and native is not None and self.by != native:
            raise AvindexError(f"--by {self.by}: an --{self.kind} query is {native}")
        if self.kind == "video" and self.at is None:
            raise AvindexError(f"--video {self.value}: needs --at SECONDS (the clip's start)")
        if self.kind != "video" and self.at is not None:
            raise AvindexError("--at: applies to --video queries only")
        if self.at is not None and not (self.at >= 0 and np.isfinite(self.at)):
            raise AvindexError(f"--at {self.at}: must be a time >= 0 seconds")
        if self.kind == "clip" and not self.value.lstrip("-").isdigit():
            raise AvindexError(f"--clip {self.value!r}: expected an integer clip id")

    def describe(self) -> str:
        """Short human description, e.g. 'video a.mp4 @ 3.0 s (visual)'."""
        name = os.path.basename(self.value) if self.kind in PATH_KINDS else self.value
        at = f" @ {self.at:g} s" if self.at is not None else ""
        return f"{self.kind} {name}{at} ({self.modality})"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        return {
            "kind": self.kind,
            "value": self.value,
            "at": self.at,
            "by": self.modality,
            "in": self.searched,
        }


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


def parse_batch(path: str | os.PathLike) -> list[Query | AvindexError]:
    """Queries of a batch file: JSON list of objects, or text lines of query flags.

    Text: one query per line in command-line form, e.g. `--audio dog.wav` or
    `--video a.mp4 --at 12 --in audio`; blank lines and `#` comments are skipped. JSON: a list of
    objects such as {"audio": "dog.wav"} or {"video": "a.mp4", "at": 12, "in": "audio"}.
    Relative paths are relative to the batch file's folder. A bad entry becomes an AvindexError in
    its place, so the rest of the batch still runs.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not a text file"
        raise AvindexError(f"{path}: cannot read batch file ({reason})") from None
    if text.lstrip().startswith("["):
        try:
            entries: list[Any] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AvindexError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        where = [f"{path} entry {i + 1}" for i in range(len(entries))]
    else:
        lines = [(n, ln.strip()) for n, ln in enumerate(text.splitlines(), 1)]
        kept = [(n, ln) for n, ln in lines if ln and not ln.startswith("#")]
        entries = [ln for _, ln in kept]
        where = [f"{path}:{n}" for n, _ in kept]
    out: list[Query | AvindexError] = []
    for entry, place in zip(entries, where, strict=True):
        try:
            fields = _flags(entry) if isinstance(entry, str) else _json_fields(entry)
            query = make_query(fields, base=path.parent)
        except AvindexError as exc:
            out.append(AvindexError(f"{place}: {exc}"))
        else:
            out.append(query)
    return out


def _flags(line: str) -> dict[str, Any]:
    """`--flag value` pairs of a text batch line."""
    try:
        tokens = shlex.split(line)
    except ValueError as exc:
        raise AvindexError(f"cannot split {line!r} ({exc})") from None
    if len(tokens) % 2 or not all(t.startswith("--") for t in tokens[::2]):
        raise AvindexError(f"{line!r}: expected '--flag value' pairs, e.g. --audio dog.wav")
    return {flag[2:]: value for flag, value in zip(tokens[::2], tokens[1::2], strict=True)}


def _json_fields(entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise AvindexError(f'expected an object such as {{"audio": "dog.wav"}}, got {entry!r}')
    return entry


def make_query(fields: dict[str, Any], base: Path | None = None) -> Query:
    """Query from flag names (audio|image|video|clip|vector, at, by, in); paths under `base`."""
    unknown = set(fields) - {*KINDS, "at", "by", "in"}
    if unknown:
        raise AvindexError(f"unknown query field(s) {', '.join(sorted(unknown))}")
    kinds = [k for k in KINDS if fields.get(k) is not None]
    if len(kinds) != 1:
        raise AvindexError(
            "give exactly one of --audio, --image, --video, --clip, --vector (or --batch FILE)"
        )
    kind = kinds[0]
    value = str(fields[kind])
    if kind in PATH_KINDS and base is not None and not os.path.isabs(value):
        value = str(base / value)
    at = fields.get("at")
    try:
        at = float(at) if at is not None else None
    except (TypeError, ValueError):
        raise AvindexError(f"--at {at!r}: expected seconds, e.g. 12.5") from None
    query = Query(kind, value, at, fields.get("by"), fields.get("in"))
    query.check()
    return query


def resolve_model(
    store_dir: str | os.PathLike, meta: StoreMeta, model: str | None, device: str
) -> Checkpoint:
    """The store's model: --model CKPT, else what the store records (checkpoint path or random
    model), checked by sha256 against the model the store was embedded with."""
    from avindex.model import load_checkpoint, random_checkpoint

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
    from avindex.media import clip_starts

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
    """An indexed store opened once; answers batches of queries with its model and indexes."""

    def __init__(
        self,
        store_dir: str | os.PathLike,
        model: str | None = None,
        cfg: SearchConfig | None = None,
    ) -> None:
        """Open the store in its index's id order (the index must exist and match the store)."""
        from avindex.index import indexed_store

        self.dir = Path(store_dir)
        if not self.dir.is_dir():
            raise AvindexError(f"{self.dir}: no such store directory; run `avindex embed` first")
        self.store, self.info = indexed_store(self.dir)
        self.meta = self.store.meta
        self.model_arg = model
        self.cfg = cfg or SearchConfig()
        self.audio_cfg = from_dict(AudioConfig, self.meta.audio_config)
        self.video_cfg = from_dict(VideoConfig, self.meta.video_config)
        self._checkpoint: Checkpoint | None = None
        self._prep: Preprocessor | None = None
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

    def checkpoint(self) -> Checkpoint:
        """The store's model on the torch device, loaded on first use (clip/vector need none)."""
        if self._checkpoint is None:
            from avindex.devices import resolve_device

            device = resolve_device(self.cfg.device)
            self._checkpoint = resolve_model(self.dir, self.meta, self.model_arg, device)
        return self._checkpoint

    def _preprocessor(self) -> Preprocessor:
        if self._prep is None:
            from avindex.pipelines import Preprocessor

            ckpt = self.checkpoint()
            self._prep = Preprocessor(
                ckpt.audio_cfg, ckpt.video_cfg, self.cfg.batch_size, device=ckpt.model.device.type
            )
        return self._prep

    def index(self, modality: str) -> LoadedIndex:
        """One modality's index, loaded on first use."""
        if modality not in self._indexes:
            from avindex.index import load_index

            self._indexes[modality] = load_index(self.dir, modality, self.cfg.device)
        return self._indexes[modality]

    def run(self, queries: Sequence[Query | AvindexError], k: int | None = None) -> list[Result]:
        """Answer every query; a bad one becomes a Result with its error, the rest still run."""
        k = self.cfg.k if k is None else k
        results = []
        for q in queries:
            if isinstance(q, AvindexError):
                results.append(Result(None, "invalid query", error=str(q)))
                continue
            try:
                results.append(self._gather(q))
            except AvindexError as exc:
                results.append(Result(q, q.describe(), error=str(exc)))
        self._encode([r for r in results if r.error is None and r.vector is None])
        self._search([r for r in results if r.error is None], k)
        return results

    def _gather(self, q: Query) -> Result:
        """Read a query's media (or stored vector) without the model; raises AvindexError."""
        from avindex.media import decode_audio, load_image

        q.check()
        result = Result(q, q.describe())
        if q.kind == "audio":
            samples = decode_audio(q.value, self.audio_cfg.sample_rate)
            result.audio = audio_windows(samples, self.audio_cfg, self.meta.hop)
        elif q.kind == "image":
            result.frame = load_image(q.value, self.video_cfg)
        elif q.kind == "video":
            result.frame, audio = self._moment(q)
            if q.modality == "audio":
                result.audio = audio[None, :]
        elif q.kind == "clip":
            result.clip = self.store.clip(int(q.value))
            if q.modality == "audio" and not result.clip.has_audio:
                raise AvindexError(f"--clip {q.value}: the clip has no audio; use --by visual")
            result.vector = self.store.vectors([result.clip.id], q.modality)[0]
        else:
            result.vector = self._load_vector(q)
        return result

    def _moment(self, q: Query) -> tuple[np.ndarray, np.ndarray]:
        """Frame and audio window of the clip at --at (checked against the video's length)."""
        from avindex.media import MediaError, clip_moment, probe, read_moments

        info = probe(q.value, self.audio_cfg.clip_seconds)
        if info.error:
            raise MediaError(f"{q.value}: {info.error}")
        last = info.duration - self.audio_cfg.clip_seconds
        if q.at > last + 1e-6:
            raise AvindexError(
                f"--at {q.at:g}: {q.value} is {info.duration:.2f} s long, so a clip starts at "
                f"0..{last:.2f} s"
            )
        moment = clip_moment(q.at, self.audio_cfg.clip_seconds)
        (data,) = read_moments(q.value, [moment], self.audio_cfg, self.video_cfg)
        if q.modality == "audio" and not data.has_audio:
            raise AvindexError(f"{q.value}: no audio at {q.at:g} s; use --by visual")
        return data.frame, data.audio

    def _load_vector(self, q: Query) -> np.ndarray:
        """A query vector from .npy: shape (D,) or (1, D) of the query modality's dim."""
        try:
            vec = np.load(q.value, allow_pickle=False)
        except FileNotFoundError:
            raise AvindexError(f"{q.value}: no such file") from None
        except (OSError, ValueError, EOFError) as exc:
            raise AvindexError(f"{q.value}: not a .npy array ({exc})") from None
        dim = self.meta.dim(q.modality)
        if vec.dtype.kind not in "fiu" or vec.shape not in ((dim,), (1, dim)):
            raise AvindexError(
                f"{q.value}: vector of shape {vec.shape}; expected ({dim},) or (1, {dim}), "
                f"the store's {q.modality} embedding size"
            )
        return vec.reshape(-1).astype(np.float32)

    def _encode(self, pending: list[Result]) -> None:
        """Embed the gathered media, batched through the preprocessor and model."""
        from avindex.index import normalize_rows

        visual = [r for r in pending if r.query.modality == "visual"]
        audio = [r for r in pending if r.query.modality == "audio"]
        if not pending:
            return
        # A wrong --model is the command's error, not one query's: it stops the whole run.
        model = self.checkpoint().model
        prep = self._preprocessor()
        if visual:
            with _group_errors(visual):
                vecs = self._batched([r.frame for r in visual], prep.frames, model.encode_visual)
                for r, v in zip(visual, vecs, strict=True):
                    r.vector = v
        if audio:
            with _group_errors(audio):
                windows = np.concatenate([r.audio for r in audio])
                vecs = self._batched(windows, prep.spectrograms, model.encode_audio)
                ends = np.cumsum([len(r.audio) for r in audio])
                # A long query is the mean of its clips' embeddings, re-normalised (cosine).
                means = np.stack([p.mean(axis=0) for p in np.split(vecs, ends[:-1])])
                for r, v in zip(audio, normalize_rows(means), strict=True):
                    r.vector = v

    def _batched(self, items: Any, prepare: Callable, encode: Callable) -> np.ndarray:
        """Run items through `prepare` then `encode` in batches of cfg.batch_size."""
        import torch

        device = self.checkpoint().model.device
        out = []
        for start in range(0, len(items), self.cfg.batch_size):
            x = prepare(items[start : start + self.cfg.batch_size])
            with torch.inference_mode():
                out.append(encode(x.to(device)).float().cpu().numpy())
        return np.concatenate(out)

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
        from avindex.index import search_vectors

        scores, ids = search_vectors(self.index(modality), np.stack([r.vector for r in group]), k)
        found = np.unique(ids[ids >= 0])
        refs = {ref.id: ref for ref in self.store.clips(found)}
        for r, row_scores, row_ids in zip(group, scores, ids, strict=True):
            r.hits = [
                Hit(rank, float(s), int(i), refs[i].path, refs[i].t0, refs[i].has_audio)
                for rank, (s, i) in enumerate(zip(row_scores, row_ids, strict=True), 1)
                if i >= 0
            ]


def search(
    store_dir: str | os.PathLike,
    queries: Sequence[Query | AvindexError],
    k: int | None = None,
    model: str | None = None,
    cfg: SearchConfig | None = None,
) -> list[Result]:
    """Answer queries against an indexed store (see Searcher)."""
    return Searcher(store_dir, model, cfg).run(queries, k)


__all__ = [
    "KINDS",
    "Hit",
    "Query",
    "Result",
    "Searcher",
    "audio_windows",
    "make_query",
    "other_modality",
    "parse_batch",
    "resolve_model",
    "search",
]
