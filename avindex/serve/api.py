"""The JSON/media API: search by upload or by stored clip, clip media, videos with range
requests, store facts, health and metrics (each response model documents itself in /docs)."""

# No `from __future__ import annotations`: FastAPI reads the route signatures at run time, and
# their limits (k <= max_k) come from the ServeConfig in build_router's scope.
import base64
import mimetypes
import os
import tempfile
import time
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, HTTPException, UploadFile
from fastapi import Query as Param
from fastapi.responses import FileResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field

from avindex.errors import AvindexError
from avindex.queries import Query, make_query
from avindex.search import Hit, Result
from avindex.serve.clipmedia import jpeg_bytes
from avindex.serve.state import ServeState
from avindex.serve.uploads import display_name, save_upload, too_long
from avindex.sheet import spectrogram_picture
from avindex.store import ClipRef

Kind = Literal["audio", "image", "video"]
Modality = Literal["visual", "audio"]
MEDIA_CACHE = {"Cache-Control": "private, max-age=86400"}  # a clip's media never changes
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class ErrorOut(BaseModel):
    """Every error: one line saying what was wrong and what to do."""

    error: str


class VideoRef(BaseModel):
    """A stored video as clients see it: an id for /api/videos/{id} and a display name."""

    id: str
    name: str


class ClipOut(BaseModel):
    """A stored clip and where to get its media."""

    clip: int = Field(description="Clip id (for 'more like this' and the media URLs).")
    video: VideoRef
    t0: float = Field(description="Start of the clip in its video, seconds.")
    has_audio: bool
    frame_url: str = Field(description="JPEG of the frame the clip was embedded with.")
    audio_url: str | None = Field(description="WAV of its second of sound with context.")
    spectrogram_url: str | None = Field(description="PNG spectrogram of its second of sound.")
    video_url: str = Field(description="The source video (supports HTTP range requests).")
    similar_url: str = Field(description="'More like this': GET with by, in and k.")


class HitOut(ClipOut):
    """One search result."""

    rank: int
    score: float = Field(description="Cosine similarity to the query.")


class QueryOut(BaseModel):
    """What was searched for, and how."""

    kind: str
    name: str = Field(description="The uploaded file's name, or 'clip N'.")
    at: float | None
    by: Modality = Field(description="Embedding of the query that was used.")
    searched: Modality = Field(description="Index searched (the 'in' parameter).")
    clip: ClipOut | None = Field(description="The stored clip of a 'more like this' query.")


class SearchOut(BaseModel):
    """A query's results, best first."""

    query: QueryOut
    hits: list[HitOut]
    picture: str | None = Field(
        description="With picture=true: the query's picture or spectrogram as a data: URL."
    )
    seconds: float = Field(description="Time the server took.")


class IndexOut(BaseModel):
    """One modality's faiss index."""

    factory: str
    count: int
    recall: dict[str, float] = Field(description="Recall measured when the index was built.")
    params: dict[str, int]


class InfoOut(BaseModel):
    """What the server searches."""

    store: str
    clips: int
    indexed_clips: int
    videos: int
    hop: float
    model: dict[str, str | float | int | None]
    indexes: dict[str, IndexOut]
    notes: list[str]
    limits: dict[str, int | float]


class VideoOut(VideoRef):
    """A stored video."""

    duration: float
    clips: int
    url: str


ERRORS: dict[int | str, dict] = {
    status: {"model": ErrorOut} for status in (400, 401, 404, 413, 416, 422)
}


def build_router(state: ServeState) -> APIRouter:
    """Every API route, answering from `state` (limits from its ServeConfig)."""
    router = APIRouter(responses=ERRORS)
    _search_routes(router, state)
    _media_routes(router, state)
    _facts_routes(router, state)
    return router


