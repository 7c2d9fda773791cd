"""Frozen dataclass configs: the one source of defaults for every stage; the CLI maps flags."""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class AudioConfig:
    """Audio front end: mono at `sample_rate`, `clip_seconds` clips, log-magnitude spectrogram."""

    sample_rate: int = 48_000
    clip_seconds: float = 1.0
    n_fft: int = 512
    window_length: int = 480  # 10 ms at 48 kHz (paper)
    window_step: int = 240  # half overlap (paper)
    db_cutoff: float = -100.0  # floor of the log spectrogram, dB re amplitude 1.0

    @property
    def n_samples(self) -> int:
        """Samples in one clip."""
        return round(self.sample_rate * self.clip_seconds)

    @property
    def n_freq(self) -> int:
        """Frequency bins of the spectrogram (257 at the paper's settings)."""
        return self.n_fft // 2 + 1

    @property
    def n_frames(self) -> int:
        """Time frames of the spectrogram without centred windows (199 at the paper's settings)."""
        return (self.n_samples - self.window_length) // self.window_step + 1


@dataclass(frozen=True)
class VideoConfig:
    """Frame preprocessing: scale the shorter side to `resize_shorter`, crop `crop` x `crop`."""

    resize_shorter: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    """L3-Net shape: tower width multiplier, head, projection size and spectrogram pooling."""

    width: float = 1.0  # channel multiplier; 1.0 = paper (64/128/256/512)
    head: str = "contrastive"  # l3 | ave | contrastive
    embed_dim: int = 128  # projection size of the aligned heads
    spec_pool: int = 1  # average-pool the spectrogram by this factor before the audio tower
    dropout: float = 0.0  # on the tower outputs entering the head (training only)


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation: the paper's (random crop and flip, brightness and saturation jitter,
    random gain per sample) and the extra ones measured against it on a hard corpus (README)."""

    # Gain +/-30% (the paper: +/-10%) and audio shifts up to 0.25 s: together they raised the
    # held-out AVC on a hard corpus in both screened runs (README, "Regularisation").
    volume_jitter: float = 0.3
    brightness_jitter: float = 0.2
    saturation_jitter: float = 0.2
    min_crop_area: float = 1.0  # random resized crop over this..1 of the frame; 1.0: plain crop
    audio_shift: float = 0.25  # circular shift of each audio window by up to this many seconds
    background_mix: float = 0.0  # add another video's sound at up to this gain (0: off)
    spec_masks: int = 0  # SpecAugment: this many time and this many frequency masks per sample


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its learning-rate schedule (the paper's Adam at 1e-4 by default)."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up from lr/10
    lr_drop: float = 1.0  # multiply the rate by this after `lr_drop_after` steps without a better
    lr_drop_after: int = 0  # validation criterion (0: never)


@dataclass(frozen=True)
class DataConfig:
    """AVC pair streaming: batch size, moment sampling, shuffle buffer, decoders, prefetch."""

    batch_size: int = 64
    moments_per_video: int = 8  # random moments decoded per video visit (one sequential pass)...
    moments_per_second: float = 2.0  # ...or more for long videos: a visit decodes up to its last
    shuffle_buffer: int = 512
    decode_workers: int = 2
    prefetch_batches: int = 2  # preprocessed batches waiting for the model


@dataclass(frozen=True)
class ValConfig:
    """Validation on held-out videos or moments, the criterion best.pt follows, early stopping,
    fold-in."""

    val_every: int = 250  # steps between validations
    # What validation holds out of the main phase: "videos" (val_fraction of the videos, at least
    # 2: the criterion measures videos never seen) or "moments" (the last val_fraction of every
    # video: it measures search within the training collection). 0: no validation.
    holdout: str = "videos"
    val_fraction: float = 0.2
    val_samples: int = 1024  # fixed held-out moments: each gives a positive and a negative pair
    # Stop when the criterion has not improved by `min_delta` for this many steps. None: on
    # (10 validations) with a time limit, off for a fixed number of steps; 0: never.
    patience: int | None = None
    min_delta: float = 0.002
    # Fold what was held out back in: train on every video, whole, for this fraction of the best
    # step's steps (at least `min_fold_steps`), from the best model, so best.pt covers it too.
    fold_in: float = 0.25
    min_fold_steps: int = 50


@dataclass(frozen=True)
class TrainConfig:
    """One training run: stopping, checkpoints, seed and device, and the nested configs."""

    max_steps: int = 20_000
    time_limit: float | None = None  # seconds; stop cleanly with a checkpoint
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "auto"
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    val: ValConfig = ValConfig()
    augment: AugmentConfig = AugmentConfig()


@dataclass(frozen=True)
class EmbedConfig:
    """Bulk embedding: clip hop, batching, background decoding and shard flushing."""

    hop: float = 1.0
    batch_size: int = 64
    device: str = "auto"
    # Decoder processes: half the cores (at least 2), so the towers keep the other half; on a
    # 16-core GPU host 8 decoders embedded 720p 1.36x faster than 2 (H200 run, README).
    decode_workers: int = field(default_factory=lambda: max(2, (os.cpu_count() or 2) // 2))
    # FFmpeg threads per decoder; 0: the cores shared among the decoders at work, so fewer
    # videos than decoders (one long file) still use every core.
    decode_threads: int = 0
    decode_stall_seconds: float = 300.0  # a decoder silent this long is killed (its video fails)
    decode_memory_bytes: int = 8 << 30  # address-space limit of a decoder process
    nvdec: bool = True  # on CUDA, decode frames of NVDEC codecs on the GPU; PyAV otherwise
    # NVDEC sessions in flight (and demux workers feeding them): 2 per engine keeps every engine
    # busy while one session waits for packets; an H200 has 7 engines.
    nvdec_sessions: int = 14
    prefetch_batches: int = 4
    shard_clips: int = 16_384  # flush a shard once it holds this many clips...
    shard_seconds: float = 60.0  # ...or this long after its first video, to bound lost work
    ray_actors: int | None = None  # --ray: CPU actors (None: cores / (decoders + 1)); GPUs: 1 each
    ray_batch_videos: int = 16  # --ray: videos per actor task (a retry redoes at most these)


@dataclass(frozen=True)
class IndexConfig:
    """faiss index building: factory choice, memory budget, streaming and recall check."""

    factory: str = "auto"
    max_memory: int = 4 << 30  # bytes the index may use
    device: str = "auto"
    block_rows: int = 65_536
    train_sample: int = 100_000  # training vectors at least; more for many lists (39 per list)
    parts: int = 0  # runs of shards added separately and merged on disk; 0: by size and memory
    part_rows: int = 1_000_000  # rows per part when `parts` is 0
    workers: int = 0  # processes adding parts at once; 0: one per core
    rerank: int = 10  # lossy codes (PQ): re-rank k x this many candidates exactly; 0: off
    recall_queries: int = 500
    recall_k: int = 10
    target_recall: float = 0.95  # nprobe/efSearch are tuned up to this recall@recall_k
    exact_limit: int = 50_000  # Flat (exact) up to this many vectors
    seed: int = 0


@dataclass(frozen=True)
class SearchConfig:
    """Query search: results per query, model batch size, devices, contact-sheet size."""

    k: int = 10
    batch_size: int = 64  # query windows / frames per model batch
    device: str = "auto"  # torch + DALI for query encoding, faiss for the search
    sheet_results: int = 10  # result tiles per query row on a contact sheet
    max_query_seconds: float = 300.0  # a longer sound query uses its first 300 s
    media_workers: int = 2  # child processes that decode query media (a crash fails one query)


@dataclass(frozen=True)
class ServeConfig:
    """`avindex serve`: address, access token, upload limits, result counts and media sizes."""

    host: str = "127.0.0.1"  # loopback only; any other address needs a token
    port: int = 8000
    token: str | None = None  # required on every API and media request when set
    max_upload_bytes: int = 50 << 20  # whole request body, refused while it streams in
    max_upload_seconds: float = 600.0  # longest sound or video accepted as a query
    k: int = 12  # results per query when the request does not say
    max_k: int = 100
    thumb_height: int = 180  # result frames are JPEGs this many pixels high
    audio_context: float = 0.5  # seconds of sound played on each side of a result's 1 s clip
    media_workers: int = 4  # stored-video decodes at once (thumbnails, sounds)
    media_cache: int = 256  # decoded thumbnails/sounds/spectrograms kept in memory
    device: str = "auto"  # torch + faiss for queries


@dataclass(frozen=True)
class EvalConfig:
    """Retrieval evaluation by class labels: query sample size and exact-search block size."""

    max_queries: int = 5_000  # per direction; larger stores are sampled (seeded)
    seed: int = 0
    block_rows: int = 65_536


@dataclass(frozen=True)
class BenchConfig:
    """`avindex bench`: corpus, model width, batch sweep, repeats and index sizes (a few minutes
    on 2 CPU cores by default)."""

    videos: int = 8  # synthetic corpus when no folder is given
    seconds: int = 60  # long enough that embed start-up (model, DALI build) does not dominate
    size: tuple[int, int] = (128, 96)  # synthetic frame size (width, height)
    corpus: str = "classes"  # classes (SynthConfig look) | natural (NaturalConfig look)
    codec: str = "h264"  # natural corpus: h264 | hevc
    fps: float = 30.0  # natural corpus frame rate
    copies: int = 1  # each video appears this many times (hard links): work for many sessions
    nvdec_sessions: tuple[int, ...] = (1, 2, 4, 7, 14, 21)  # NVDEC sweep (CUDA only)
    naive_max_bytes: int = 4 << 30  # the naive pipeline holds every frame: bigger files skip it
    width: float | None = None  # tower width; None: the device's default preset's
    batch_sizes: tuple[int, ...] = (1, 8, 64)  # model sweep (the embed batch size is added)
    repeats: int = 2  # each rate is the best of this many runs (shared machines are noisy)
    min_seconds: float = 1.0  # each model/front-end timing runs at least this long
    naive_videos: int = 2  # the naive pipeline is slow: it embeds this many of the videos
    train_steps: int = 10  # timed steps, after a few warm-up steps
    train_batch: int | None = None  # None: the training preset's batch size
    index_vectors: int = 100_000  # synthetic clustered vectors for index build and search
    index_dim: int = 128
    queries: int = 2_000  # search queries per batched call (100 of them also one per call)
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class SynthConfig:
    """Synthetic corpus: `videos` videos of `seconds` s, segments of one of `classes` events."""

    videos: int = 40
    seconds: int = 20
    classes: int = 10
    seed: int = 0
    format: str = "mp4"  # mp4 (H.264 + AAC) | webm (VP9 + Opus)
    width: int = 128
    height: int = 96
    fps: float = 25.0
    sample_rate: int = 48_000
    min_segment: int = 2  # whole seconds, so every second has exactly one class
    max_segment: int = 4
    # easy: a large object over a plain backdrop, a clean sound. hard (and harder): a small object
    # crossing a textured scene of its own per video, its sound at a random SNR in ambient noise,
    # and a distractor sound unrelated to the picture (what real collections look like).
    difficulty: str = "easy"
    one_class_per_video: bool = False  # video i shows class i % classes for its whole length


@dataclass(frozen=True)
class NaturalConfig:
    """Natural-looking benchmark videos (avindex.natural): textured scenery, camera motion,
    moving objects, encoded with x264/x265 defaults."""

    videos: int = 4
    seconds: int = 60
    width: int = 1280
    height: int = 720
    fps: float = 30.0
    codec: str = "h264"  # h264 (libx264) | hevc (libx265)
    seed: int = 0
    loops: int = 1  # each video is its encoded `seconds` played this many times (remuxed)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass config -> plain dict (for JSON, HDF5 attributes and checkpoints)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config from a dict, ignoring unknown keys (other versions), restoring tuples and
    nested configs; a key that belongs to a nested config but sits at the top (a flat layout
    written before that config was split off) goes to its nested config."""
    types = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        owner = _nested_owner(cls, key)
        if owner is not None and key not in types:
            nested.setdefault(owner, {})[key] = value
    for f in dataclasses.fields(cls):
        value = data.get(f.name)
        kind = types[f.name]
        if dataclasses.is_dataclass(kind):
            merged = {**(value if isinstance(value, dict) else {}), **nested.get(f.name, {})}
            if f.name in data or merged:
                kwargs[f.name] = from_dict(kind, merged)
            continue
        if f.name not in data:
            continue
        kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def replace(cfg: T, **changes: Any) -> T:
    """Copy of a config with the given fields changed; None values mean 'keep the default'.

    A name that is not a field of `cfg` but of one of its nested configs changes it there, so
    callers can say `replace(train_cfg, lr=1e-3, batch_size=16)`."""
    changes = {k: v for k, v in changes.items() if v is not None}
    fields = {f.name for f in dataclasses.fields(cfg)}  # type: ignore[arg-type]
    nested: dict[str, dict[str, Any]] = {}
    for key in [k for k in changes if k not in fields]:
        owner = _nested_owner(type(cfg), key)
        if owner is None:
            raise TypeError(f"{type(cfg).__name__} has no field {key!r}")
        nested.setdefault(owner, {})[key] = changes.pop(key)
    for owner, values in nested.items():
        changes[owner] = replace(getattr(cfg, owner), **values)
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]


