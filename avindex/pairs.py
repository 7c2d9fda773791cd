"""AVC training pairs: overlap-rule sampling, decoder processes, shuffle buffer, batches."""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from avindex.augment import augment_batch_audio, mask_spectrograms
from avindex.config import AudioConfig, AugmentConfig, DataConfig, VideoConfig
from avindex.decode import Moment, read_moments
from avindex.errors import AvindexError
from avindex.media import probe_files
from avindex.workers import Failed, Item, Job, PoolLimits, WorkerPool

if TYPE_CHECKING:
    from avindex.pipelines import Preprocessor

log = logging.getLogger(__name__)

MIN_VIDEOS = 2  # AVC negatives pair frames and audio of different videos


@dataclass(frozen=True)
class Video:
    """A usable training video: its index in the run's list, its path, and the span of it that
    moments are drawn from, [start, end) seconds (the whole file, or a part of it when the rest
    is held out for validation)."""

    index: int
    path: str
    end: float  # the file's duration for a whole video
    start: float = field(default=0.0, kw_only=True)

    def part(self, start: float, end: float) -> Video:
        """The same video, drawn from [start, end) only."""
        return Video(self.index, self.path, end, start=start)


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


def usable_videos(
    paths: Sequence[str | Path], clip_seconds: float, workers: int = 2
) -> list[Video]:
    """Probe videos in child processes (a file that crashes its demuxer fails alone); unusable
    ones are skipped with one warning each."""
    videos = []
    for path, info in zip(paths, probe_files(paths, workers, clip_seconds), strict=True):
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
                "add videos or use --holdout moments"
            )
    val = sorted((videos[i] for i in order[:n_val]), key=lambda v: v.index)
    train = sorted((videos[i] for i in order[n_val:]), key=lambda v: v.index)
    return train, val


def split_moments(
    videos: Sequence[Video], val_fraction: float, clip_seconds: float
) -> tuple[list[Video], list[Video]]:
    """Split every video in time into (train, val): the last `val_fraction` of each is held out,
    the rest trains; no training moment's frame or sound reaches into the held-out part. Videos
    too short to give a clip to each side train whole and are not validated."""
    train, val = [], []
    for video in videos:
        cut = video.start + (video.end - video.start) * (1.0 - val_fraction)
        if val_fraction > 0 and min(cut - video.start, video.end - cut) >= clip_seconds:
            train.append(video.part(video.start, cut))
            val.append(video.part(cut, video.end))
        else:
            train.append(video)
    if val_fraction > 0 and len(val) < MIN_VIDEOS:
        raise AvindexError(
            f"{len(val)} of {len(videos)} videos are long enough to hold out their last "
            f"{val_fraction:.0%} (a {clip_seconds:g} s clip on each side of the cut): validation "
            f"needs at least {MIN_VIDEOS}; add longer videos"
            + (" or use --holdout videos" if len(videos) >= 2 * MIN_VIDEOS else "")
        )
    return train, val


def sample_moments(
    video: Video, n: int, rng: np.random.Generator, clip_seconds: float = 1.0
) -> list[Moment]:
    """n random moments of the video's span sorted by frame time; each audio window
    [ta, ta+clip) overlaps its frame, and frame and window stay within [start, end).

    The frame time tf is uniform over the span; ta is uniform over [tf - clip, tf] clipped to
    [start, end - clip], an interval that always contains a start whose window covers tf.
    """
    frame_times = np.sort(rng.uniform(video.start, video.end, n))
    lo = np.maximum(video.start, frame_times - clip_seconds)
    hi = np.minimum(frame_times, max(video.start, video.end - clip_seconds))
    starts = rng.uniform(lo, np.maximum(lo, hi))
    return [Moment(float(t), float(a)) for t, a in zip(frame_times, starts, strict=True)]


