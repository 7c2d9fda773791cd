"""Run the chosen bench stages (with the baselines they are compared against) in one process."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from avindex.bench import gpu
from avindex.bench.corpus import bench_corpus
from avindex.bench.decode import decode_bench
from avindex.bench.frontend import frontend_bench
from avindex.bench.indexing import index_bench
from avindex.bench.measure import machine
from avindex.bench.naive import naive_bench
from avindex.bench.pipeline import embed_bench, train_bench
from avindex.bench.report import assess
from avindex.bench.towers import tower_bench
from avindex.config import BenchConfig, EmbedConfig, replace, to_dict
from avindex.devices import resolve_device
from avindex.errors import AvindexError
from avindex.model import random_checkpoint
from avindex.presets import default_preset

log = logging.getLogger(__name__)

STAGES = ("decode", "frontend", "model", "embed", "train", "index", "search")
# A stage's comparisons need these measured in the same run.
NEEDS = {"embed": ("decode", "model", "naive"), "search": ("index",)}
MEDIA_STAGES = {"decode", "frontend", "embed", "naive", "train"}


def parse_stages(text: str | None) -> list[str]:
    """'decode,model' -> the stages to run, with the ones they depend on, in STAGES order."""
    wanted = set(STAGES) if not text else {s.strip() for s in text.split(",") if s.strip()}
    unknown = wanted - set(STAGES)
    if unknown:
        raise AvindexError(
            f"--stage {','.join(sorted(unknown))}: unknown; choose from {','.join(STAGES)}"
        )
    for stage in list(wanted):
        wanted.update(NEEDS.get(stage, ()))
    return [s for s in (*STAGES[:4], "naive", *STAGES[4:]) if s in wanted]


def run_bench(
    stages: Sequence[str],
    videos: str | Path | None,
    cfg: BenchConfig,
    embed_cfg: EmbedConfig | None = None,
    on_stage: Callable[[str], None] | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Measure `stages` (from parse_stages) on `videos` or a synthetic corpus; returns the result
    dict (machine, config, corpus, raw stage numbers, rows with ratios, checked targets)."""
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    preset = default_preset(device)
    embed_cfg = replace(embed_cfg or EmbedConfig(), device=device)
    checkpoint = random_checkpoint(cfg.width, cfg.seed, preset=preset.name, device=device)
    width = checkpoint.model_cfg.width
    result: dict[str, Any] = {
        "schema": 1,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "machine": machine(device),
        "config": {"bench": to_dict(cfg), "embed": to_dict(embed_cfg), "width": width},
        "stages": {},
    }
    with tempfile.TemporaryDirectory(prefix="avindex-bench-") as tmp:
        work = Path(tmp)
        corpus = None
        if MEDIA_STAGES & set(stages):
            if on_stage:
                on_stage("corpus")
            corpus = bench_corpus(videos, cfg, work)
            result["corpus"] = {"source": corpus.source, **corpus.describe}
        for stage in stages:
            if stage == "search":
                continue  # measured with the index (same store and raw faiss index)
            if on_stage:
                on_stage(stage)
            stage_started = time.perf_counter()
            try:
                measured = _run_stage(stage, corpus, checkpoint, cfg, embed_cfg, device, work)
            except Exception as exc:  # recorded and reported; the other stages still measure
                log.exception("bench stage %s failed", stage)
                measured = {stage: {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}}
            for entry in measured.values():
                entry.setdefault("bench_seconds", time.perf_counter() - stage_started)
            result["stages"].update(measured)
    rows, targets = assess(result["stages"], result.get("corpus"))
    result["rows"] = [r.to_dict() for r in rows]
    result["targets"] = [t.to_dict() for t in targets]
    result["elapsed_seconds"] = time.perf_counter() - started
    return result


def _run_stage(
    stage: str,
    corpus: Any,
    checkpoint: Any,
    cfg: BenchConfig,
    embed_cfg: EmbedConfig,
    device: str,
    work: Path,
) -> dict[str, Any]:
    """One stage's raw numbers, keyed by stage name (decode on CUDA adds 'nvdec' and 'dali')."""
    acfg, vcfg = checkpoint.audio_cfg, checkpoint.video_cfg
    if stage == "decode":
        # Bounds are rates: the distinct videos give them (copies only add identical work).
        distinct = corpus.describe["distinct_videos"]
        paths, durations = corpus.paths[:distinct], corpus.durations[:distinct]
        out = {"decode": decode_bench(paths, durations, acfg, vcfg, embed_cfg, cfg.repeats)}
        if device == "cuda":
            out.update(_gpu_decode(paths, durations, cfg))
        return out
    if stage == "frontend":
        batch = embed_cfg.batch_size
        args = (acfg, vcfg, batch, device, cfg.min_seconds, cfg.repeats)
        return {"frontend": frontend_bench(corpus.paths[0], *args)}
    if stage == "model":
        batches = (*cfg.batch_sizes, embed_cfg.batch_size)
        args = (batches, cfg.min_seconds, cfg.repeats, cfg.seed)
        return {"model": tower_bench(checkpoint, device, *args)}
    if stage == "naive":
        return {"naive": _naive(corpus, checkpoint, cfg, embed_cfg)}
    if stage == "embed":
        return {"embed": embed_bench(corpus.paths, checkpoint, embed_cfg, work, cfg.repeats)}
    if stage == "train":
        args = (checkpoint.preset, checkpoint.model_cfg.width, device, cfg.train_steps, cfg.seed)
        args = (*args, cfg.train_batch)
        return {"train": train_bench(corpus.paths, work, *args)}
    args = (cfg.index_vectors, cfg.index_dim, cfg.queries, cfg.seed, cfg.repeats, cfg.min_seconds)
    return {"index": index_bench(work, *args)}


def _naive(corpus: Any, checkpoint: Any, cfg: BenchConfig, embed_cfg: EmbedConfig) -> dict:
    """The naive pipeline on the first videos, unless it would hold too many frames."""
    n = max(1, cfg.naive_videos)
    info = corpus.infos[0]
    frames_bytes = (info.n_frames or 0) * (info.width or 0) * (info.height or 0) * 3
    if frames_bytes > cfg.naive_max_bytes:
        return {
            "skipped": f"the naive pipeline would hold {frames_bytes / 2**30:.1f} GiB of frames "
            f"(limit {cfg.naive_max_bytes / 2**30:.0f} GiB)"
        }
    args = (embed_cfg.hop, cfg.repeats)
    return naive_bench(corpus.paths[:n], corpus.durations[:n], checkpoint, *args)


def _gpu_decode(paths: list[Path], durations: list[float], cfg: BenchConfig) -> dict[str, Any]:
    """NVDEC sweep and DALI's video decoder on the videos, or why they could not run."""
    out: dict[str, Any] = {}
    for name, run in (
        ("nvdec", lambda: gpu.nvdec_sweep(paths, durations, cfg.nvdec_sessions)),
        ("dali", lambda: gpu.dali_decode_all(paths, durations)),
    ):
        try:
            out[name] = run()
        except Exception as exc:  # reported in the result; the other stages still measure
            log.exception("bench %s failed", name)
            out[name] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    return out
