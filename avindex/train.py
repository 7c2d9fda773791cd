"""Training loop: AVC batches -> L3Net with Adam, validation, atomic checkpoints, resume, DDP."""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from avindex import config
from avindex.config import TrainConfig
from avindex.distributed import agree_stop, capture_rng, model_threads, restore_rng, setup_dist
from avindex.errors import AvindexError
from avindex.presets import SMALL, Preset

if TYPE_CHECKING:
    from avindex.model import L3Net
    from avindex.pairs import Batch, PairStream, ValSet, Video
    from avindex.pipelines import Preprocessor

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"


@dataclass
class TrainResult:
    """Outcome of a run: where it stopped and its validation numbers."""

    out: Path
    step: int
    stopped: str  # max_steps | time_limit | signal
    val: dict[str, Any] = field(default_factory=dict)  # last validation
    best: dict[str, Any] = field(default_factory=dict)  # validation of best.pt
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for --json."""
        return {
            "out": str(self.out),
            "step": self.step,
            "stopped": self.stopped,
            "seconds": round(self.seconds, 2),
            "val": self.val,
            "best": self.best,
            "checkpoints": {"last": str(self.out / LAST), "best": str(self.out / BEST)},
        }

    def summary(self) -> str:
        """A few human-readable lines: where it stopped, validation numbers, checkpoint paths."""
        lines = [f"stopped at step {self.step} ({self.stopped}) after {self.seconds:.0f} s"]
        for name, val in (("last", self.val), ("best", self.best)):
            if val:
                lines.append(
                    f"{name} validation (step {val['step']}): AVC acc {val['val_acc']:.3f}, "
                    f"A->V R@1 {val['a2v_R@1']:.3f} R@10 {val['a2v_R@10']:.3f}, "
                    f"V->A R@1 {val['v2a_R@1']:.3f} R@10 {val['v2a_R@10']:.3f} "
                    f"(chance R@1 {val['chance_R@1']:.3f})"
                )
        lines.append(f"checkpoints: {self.out / BEST} (best), {self.out / LAST} (last)")
        lines.append(f"metrics: {self.out / METRICS}")
        return "\n".join(lines)


def _seed_for(*parts: int) -> int:
    """A 31-bit seed derived from several integers (run seed, rank, step...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] & 0x7FFFFFFF)


