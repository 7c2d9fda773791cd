"""AVC training pairs: overlap-rule sampling, background decoding, shuffle buffer, batches."""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from avindex.config import AudioConfig, TrainConfig, VideoConfig
from avindex.decode import Moment, read_moments
from avindex.errors import AvindexError
from avindex.media import probe

if TYPE_CHECKING:
    import torch

    from avindex.pipelines import Preprocessor

log = logging.getLogger(__name__)

MIN_VIDEOS = 2  # AVC negatives pair frames and audio of different videos


@dataclass(frozen=True)
class Video:
    """A usable training video: its index in the run's list, path and duration (seconds)."""

    index: int
    path: str
    duration: float


@dataclass
class Sample:
    """One decoded moment: which video, the RGB frame and the audio window (mono float32)."""

    video: int
    frame: np.ndarray
    audio: np.ndarray


@dataclass
class Batch:
    """Preprocessed AVC pairs ready for the model; labels 1 = corresponding, 0 = mismatched."""

    frames: torch.Tensor
    specs: torch.Tensor
    labels: torch.Tensor


def usable_videos(paths: Sequence[str | Path], clip_seconds: float) -> list[Video]:
    """Probe videos; unusable ones are skipped with one warning each."""
    videos = []
    for path in paths:
        info = probe(path, clip_seconds)
        if info.usable and info.duration:
            videos.append(Video(len(videos), str(path), float(info.duration)))
        else:
            log.warning("%s: skipped (%s)", path, info.error or "no duration")
    return videos


def split_videos(
    videos: Sequence[Video], val_fraction: float, seed: int
) -> tuple[list[Video], list[Video]]:
    """Seeded split by video into (train, val); with val_fraction > 0, at least two of each.

    Validation pairs need two held-out videos (negatives mix videos) and so does training, so a
    run that validates needs four usable videos."""
    order = np.random.default_rng(seed).permutation(len(videos))
    n_val = 0
    if val_fraction > 0:
        n_val = max(MIN_VIDEOS, round(len(videos) * val_fraction))
        if len(videos) - n_val < MIN_VIDEOS:
            raise AvindexError(
                f"{len(videos)} usable videos: training with validation needs at least "
                f"{2 * MIN_VIDEOS} ({MIN_VIDEOS} held out, {MIN_VIDEOS} to train on); "
                "add videos"
            )
    val = sorted((videos[i] for i in order[:n_val]), key=lambda v: v.index)
    train = sorted((videos[i] for i in order[n_val:]), key=lambda v: v.index)
    return train, val


def sample_moments(
    duration: float, n: int, rng: np.random.Generator, clip_seconds: float = 1.0
) -> list[Moment]:
    """n random moments sorted by frame time; each audio window [ta, ta+clip) overlaps its frame.

    The frame time tf is uniform over the video; ta is uniform over [tf - clip, tf] clipped to
    [0, duration - clip], an interval that always contains a start whose window covers tf.
    """
    frame_times = np.sort(rng.uniform(0.0, duration, n))
    lo = np.maximum(0.0, frame_times - clip_seconds)
    hi = np.minimum(frame_times, max(0.0, duration - clip_seconds))
    starts = rng.uniform(lo, np.maximum(lo, hi))
    return [Moment(float(t), float(a)) for t, a in zip(frame_times, starts, strict=True)]


def mismatch_by_video(videos: np.ndarray) -> np.ndarray:
    """Permutation p with videos[p[i]] != videos[i] wherever possible (-1 where impossible).

    Sort by video and shift by the largest group size: every position then takes an item from a
    different group, which always works while no video holds more than half of the items.
    """
    n = len(videos)
    order = np.argsort(videos, kind="stable")
    shift = int(np.max(np.unique(videos, return_counts=True)[1])) if n else 0
    perm = np.empty(n, dtype=np.int64)
    perm[order] = order[(np.arange(n) + shift) % n] if n else order
    perm[videos[perm] == videos] = -1
    return perm


