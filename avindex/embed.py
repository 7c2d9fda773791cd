"""Bulk embedding: background decoders -> DALI preprocessing -> L3 towers -> sharded HDF5 store."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from avindex.config import AudioConfig, EmbedConfig, VideoConfig
from avindex.errors import AvindexError

if TYPE_CHECKING:
    import torch

    from avindex.media import Moment
    from avindex.model import Checkpoint, L3Net
    from avindex.store import StoreMeta, StoreWriter, VideoRecord

STAGES = ("decode", "wait", "preprocess", "model", "write")


@dataclass
class EmbedReport:
    """What one `embed` run did, with wall time split by stage (decode is summed over workers)."""

    videos_done: int = 0
    videos_failed: int = 0
    videos_skipped: int = 0
    clips: int = 0
    video_seconds: float = 0.0
    wall_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def realtime_factor(self) -> float:
        """Seconds of video embedded per second of wall time."""
        return self.video_seconds / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def clips_per_second(self) -> float:
        """Clips embedded per second of wall time."""
        return self.clips / self.wall_seconds if self.wall_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary, derived rates included."""
        out = asdict(self)
        out["realtime_factor"] = self.realtime_factor
        out["clips_per_second"] = self.clips_per_second
        return out


@dataclass
class _Clip:
    """One decoded clip on its way to the model."""

    video: int
    t0: float
    frame: np.ndarray | torch.Tensor  # HxWx3 uint8 from PyAV, or (3,crop,crop) CUDA from NVDEC
    audio: np.ndarray
    has_audio: bool


@dataclass
class _VideoEnd:
    """Marks that a decoder has sent every clip of a video (error set when it failed)."""

    video: int
    record: VideoRecord
    n_clips: int
    error: str | None = None


@dataclass
class _Pending:
    """Embedding results collected for one video until all its clips are through the model."""

    t0: list[float] = field(default_factory=list)
    visual: list[np.ndarray] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)
    has_audio: list[bool] = field(default_factory=list)
    end: _VideoEnd | None = None

    def discard(self) -> None:
        """Drop collected rows (the video failed part-way, so none of it is stored)."""
        self.t0.clear()
        self.visual.clear()
        self.audio.clear()
        self.has_audio.clear()


def video_record(path: Path, duration: float) -> VideoRecord:
    """Store identity of a file (resolved path, size, mtime); a vanished file gets size -1."""
    from avindex.store import VideoRecord

    try:
        return VideoRecord.from_file(path, duration)
    except OSError:
        return VideoRecord(str(path), -1, 0.0, float(duration))


def clip_moments(duration: float, hop: float, clip_seconds: float) -> list[Moment]:
    """What to read for each clip of a video: audio from t0, the frame nearest t0 + clip/2."""
    from avindex.media import clip_moment, clip_starts

    return [clip_moment(t, clip_seconds) for t in clip_starts(duration, hop, clip_seconds)]


def _cpu_clips(path: Path, moments: list[Moment], audio_cfg, video_cfg, cfg) -> Iterator[tuple]:
    """(moment, frame HxWx3 uint8, audio, has_audio) per clip, all decoded by PyAV."""
    from avindex.media import read_moments

    for d in read_moments(path, moments, audio_cfg, video_cfg, threads=cfg.decode_threads):
        yield d.moment, d.frame, d.audio, d.has_audio


def _nvdec_clips(
    path: Path, moments: list[Moment], audio_cfg, video_cfg, cfg, decoder
) -> Iterator[tuple]:
    """(moment, preprocessed frame on the GPU, audio, has_audio): NVDEC frames, PyAV audio."""
    from avindex.media import read_moments
    from avindex.pipelines import frame_indices

    indices = frame_indices(str(path), [m.frame_time for m in moments])
    audio = read_moments(
        path, moments, audio_cfg, video_cfg, threads=cfg.decode_threads, frames=False
    )
    for chunk in decoder.chunks(str(path), indices):
        for frame in chunk:
            data = next(audio)
            yield data.moment, frame, data.audio, data.has_audio


def nvdec_factory(video_cfg: VideoConfig, cfg: EmbedConfig, device: str) -> Callable | None:
    """Makes one NVDEC frame decoder per decoder thread on CUDA (unless disabled), else None."""
    if device != "cuda" or not cfg.nvdec:
        return None
    from avindex.pipelines import GpuFrameDecoder

    return lambda: GpuFrameDecoder(video_cfg)