def _search_routes(router: APIRouter, state: ServeState) -> None:
    """Search by an uploaded sound, picture or video moment, and by a stored clip."""
    cfg = state.cfg
    KParam = Annotated[int, Param(ge=1, le=cfg.max_k, description="Results wanted.")]

    @router.post(
        "/api/search",
        response_model=SearchOut,
        max_body_size=cfg.max_upload_bytes,
        form_limits={"max_files": 1, "max_fields": 8, "max_part_size": 1024},
        summary="Search by an uploaded sound, picture or video moment",
    )
    def search_upload(
        file: Annotated[UploadFile, File(description="Sound, picture or video (any format).")],
        kind: Annotated[Kind, Form(description="audio, image, or video (with 'at').")],
        at: Annotated[float | None, Form(ge=0, description="Video: clip start, s.")] = None,
        by: Annotated[Modality | None, Form(description="Video: its picture or sound.")] = None,
        target: Annotated[
            Modality | None, Form(alias="in", description="Index searched (default: the other).")
        ] = None,
        k: Annotated[int, Form(ge=1, le=cfg.max_k)] = cfg.k,
        picture: Annotated[bool, Form(description="Return the query's own picture.")] = False,
    ) -> SearchOut:
        """Results for an uploaded query; 413 beyond the size or duration limit, 422 for media
        that cannot be used."""
        started = time.perf_counter()
        name = display_name(file.filename)
        with tempfile.TemporaryDirectory(prefix="avindex-upload-") as folder:
            path = save_upload(file.file, file.filename, Path(folder))
            try:
                over = too_long(path, kind, cfg.max_upload_seconds, state.searcher.sandbox())
            except AvindexError as exc:  # its demuxer crashed or hung in the child process
                raise HTTPException(422, f"{name}: {exc}") from None
            if over:
                limit = cfg.max_upload_seconds
                raise HTTPException(413, f"{name}: longer than {limit:g} s; cut the part to find")
            try:
                query = make_query({kind: str(path), "at": at, "by": by, "in": target})
            except AvindexError as exc:
                raise HTTPException(422, str(exc).replace(str(path), name)) from None
            result = state.search(query, k)
            if result.error is not None:
                raise HTTPException(422, result.error.replace(str(path), name))
            return _search_out(state, result, name, picture, started)

    @router.get(
        "/api/clips/{clip_id}/similar",
        response_model=SearchOut,
        summary="More like this: search by a stored clip",
    )
    def similar(
        clip_id: int,
        by: Annotated[Modality, Param(description="The clip's picture or sound.")] = "visual",
        target: Annotated[
            Modality | None, Param(alias="in", description="Index searched (default: the other).")
        ] = None,
        k: KParam = cfg.k,
        picture: bool = False,
    ) -> SearchOut:
        """Results for a stored clip's own embedding (422 e.g. for the sound of a silent clip)."""
        started = time.perf_counter()
        state.clip(clip_id)
        result = state.search(Query("clip", str(clip_id), by=by, target=target), k)
        if result.error is not None:
            raise HTTPException(422, result.error)
        return _search_out(state, result, f"clip {clip_id}", picture, started)


def _media_routes(router: APIRouter, state: ServeState) -> None:
    """A clip's facts, frame, sound and spectrogram; the store's videos, with range requests."""

    @router.get("/api/clips/{clip_id}", response_model=ClipOut, summary="A stored clip")
    def clip(clip_id: int) -> dict:
        """The clip's video, start time and media URLs."""
        return _clip_out(state, state.clip(clip_id))

    @router.get(
        "/api/clips/{clip_id}/frame.jpg",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}},
        summary="A clip's frame",
    )
    def frame(clip_id: int) -> Response:
        """JPEG of the frame nearest the clip's middle (the one it was embedded with)."""
        return Response(state.media_bytes(clip_id, "frame"), 200, MEDIA_CACHE, "image/jpeg")

    @router.get(
        "/api/clips/{clip_id}/audio.wav",
        response_class=Response,
        responses={200: {"content": {"audio/wav": {}}}},
        summary="A clip's sound",
    )
    def audio(clip_id: int) -> Response:
        """WAV of the clip's second of sound with a little context on either side."""
        return Response(state.media_bytes(clip_id, "audio"), 200, MEDIA_CACHE, "audio/wav")

    @router.get(
        "/api/clips/{clip_id}/spectrogram.png",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
        summary="A clip's spectrogram",
    )
    def spectrogram(clip_id: int) -> Response:
        """PNG spectrogram (low frequencies at the bottom) of the clip's second of sound."""
        return Response(state.media_bytes(clip_id, "spectrogram"), 200, MEDIA_CACHE, "image/png")

    @router.get("/api/videos", response_model=list[VideoOut], summary="The store's videos")
    def videos() -> list[dict]:
        """Every embedded video: id, display name, duration and clip count."""
        return [
            {
                "id": v.id,
                "name": v.name,
                "duration": v.duration,
                "clips": v.clips,
                "url": f"/api/videos/{v.id}",
            }
            for v in sorted(state.catalog.by_id.values(), key=lambda v: v.name)
        ]

    @router.get(
        "/api/videos/{video_id}",
        response_class=FileResponse,
        responses={200: {"content": {"video/mp4": {}}}, 206: {"description": "A byte range."}},
        summary="A source video",
    )
    def video(video_id: str) -> FileResponse:
        """The video file, with HTTP range requests (206) so players can seek."""
        found = state.video(video_id)
        if not os.path.isfile(found.path):
            raise HTTPException(404, f"{found.name}: the video file is gone from the server")
        kind = mimetypes.guess_type(found.path)[0] or "application/octet-stream"
        return FileResponse(found.path, media_type=kind, headers={"Cache-Control": "private"})