def build_pairs(
    samples: Sequence[Sample], rng: np.random.Generator
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Half positives (a moment's own frame and audio), half negatives (frame of one video, audio
    of another); returns frames, audio (B, n_samples) and labels."""
    n_pos = len(samples) // 2
    pos, neg = list(samples[:n_pos]), list(samples[n_pos:])
    perm = mismatch_by_video(np.array([s.video for s in neg], dtype=np.int64))
    # Negatives whose batch holds only their own video are dropped rather than mislabelled.
    neg_pairs = [(neg[i].frame, neg[j].audio) for i, j in enumerate(perm) if j >= 0]
    frames = [s.frame for s in pos] + [f for f, _ in neg_pairs]
    audio = np.stack([s.audio for s in pos] + [a for _, a in neg_pairs])
    labels = np.array([1] * len(pos) + [0] * len(neg_pairs), dtype=np.int64)
    order = rng.permutation(len(frames))
    return [frames[i] for i in order], audio[order], labels[order]


class PairStream:
    """Background decode workers feed a shuffle buffer; a batcher thread preprocesses AVC batches.

    Each worker visits a random video, reads sorted random moments in one streaming pass, and
    pushes them; every decoded moment is used in exactly one pair.
    """

    def __init__(
        self,
        videos: Sequence[Video],
        audio_cfg: AudioConfig,
        video_cfg: VideoConfig,
        train_cfg: TrainConfig,
        preprocess: Preprocessor,
        seed: Sequence[int],
        cuda_device: int | None = None,
    ) -> None:
        if len({v.index for v in videos}) < 2:
            raise AvindexError(
                "training needs at least two usable videos (negatives pair different videos)"
            )
        self.videos = list(videos)
        self.audio_cfg, self.video_cfg, self.cfg = audio_cfg, video_cfg, train_cfg
        self.preprocess = preprocess
        self.seed = list(seed)
        self.cuda_device = cuda_device  # the batcher thread must select the rank's GPU itself
        self.samples: queue.Queue[Sample] = queue.Queue(maxsize=train_cfg.shuffle_buffer)
        self.batches: queue.Queue[Batch] = queue.Queue(train_cfg.prefetch_batches)
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.bad: set[int] = set()
        self.bad_lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def start(self) -> PairStream:
        """Start the decode workers and the batcher."""
        for worker in range(max(1, self.cfg.decode_workers)):
            self._spawn(self._decode_loop, worker)
        self._spawn(self._batch_loop, 0)
        return self

    def _spawn(self, target: Callable[[int], None], arg: int) -> None:
        thread = threading.Thread(target=self._guard, args=(target, arg), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _guard(self, target: Callable[[int], None], arg: int) -> None:
        """Run a thread body; an unexpected error reaches the training loop instead of vanishing."""
        try:
            target(arg)
        except BaseException as exc:
            self.error = exc
            self.stop.set()

    def _put(self, q: queue.Queue, item: object) -> bool:
        """Put unless stopping (polls so a stopped stream never blocks a thread forever)."""
        while not self.stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _decode_loop(self, worker: int) -> None:
        rng = np.random.default_rng([*self.seed, worker])
        while not self.stop.is_set():
            video = self.videos[rng.integers(len(self.videos))]
            if video.index in self.bad:
                if len(self.bad) >= len({v.index for v in self.videos}):
                    raise AvindexError("every training video failed to decode; see the warnings")
                continue
            moments = sample_moments(
                video.duration, self._visit_size(video), rng, self.audio_cfg.clip_seconds
            )
            try:
                for data in read_moments(video.path, moments, self.audio_cfg, self.video_cfg):
                    if not self._put(
                        self.samples,
                        Sample(video.index, data.frame, data.audio),
                    ):
                        return
            except Exception as exc:  # any decoder failure skips only this video
                self._mark_bad(video, str(exc) or type(exc).__name__)

    def _visit_size(self, video: Video) -> int:
        """Moments per visit: a visit decodes every frame up to its last moment, so longer videos
        give more moments (measured on 20 s clips: 10 ms per moment at 8, 2 ms at 40), capped so
        one video cannot fill the shuffle buffer."""
        cfg = self.cfg
        n = max(cfg.moments_per_video, math.ceil(video.duration * cfg.moments_per_second))
        return min(n, max(cfg.moments_per_video, cfg.shuffle_buffer // 4))

    def _mark_bad(self, video: Video, reason: str) -> None:
        """Skip a video that failed to decode from now on, warning once."""
        with self.bad_lock:
            if video.index not in self.bad:
                self.bad.add(video.index)
                log.warning("%s: skipped in training (%s)", video.path, reason)

    def _batch_loop(self, _: int) -> None:
        rng = np.random.default_rng([*self.seed, 1 << 20])
        if self.cuda_device is not None:
            import torch

            torch.cuda.set_device(self.cuda_device)
        buffer: list[Sample] = []
        # Start once the buffer is partly full so the first batches mix several videos.
        fill = min(self.cfg.shuffle_buffer, 4 * self.cfg.batch_size)
        size = self.cfg.batch_size
        while not self.stop.is_set():
            while len(buffer) < fill or not self.samples.empty():
                if len(buffer) >= self.cfg.shuffle_buffer:
                    break
                try:
                    buffer.append(self.samples.get(timeout=0.1))
                except queue.Empty:
                    if self.stop.is_set():
                        return
            fill = size  # later batches take whatever is there, down to one batch
            picked = []
            for _ in range(size):
                i = int(rng.integers(len(buffer)))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                picked.append(buffer.pop())
            frames, audio, labels = build_pairs(picked, rng)
            self._put(self.batches, self._tensors(frames, audio, labels))

    def _tensors(self, frames: list[np.ndarray], audio: np.ndarray, labels: np.ndarray) -> Batch:
        import torch

        f, s = self.preprocess(frames, audio)
        return Batch(f, s, torch.from_numpy(labels))

    def next(self, timeout: float = 600.0) -> Batch:
        """The next batch (blocks while the workers catch up); re-raises a worker's error."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.batches.get(timeout=0.2)
            except queue.Empty:
                if self.error is not None:
                    raise self.error from None
                if time.monotonic() > deadline:
                    raise AvindexError(
                        "no training batch for a long time; are the videos readable?"
                    ) from None

    def close(self) -> None:
        """Stop and join every thread."""
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)


