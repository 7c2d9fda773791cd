"""Training loop: AVC batches -> L3Net with Adam, validation, atomic checkpoints, resume, DDP."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from avindex import config
from avindex.config import AudioConfig, ModelConfig, TrainConfig, VideoConfig
from avindex.errors import AvindexError

if TYPE_CHECKING:
    from avindex.model import L3Net
    from avindex.pairs import ValSet, Video

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"


@dataclass
class Dist:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    initialised: bool = False  # we called init_process_group (and must destroy it)

    @property
    def main(self) -> bool:
        """Rank 0 writes checkpoints, logs and runs validation."""
        return self.rank == 0


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


def setup_dist(device: str) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    import torch

    from avindex.devices import resolve_device

    resolved = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if resolved == "cuda":
        torch.cuda.set_device(local)
        resolved = f"cuda:{local}"
    dist = Dist(rank, world, local, resolved)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if resolved.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
        dist.initialised = True
    return dist


def capture_rng() -> dict[str, Any]:
    """Global RNG states (python, numpy, torch, CUDA) in a form torch.load(weights_only) accepts."""
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any] | None) -> None:
    """Undo capture_rng (missing parts are left alone)."""
    import torch

    if not state:
        return
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_for(*parts: int) -> int:
    """A 31-bit seed derived from several integers (run seed, rank, step...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] & 0x7FFFFFFF)