def clip_label_fn(
    labels_path: str | Path | None, videos: Sequence[Video]
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Labels for retrieval: class per clip from a labels file (-1 for unlisted videos and
    seconds: left out), else one id per (video, second)."""
    if labels_path is None:

        def by_clip(video: np.ndarray, t0: np.ndarray) -> np.ndarray:
            return video.astype(np.int64) * 1_000_000 + np.round(t0).astype(np.int64)

        return by_clip
    from avindex.synth import clip_labels, labels_by_path

    table = labels_by_path(labels_path)
    per_video = {}
    for v in videos:
        key = str(Path(v.path).resolve())
        if key in table:
            per_video[v.index] = table[key]
        else:
            log.warning(
                "%s: no labels for %s; left out of validation retrieval", labels_path, v.path
            )

    def by_class(video: np.ndarray, t0: np.ndarray) -> np.ndarray:
        return np.array(
            [
                clip_labels(per_video[int(v)], np.array([t]))[0] if int(v) in per_video else -1
                for v, t in zip(video, t0, strict=True)
            ],
            dtype=np.int64,
        )

    return by_class


def validate(
    model: L3Net,
    val: ValSet,
    label_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    batch_size: int,
) -> dict[str, float]:
    """AVC accuracy on the fixed pairs; A->V and V->A retrieval R@1/R@10 on the held-out clips."""
    import torch

    from avindex.metrics import retrieval

    was_training = model.training
    model.eval()
    device = model.device
    correct = 0
    with torch.no_grad():
        for i in range(0, len(val.labels), batch_size):
            labels = val.labels[i : i + batch_size].to(device)
            out = model(
                val.frames[i : i + batch_size].to(device),
                val.specs[i : i + batch_size].to(device),
                labels,
            )
            correct += int((out.logits.argmax(1) == labels).sum())
        vis = torch.cat(
            [
                model.encode_visual(val.clip_frames[i : i + batch_size].to(device)).cpu()
                for i in range(0, len(val.clip_frames), batch_size)
            ]
        )
        aud = torch.cat(
            [
                model.encode_audio(val.clip_specs[i : i + batch_size].to(device)).cpu()
                for i in range(0, len(val.clip_specs), batch_size)
            ]
        )
    model.train(was_training)
    labels = label_fn(val.clip_video, val.clip_t0)
    known = labels >= 0
    vis, aud, labels = vis[torch.from_numpy(known)], aud[torch.from_numpy(known)], labels[known]
    a2v = retrieval(aud, vis, labels, labels, ks=(1, 10))
    v2a = retrieval(vis, aud, labels, labels, ks=(1, 10))
    return {
        "val_acc": correct / max(1, len(val.labels)),
        "a2v_R@1": a2v.recall[1],
        "a2v_R@10": a2v.recall[10],
        "v2a_R@1": v2a.recall[1],
        "v2a_R@10": v2a.recall[10],
        "chance_R@1": a2v.chance_recall[1],
        "val_clips": len(labels),
    }


def score(val: dict[str, float], aligned: bool) -> tuple[float, ...]:
    """What best.pt is chosen by: mean cross-modal R@1, then R@10, then AVC accuracy (aligned
    heads: R@1 often saturates early on small collections), else AVC accuracy."""
    if not aligned:
        return (val["val_acc"],)
    r1 = 0.5 * (val["a2v_R@1"] + val["v2a_R@1"])
    return (r1, 0.5 * (val["a2v_R@10"] + val["v2a_R@10"]), val["val_acc"])


@contextmanager
def stop_signals() -> Iterator[dict[str, bool]]:
    """SIGINT/SIGTERM set a flag (the loop then stops with a checkpoint) instead of killing."""
    flag = {"stop": False}

    def handler(signum: int, _frame: object) -> None:
        flag["stop"] = True

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:
        pass  # not the main thread: signals keep their default behaviour
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _Once(logging.Filter):
    """Let each distinct message through once (a damaged video warns at every visit otherwise)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


class _Logger:
    """metrics.jsonl writer (rank 0 only; appends, so a resumed run continues the file)."""

    def __init__(self, path: Path | None) -> None:
        self.fh = open(path, "a") if path is not None else None  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        if self.fh is not None:
            self.fh.write(json.dumps(record) + "\n")
            self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


class _Progress:
    """Rich progress bar with loss, accuracy, pairs/s and data-wait share (a no-op if disabled)."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.bar = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.bar = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.3f}"),
            TextColumn("{task.fields[pps]:.0f} pairs/s, data wait {task.fields[wait]:.0%}"),
            TimeElapsedColumn(),
        )
        self.bar.start()
        self.task = self.bar.add_task(
            "train", total=total, completed=done, loss=math.nan, acc=math.nan, pps=0.0, wait=0.0
        )
        self.ema: dict[str, float] = {}

    def update(self, step: int, loss: float, acc: float, pps: float, wait: float) -> None:
        """Show step and smoothed loss/acc/pairs-per-second/wait share."""
        if self.bar is None:
            return
        for key, value in (("loss", loss), ("acc", acc), ("pps", pps), ("wait", wait)):
            self.ema[key] = value if key not in self.ema else 0.9 * self.ema[key] + 0.1 * value
        self.bar.update(self.task, completed=step, **self.ema)

    def close(self) -> None:
        """Stop drawing."""
        if self.bar is not None:
            self.bar.stop()


class Trainer:
    """One training run: set up from configs (or out/last.pt), then `run()` until a stop reason."""

    def __init__(
        self,
        videos: Sequence[str | Path],
        out: str | Path,
        preset: Preset,
        labels: str | Path | None,
        resume: bool,
        progress: bool,
        overwrite: bool = False,
    ) -> None:
        import torch

        self.started = time.monotonic()
        self.out, self.cfg, self.labels, self.progress = Path(out), preset.train, labels, progress
        self.dist = setup_dist(self.cfg.device)
        try:
            self._setup(videos, preset, resume, overwrite)
        except BaseException:
            # run() (which normally destroys the group) will never be called on this trainer.
            if self.dist.initialised:
                torch.distributed.destroy_process_group()
            raise

    def _setup(
        self,
        videos: Sequence[str | Path],
        preset: Preset,
        resume: bool,
        overwrite: bool,
    ) -> None:
        """Model, optimizer and the train/validation split (fresh or from out/last.pt)."""
        import torch

        from avindex.model import L3Net, load_checkpoint
        from avindex.pairs import split_videos, usable_videos

        cfg = self.cfg
        self.ck = None
        if resume:
            if not (self.out / LAST).exists():
                raise AvindexError(f"{self.out / LAST}: nothing to resume; run without --resume")
            self.ck = load_checkpoint(self.out / LAST)
            self.model = self.ck.model
        elif (self.out / LAST).exists() and not overwrite:
            raise AvindexError(
                f"{self.out}: already holds a run; pass --resume to continue it, --overwrite to "
                "start over, or another --out"
            )
        else:
            for name in (LAST, BEST, METRICS):
                (self.out / name).unlink(missing_ok=True)
            torch.manual_seed(cfg.seed)
            self.model = L3Net(preset.model, preset.audio, preset.video, preset=preset.name)
        self.model.to(self.dist.device).train()
        self.net: torch.nn.Module = self.model
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.step = 0
        self.best: dict[str, Any] = {}
        if self.ck is not None:
            self.optimizer.load_state_dict(self.ck.optimizer_state)
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr  # a resumed run may be given another rate
            self.step, self.best = self.ck.step, dict(self.ck.extra.get("best") or {})
            restore_rng(self.ck.rng)
        clip = self.model.audio_cfg.clip_seconds
        self.train_videos, self.val_videos = split_videos(
            usable_videos(_media(videos), clip), cfg.val_fraction, cfg.seed
        )
        self.shard = self.train_videos[self.dist.rank :: self.dist.world]
        if len(self.shard) < 2:
            raise AvindexError(
                f"{len(self.train_videos)} training videos for {self.dist.world} process(es): "
                "each process needs two or more"
            )
        self.val: ValSet | None = None
        self.label_fn = clip_label_fn(None, [])
        self.last_val: dict[str, Any] = {}
        self.last_val_step = -1
        self.bar = _Progress(False, 0, 0)

    @property
    def pre_device(self) -> str:
        """Where DALI preprocesses: on the GPU when training on one."""
        return "cuda" if self.dist.device.startswith("cuda") else "cpu"

    def _preprocessor(self, train: bool) -> Preprocessor:
        from avindex.pipelines import Preprocessor

        m, cfg = self.model, self.cfg
        seed = _seed_for(cfg.seed, self.dist.rank, self.step)
        return Preprocessor(
            m.audio_cfg,
            m.video_cfg,
            cfg.batch_size,
            device=self.pre_device,
            train=train,
            seed=seed,
            threads=1,  # measured: the model, not DALI, limits a 2-core machine
            augment=cfg.augment,
        )

    def _stream(self) -> PairStream:
        from avindex.pairs import PairStream

        return PairStream(
            self.shard,
            self.model.audio_cfg,
            self.model.video_cfg,
            self.cfg,
            self._preprocessor(train=True),
            seed=(self.cfg.seed, self.dist.rank, self.step),
            cuda_device=self.dist.local_rank if self.pre_device == "cuda" else None,
        )

    def checkpoint(self, path: Path, **extra: Any) -> None:
        """Atomic checkpoint with model, optimizer, step, RNG, configs and validation results."""
        from avindex.model import save_checkpoint

        info = {"best": self.best, "val": self.last_val, **extra}
        info["seconds"] = time.monotonic() - self.started
        save_checkpoint(path, self.model, self.optimizer, self.step, capture_rng(), info, self.cfg)

    def validate(self, logger: _Logger) -> None:
        """Validate (rank 0), log, and write best.pt when the score improved."""
        if self.val is None:
            return
        metrics = validate(self.model, self.val, self.label_fn, self.cfg.batch_size)
        self.last_val, self.last_val_step = {"step": self.step, **metrics}, self.step
        logger.write({"kind": "val", **self.last_val})
        aligned = self.model.aligned
        if not self.best or score(self.last_val, aligned) > score(self.best, aligned):
            self.best = dict(self.last_val)
            self.checkpoint(self.out / BEST)

    def stop_reason(self, signalled: bool) -> str | None:
        """Why to stop now (the same answer on every rank), or None."""
        cfg = self.cfg
        reason = None
        if signalled:
            reason = "signal"
        elif cfg.time_limit is not None and time.monotonic() - self.started >= cfg.time_limit:
            reason = "time_limit"
        elif self.step >= cfg.max_steps:
            reason = "max_steps"
        return (reason or "signal") if agree_stop(reason is not None, self.dist) else None

    def train_step(self, batch: Batch) -> tuple[float, float]:
        """One Adam step on a batch; returns (loss, AVC accuracy)."""
        device = self.dist.device
        labels = batch.labels.to(device, non_blocking=True)
        frames = batch.frames.to(device, non_blocking=True)
        result = self.net(frames, batch.specs.to(device, non_blocking=True), labels)
        self.optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        self.optimizer.step()
        self.step += 1
        # .item() waits for the GPU, so the measured compute time is honest.
        return result.loss.item(), (result.logits.argmax(1) == labels).float().mean().item()

    def _setup_data(self) -> PairStream:
        """Held-out set (rank 0) and the started training stream."""
        from avindex.pairs import read_val_set

        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.val_videos:
                self.label_fn = clip_label_fn(self.labels, self.val_videos)
                m = self.model
                self.val = read_val_set(
                    self.val_videos,
                    m.audio_cfg,
                    m.video_cfg,
                    self.cfg,
                    self._preprocessor(train=False),
                    self.cfg.seed,
                )
        return self._stream().start()

    def _wrap(self) -> None:
        """DistributedDataParallel over the model when running under torchrun."""
        import torch

        if self.dist.world > 1:
            ids = [self.dist.local_rank] if self.pre_device == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def run(self) -> TrainResult:
        """Train until max steps, the time limit or a signal; always ends with last.pt."""
        import torch

        threads = torch.get_num_threads()
        once = _Once()
        media_log = logging.getLogger("avindex.media")
        media_log.addFilter(once)
        if self.dist.device == "cpu":
            torch.set_num_threads(model_threads(self.dist.world, self.cfg.decode_workers))
        stream = logger = None
        try:
            with stop_signals() as flag:
                stream = self._setup_data()
                logger = _Logger(self.out / METRICS if self.dist.main else None)
                stopped = self._loop(stream, logger, flag)
                if self.dist.main:
                    if self.last_val_step != self.step:
                        self.validate(logger)
                    self.checkpoint(self.out / LAST, stopped=stopped)
                    if not (self.out / BEST).exists():
                        self.checkpoint(self.out / BEST)
        finally:
            media_log.removeFilter(once)
            torch.set_num_threads(threads)
            for thing in (self.bar, stream, logger):
                if thing is not None:
                    thing.close()
            if self.dist.initialised:
                torch.distributed.barrier()
                torch.distributed.destroy_process_group()
        seconds = time.monotonic() - self.started
        return TrainResult(self.out, self.step, stopped, self.last_val, self.best, seconds)

    def _loop(self, stream: PairStream, logger: _Logger, flag: dict[str, bool]) -> str:
        """The step loop (spectrogram stats from the first batch on a fresh run); returns why it
        stopped."""
        t0 = time.monotonic()
        batch: Batch | None = stream.next()
        wait = time.monotonic() - t0
        if self.ck is None:
            self.model.set_spec_stats(batch.specs.mean().item(), batch.specs.std().item())
        self._wrap()
        self.bar = _Progress(self.progress and self.dist.main, self.cfg.max_steps, self.step)
        cfg = self.cfg
        while (stopped := self.stop_reason(flag["stop"])) is None:
            if batch is None:
                t0 = time.monotonic()
                batch = stream.next()
                wait = time.monotonic() - t0
            t1 = time.monotonic()
            loss, acc = self.train_step(batch)
            compute = time.monotonic() - t1
            pairs, batch = len(batch.labels), None
            logger.write(
                {
                    "kind": "train",
                    "step": self.step,
                    "loss": loss,
                    "acc": acc,
                    "pairs": pairs,
                    "data_wait_s": round(wait, 5),
                    "compute_s": round(compute, 5),
                    "pairs_per_s": round(pairs / (wait + compute), 2),
                    "lr": cfg.lr,
                    "elapsed_s": round(time.monotonic() - self.started, 3),
                }
            )
            self.bar.update(self.step, loss, acc, pairs / (wait + compute), wait / (wait + compute))
            if self.dist.main and cfg.val_every and self.step % cfg.val_every == 0:
                self.validate(logger)
            if self.dist.main and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.checkpoint(self.out / LAST)
        return stopped


def train(
    videos: Sequence[str | Path],
    out: str | Path,
    preset: Preset | None = None,
    labels: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> TrainResult:
    """Train L3Net on AVC pairs from `videos`, writing out/last.pt, out/best.pt, out/metrics.jsonl.

    `preset` (default: the small one) gives the model, audio, video and training configs. With
    resume=True the model, its configs, optimizer, step and RNG state come from out/last.pt; the
    train config (max steps, time limit...) comes from the caller. A fresh run refuses an `out`
    that already holds one unless overwrite=True (which deletes its checkpoints and metrics).
    """
    trainer = Trainer(videos, out, preset or SMALL, labels, resume, progress, overwrite)
    return trainer.run()


def _media(inputs: Sequence[str | Path]) -> list[Path]:
    """Media files under the inputs (folders searched recursively), labels files excluded."""
    from avindex.scan import find_media

    found = find_media(inputs)
    if not found:
        raise AvindexError("no media files found under the given paths; pass videos or folders")
    return found


def resume_train_config(out: str | Path, **overrides: Any) -> TrainConfig | None:
    """The train config saved in out/last.pt with the given (non-None) overrides, if it exists."""
    from avindex.model import load_checkpoint

    path = Path(out) / LAST
    if not path.exists():
        return None
    saved = load_checkpoint(path).train_cfg
    return config.replace(saved, **overrides) if saved is not None else None
