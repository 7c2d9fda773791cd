"""Search queries: what a query is (a sound, picture, video moment, stored clip or vector; the
embedding it is searched by and the index it searches) and how batch files of queries are read."""

from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avindex.errors import AvindexError
from avindex.store import MODALITIES

KINDS = ("audio", "image", "video", "clip", "vector")
PATH_KINDS = ("audio", "image", "video", "vector")
# Queries that carry one modality are that modality; a video moment, a stored clip or a vector is
# queried by its picture unless --by says otherwise (so by default they behave like an image).
_NATIVE = {"audio": "audio", "image": "visual"}
DEFAULT_BY = "visual"
MAX_CLIP_ID = 2**63  # clip ids are int64 rows


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
        if self.at is not None and not (self.at >= 0 and math.isfinite(self.at)):
            raise AvindexError(f"--at {self.at}: must be a time >= 0 seconds")
        if self.kind == "clip" and not (self.value.isdigit() and int(self.value) < MAX_CLIP_ID):
            raise AvindexError(f"--clip {self.value!r}: expected a clip id from 0 to 2^63 - 1")

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
            entries: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AvindexError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
        except RecursionError:
            raise AvindexError(f"{path}: JSON nested too deeply to be a list of queries") from None
        if not isinstance(entries, list):
            raise AvindexError(
                f'{path}: expected a JSON list of queries like [{{"audio": "a.wav"}}]'
            )
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


__all__ = [
    "KINDS",
    "PATH_KINDS",
    "Query",
    "make_query",
    "other_modality",
    "parse_batch",
]
