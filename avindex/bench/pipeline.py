"""End-to-end `embed` and `train` throughput with their stage split, as users run them."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from avindex.bench.gpu import DecoderUtilisation
from avindex.config import EmbedConfig
from avindex.embed import EmbedReport, embed_paths
from avindex.model import Checkpoint
from avindex.presets import get_preset
from avindex.train import METRICS, train

# Training steps left out of the rates: the first batches include starting the decoders.
TRAIN_WARMUP_STEPS = 3


def embed_bench(
    paths: Sequence[Path], checkpoint: Checkpoint, cfg: EmbedConfig, workdir: Path, repeats: int
) -> dict[str, Any]:
    """Best of `repeats` fresh `embed` runs into a new store: rates and time split by stage."""
    best: EmbedReport | None = None
    utilisation = None
    for run in range(max(1, repeats)):
        store = workdir / f"embed-store-{run}"
        with _sampler(cfg.device) as sampler:
            report = embed_paths(paths, store, checkpoint, cfg)
        shutil.rmtree(store, ignore_errors=True)
        if best is None or report.realtime_factor > best.realtime_factor:
            best, utilisation = report, sampler.mean if sampler else None
    assert best is not None
    wall = best.wall_seconds
    return {
        "decoders": best.decoders,
        "fallbacks": best.fallbacks,
        "decoded_fraction": best.decoded_fraction,
        "nvdec_sessions": cfg.nvdec_sessions,
        "nvdec_utilisation": utilisation,
        "hop": cfg.hop,
        "device": cfg.device,
        "batch_size": cfg.batch_size,
        "decode_workers": cfg.decode_workers,
        "videos": best.videos_done,
        "videos_failed": best.videos_failed,
        "clips": best.clips,
        "wall_seconds": wall,
        "video_s_per_s": best.realtime_factor,
        "clips_per_s": best.clips_per_second,
        "stage_seconds": best.stage_seconds,
        # decode runs in background workers (summed over them); the rest is the consumer's time.
        "stage_fraction": {k: v / wall for k, v in best.stage_seconds.items()} if wall else {},
    }


@contextlib.contextmanager
def _sampler(device: str) -> Iterator[Any]:
    """NVDEC utilisation sampling on CUDA (None elsewhere)."""
    if device != "cuda":
        yield None
        return
    with DecoderUtilisation() as sampler:
        yield sampler


def train_bench(
    paths: Sequence[Path],
    workdir: Path,
    preset: str,
    width: float,
    device: str,
    steps: int,
    seed: int,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """A short training run: AVC pairs/s and the fraction of step time spent waiting for data."""
    chosen = get_preset(preset).configure(
        width=width,
        max_steps=steps + TRAIN_WARMUP_STEPS,
        val_every=0,
        checkpoint_every=0,
        val_fraction=0.0,
        device=device,
        seed=seed,
        batch_size=batch_size,
    )
    out = workdir / "train"
    train(paths, out, chosen, progress=False)
    with open(out / METRICS) as fh:
        steps_log = [r for r in map(json.loads, fh) if r.get("kind") == "train"]
    shutil.rmtree(out, ignore_errors=True)
    steady = steps_log[TRAIN_WARMUP_STEPS:] or steps_log
    pairs = sum(r["pairs"] for r in steady)
    wait = sum(r["data_wait_s"] for r in steady)
    compute = sum(r["compute_s"] for r in steady)
    return {
        "device": device,
        "width": chosen.model.width,
        "batch_size": chosen.train.data.batch_size,
        "steps_timed": len(steady),
        "pairs_per_s": pairs / (wait + compute),
        "compute_pairs_per_s": pairs / compute,
        "data_wait_fraction": wait / (wait + compute),
    }