@dataclass
class ValSet:
    """Fixed held-out data: AVC pairs, and clips on the embedding grid for retrieval."""

    frames: torch.Tensor  # AVC pairs
    specs: torch.Tensor
    labels: torch.Tensor
    clip_frames: torch.Tensor  # retrieval clips: frame at t0 + clip/2, audio [t0, t0 + clip)
    clip_specs: torch.Tensor
    clip_video: np.ndarray  # index into the run's video list
    clip_t0: np.ndarray


def _spread(n_total: int, n: int) -> np.ndarray:
    """n evenly spread indices of range(n_total) (all of them when n >= n_total)."""
    if n >= n_total:
        return np.arange(n_total)
    return np.unique(np.linspace(0, n_total - 1, n).round().astype(np.int64))


def read_val_set(
    videos: Sequence[Video],
    audio_cfg: AudioConfig,
    video_cfg: VideoConfig,
    train_cfg: TrainConfig,
    preprocess: Preprocessor,
    seed: int,
) -> ValSet:
    """Decode the held-out videos once (one pass each) into fixed preprocessed pairs and clips."""
    import torch

    from avindex.decode import clip_moment
    from avindex.media import clip_starts

    rng = np.random.default_rng([seed, 2 << 20])
    clip = audio_cfg.clip_seconds
    per_video = -(-train_cfg.val_pairs // max(1, len(videos)))
    grids = [clip_starts(v.duration, clip, clip) for v in videos]
    offsets = np.cumsum([0] + [len(g) for g in grids])
    keep = set(_spread(int(offsets[-1]), train_cfg.val_clips).tolist())
    pair_samples: list[Sample] = []
    clip_samples: list[Sample] = []
    clip_video, clip_t0 = [], []
    for video, grid, offset in zip(videos, grids, offsets, strict=False):
        wanted = [(m, True) for m in sample_moments(video.duration, per_video, rng, clip)]
        wanted += [(clip_moment(t, clip), False) for i, t in enumerate(grid) if offset + i in keep]
        wanted.sort(key=lambda w: w[0].frame_time)
        try:
            datas = list(read_moments(video.path, [m for m, _ in wanted], audio_cfg, video_cfg))
        except Exception as exc:  # a bad held-out video must not end the run
            log.warning(
                "%s: skipped in validation (%s)", video.path, str(exc) or type(exc).__name__
            )
            continue
        for data, (moment, is_pair) in zip(datas, wanted, strict=True):
            sample = Sample(video.index, data.frame, data.audio)
            if is_pair:
                pair_samples.append(sample)
            else:
                clip_samples.append(sample)
                clip_video.append(video.index)
                clip_t0.append(moment.audio_start)
    if len({s.video for s in pair_samples}) < 2:
        raise AvindexError(
            f"validation needs at least {MIN_VIDEOS} readable held-out videos; add videos"
        )
    order = rng.permutation(len(pair_samples))[: train_cfg.val_pairs]
    frames, audio, labels = build_pairs([pair_samples[i] for i in order], rng)
    pf, ps = _preprocess_all(preprocess, frames, audio)
    cf, cs = _preprocess_all(
        preprocess, [s.frame for s in clip_samples], np.stack([s.audio for s in clip_samples])
    )
    return ValSet(pf, ps, torch.from_numpy(labels), cf, cs, np.array(clip_video), np.array(clip_t0))


def _preprocess_all(
    preprocess: Preprocessor, frames: list[np.ndarray], audio: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the preprocessor over any number of items in chunks of its batch size (CPU tensors)."""
    import torch

    outs = [
        preprocess(frames[i : i + preprocess.batch_size], audio[i : i + preprocess.batch_size])
        for i in range(0, len(frames), preprocess.batch_size)
    ]
    return torch.cat([f.cpu() for f, _ in outs]), torch.cat([s.cpu() for _, s in outs])