def clip_label_fn(
    labels_path: str | Path | None, videos: Sequence[Video]
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Labels for retrieval: class per clip from a labels file (-1 for unlabelled videos: left
    out), else one id per (video, second)."""
    if labels_path is None:

        def by_clip(video: np.ndarray, t0: np.ndarray) -> np.ndarray:
            return video.astype(np.int64) * 1_000_000 + np.round(t0).astype(np.int64)

        return by_clip
    from avindex.synth import clip_labels, load_labels

    labels_path = Path(labels_path)
    table = {
        str((labels_path.parent / name).resolve()): per
        for name, per in load_labels(labels_path).items()
    }
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


def score(val: dict[str, float], aligned: bool) -> float:
    """The number best.pt is chosen by: mean cross-modal R@1 (aligned heads), else AVC accuracy."""
    return 0.5 * (val["a2v_R@1"] + val["v2a_R@1"]) if aligned else val["val_acc"]


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


def _progress(enabled: bool, total: int, done: int) -> Any:
    """A rich progress bar with loss/acc/pairs-per-second fields (None when disabled)."""
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.3f}"),
        TextColumn("{task.fields[pps]:.0f} pairs/s wait {task.fields[wait]:.0%}"),
        TimeElapsedColumn(),
    )
    bar.start()
    bar.add_task("train", total=total, completed=done, loss=math.nan, acc=math.nan, pps=0, wait=0)
    return bar


def _build_model(
    out: Path,
    resume: bool,
    cfgs: tuple[ModelConfig, AudioConfig, VideoConfig],
    seed: int,
) -> tuple[L3Net, Any]:
    """Fresh seeded model, or the one in out/last.pt (returned with its checkpoint) to resume."""
    import torch

    from avindex.model import L3Net, load_checkpoint

    if resume:
        if not (out / LAST).exists():
            raise AvindexError(f"{out / LAST}: nothing to resume; run without --resume first")
        ck = load_checkpoint(out / LAST)
        return ck.model, ck
    torch.manual_seed(seed)
    return L3Net(*cfgs), None


def train(
    videos: Sequence[str | Path],
    out: str | Path,
    model_cfg: ModelConfig | None = None,
    audio_cfg: AudioConfig | None = None,
    video_cfg: VideoConfig | None = None,
    train_cfg: TrainConfig | None = None,
    labels: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train L3Net on AVC pairs from `videos`, writing out/last.pt, out/best.pt, out/metrics.jsonl.

    With resume=True the model, configs, optimizer, step and RNG state come from out/last.pt; the
    train config (max steps, time limit...) comes from the caller.
    """
    import torch

    from avindex.model import save_checkpoint
    from avindex.pairs import PairStream, read_val_set, split_videos, usable_videos
    from avindex.pipelines import Preprocessor

    started = time.monotonic()
    out = Path(out)
    cfg = train_cfg or TrainConfig()
    dist = setup_dist(cfg.device)
    torch_threads = torch.get_num_threads()
    if dist.device == "cpu":
        torch.set_num_threads(model_threads(dist.world, cfg.decode_workers))
    model, ck = _build_model(
        out,
        resume,
        (model_cfg or ModelConfig(), audio_cfg or AudioConfig(), video_cfg or VideoConfig()),
        cfg.seed,
    )
    acfg, vcfg = model.audio_cfg, model.video_cfg
    model.to(dist.device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step = 0
    best: dict[str, Any] = {}
    if ck is not None:
        optimizer.load_state_dict(ck.optimizer_state)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr
        step, best = ck.step, dict(ck.extra.get("best") or {})
        restore_rng(ck.rng)

    all_videos = usable_videos(_media(videos), acfg.clip_seconds)
    train_videos, val_videos = split_videos(all_videos, cfg.val_fraction, cfg.seed)
    shard = train_videos[dist.rank :: dist.world]
    if len(shard) < 2:
        raise AvindexError(
            f"{len(train_videos)} training videos for {dist.world} process(es): "
            "each process needs two or more"
        )
    pre_device = "cuda" if dist.device.startswith("cuda") else "cpu"
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    val = None
    label_fn = None
    if dist.main and val_videos:
        label_fn = clip_label_fn(labels, val_videos)
        eval_pre = Preprocessor(acfg, vcfg, cfg.batch_size, device=pre_device, threads=1)
        val = read_val_set(val_videos, acfg, vcfg, cfg, eval_pre, cfg.seed)
    train_pre = Preprocessor(
        acfg,
        vcfg,
        cfg.batch_size,
        device=pre_device,
        train=True,
        seed=_seed_for(cfg.seed, dist.rank, step),
        threads=1,
        jitter=cfg,
    )
    stream = PairStream(
        shard,
        acfg,
        vcfg,
        cfg,
        train_pre,
        seed=(cfg.seed, dist.rank, step),
        cuda_device=dist.local_rank if pre_device == "cuda" else None,
    ).start()
    logger = _Logger(out / METRICS if dist.main else None)
    net = model
    aligned = model.aligned
    last_val: dict[str, Any] = {}
    last_val_step = -1
    stopped = "max_steps"
    bar = None

    def checkpoint(path: Path, extra: dict[str, Any] | None = None) -> None:
        save_checkpoint(
            path,
            model,
            optimizer,
            step,
            capture_rng(),
            {"best": best, "val": last_val, "seconds": time.monotonic() - started, **(extra or {})},
            cfg,
        )

    def run_validation() -> None:
        nonlocal last_val, last_val_step, best
        if val is None:
            return
        last_val = {"step": step, **validate(model, val, label_fn, cfg.batch_size)}
        last_val_step = step
        logger.write({"kind": "val", **last_val})
        if not best or score(last_val, aligned) > score(best, aligned):
            best = dict(last_val)
            checkpoint(out / BEST)

    try:
        with stop_signals() as flag:
            t0 = time.monotonic()
            batch = stream.next()
            wait = time.monotonic() - t0
            if ck is None:
                model.set_spec_stats(batch.specs.mean().item(), batch.specs.std().item())
            if dist.world > 1:
                net = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[dist.local_rank] if pre_device == "cuda" else None
                )
            bar = _progress(progress and dist.main, cfg.max_steps, step)
            ema: dict[str, float] = {}
            while True:
                limit_hit = (
                    cfg.time_limit is not None and time.monotonic() - started >= cfg.time_limit
                )
                reason = "signal" if flag["stop"] else "time_limit" if limit_hit else None
                if step >= cfg.max_steps:
                    reason = reason or "max_steps"
                if _agree_stop(reason is not None, dist):
                    stopped = reason or "signal"
                    break
                if batch is None:
                    t0 = time.monotonic()
                    batch = stream.next()
                    wait = time.monotonic() - t0
                t1 = time.monotonic()
                labels_t = batch.labels.to(dist.device, non_blocking=True)
                result = net(
                    batch.frames.to(dist.device, non_blocking=True),
                    batch.specs.to(dist.device, non_blocking=True),
                    labels_t,
                )
                optimizer.zero_grad(set_to_none=True)
                result.loss.backward()
                optimizer.step()
                loss = result.loss.item()  # also waits for the GPU, so compute time is honest
                acc = (result.logits.argmax(1) == labels_t).float().mean().item()
                compute = time.monotonic() - t1
                step += 1
                pairs = len(batch.labels)
                batch = None
                for key, value in (("loss", loss), ("acc", acc), ("pps", pairs / (wait + compute))):
                    ema[key] = value if key not in ema else 0.9 * ema[key] + 0.1 * value
                ema["wait"] = wait / (wait + compute)
                logger.write(
                    {
                        "kind": "train",
                        "step": step,
                        "loss": loss,
                        "acc": acc,
                        "pairs": pairs,
                        "data_wait_s": round(wait, 5),
                        "compute_s": round(compute, 5),
                        "pairs_per_s": round(pairs / (wait + compute), 2),
                        "lr": cfg.lr,
                        "elapsed_s": round(time.monotonic() - started, 3),
                    }
                )
                if bar is not None:
                    bar.update(bar.task_ids[0], completed=step, **ema)
                if dist.main and cfg.val_every and step % cfg.val_every == 0:
                    run_validation()
                if dist.main and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    checkpoint(out / LAST)
            if dist.main:
                if last_val_step != step:
                    run_validation()
                checkpoint(out / LAST, {"stopped": stopped})
                if not (out / BEST).exists():
                    checkpoint(out / BEST)
    finally:
        torch.set_num_threads(torch_threads)
        if bar is not None:
            bar.stop()
        stream.close()
        logger.close()
        if dist.initialised:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    return TrainResult(out, step, stopped, last_val, best, time.monotonic() - started)


def model_threads(processes: int, decode_workers: int) -> int:
    """CPU threads for the model: this process's share of the cores minus the decoders' (at least
    one). On 2 cores one model thread trained faster than two: OpenMP threads spin against the
    decode and DALI threads. An explicit OMP_NUM_THREADS wins."""
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // processes - decode_workers)


def _agree_stop(stop: bool, dist: Dist) -> bool:
    """Every rank stops at the same step: any rank's reason to stop stops them all."""
    if dist.world == 1:
        return stop
    import torch

    flag = torch.tensor([1.0 if stop else 0.0], device=dist.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _media(inputs: Sequence[str | Path]) -> list[Path]:
    """Media files under the inputs (folders searched recursively), labels files excluded."""
    from avindex.scan import find_media

    found = find_media(inputs)
    if not found:
        raise AvindexError("no media files found under the given paths; pass videos or folders")
    return found


def preset(
    small: bool, head: str | None = None, width: float | None = None, **train: Any
) -> tuple[ModelConfig, AudioConfig, VideoConfig, TrainConfig]:
    """Configs for `avindex train`: the small CPU preset or the paper's, with flag overrides."""
    from avindex.model import preset_configs

    model_cfg, audio_cfg, video_cfg = preset_configs(small, width=width, head=head)
    base = config.SMALL_TRAIN if small else TrainConfig()
    return model_cfg, audio_cfg, video_cfg, config.replace(base, **train)


def resume_train_config(out: str | Path, **overrides: Any) -> TrainConfig | None:
    """The train config saved in out/last.pt with the given (non-None) overrides, if it exists."""
    from avindex.model import load_checkpoint

    path = Path(out) / LAST
    if not path.exists():
        return None
    saved = load_checkpoint(path).train_cfg
    return config.replace(saved, **overrides) if saved is not None else None
