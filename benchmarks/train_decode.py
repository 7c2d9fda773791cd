"""Training's decode stage alone: moments/s that PairStream's decoder processes deliver, against
the same visits decoded by threads in this process (what training did before), in alternating
rounds on the same corpus and cores.

    python benchmarks/train_decode.py [--videos 16] [--seconds 20] [--size 640x360]
        [--workers 2] [--rounds 3] [--round-seconds 20] [--json out.json]

No model, no preprocessing: the number is how fast the decoders can fill the shuffle buffer.
"""

from __future__ import annotations

import argparse
import json
import queue
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from avindex.config import DataConfig, SynthConfig
from avindex.decode import read_moments
from avindex.pairs import PairStream, sample_moments, usable_videos, visit_size
from avindex.presets import SMALL
from avindex.scan import find_media
from avindex.synth import make_corpus


def processes_rate(videos: list, data: DataConfig, seconds: float) -> float:
    """Moments/s out of PairStream's decoder processes (counted after the first one arrives)."""
    stream = PairStream(
        videos, SMALL.audio, SMALL.video, data, SMALL.train.augment, None, seed=(0,)
    )
    stream.start_decoding()
    try:
        stream.samples.get(timeout=60)  # start-up (spawning processes) is not decode time
        started, count = time.monotonic(), 0
        while time.monotonic() - started < seconds:
            stream.samples.get(timeout=60)
            count += 1
        return count / (time.monotonic() - started)
    finally:
        stream.close()


def threads_rate(videos: list, data: DataConfig, seconds: float) -> float:
    """Moments/s of the same visits decoded by `data.decode_workers` threads in this process."""
    samples: queue.Queue = queue.Queue(data.shuffle_buffer)
    stop = threading.Event()

    def work(worker: int) -> None:
        rng = np.random.default_rng([0, worker])
        while not stop.is_set():
            video = videos[rng.integers(len(videos))]
            moments = sample_moments(video, visit_size(video, data), rng)
            for data_ in read_moments(video.path, moments, SMALL.audio, SMALL.video):
                while not stop.is_set():
                    try:
                        samples.put(data_, timeout=0.1)
                        break
                    except queue.Full:
                        continue

    threads = [
        threading.Thread(target=work, args=(w,), daemon=True) for w in range(data.decode_workers)
    ]
    for thread in threads:
        thread.start()
    samples.get(timeout=60)
    started, count = time.monotonic(), 0
    while time.monotonic() - started < seconds:
        samples.get(timeout=60)
        count += 1
    rate = count / (time.monotonic() - started)
    stop.set()  # each thread finishes its visit without queueing, then ends
    for thread in threads:
        thread.join()
    return rate


def main() -> None:
    """Alternate the two decoders for a few rounds; print and optionally write the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--size", default="640x360")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-seconds", type=float, default=20.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    data = DataConfig(decode_workers=args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SynthConfig(videos=args.videos, seconds=args.seconds, width=width, height=height)
        make_corpus(tmp, cfg)
        videos = usable_videos(find_media([Path(tmp)]), SMALL.audio.clip_seconds)
        rounds = []
        for _ in range(args.rounds):
            threads = threads_rate(videos, data, args.round_seconds)
            processes = processes_rate(videos, data, args.round_seconds)
            rounds.append({"threads": threads, "processes": processes})
            print(f"threads {threads:.1f} moments/s, processes {processes:.1f} moments/s")
    best = {k: max(r[k] for r in rounds) for k in ("threads", "processes")}
    result = {
        "corpus": {"videos": args.videos, "seconds": args.seconds, "size": args.size},
        "workers": args.workers,
        "rounds": rounds,
        "best": best,
        "processes_x_threads": best["processes"] / best["threads"],
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
