"""What the benchmarks run on: a synthetic corpus (or the user's folder), probed once."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from avindex.config import AudioConfig, BenchConfig, NaturalConfig, SynthConfig
from avindex.errors import AvindexError
from avindex.media import probe
from avindex.natural import make_natural_corpus
from avindex.scan import find_media
from avindex.store import StoreMeta, StoreWriter, VideoRecord
from avindex.synth import make_corpus


@dataclass
class Corpus:
    """Usable videos with their durations, and where they came from."""

    paths: list[Path]
    durations: list[float]
    source: str  # 'synth', 'natural' or the folder given
    describe: dict[str, Any]
    infos: list[Any]  # probe's MediaInfo of each distinct video

    @property
    def seconds(self) -> float:
        """Total video duration."""
        return float(sum(self.durations))


def synth_config(cfg: BenchConfig) -> SynthConfig:
    """The synthetic corpus a bench run makes when no folder is given."""
    return SynthConfig(
        videos=cfg.videos, seconds=cfg.seconds, seed=cfg.seed, width=cfg.size[0], height=cfg.size[1]
    )


def natural_config(cfg: BenchConfig) -> NaturalConfig:
    """The natural-looking corpus a bench run makes with --corpus natural."""
    width, height = cfg.size
    return NaturalConfig(cfg.videos, cfg.seconds, width, height, cfg.fps, cfg.codec, cfg.seed)


def _copies(paths: list[Path], copies: int, folder: Path) -> list[Path]:
    """Each path `copies` times: the originals, then hard links (symlinks across devices)."""
    if copies <= 1:
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    out = list(paths)
    for copy in range(1, copies):
        for path in paths:
            link = folder / f"{copy:02d}_{path.name}"
            try:
                os.link(path, link)
            except OSError:
                link.symlink_to(path.resolve())
            out.append(link)
    return out


def bench_corpus(videos: str | Path | None, cfg: BenchConfig, workdir: Path) -> Corpus:
    """Probe the videos under `videos`, or synthesise a corpus in `workdir` when it is None;
    with cfg.copies > 1 each appears that many times."""
    if videos is None and cfg.corpus == "natural":
        paths, source = make_natural_corpus(workdir / "corpus", natural_config(cfg)), "natural"
    elif videos is None:
        make_corpus(workdir / "corpus", synth_config(cfg))
        paths, source = find_media([workdir / "corpus"]), "synth"
    else:
        paths, source = find_media([videos]), str(videos)
    infos = [probe(p, clip_seconds=AudioConfig().clip_seconds) for p in paths]
    good = [(p, i) for p, i in zip(paths, infos, strict=True) if i.usable]
    if not good:
        raise AvindexError(f"{source}: no usable videos to benchmark; pass a folder of videos")
    first = good[0][1]
    describe = {
        "videos": len(good) * max(1, cfg.copies),
        "distinct_videos": len(good),
        "unusable": len(paths) - len(good),
        "seconds": round(sum(i.duration for _, i in good) * max(1, cfg.copies), 2),
        "video_codecs": sorted({i.video_codec for _, i in good}),
        "sizes": sorted({f"{i.width}x{i.height}" for _, i in good}),
        "fps": first.avg_fps,
        "frames": sum(i.n_frames or 0 for _, i in good) * max(1, cfg.copies),
        "audio": f"{first.audio_codec} {first.sample_rate} Hz {first.channels} ch",
    }
    paths = _copies([p for p, _ in good], cfg.copies, workdir / "copies")
    durations = [float(i.duration) for _, i in good] * max(1, cfg.copies)
    return Corpus(paths, durations, source, describe, [i for _, i in good])


def clustered_vectors(n: int, d: int, seed: int, clusters: int = 256) -> np.ndarray:
    """n float32 vectors around random centres: structure like real embeddings, cheap to make."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    noise = rng.standard_normal((n, d)).astype(np.float32)
    return centres[rng.integers(0, clusters, n)] + 0.6 * noise


def write_vector_store(store: Path, blocks: Iterable[np.ndarray], shard_clips: int) -> None:
    """A store whose visual rows are the given blocks of vectors (one fake video per block).

    Blocks are written as they come, so a generator can make a store larger than memory.
    """
    writer = None
    for v, rows in enumerate(blocks):
        m, d = rows.shape
        if writer is None:
            meta = StoreMeta(model_sha256="bench-synthetic", visual_dim=d, audio_dim=d, hop=1.0)
            writer = StoreWriter(store, meta, shard_clips=shard_clips)
        record = VideoRecord(f"/bench/{v:06d}.mp4", m, 0.0, float(m))
        t0 = np.arange(m, dtype=np.float64)
        writer.add_video(record, rows, rows, np.zeros(m, bool), t0)  # audio rows unused
    if writer is not None:
        writer.close()