def _nested_owner(cls: type, name: str) -> str | None:
    """The field of `cls` holding a nested config that has a field `name` (None if none does)."""
    types = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = types[f.name]
        if dataclasses.is_dataclass(kind) and name in {g.name for g in dataclasses.fields(kind)}:
            return f.name
    return None


@dataclass(frozen=True)
class DemoConfig:
    """`avindex demo`: corpus, training time and queries (about 5 minutes on 2 CPU cores)."""

    out: str = "avindex-demo"
    corpus: SynthConfig = SynthConfig(videos=32, seconds=16, classes=8, seed=7)
    train_seconds: float = 150.0
    queries_per_kind: int = 3  # held-out sounds and pictures of different classes
    query_sample_rate: int = 16_000  # the sound queries are 16 kHz stereo wav: any rate works
    k: int = 5
    device: str = "auto"


@dataclass(frozen=True)
class ClaimConfig:
    """Per-video claims of writers sharing one store (avindex.claims): when a writer counts as dead.

    A writer on this host is dead as soon as its process is gone; a writer on another machine
    when its heartbeat is older than `ttl`, so `ttl` must exceed the longest stall of a live
    writer (a slow shared filesystem, a paused VM) by a margin.
    """

    ttl: float = 120.0  # seconds without a heartbeat before another machine's writer is dead
    heartbeat: float = 15.0  # how often a live writer refreshes its heartbeat
    # How long a finished video's claim says "done" to writers whose view of the catalog is older
    # (a shared filesystem may list new shards late); after it only the catalog decides.
    done_grace: float = 900.0


__all__ = [
    "AudioConfig",
    "AugmentConfig",
    "BenchConfig",
    "ClaimConfig",
    "DataConfig",
    "DemoConfig",
    "EmbedConfig",
    "EvalConfig",
    "IndexConfig",
    "ModelConfig",
    "NaturalConfig",
    "OptimConfig",
    "SearchConfig",
    "ServeConfig",
    "SynthConfig",
    "TrainConfig",
    "ValConfig",
    "VideoConfig",
    "from_dict",
    "replace",
    "to_dict",
]