def visit_size(video: Video, cfg: DataConfig) -> int:
    """Moments per visit: a visit decodes every frame up to its last moment, so longer videos
    give more moments (measured on 20 s clips: 10 ms per moment at 8, 2 ms at 40), capped so
    one video cannot fill the shuffle buffer."""
    n = max(cfg.moments_per_video, math.ceil((video.end - video.start) * cfg.moments_per_second))
    return min(n, max(cfg.moments_per_video, cfg.shuffle_buffer // 4))


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


@dataclass
class Pairs:
    """AVC pairs before preprocessing: frames, audio (B, n_samples), labels (1 = corresponding),
    and which video each frame and each audio window comes from."""

    frames: list[np.ndarray]
    audio: np.ndarray
    labels: np.ndarray
    frame_video: np.ndarray
    audio_video: np.ndarray


def build_pairs(samples: Sequence[Sample], rng: np.random.Generator) -> Pairs:
    """Half positives (a moment's own frame and audio), half negatives (frame of one video, audio
    of another), shuffled."""
    n_pos = len(samples) // 2
    pos, neg = list(samples[:n_pos]), list(samples[n_pos:])
    perm = mismatch_by_video(np.array([s.video for s in neg], dtype=np.int64))
    # Negatives whose batch holds only their own video are dropped rather than mislabelled.
    neg_pairs = [(neg[i], neg[j]) for i, j in enumerate(perm) if j >= 0]
    pairs = [(s, s) for s in pos] + neg_pairs
    order = rng.permutation(len(pairs))
    return Pairs(
        frames=[pairs[i][0].frame for i in order],
        audio=np.stack([pairs[i][1].audio for i in order]),
        labels=np.array([int(i < len(pos)) for i in order], dtype=np.int64),
        frame_video=np.array([pairs[i][0].video for i in order], dtype=np.int64),
        audio_video=np.array([pairs[i][1].video for i in order], dtype=np.int64),
    )


class PairStream:
    """Decoder processes feed a shuffle buffer; a batcher thread preprocesses AVC batches.

    Each visit is one job in a WorkerPool: a random video, sorted random moments read in one
    streaming pass (decode.read_moments, the embed path's decoder), so a file that crashes or
    hangs its decoder fails that video only and decoding is not bound by this process's GIL.
    Every decoded moment is used in exactly one pair. The batcher applies the waveform and
    spectrogram augmentations that DALI does not do (augment.py).
    """

    def __init__(
        self,
        videos: Sequence[Video],
        audio_cfg: AudioConfig,
        video_cfg: VideoConfig,
        data_cfg: DataConfig,
        augment_cfg: AugmentConfig,
        preprocess: Preprocessor,
        seed: Sequence[int],
        cuda_device: int | None = None,
    ) -> None:
        if len({v.index for v in videos}) < 2:
            raise AvindexError(
                "training needs at least two usable videos (negatives pair different videos)"
            )
        self.videos = list(videos)
        self.audio_cfg, self.video_cfg, self.cfg = audio_cfg, video_cfg, data_cfg
        self.augment = augment_cfg
        self.preprocess = preprocess
        self.seed = list(seed)
        self.cuda_device = cuda_device  # the batcher thread must select the rank's GPU itself
        self.samples: queue.Queue[Sample] = queue.Queue(maxsize=data_cfg.shuffle_buffer)
        self.batches: queue.Queue[Batch] = queue.Queue(data_cfg.prefetch_batches)
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.bad: set[int] = set()
        self.bad_lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.pool: WorkerPool | None = None

    def use(self, videos: Sequence[Video]) -> None:
        """Sample these videos from now on (the held-out ones folded back in)."""
        # One list swap: the job source reads self.videos afresh at every visit.
        self.videos = list(videos)

    def start(self) -> PairStream:
        """Start the decoder processes, the thread that collects their moments, the batcher."""
        self.start_decoding()
        self._spawn(self._batch_loop, 0)
        return self

    def start_decoding(self) -> None:
        """Start the decoder processes and the thread that moves their moments into the buffer."""
        limits = PoolLimits(role="training decoder")
        self.pool = WorkerPool(self._visits(), max(1, self.cfg.decode_workers), limits)
        self._spawn(self._collect_loop, 0)

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

    def _visits(self) -> Iterator[Job]:
        """Decode jobs, one per visit of a random video, until the stream stops."""
        rng = np.random.default_rng([*self.seed, 0])
        for visit in itertools.count():
            if self.stop.is_set():
                return
            videos = self.videos
            video = videos[rng.integers(len(videos))]
            if video.index in self.bad:
                if all(v.index in self.bad for v in videos):
                    raise AvindexError("every training video failed to decode; see the warnings")
                continue  # draw again
            moments = sample_moments(
                video, visit_size(video, self.cfg), rng, self.audio_cfg.clip_seconds
            )
            args = (video.path, moments, self.audio_cfg, self.video_cfg)
            yield Job((visit, video), read_moments, args)

    def _collect_loop(self, _: int) -> None:
        """Move decoded moments into the shuffle buffer; a failed visit marks its video bad."""
        assert self.pool is not None
        for event in self.pool.events():
            video: Video = event.key[1]
            if isinstance(event, Item):
                data = event.value
                if not self._put(self.samples, Sample(video.index, data.frame, data.audio)):
                    return
            elif isinstance(event, Failed):  # any decoder failure skips only this video
                self._mark_bad(video, event.reason)

    def _mark_bad(self, video: Video, reason: str) -> None:
        """Skip a video that failed to decode from now on, warning once."""
        with self.bad_lock:
            if video.index not in self.bad:
                self.bad.add(video.index)
                log.warning("%s: skipped in training (%s)", video.path, reason)

    def _batch_loop(self, _: int) -> None:
        rng = np.random.default_rng([*self.seed, 1 << 20])
        if self.cuda_device is not None:
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
            self._put(self.batches, self._tensors(build_pairs(picked, rng), rng))

    def _tensors(self, pairs: Pairs, rng: np.random.Generator) -> Batch:
        """Augment and preprocess one batch of pairs into model-ready tensors."""
        audio = augment_batch_audio(
            pairs.audio,
            pairs.frame_video,
            pairs.audio_video,
            rng,
            self.augment,
            self.audio_cfg.sample_rate,
        )
        frames, specs = self.preprocess(pairs.frames, audio)
        specs = mask_spectrograms(specs, rng, self.augment.spec_masks)
        return Batch(frames, specs, torch.from_numpy(pairs.labels))

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
        """Stop the decoder processes and join every thread."""
        self.stop.set()
        if self.pool is not None:
            self.pool.close()
        for thread in self.threads:
            thread.join(timeout=10)


@dataclass
class ValSet:
    """Fixed held-out moments, preprocessed once (float16 on the CPU to halve their memory).

    Each moment gives one positive pair (its own frame and audio) and one negative (its frame
    with the audio of a moment of another video: `negative_audio`)."""

    frames: torch.Tensor  # (n, 3, crop, crop)
    specs: torch.Tensor  # (n, 1, F, T)
    video: np.ndarray  # index into the run's video list
    audio_start: np.ndarray  # seconds
    negative_audio: np.ndarray  # moment whose audio forms this frame's negative (-1: none)

    def __len__(self) -> int:
        return len(self.video)


def read_val_set(
    videos: Sequence[Video],
    audio_cfg: AudioConfig,
    video_cfg: VideoConfig,
    n_samples: int,
    preprocess: Preprocessor,
    seed: int,
    workers: int = 2,
) -> ValSet:
    """Decode `n_samples` seeded moments (overlap rule, as in training) spread evenly over the
    held-out videos, one pass each in decoder processes; unreadable videos are skipped with a
    warning."""
    rng = np.random.default_rng([seed, 2 << 20])
    per_video = -(-n_samples // max(1, len(videos)))
    plans = [sample_moments(v, per_video, rng, audio_cfg.clip_seconds) for v in videos]
    # A held-out end of a video (--holdout moments) is read from the keyframe before it.
    jobs = [
        Job(
            i, partial(read_moments, seek=video.start > 0), (video.path, plan, audio_cfg, video_cfg)
        )
        for i, (video, plan) in enumerate(zip(videos, plans, strict=True))
    ]
    read: dict[int, list] = {i: [] for i in range(len(jobs))}
    limits = PoolLimits(role="validation decoder")
    with WorkerPool(jobs, max(1, min(workers, len(jobs))), limits) as pool:
        for event in pool.events():
            if isinstance(event, Item):
                read[event.key].append(event.value)
            elif isinstance(event, Failed):  # a bad held-out video must not end the run
                log.warning("%s: skipped in validation (%s)", videos[event.key].path, event.reason)
                del read[event.key]
    samples: list[Sample] = []
    starts: list[float] = []
    for i, datas in read.items():  # in video order: the set does not depend on timing
        samples += [Sample(videos[i].index, d.frame, d.audio) for d in datas]
        starts += [d.moment.audio_start for d in datas]
    video_of = np.array([s.video for s in samples], dtype=np.int64)
    if len(np.unique(video_of)) < MIN_VIDEOS:
        raise AvindexError(
            f"validation needs at least {MIN_VIDEOS} readable held-out videos; add videos"
        )
    # Negatives: a seeded shuffle, then each moment takes the audio of one of another video
    # (-1 where none is left: a video holding more than half of the moments).
    shuffle = rng.permutation(len(samples))
    partner = mismatch_by_video(video_of[shuffle])
    negative = np.empty(len(samples), dtype=np.int64)
    negative[shuffle] = np.where(partner >= 0, shuffle[partner], -1)
    frames, specs = _preprocess_all(
        preprocess, [s.frame for s in samples], np.stack([s.audio for s in samples])
    )
    return ValSet(frames.half(), specs.half(), video_of, np.array(starts), negative)


def _preprocess_all(
    preprocess: Preprocessor, frames: list[np.ndarray], audio: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the preprocessor over any number of items in chunks of its batch size (CPU tensors)."""
    outs = [
        preprocess(frames[i : i + preprocess.batch_size], audio[i : i + preprocess.batch_size])
        for i in range(0, len(frames), preprocess.batch_size)
    ]
    return torch.cat([f.cpu() for f, _ in outs]), torch.cat([s.cpu() for _, s in outs])