def _decode_worker(
    jobs: queue.Queue,
    out: queue.Queue,
    audio_cfg: AudioConfig,
    video_cfg: VideoConfig,
    cfg: EmbedConfig,
    stop: threading.Event,
    decode_seconds: list[float],
    make_decoder: Callable | None,
) -> None:
    """Probe and stream-decode videos from `jobs`, sending clips then an end marker for each one.

    With `make_decoder` (CUDA), frames of NVDEC-decodable videos come from the GPU decoder; any
    other video, or one NVDEC fails on before its first clip, is decoded by PyAV.
    """
    from avindex.media import MediaError, probe
    from avindex.pipelines import gpu_decodable

    decoder = None
    while not stop.is_set():
        try:
            index, path = jobs.get_nowait()
        except queue.Empty:
            return
        started = time.perf_counter()
        record, sent, error = video_record(path, 0.0), 0, None
        try:
            info = probe(path, clip_seconds=audio_cfg.clip_seconds)
            record = video_record(path, info.duration or 0.0)
            error = info.error
            moments = [] if error else clip_moments(info.duration, cfg.hop, audio_cfg.clip_seconds)
            sources = [("PyAV", _cpu_clips(path, moments, audio_cfg, video_cfg, cfg))]
            if (
                moments
                and make_decoder is not None
                and gpu_decodable(info.video_codec, info.rotation)
            ):
                decoder = decoder or make_decoder()
                nvdec = _nvdec_clips(path, moments, audio_cfg, video_cfg, cfg, decoder)
                sources.insert(0, ("NVDEC", nvdec))
            for name, source in sources if moments else ():
                try:
                    for moment, frame, audio, has_audio in source:
                        decode_seconds[0] += time.perf_counter() - started
                        out.put(_Clip(index, moment.audio_start, frame, audio, has_audio))
                        started = time.perf_counter()
                        sent += 1
                        if stop.is_set():
                            return
                    error = None
                    break
                except MediaError as exc:
                    error = str(exc)
                    break
                except (
                    RuntimeError
                ) as exc:  # DALI's NVDEC errors: fall back to PyAV if nothing sent
                    error = f"{name} decode failed: {exc}".splitlines()[0]
                    if sent:
                        break
        except Exception as exc:  # whatever one file does, it fails that file, never the batch
            error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        decode_seconds[0] += time.perf_counter() - started
        out.put(_VideoEnd(index, record, sent, error))


