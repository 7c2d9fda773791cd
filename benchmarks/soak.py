"""Soak: embed many small videos in one run and watch memory and file descriptors stay flat.

Samples the resident memory (RSS) and open file descriptors of the embedding process and of its
decoder processes after every video; after warm-up (the first --warmup videos) neither may grow:
the median RSS of the last tenth of the run at most 5% above that of the first tenth after
warm-up, descriptors not at all.

Example: .venv/bin/python benchmarks/soak.py --videos 1000 --json benchmarks/results/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from avindex.config import EmbedConfig, SynthConfig
from avindex.embed import EmbedReport, embed_paths
from avindex.model import random_checkpoint
from avindex.scan import find_media
from avindex.synth import make_corpus

RSS_GROWTH = 0.05  # allowed growth of RSS after warm-up


def _status(pid: int) -> tuple[int, int] | None:
    """(RSS bytes, open file descriptors) of a live process, from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            rss = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None


def _children(pid: int) -> list[int]:
    """Child process ids of `pid` (the decoder workers and their resource tracker)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(c) for c in fh.read().split()]
    except OSError:
        return []


def sample() -> dict[str, int]:
    """RSS and descriptors of this process and, summed, of its children."""
    me = os.getpid()
    rss, fds = _status(me) or (0, 0)
    kids = [s for s in (_status(c) for c in _children(me)) if s is not None]
    return {
        "rss": rss,
        "fds": fds,
        "children_rss": sum(s[0] for s in kids),
        "children_fds": sum(s[1] for s in kids),
        "children": len(kids),
    }


def run(videos: int, seconds: int, workers: int, warmup: int, workdir: Path) -> dict:
    """Make the corpus, embed it while sampling, and judge growth after warm-up."""
    corpus = workdir / "corpus"
    synth = SynthConfig(videos=videos, seconds=seconds, classes=4, seed=11, width=64, height=48)
    started = time.perf_counter()
    make_corpus(corpus, synth)
    made = time.perf_counter() - started
    samples: list[dict] = []

    def on_progress(report: EmbedReport) -> None:
        samples.append({"videos": report.videos_done + report.videos_failed, **sample()})

    cfg = EmbedConfig(device="cpu", decode_workers=workers)
    report = embed_paths(
        find_media([corpus]),
        workdir / "store",
        random_checkpoint(seed=0),
        cfg,
        on_progress=on_progress,
    )
    # The last sample comes as the decoders exit: judge the run while it was running.
    steady = [s for s in samples if s["videos"] > warmup][:-1]
    window = max(1, len(steady) // 10)
    first, last = steady[:window], steady[-window:]

    def median(rows: list[dict], key: str) -> float:
        return float(statistics.median(r[key] for r in rows))

    growth = {key: median(last, key) / median(first, key) - 1 for key in ("rss", "children_rss")}
    growth["fds"] = max(s["fds"] for s in last) - max(s["fds"] for s in first)
    growth["children_fds"] = max(s["children_fds"] for s in last) - max(
        s["children_fds"] for s in first
    )
    passed = (
        growth["rss"] <= RSS_GROWTH
        and growth["children_rss"] <= RSS_GROWTH
        and growth["fds"] <= 0
        and growth["children_fds"] <= 0
    )
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"cpus": os.cpu_count(), "load": os.getloadavg(), "python": sys.version},
        "platform": platform.platform(),
        "videos": videos,
        "seconds_each": seconds,
        "decode_workers": workers,
        "warmup_videos": warmup,
        "corpus_seconds": round(made, 1),
        "embed": {
            "videos_done": report.videos_done,
            "videos_failed": report.videos_failed,
            "clips": report.clips,
            "wall_seconds": round(report.wall_seconds, 1),
            "video_s_per_s": round(report.realtime_factor, 1),
        },
        "first_window": first,
        "last_window": last,
        "growth": growth,
        "passed": passed,
        "samples": samples[:: max(1, len(samples) // 200)],
    }


def main() -> None:
    """Command line: run the soak and write/print its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="avindex-soak-") as tmp:
        result = run(args.videos, args.seconds, args.workers, args.warmup, Path(tmp))
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    summary = {k: result[k] for k in ("embed", "growth", "passed")}
    print(json.dumps(summary, indent=2))
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
