"""NVDEC bounds (GPU only): decode-all with 1..21 sessions in flight, the physical limit (engines
x the per-engine rate seen), the gain of leaving non-reference packets out, DALI's batched video
decoder for comparison, and a sampler of NVDEC utilisation (nvidia-smi) during a run.

Packets are demuxed into memory first (Annex-B, as the embed workers send them), so the sweep
times the sessions alone; each session decodes whole files on a fresh decoder, as embed does.
"""

from __future__ import annotations

import contextlib
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from avindex.bitstream import (
    PacketExport,
    ReferenceFinder,
    first_frame,
    nvdec_unsupported,
    stream_header,
)
from avindex.media import start_pts

# Sessions in flight for the sweep (an H200 has 7 NVDEC engines: 1..3 sessions per engine).
SESSIONS = (1, 2, 4, 7, 14, 21)
# DALI's decoder keeps every decoded frame of its batch on the GPU: its batch is this many files.
DALI_BATCH = 4
DALI_MAX_BYTES = 24 << 30


class Demuxed:
    """One file's video packets in memory: (payload, pts, droppable) in decode order."""

    def __init__(self, path: Path, seconds: float) -> None:
        self.path, self.seconds = path, seconds
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            packets = [p for p in container.demux(stream) if p.size]
            probed = first_frame(stream, packets[:16])
            why = nvdec_unsupported(stream, probed)
            if why is not None:
                raise RuntimeError(f"{path}: NVDEC does not take it ({why})")
            export = PacketExport(stream)
            origin = float(start_pts(stream, None) * stream.time_base)
            self.header = stream_header(stream, origin, probed, export)
            for packet in packets:
                export.add(packet, needed=True)
            export.flush()
        finder = ReferenceFinder(self.header.codec)
        self.packets = [(d, p, finder.droppable(d)) for d, p, _ in export.take().packets]


def decode_files(
    files: Sequence[Demuxed], sessions: int, make_session: Callable, device: Any, skip: bool
) -> tuple[int, float]:
    """Decode `files` with `sessions` threads, a fresh session per file: (frames, wall s)."""
    work: queue.SimpleQueue = queue.SimpleQueue()
    for item in files:
        work.put(item)
    counts = [0] * sessions
    errors: list[BaseException] = []

    def serve(slot: int) -> None:
        try:
            stream = torch.cuda.Stream(device) if device.type == "cuda" else None
            with torch.cuda.stream(stream) if stream else contextlib.nullcontext():
                while True:
                    try:
                        item = work.get_nowait()
                    except queue.Empty:
                        break
                    session = make_session(item.header, device)
                    for data, pts, droppable in item.packets:
                        if not (skip and droppable):
                            counts[slot] += len(session.decode(data, pts))
                    counts[slot] += len(session.flush())
                    session.close()
            if stream is not None:
                stream.synchronize()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(sessions)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = time.perf_counter() - started
    if errors:
        raise errors[0]
    return sum(counts), took


def nvdec_sweep(
    paths: Sequence[Path], durations: Sequence[float], sweep: Sequence[int] = SESSIONS
) -> dict[str, Any]:
    """Decode-all rate per session count, the physical limit and the skip gain."""
    from avindex.nvdec_session import PyNvSession, decoder_engines

    device = torch.device("cuda", torch.cuda.current_device())
    files = [Demuxed(p, d) for p, d in zip(paths, durations, strict=True)]
    decode_files(files[:1], 1, PyNvSession, device, False)  # warm-up: driver, first session
    frames_per_file = float(np.mean([len(f.packets) for f in files]))
    seconds_per_file = float(np.mean([f.seconds for f in files]))
    points = []
    for sessions in sweep:
        batch = [files[i % len(files)] for i in range(max(sessions, len(files)))]
        frames, took = decode_files(batch, sessions, PyNvSession, device, False)
        points.append(
            {
                "sessions": sessions,
                "frames_per_s": frames / took,
                "video_s_per_s": len(batch) * seconds_per_file / took,
            }
        )
    engines = decoder_engines(files[0].header.codec)
    per_engine = max(p["frames_per_s"] / min(p["sessions"], engines) for p in points)
    best = max(points, key=lambda p: p["frames_per_s"])
    batch = [files[i % len(files)] for i in range(max(best["sessions"], len(files)))]
    frames, took = decode_files(batch, best["sessions"], PyNvSession, device, True)
    submitted = sum(sum(not d for _, _, d in f.packets) for f in batch)
    return {
        "codec": files[0].header.codec,
        "size": f"{files[0].header.width}x{files[0].header.height}",
        "engines": engines,
        "sweep": points,
        "best": best,
        "per_engine_frames_per_s": per_engine,
        "physical_frames_per_s": engines * per_engine,
        "physical_video_s_per_s": engines * per_engine / frames_per_file * seconds_per_file,
        "skip": {
            "sessions": best["sessions"],
            "frames_per_s": frames / took,
            "video_s_per_s": len(batch) * seconds_per_file / took,
            "submitted_fraction": submitted / sum(len(f.packets) for f in batch),
        },
    }


def dali_decode_all(paths: Sequence[Path], durations: Sequence[float]) -> dict[str, Any]:
    """DALI's fn.decoders.video (mixed) on DALI_BATCH files per call: the alternative design."""
    batch = max(1, min(DALI_BATCH, len(paths)))

    @pipeline_def(batch_size=batch, num_threads=4, device_id=0, prefetch_queue_depth=1)
    def pipeline() -> Any:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        return fn.decoders.video(encoded, device="mixed")

    pipe = pipeline()
    pipe.build()
    chosen = [i for i in range(len(paths))][: batch * max(1, len(paths) // batch)]
    encoded = [np.fromfile(paths[i], dtype=np.uint8) for i in chosen]
    pipe.feed_input("encoded", encoded[:batch])
    pipe.run()  # warm-up
    frames, started = 0, time.perf_counter()
    for start in range(0, len(encoded), batch):
        pipe.feed_input("encoded", encoded[start : start + batch])
        (out,) = pipe.run()
        frames += sum(int(s[0]) for s in out.shape())
    took = time.perf_counter() - started
    return {
        "batch": batch,
        "frames_per_s": frames / took,
        "video_s_per_s": float(sum(durations[i] for i in chosen)) / took,
    }


class DecoderUtilisation:
    """Samples NVDEC utilisation (nvidia-smi, percent) every `interval` s while in its block."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.decoder", "--format=csv,noheader,nounits"]
        while not self._stop.wait(self.interval):
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return  # no nvidia-smi: no samples

    def __enter__(self) -> DecoderUtilisation:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float | None:
        """Mean utilisation over the block (None without samples)."""
        return float(np.mean(self.samples)) if self.samples else None
