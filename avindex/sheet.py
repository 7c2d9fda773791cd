"""Contact sheets: each query's picture (image, frame or spectrogram) beside its results' frames,
captioned with rank, score, file and time, because people judge search results by looking."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from avindex.config import AudioConfig, VideoConfig
from avindex.decode import clip_moment, read_moments
from avindex.errors import AvindexError
from avindex.media import MediaError
from avindex.pipelines import reference_log_spectrograms

if TYPE_CHECKING:
    from avindex.search import Result  # search draws sheets through the CLI, not the reverse

TILE_W, TILE_H = 192, 144
LINE_H = 15  # caption line height at FONT_SIZE
CAPTION_LINES = 3
PAD = 8
FONT_SIZE = 12
BACKGROUND = (28, 28, 30)
TEXT = (236, 236, 236)
MUTED = (150, 150, 155)
QUERY_FRAME = (255, 196, 0)  # the query tile gets a coloured border so rows read left to right
SPEC_SECONDS = 4  # at most this many clip windows drawn in an audio query's spectrogram
SPEC_RANGE_DB = 80.0  # dynamic range shown below the loudest bin
# Dark-to-bright colour ramp (black, purple, orange, pale yellow) for spectrogram pictures.
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]])


def sheet_size(rows: int, cols: int) -> tuple[int, int]:
    """(width, height) in pixels of a sheet with `rows` queries and `cols` tiles per row."""
    return PAD + cols * (TILE_W + PAD), PAD + rows * (TILE_H + CAPTION_LINES * LINE_H + 2 * PAD)


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
        return ImageFont.load_default()


def spectrogram_picture(windows: np.ndarray, audio_cfg: AudioConfig) -> np.ndarray:
    """RGB picture (low frequencies at the bottom) of up to SPEC_SECONDS query windows."""
    specs = reference_log_spectrograms(windows[:SPEC_SECONDS], audio_cfg)
    db = np.concatenate(list(specs), axis=1)[::-1]
    level = np.clip((db - (db.max() - SPEC_RANGE_DB)) / SPEC_RANGE_DB, 0.0, 1.0)
    stops = np.linspace(0.0, 1.0, len(_RAMP))
    rgb = [np.interp(level, stops, _RAMP[:, c]) for c in range(3)]
    return np.stack(rgb, axis=-1).astype(np.uint8)


def _fit(picture: np.ndarray | None, label: str, stretch: bool = False) -> Image.Image:
    """A tile: the picture scaled to fit (aspect kept and centred unless `stretch`), or a
    labelled placeholder."""
    if picture is None:
        tile = Image.new("RGB", (TILE_W, TILE_H), (55, 55, 60))
        draw = ImageDraw.Draw(tile)
        draw.text((TILE_W // 2, TILE_H // 2), label, fill=MUTED, font=_font(), anchor="mm")
        return tile
    image = Image.fromarray(picture)
    if stretch:
        return image.resize((TILE_W, TILE_H), Image.Resampling.BILINEAR)
    return ImageOps.pad(image, (TILE_W, TILE_H), color=BACKGROUND)


def _clipped(text: str, font: ImageFont.ImageFont, width: int) -> str:
    """`text` shortened with an ellipsis in the middle so it fits `width` pixels."""
    if font.getlength(text) <= width:
        return text
    keep = len(text)
    while keep > 4 and font.getlength(text[: keep // 2] + "…" + text[-(keep // 2) :]) > width:
        keep -= 1
    return text[: keep // 2] + "…" + text[-(keep // 2) :]


def _caption(draw: ImageDraw.ImageDraw, x: int, y: int, lines: Sequence[tuple[str, tuple]]) -> None:
    font = _font()
    for i, (text, colour) in enumerate(lines):
        draw.text((x, y + i * LINE_H), _clipped(text, font, TILE_W), fill=colour, font=font)


def result_frames(
    wanted: Sequence[tuple[str, float]], audio_cfg: AudioConfig
) -> dict[tuple[str, float], np.ndarray | None]:
    """Frames at t0 + half a clip of each (path, t0), one read_moments pass per video; a video
    that cannot be read (moved since embedding) gives None."""
    by_path: dict[str, set[float]] = defaultdict(set)
    for path, t0 in wanted:
        by_path[path].add(t0)
    video_cfg = VideoConfig(resize_shorter=TILE_H)
    out: dict[tuple[str, float], np.ndarray | None] = {}
    for path, starts in by_path.items():
        ordered = sorted(starts)
        moments = [clip_moment(t0, audio_cfg.clip_seconds) for t0 in ordered]
        try:
            frames = read_moments(path, moments, audio_cfg, video_cfg)
            for t0, data in zip(ordered, frames, strict=True):
                out[(path, t0)] = data.frame
        except MediaError:
            pass  # drawn as a placeholder: one unreadable result must not lose the sheet
        for t0 in ordered:
            out.setdefault((path, t0), None)
    return out


def _query_picture(result: Result, frames: dict, audio_cfg: AudioConfig) -> np.ndarray | None:
    """Image or video-moment frame; else the audio's spectrogram; else the clip's frame."""
    if result.frame is not None:
        return result.frame
    if result.audio is not None:
        return spectrogram_picture(result.audio, audio_cfg)
    if result.clip is not None:
        return frames.get((result.clip.path, result.clip.t0))
    return None


def _query_lines(result: Result) -> list[tuple[str, tuple]]:
    q = result.query
    if q.kind == "clip" and result.clip is not None:
        where = f"{os.path.basename(result.clip.path)} t={result.clip.t0:g} s"
    else:
        where = os.path.basename(q.value) + (f" t={q.at:g} s" if q.at is not None else "")
    what = f"clip {q.value}" if q.kind == "clip" else q.kind
    return [
        (f"query: {what} ({q.modality})", QUERY_FRAME),
        (where, TEXT),
        (f"searching {q.searched}", MUTED),
    ]


def write_sheet(
    results: Sequence[Result],
    out: str | os.PathLike,
    audio_cfg: AudioConfig,
    per_row: int,
) -> Path:
    """Write a PNG: one row per successful query, its picture then up to `per_row` result frames."""
    rows = [r for r in results if r.error is None]
    if not rows:
        raise AvindexError(f"{out}: no query succeeded, so there is no contact sheet to draw")
    out = Path(out)
    if not out.parent.is_dir():
        raise AvindexError(f"{out}: folder {out.parent} does not exist")
    hits = [r.hits[:per_row] for r in rows]
    wanted = [(h.path, h.t0) for row in hits for h in row]
    wanted += [(r.clip.path, r.clip.t0) for r in rows if r.clip is not None]
    frames = result_frames(wanted, audio_cfg)
    cols = 1 + max(1, max(len(row) for row in hits))
    sheet = Image.new("RGB", sheet_size(len(rows), cols), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    row_h = TILE_H + CAPTION_LINES * LINE_H + 2 * PAD
    for i, (result, row) in enumerate(zip(rows, hits, strict=True)):
        y = PAD + i * row_h
        picture = _query_picture(result, frames, audio_cfg)
        # A spectrogram's aspect ratio means nothing, so it fills the tile.
        spectrogram = result.frame is None and result.audio is not None
        sheet.paste(_fit(picture, "vector query", stretch=spectrogram), (PAD, y))
        draw.rectangle([PAD - 2, y - 2, PAD + TILE_W + 1, y + TILE_H + 1], outline=QUERY_FRAME)
        _caption(draw, PAD, y + TILE_H + 4, _query_lines(result))
        for j, hit in enumerate(row, 1):
            x = PAD + j * (TILE_W + PAD)
            sheet.paste(_fit(frames[(hit.path, hit.t0)], "unreadable video"), (x, y))
            audio_note = "" if hit.has_audio else "  no audio"
            lines = [
                (f"#{hit.rank}  score {hit.score:.3f}", TEXT),
                (os.path.basename(hit.path), TEXT),
                (f"t={hit.t0:g} s  clip {hit.id}{audio_note}", MUTED),
            ]
            _caption(draw, x, y + TILE_H + 4, lines)
    tmp = out.with_name(f".{out.name}.tmp")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, out)
    return out


__all__ = ["result_frames", "sheet_size", "spectrogram_picture", "write_sheet"]