def inference_model(checkpoint: Checkpoint, device: str) -> L3Net:
    """The checkpoint's model as embedding runs it (eval mode on `device`); benchmarks time it."""
    return checkpoint.model.to(device).eval()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with `n` torch intra-op threads, then restore the caller's setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TowerRunner:
    """Both towers on one batch -> (visual, audio) float16 arrays.

    On CPU the towers run side by side, each in its own thread with one torch thread (see
    `towers_on_cpu`): OpenMP's multi-threaded kernels wait at a barrier after every layer, and
    while a decoder thread holds one of the cores each barrier stalls (measured on 2 busy cores:
    9-60 clips/s with 2 torch threads vs ~190-250 with 1). On CUDA they run one after the other
    (the GPU queues the work).
    """

    def __init__(self, model: L3Net, device: str) -> None:
        self.model, self.device = model, device
        self.pool = (
            ThreadPoolExecutor(1, thread_name_prefix="avindex-tower") if device == "cpu" else None
        )

    def _visual(self, frames: torch.Tensor) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model.encode_visual(frames.to(self.device, non_blocking=True)).cpu().numpy()

    def _audio(self, specs: torch.Tensor) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model.encode_audio(specs.to(self.device, non_blocking=True)).cpu().numpy()

    def __call__(self, frames: torch.Tensor, specs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of a preprocessed batch, float16 (as stored)."""
        if self.pool is None:
            visual, audio = self._visual(frames), self._audio(specs)
        else:
            pending = self.pool.submit(self._visual, frames)
            audio = self._audio(specs)
            visual = pending.result()
        return visual.astype(np.float16), audio.astype(np.float16)

    def close(self) -> None:
        """Stop the helper thread."""
        if self.pool is not None:
            self.pool.shutdown()


@contextlib.contextmanager
def towers_on_cpu(model: L3Net, device: str) -> Iterator[TowerRunner]:
    """A TowerRunner for the duration of a block; on CPU torch runs one thread per tower."""
    with torch_threads(1) if device == "cpu" else contextlib.nullcontext():
        runner = TowerRunner(model, device)
        try:
            yield runner
        finally:
            runner.close()


class _Embedder:
    """Turns batches of decoded clips into visual and audio embeddings on one device."""

    def __init__(
        self, checkpoint: Checkpoint, cfg: EmbedConfig, device: str, towers: TowerRunner
    ) -> None:
        from avindex.pipelines import Preprocessor

        self.towers = towers
        self.preprocess = Preprocessor(
            checkpoint.audio_cfg, checkpoint.video_cfg, cfg.batch_size, device=device
        )

    def __call__(self, clips: Sequence[_Clip], seconds: dict[str, float]) -> tuple:
        """Embed a batch into (visual, audio) float16 arrays, adding stage times to `seconds`."""
        import torch

        started = time.perf_counter()
        audio = np.stack([c.audio for c in clips])
        raw = [c.frame for c in clips if isinstance(c.frame, np.ndarray)]
        if len(raw) == len(clips):
            frames, specs = self.preprocess(raw, audio)
        else:  # some frames came preprocessed from NVDEC: DALI prepares the rest
            specs = self.preprocess.spectrograms(audio)
            prepared = iter(self.preprocess.frames(raw) if raw else ())
            frames = torch.stack(
                [next(prepared) if isinstance(c.frame, np.ndarray) else c.frame for c in clips]
            )
        seconds["preprocess"] += time.perf_counter() - started
        started = time.perf_counter()
        visual, audio = self.towers(frames, specs)
        seconds["model"] += time.perf_counter() - started
        return visual, audio


def pending_videos(paths: Sequence[Path], store_dir: Path, retry_failed: bool) -> list[Path]:
    """Videos not yet in the store (same path, size and mtime), so a re-run finishes the rest."""
    from avindex.store import Store

    if not (store_dir.exists() and any(store_dir.glob("shard-*.h5"))):
        return list(paths)
    known = Store(store_dir).videos()
    todo = []
    for path in paths:
        entry = known.get(video_record(path, 0.0).key)
        if entry is None or (entry.status == "failed" and retry_failed):
            todo.append(path)
    return todo


def run_embed(
    paths: Sequence[Path],
    writer: StoreWriter,
    checkpoint: Checkpoint,
    cfg: EmbedConfig,
    device: str,
    on_progress: Callable[[EmbedReport], None] | None = None,
) -> EmbedReport:
    """Embed `paths` into `writer`: decoders run ahead in threads while the model embeds batches."""
    report = EmbedReport()
    started = time.perf_counter()
    jobs: queue.Queue = queue.Queue()
    for item in enumerate(paths):
        jobs.put(item)
    out: queue.Queue = queue.Queue(maxsize=cfg.prefetch_batches * cfg.batch_size)
    stop = threading.Event()
    decode_seconds = [[0.0] for _ in range(cfg.decode_workers)]
    make_decoder = nvdec_factory(checkpoint.video_cfg, cfg, device)
    workers = [
        threading.Thread(
            target=_decode_worker,
            args=(
                jobs,
                out,
                checkpoint.audio_cfg,
                checkpoint.video_cfg,
                cfg,
                stop,
                seconds,
                make_decoder,
            ),
            daemon=True,
            name=f"avindex-decode-{i}",
        )
        for i, seconds in enumerate(decode_seconds)
    ]
    # Decoders start first: they fill the queue while the model and DALI pipelines are set up.
    for worker in workers:
        worker.start()
    try:
        with towers_on_cpu(inference_model(checkpoint, device), device) as towers:
            embedder = _Embedder(checkpoint, cfg, device, towers)
            _consume(out, workers, embedder, writer, cfg, report, on_progress)
    finally:
        stop.set()
        _drain(out, workers)
        report.stage_seconds["decode"] = sum(s[0] for s in decode_seconds)
        report.wall_seconds = time.perf_counter() - started
    return report


def _items(out: queue.Queue, workers: Sequence[threading.Thread], seconds: dict) -> Iterator:
    """Items from the decoders until all have finished, timing how long the consumer waits."""
    while True:
        waited = time.perf_counter()
        try:
            item = out.get(timeout=0.05)
        except queue.Empty:
            seconds["wait"] += time.perf_counter() - waited
            if not any(w.is_alive() for w in workers) and out.empty():
                return
            continue
        seconds["wait"] += time.perf_counter() - waited
        yield item


def _consume(
    out: queue.Queue,
    workers: Sequence[threading.Thread],
    embedder: _Embedder,
    writer: StoreWriter,
    cfg: EmbedConfig,
    report: EmbedReport,
    on_progress: Callable[[EmbedReport], None] | None,
) -> None:
    """Batch clips across videos, embed them, and write each video once all its clips are back."""
    seconds = report.stage_seconds
    pending: dict[int, _Pending] = {}
    batch: list[_Clip] = []

    def finish(video: int) -> None:
        state = pending[video]
        end = state.end
        if end is None or len(state.t0) < end.n_clips:
            return
        del pending[video]
        started = time.perf_counter()
        if end.error:
            writer.add_failure(end.record, end.error)
            report.videos_failed += 1
            report.failures.append((end.record.path, end.error))
        else:
            writer.add_video(
                end.record,
                np.stack(state.visual),
                np.stack(state.audio),
                np.asarray(state.has_audio, dtype=bool),
                np.asarray(state.t0, dtype=np.float32),
            )
            report.videos_done += 1
            report.clips += len(state.t0)
            report.video_seconds += end.record.duration
        seconds["write"] += time.perf_counter() - started
        if on_progress:
            on_progress(report)

    def flush() -> None:
        if not batch:
            return
        visual, audio = embedder(batch, seconds)
        touched = set()
        for clip, v, a in zip(batch, visual, audio, strict=True):
            state = pending[clip.video]
            state.t0.append(clip.t0)
            state.visual.append(v)
            state.audio.append(a)
            state.has_audio.append(clip.has_audio)
            touched.add(clip.video)
        batch.clear()
        for video in touched:
            finish(video)

    for item in _items(out, workers, seconds):
        if isinstance(item, _Clip):
            pending.setdefault(item.video, _Pending())
            batch.append(item)
            if len(batch) >= cfg.batch_size:
                flush()
        else:
            state = pending.setdefault(item.video, _Pending())
            if item.error:
                # A video that fails part-way is recorded as failed; its clips are dropped.
                batch[:] = [c for c in batch if c.video != item.video]
                state.discard()
                item.n_clips = 0
            state.end = item
            finish(item.video)
    flush()
    if pending:
        raise AvindexError(f"internal: {len(pending)} videos never completed")  # pragma: no cover


def _drain(out: queue.Queue, workers: Sequence[threading.Thread]) -> None:
    """Empty the queue so blocked decoders can see the stop flag and exit."""
    while any(w.is_alive() for w in workers):
        with contextlib.suppress(queue.Empty):
            out.get(timeout=0.05)
    for worker in workers:
        worker.join()


def model_source(checkpoint: Checkpoint, model_path: str | os.PathLike | None) -> dict:
    """How `search` can rebuild the model: random_checkpoint's arguments, or the checkpoint path."""
    if checkpoint.untrained:
        return {
            "random": {
                "preset": checkpoint.preset,
                "width": checkpoint.model_cfg.width,
                "seed": checkpoint.extra["seed"],
                "head": checkpoint.model_cfg.head,
            }
        }
    return {"path": str(Path(model_path).resolve())} if model_path is not None else {}


def store_meta(
    checkpoint: Checkpoint, cfg: EmbedConfig, model_path: str | os.PathLike | None = None
) -> StoreMeta:
    """What every shard written with this model and hop records (and what resume checks)."""
    from avindex.config import to_dict
    from avindex.store import StoreMeta

    dim = checkpoint.model.embed_dim
    return StoreMeta(
        model_sha256=checkpoint.sha256,
        visual_dim=dim,
        audio_dim=dim,
        hop=cfg.hop,
        model_config=to_dict(checkpoint.model_cfg),
        audio_config=to_dict(checkpoint.audio_cfg),
        video_config=to_dict(checkpoint.video_cfg),
        embed_config=to_dict(cfg),
        model_source=model_source(checkpoint, model_path),
        preset=checkpoint.preset,
    )


def embed_paths(
    paths: Sequence[Path],
    store_dir: Path,
    checkpoint: Checkpoint,
    cfg: EmbedConfig,
    retry_failed: bool = False,
    on_start: Callable[[int, int], None] | None = None,
    on_progress: Callable[[EmbedReport], None] | None = None,
    model_path: str | os.PathLike | None = None,
) -> EmbedReport:
    """Embed every video not yet in the store; finished shards survive any crash of this run.

    `model_path` (the checkpoint file) is recorded in the store so `search` can find the model.
    """
    from avindex.devices import resolve_device
    from avindex.store import StoreWriter, clear_tmp

    device = resolve_device(cfg.device)
    for flag, value, low in (
        ("--hop", cfg.hop, 1e-3),
        ("--batch-size", cfg.batch_size, 1),
        ("--workers", cfg.decode_workers, 1),
    ):
        if value < low:
            raise AvindexError(f"{flag} {value}: must be at least {low}")
    store_dir.mkdir(parents=True, exist_ok=True)
    clear_tmp(store_dir)
    todo = pending_videos(paths, store_dir, retry_failed)
    if on_start:
        on_start(len(todo), len(paths) - len(todo))
    with StoreWriter(
        store_dir, store_meta(checkpoint, cfg, model_path), cfg.shard_clips, cfg.shard_seconds
    ) as w:
        report = run_embed(todo, w, checkpoint, cfg, device, on_progress)
    report.videos_skipped = len(paths) - len(todo)
    return report