def _facts_routes(router: APIRouter, state: ServeState) -> None:
    """Store and index facts, health and Prometheus metrics."""
    cfg = state.cfg

    @router.get("/api/info", response_model=InfoOut, summary="Store and index facts")
    def info() -> dict:
        """Clips, videos, model, each index's factory and measured recall, notes and limits."""
        meta = state.store.meta
        indexes = {
            m: {
                "factory": e["factory"],
                "count": e["count"],
                "recall": {k: v for k, v in e.items() if k.startswith("recall_at_")},
                "params": e.get("params", {}),
            }
            for m, e in state.searcher.info["modalities"].items()
        }
        return {
            "store": state.searcher.dir.name,
            "clips": state.store.num_clips,
            "indexed_clips": int(state.searcher.info["num_clips"]),
            "videos": len(state.catalog),
            "hop": meta.hop,
            "model": _model_facts(meta.model_source, meta.model_config, meta.model_sha256),
            "indexes": indexes,
            # Notes name the store's folder; clients get its name only.
            "notes": [
                n.replace(str(state.searcher.dir), state.searcher.dir.name)
                for n in state.searcher.notes()
            ],
            "limits": {
                "max_upload_bytes": cfg.max_upload_bytes,
                "max_upload_seconds": cfg.max_upload_seconds,
                "k": cfg.k,
                "max_k": cfg.max_k,
            },
        }

    @router.get("/api/health", summary="Liveness")
    def health() -> dict:
        """200 with the clip count while the server answers."""
        return {"status": "ok", "clips": state.store.num_clips}

    @router.get(
        "/metrics",
        response_class=PlainTextResponse,
        summary="Prometheus metrics",
        responses={200: {"content": {PROMETHEUS_TEXT: {}}}},
    )
    def metrics() -> PlainTextResponse:
        """Requests by route and status, latency histograms, errors, store size."""
        gauges = {
            "clips": ("Clips in the store.", state.store.num_clips),
            "videos": ("Videos in the store.", len(state.catalog)),
        }
        return PlainTextResponse(state.metrics.render(gauges), media_type=PROMETHEUS_TEXT)


def _clip_out(state: ServeState, clip: ClipRef | Hit) -> dict:
    """A clip as the API shows it: video id and name, start, media URLs."""
    video = state.clip_video(clip)
    base = f"/api/clips/{clip.id}"
    return {
        "clip": clip.id,
        "video": {"id": video.id, "name": video.name},
        "t0": clip.t0,
        "has_audio": clip.has_audio,
        "frame_url": f"{base}/frame.jpg",
        "audio_url": f"{base}/audio.wav" if clip.has_audio else None,
        "spectrogram_url": f"{base}/spectrogram.png" if clip.has_audio else None,
        "video_url": f"/api/videos/{video.id}",
        "similar_url": f"{base}/similar",
    }


def _search_out(
    state: ServeState, result: Result, name: str, picture: bool, started: float
) -> SearchOut:
    """A search result as the API returns it."""
    q = result.query
    hits = [{**_clip_out(state, h), "rank": h.rank, "score": h.score} for h in result.hits]
    return SearchOut(
        query=QueryOut(
            kind=q.kind,
            name=name,
            at=q.at,
            by=q.modality,
            searched=q.searched,
            clip=_clip_out(state, result.clip) if result.clip is not None else None,
        ),
        hits=hits,
        picture=_picture(state, result) if picture else None,
        seconds=round(time.perf_counter() - started, 4),
    )


def _picture(state: ServeState, result: Result) -> str | None:
    """The query's picture (image or video frame) or spectrogram (sound) as a data: URL."""
    if result.frame is not None:
        picture = result.frame
    elif result.audio is not None:
        picture = spectrogram_picture(result.audio, state.audio_cfg)
    else:
        return None  # a stored clip: its frame_url / spectrogram_url show it
    return "data:image/jpeg;base64," + base64.b64encode(jpeg_bytes(picture)).decode("ascii")


def _model_facts(source: dict, config: dict, sha256: str) -> dict[str, str | float | int | None]:
    """The store's model as the page shows it (a checkpoint by file name, never its path)."""
    random = source.get("random")
    return {
        "source": "random (untrained)" if random else os.path.basename(source.get("path", "")),
        "head": config.get("head"),
        "width": config.get("width"),
        "embed_dim": config.get("embed_dim"),
        "sha256": sha256[:12],
    }
