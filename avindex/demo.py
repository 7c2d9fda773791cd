"""`avindex demo`: synthetic corpus -> train -> embed -> index -> cross-modal queries -> eval."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from avindex.config import (
    AudioConfig,
    DemoConfig,
    EmbedConfig,
    IndexConfig,
    SearchConfig,
    VideoConfig,
    replace,
)
from avindex.decode import clip_moment, read_moments
from avindex.embed import embed_paths
from avindex.errors import AvindexError
from avindex.evaluate import EvalReport, evaluate
from avindex.index import build_index
from avindex.labels import VideoLabels, clip_labels, load_labels
from avindex.model import load_checkpoint
from avindex.presets import SMALL
from avindex.queries import Query
from avindex.scan import find_media
from avindex.search import search
from avindex.sheet import write_sheet
from avindex.synth import make_corpus, write_video
from avindex.train import train

DEMO_FOLDERS = ("corpus", "queries", "run", "store")
MARKER = ".avindex-demo"  # written into OUT by the demo: only such a folder is ever cleared


def prepare_out(out: Path) -> Path:
    """OUT ready for a fresh demo: new or empty (then marked as the demo's), or a folder the demo
    made before (its own subfolders are cleared). Any other folder is refused, never cleared."""
    out = out.resolve()
    if out.exists() and not out.is_dir():
        raise AvindexError(f"--out {out}: is a file; give a new or empty folder")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise AvindexError(
            f"--out {out}: holds files the demo did not write; give a new or empty folder "
            "(the demo clears its output folder before each run)"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `avindex demo`; it may clear this folder's demo data\n")
    for name in DEMO_FOLDERS:  # a re-run starts fresh: a new model, a new store
        shutil.rmtree(out / name, ignore_errors=True)
    return out


@dataclass
class QueryFile:
    """A query the demo writes from a held-out video: its file, kind and ground-truth class."""

    path: Path
    kind: str  # audio | image
    label: int
    second: int


@dataclass
class DemoReport:
    """Where the demo wrote everything and what it measured."""

    out: Path
    seconds: dict[str, float] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    queries: list[dict[str, Any]] = field(default_factory=list)
    eval: EvalReport | None = None
    sheets: list[str] = field(default_factory=list)


def _timed(
    report: DemoReport, stage: str, say: Callable[[str], None], fn: Callable[[], Any]
) -> Any:
    """Run one stage, announce it and record its wall time."""
    say(f"[{stage}] ...")
    started = time.perf_counter()
    result = fn()
    report.seconds[stage] = round(time.perf_counter() - started, 1)
    say(f"[{stage}] done in {report.seconds[stage]:.0f} s")
    return result


def write_queries(held_out: Path, labels_file: Path, out: Path, cfg: DemoConfig) -> list[QueryFile]:
    """Cut query files from a held-out video: a sound (16 kHz stereo wav) and a picture (png)."""

    per_second = load_labels(labels_file)[held_out.name].dense()
    # Seconds in the middle of a segment, one per class, so each query is one clean event.
    middles = [s for s in range(1, len(per_second) - 1) if len(set(per_second[s - 1 : s + 2])) == 1]
    chosen: dict[int, int] = {}
    for s in middles:
        if per_second[s] >= 0:  # -1: a second the labels file does not list
            chosen.setdefault(int(per_second[s]), s)
    seconds = sorted(chosen.values())[: cfg.queries_per_kind]
    audio_cfg = AudioConfig()
    moments = [clip_moment(float(s), audio_cfg.clip_seconds) for s in seconds]
    queries = []
    for s, data in zip(
        seconds, read_moments(held_out, moments, audio_cfg, VideoConfig()), strict=True
    ):
        label = int(per_second[s])
        wav = out / f"sound_class{label}_t{s}.wav"
        rate = cfg.query_sample_rate  # any rate and channel count works: show a non-48k stereo one
        mono = np.interp(
            np.arange(round(len(data.audio) * rate / audio_cfg.sample_rate))
            * audio_cfg.sample_rate
            / rate,
            np.arange(len(data.audio)),
            data.audio,
        )
        write_video(wav, None, 25.0, np.stack([mono, mono], axis=1).astype(np.float32), rate)
        png = out / f"picture_class{label}_t{s}.png"
        Image.fromarray(data.frame).save(png)
        queries += [QueryFile(wav, "audio", label, s), QueryFile(png, "image", label, s)]
    return queries


def _result_labels(hits: list, labels: dict[str, VideoLabels], corpus: Path) -> list[int]:
    """Ground-truth class of each hit (the second holding the clip's centre)."""

    return [
        int(clip_labels(labels[Path(h.path).relative_to(corpus).as_posix()], np.array([h.t0]))[0])
        for h in hits
    ]


def run_demo(cfg: DemoConfig, say: Callable[[str], None] = print) -> DemoReport:
    """Run every stage on a fresh synthetic corpus, through the same code as each command."""

    out = prepare_out(Path(cfg.out))
    corpus, held, run, store = (out / name for name in DEMO_FOLDERS)
    report = DemoReport(out)
    labels_file = _timed(report, "synth", say, lambda: make_corpus(corpus, cfg.corpus))
    held_labels = make_corpus(held, replace(cfg.corpus, videos=1, seed=cfg.corpus.seed + 1000))
    preset = SMALL.configure(time_limit=cfg.train_seconds, seed=cfg.corpus.seed, device=cfg.device)
    result = _timed(report, "train", say, lambda: train([corpus], run, preset, labels_file))
    report.train = result.to_dict()
    say(result.summary())
    best = run / "best.pt"
    embed_cfg = EmbedConfig(device=cfg.device)
    embedded = _timed(
        report,
        "embed",
        say,
        lambda: embed_paths(
            find_media([corpus]), store, load_checkpoint(best), embed_cfg, model_path=best
        ),
    )
    say(
        f"embedded {embedded.clips} clips of {embedded.videos_done} videos "
        f"({embedded.clips_per_second:.0f} clips/s)"
    )
    _timed(report, "index", say, lambda: build_index(store, IndexConfig(device=cfg.device)))
    queries = write_queries(sorted(held.glob("*.mp4"))[0], held_labels, held, cfg)
    labels = load_labels(labels_file)
    search_cfg = SearchConfig(device=cfg.device)
    for kind, sheet_name in (
        ("audio", "sheet_sound_to_pictures"),
        ("image", "sheet_picture_to_sounds"),
    ):
        mine = [q for q in queries if q.kind == kind]
        results = _timed(
            report,
            f"search {kind}",
            say,
            lambda mine=mine, kind=kind: search(
                store, [Query(kind, str(q.path)) for q in mine], k=cfg.k, cfg=search_cfg
            ),
        )
        for query, res in zip(mine, results, strict=True):
            found = _result_labels(res.hits, labels, corpus)
            right = sum(label == query.label for label in found)
            report.queries.append(
                {
                    "query": str(query.path),
                    "searched": res.searched,
                    "class": query.label,
                    "result_classes": found,
                    "right_class": right,
                }
            )
            say(
                f"{kind} query {query.path.name} (class {query.label}) -> {res.searched}: "
                f"{right}/{len(found)} of the top {cfg.k} are class {query.label}"
            )
        sheet = write_sheet(results, out / f"{sheet_name}.png", preset.audio, cfg.k)
        report.sheets.append(str(sheet))
    report.eval = _timed(report, "eval", say, lambda: evaluate(store, labels_file))
    (out / "demo.json").write_text(json.dumps(_jsonable(report), indent=2))
    return report


def _jsonable(report: DemoReport) -> dict[str, Any]:
    """The report as plain JSON types."""
    return {
        "out": str(report.out),
        "seconds": report.seconds,
        "train": report.train,
        "queries": report.queries,
        "eval": report.eval.to_dict() if report.eval else None,
        "sheets": report.sheets,
    }
