"""Training: set-up in one place, then one step loop: validation on held-out videos (or the held-out
ends of every video) with a stable criterion, early stopping, fold-in of what was held out, atomic
checkpoints, resume, DDP."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from avindex import config
from avindex.config import OptimConfig, TrainConfig, ValConfig
from avindex.distributed import (
    Dist,
    agree_stop,
    capture_rng,
    model_threads,
    restore_rng,
    setup_dist,
    share_from_main,
)
from avindex.errors import AvindexError
from avindex.labels import VideoLabels, clip_labels, labels_by_path
from avindex.metrics import retrieval
from avindex.model import (
    Checkpoint,
    L3Net,
    autocast,
    best_threshold,
    load_checkpoint,
    save_checkpoint,
)
from avindex.pairs import (
    Batch,
    PairStream,
    ValSet,
    Video,
    read_val_set,
    split_moments,
    split_videos,
)
from avindex.pairs import usable_videos as probe_videos
from avindex.pipelines import Preprocessor
from avindex.presets import SMALL, Preset
from avindex.scan import find_media

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"
METRICS = "metrics.jsonl"
RUN_FILES = (LAST, BEST, METRICS)  # any of them means a run is in the folder
CRITERION = "val_avc"  # what best.pt and early stopping follow (higher is better)
CRITERION_TEXT = "AVC accuracy on the held-out pairs (best threshold)"


@dataclass
class TrainResult:
    """Outcome of a run: where it stopped, the chosen model and its validation numbers."""

    out: Path
    step: int
    stopped: str  # max_steps | time_limit | patience | signal
    val: dict[str, Any] = field(default_factory=dict)  # last validation
    best: dict[str, Any] = field(default_factory=dict)  # validation of the model best.pt holds
    fold_in: dict[str, Any] = field(default_factory=dict)  # what was held out, folded back in
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for --json."""
        return {
            "out": str(self.out),
            "step": self.step,
            "stopped": self.stopped,
            "seconds": round(self.seconds, 2),
            "criterion": CRITERION,
            "val": self.val,
            "best": self.best,
            "fold_in": self.fold_in,
            "checkpoints": {"last": str(self.out / LAST), "best": str(self.out / BEST)},
        }

    def summary(self) -> str:
        """A few human-readable lines: why it stopped, the chosen model and why, the files."""
        lines = [f"stopped at step {self.step} ({self.stopped}) after {self.seconds:.0f} s"]
        if self.best:
            lines.append(f"best.pt: {describe_choice(self.best)}")
            lines.append(f"  at step {self.best['step']}: {_val_line(self.best)}")
        if self.val and self.val.get("step") != self.best.get("step"):
            lines.append(f"last validation, step {self.val['step']}: {_val_line(self.val)}")
        if self.fold_in:
            f = self.fold_in
            cut = (
                "" if f["stopped"] == "max_steps" else f" of {f['planned_steps']} ({f['stopped']})"
            )
            held = (
                f"the held-out ends of {f['videos']} included"
                if f.get("held_out") == "moments"
                else f"the {f['videos']} held-out ones included"
            )
            lines.append(
                f"fold-in: best.pt is the step-{f['from_step']} model trained {f['steps']} more "
                f"steps{cut} on every video, whole, {held}"
            )
        lines.append(f"checkpoints: {self.out / BEST} (use this), {self.out / LAST} (resume)")
        lines.append(f"metrics: {self.out / METRICS}")
        return "\n".join(lines)


def describe_choice(best: dict[str, Any]) -> str:
    """Why best.pt holds this model, in one line (also written to metrics.jsonl)."""
    return (
        f"step {best['step']}, highest {CRITERION_TEXT}: {best[CRITERION]:.3f} "
        f"+/- {best[CRITERION + '_se']:.3f} (standard error, {best['val_pairs']} pairs of "
        f"{best['val_videos']} videos)"
    )


def _val_line(val: dict[str, Any]) -> str:
    """Validation numbers in one line."""
    text = (
        f"AVC acc {val['val_avc']:.3f} +/- {val['val_avc_se']:.3f} "
        f"(at the model's threshold {val['val_acc']:.3f}), "
        f"loss {val['val_loss']:.3f} +/- {val['val_loss_se']:.3f}"
    )
    if "a2v_R@1" in val:
        text += (
            f", R@1 by {val['retrieval_by']} A->V {val['a2v_R@1']:.3f} V->A {val['v2a_R@1']:.3f}"
            f" (chance {val['chance_R@1']:.3f})"
        )
    return text


def check_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start over a run (deletes nothing: that waits until set-up has succeeded)."""
    found = [name for name in RUN_FILES if (out / name).exists()]
    if resume:
        if not (out / LAST).exists():
            raise AvindexError(f"{out / LAST}: nothing to resume; run without --resume")
    elif found and not overwrite:
        raise AvindexError(
            f"{out}: already holds a run ({', '.join(found)}); pass --resume to continue it, "
            "--overwrite to start over, or another --out"
        )


HOLDOUTS = ("videos", "moments")


def check_holdout(cfg: ValConfig, saved: TrainConfig | None) -> None:
    """A holdout this version knows and, on resume, the one the run was validated with (its best
    criterion so far was measured on that split's pairs)."""
    if cfg.holdout not in HOLDOUTS:
        raise AvindexError(f"--holdout {cfg.holdout!r}: use one of {', '.join(HOLDOUTS)}")
    if saved is not None and saved.val.holdout != cfg.holdout:
        raise AvindexError(
            f"--holdout {cfg.holdout}: this run was validated with --holdout "
            f"{saved.val.holdout}; resume with that, or start over with --overwrite"
        )


def hold_out(
    videos: Sequence[Video], cfg: ValConfig, clip: float, seed: int
) -> tuple[list[Video], list[Video]]:
    """(train, val) as `cfg.holdout` says: whole videos held out, or the end of every video."""
    if cfg.holdout == "moments":
        return split_moments(videos, cfg.val_fraction, clip)
    return split_videos(videos, cfg.val_fraction, seed)


def retrieval_labels(
    table: dict[str, VideoLabels] | None, val: ValSet, videos: Sequence[Video], clip: float
) -> tuple[np.ndarray, str]:
    """Label of each held-out moment for validation retrieval: its class from the labels file
    (-1, left out, for unlisted videos), else its video. Returns (labels, 'class' | 'video')."""
    if table is None:
        return val.video.copy(), "video"
    paths = {v.index: str(Path(v.path).resolve()) for v in videos}
    out = np.full(len(val), -1, dtype=np.int64)
    for index in np.unique(val.video):
        rows = np.flatnonzero(val.video == index)
        if paths[int(index)] in table:
            out[rows] = clip_labels(table[paths[int(index)]], val.audio_start[rows], clip)
        else:
            log.warning("no labels for %s; left out of validation retrieval", paths[int(index)])
    return out, "class"


@torch.no_grad()
def validation_metrics(
    model: L3Net, val: ValSet, labels: np.ndarray, by: str, batch_size: int
) -> dict[str, Any]:
    """AVC accuracy and loss, each with its standard error, on the fixed held-out pairs (every
    moment's positive and negative); cross-modal R@1/R@10 over the moments for aligned heads.

    Two AVC accuracies: `val_avc` at the threshold that separates these pairs best (the
    criterion: it measures how well the model tells corresponding pairs from the others, which
    is what retrieval needs), and `val_acc` at the model's own decision threshold (tracked on
    training batches, so it also moves when similarities on unseen videos shift as a whole)."""
    was_training = model.training
    model.eval()
    device = model.device
    vis, aud = [], []
    with autocast(device):
        for i in range(0, len(val), batch_size):
            vis.append(model.vision(val.frames[i : i + batch_size].to(device).float()))
            aud.append(model.audio(val.specs[i : i + batch_size].to(device).float()))
    v, a = torch.cat(vis), torch.cat(aud)
    moments = np.arange(len(val))
    has_negative = val.negative_audio >= 0
    frame_of = np.concatenate([moments, moments[has_negative]])
    audio_of = np.concatenate([moments, val.negative_audio[has_negative]])
    pair_labels = np.concatenate([np.ones(len(val)), np.zeros(int(has_negative.sum()))])
    order = np.random.default_rng(0).permutation(len(frame_of))  # batches mix both kinds
    scores, losses = [], []
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        lab = torch.from_numpy(pair_labels[rows]).long().to(device)
        with autocast(device):
            out = model.head(v[frame_of[rows]], a[audio_of[rows]], lab)
        scores.append((out.logits[:, 1] - out.logits[:, 0]).float().cpu())
        losses.append(float(out.loss))
    score, positive = torch.cat(scores), torch.from_numpy(pair_labels[order] == 1)
    n = len(order)
    acc = float(((score > 0) == positive).float().mean())
    avc = float(((score > best_threshold(score, positive)) == positive).float().mean())
    metrics: dict[str, Any] = {
        "val_avc": avc,
        "val_avc_se": math.sqrt(avc * (1 - avc) / n),
        "val_acc": acc,
        "val_acc_se": math.sqrt(acc * (1 - acc) / n),
        "val_loss": float(np.mean(losses)),
        "val_loss_se": float(np.std(losses) / math.sqrt(len(losses))),
        "val_pairs": n,
        "val_videos": len(np.unique(val.video)),
    }
    if model.aligned:
        with autocast(device):
            vis_e = model.head.visual(v).float().cpu()
            aud_e = model.head.audio(a).float().cpu()
        known = labels >= 0
        vis_e, aud_e = vis_e[known], aud_e[known]
        a2v = retrieval(aud_e, vis_e, labels[known], labels[known], ks=(1, 10))
        v2a = retrieval(vis_e, aud_e, labels[known], labels[known], ks=(1, 10))
        metrics.update(
            {
                "retrieval_by": by,
                "a2v_R@1": a2v.recall[1],
                "a2v_R@10": a2v.recall[10],
                "v2a_R@1": v2a.recall[1],
                "v2a_R@10": v2a.recall[10],
                "chance_R@1": a2v.chance_recall[1],
            }
        )
    model.train(was_training)
    return metrics


@dataclass
class EarlyStopping:
    """The best criterion so far and how long ago it rose (the same on every rank)."""

    value: float = -math.inf
    loss: float = math.inf  # validation loss of the best model: breaks ties of the criterion
    step: int = -1  # step of the best model
    validated_at: int = -1  # step of the last validation
    improved_at: int = 0  # last step the criterion rose by at least min_delta
    lr_drops: int = 0  # learning-rate drops so far (OptimConfig.lr_drop)
    dropped_at: int = 0

    def update(self, step: int, value: float, loss: float, min_delta: float) -> bool:
        """Record a validation; True when it is the best so far (best.pt follows it).

        An equal criterion with a lower loss is better, and a loss lower by min_delta counts as
        a rise: a criterion that saturates (every held-out pair told apart, as on a collection
        of videos all unlike each other) would otherwise freeze best.pt at the first step that
        reached it and stop the run there while the model still improves.
        """
        self.validated_at = step
        tie = value == self.value
        if value >= self.value + min_delta or (tie and loss <= self.loss - min_delta):
            self.improved_at = step
        if value > self.value or (tie and loss < self.loss):
            self.value, self.loss, self.step = value, loss, step
            return True
        return False

    def waited(self, step: int) -> int:
        """Steps since the criterion last rose by min_delta."""
        return step - self.improved_at

    def drop_lr(self, step: int, after: int) -> bool:
        """Whether the rate drops now: `after` steps without a rise, and since the last drop."""
        if after <= 0 or self.waited(step) < after or step - self.dropped_at < after:
            return False
        self.lr_drops, self.dropped_at = self.lr_drops + 1, step
        return True


@dataclass
class RunState:
    """What the loop changes as it goes (checkpoints save it so a resumed run continues)."""

    step: int = 0
    stopping: EarlyStopping = field(default_factory=EarlyStopping)
    best: dict[str, Any] = field(default_factory=dict)  # validation of the best model
    last_val: dict[str, Any] = field(default_factory=dict)
    # A copy of the best model and its optimiser state, on every rank: the fold-in starts there.
    best_weights: dict[str, Any] = field(default_factory=dict)
    # best.pt already holds the finished fold-in of the best model (a resumed, finished run).
    folded: bool = False


@dataclass
class Validation:
    """The fixed held-out moments and the label each one is retrieved by."""

    moments: ValSet
    labels: np.ndarray
    by: str  # class (a labels file was given) | video


def learning_rate(step: int, cfg: OptimConfig, drops: int) -> float:
    """Rate at a step: linear warm-up from lr/10, then lr times lr_drop per drop so far."""
    warm = min(1.0, 0.1 + 0.9 * step / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return cfg.lr * warm * cfg.lr_drop**drops


def patience_steps(val: ValConfig, time_limit: float | None) -> int:
    """Early-stopping patience in steps (0: off); by default on, for 10 validations, only when a
    time limit decides the length of the run."""
    if val.patience is not None:
        return val.patience
    return 10 * val.val_every if time_limit is not None else 0


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


class MetricsLog:
    """metrics.jsonl writer (rank 0 only; appends, so a resumed run continues the file)."""

    def __init__(self, path: Path | None) -> None:
        self.fh = open(path, "a") if path is not None else None  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        """Append one JSON record and flush (a killed run keeps every line written)."""
        if self.fh is not None:
            self.fh.write(json.dumps(record) + "\n")
            self.fh.flush()

    def close(self) -> None:
        """Close the file."""
        if self.fh is not None:
            self.fh.close()


class StepBar:
    """Rich progress bar with loss, accuracy, pairs/s and data-wait share (a no-op if disabled)."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.ema: dict[str, float] = {}
        self.bar = _rich_bar() if enabled else None
        if self.bar is not None:
            self.bar.start()
            self.bar.add_task(
                "train", total=total, completed=done, loss=math.nan, acc=math.nan, pps=0.0, wait=0.0
            )

    def update(self, step: int, loss: float, acc: float, pps: float, wait: float) -> None:
        """Show step and smoothed loss/acc/pairs-per-second/wait share."""
        if self.bar is None:
            return
        for key, value in (("loss", loss), ("acc", acc), ("pps", pps), ("wait", wait)):
            self.ema[key] = value if key not in self.ema else 0.9 * self.ema[key] + 0.1 * value
        self.bar.update(self.bar.task_ids[0], completed=step, **self.ema)

    def close(self) -> None:
        """Stop drawing."""
        if self.bar is not None:
            self.bar.stop()


def _rich_bar() -> Any:
    """The rich progress bar of a training run."""
    return Progress(
        TextColumn("train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.3f}"),
        TextColumn("{task.fields[pps]:.0f} pairs/s, data wait {task.fields[wait]:.0%}"),
        TimeElapsedColumn(),
    )


def wrap_ddp(model: L3Net, dist: Dist) -> torch.nn.Module:
    """DistributedDataParallel over the model under torchrun (gradients averaged across ranks at
    every backward); the model itself in a single process."""
    if dist.world == 1:
        return model
    ids = [dist.local_rank] if dist.device.startswith("cuda") else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _seed_for(*parts: int) -> int:
    """A 31-bit seed derived from several integers (run seed, rank, step...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] & 0x7FFFFFFF)


class Trainer:
    """One training run. `__init__` does all the set-up, in the order it happens; `run()` is the
    step loop: the main phase on the training videos (validating, keeping the best model,
    stopping early), then the fold-in phase on every video from the best model."""

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
        self.started = time.monotonic()
        self.out, self.cfg = Path(out), preset.train
        cfg = self.cfg
        self.dist = dist = setup_dist(cfg.device)
        with ExitStack() as undo:  # a failed set-up releases what it took; run() does otherwise
            if dist.initialised:
                undo.callback(torch.distributed.destroy_process_group)
            # 1. Inputs, checked before anything is written: the run folder, labels, videos.
            check_run_folder(self.out, resume, overwrite)
            saved = load_checkpoint(self.out / LAST) if resume else None
            check_holdout(cfg.val, saved.train_cfg if saved else None)
            table = labels_by_path(labels) if labels is not None else None
            clip = (saved.audio_cfg if saved else preset.audio).clip_seconds
            found = find_media(videos)
            if not found:
                raise AvindexError(
                    "no media files found under the given paths; pass videos or folders"
                )
            self.videos = probe_videos(found, clip, cfg.data.decode_workers)
            self.train_videos, self.val_videos = hold_out(self.videos, cfg.val, clip, cfg.seed)
            shard = self.train_videos[dist.rank :: dist.world]
            if len(shard) < 2:
                raise AvindexError(
                    f"{len(self.train_videos)} training videos for {dist.world} process(es): "
                    "each process needs two or more"
                )
            # 2. Model, optimiser and loop state: fresh and seeded, or as the checkpoints left
            # them (last.pt; best.pt holds the best model, which the fold-in starts from).
            if saved is None:
                torch.manual_seed(cfg.seed)
                model = L3Net(preset.model, preset.audio, preset.video, preset=preset.name)
            else:
                model = saved.model
            self.model = model.to(dist.device).train()
            self.optimizer = torch.optim.AdamW(
                self.model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
            )
            if saved is not None:
                self.optimizer.load_state_dict(saved.optimizer_state)
                for group in self.optimizer.param_groups:  # a resumed run may be given another
                    group["weight_decay"] = cfg.optim.weight_decay
                restore_rng(saved.rng)
            self.state = self._loop_state(saved)
            # 3. Validation set (rank 0): fixed held-out moments and their retrieval labels.
            self.validation = (
                self._validation_set(table, clip) if dist.main and self.val_videos else None
            )
            # 4. The training stream over this rank's shard; a fresh model takes its spectrogram
            # statistics from the first batch (not trained on).
            step = self.state.step
            self.stream = PairStream(
                shard,
                self.model.audio_cfg,
                self.model.video_cfg,
                cfg.data,
                cfg.augment,
                self._preprocessor(train=True, seed=_seed_for(cfg.seed, dist.rank, step)),
                seed=(cfg.seed, dist.rank, step),
                cuda_device=dist.local_rank if self._pre_device == "cuda" else None,
            ).start()
            undo.callback(self.stream.close)
            if saved is None:
                specs = self.stream.next().specs
                self.model.set_spec_stats(specs.mean().item(), specs.std().item())
            # 5. Data-parallel wrapping, after the statistics so rank 0's reach every rank.
            self.net = wrap_ddp(self.model, dist)
            # 6. Budgets: the main phase leaves the fold-in its share of steps and time.
            self.patience = patience_steps(cfg.val, cfg.time_limit)
            share = 1.0 + (cfg.val.fold_in if self.val_videos else 0.0)
            self.main_steps = math.floor(cfg.max_steps / share)
            self.main_seconds = cfg.time_limit / share if cfg.time_limit is not None else None
            # 7. Set-up succeeded: only now may --overwrite clear the previous run.
            if dist.main:
                self.out.mkdir(parents=True, exist_ok=True)
                if overwrite and not resume:
                    for name in RUN_FILES:
                        (self.out / name).unlink(missing_ok=True)
            self.log = MetricsLog(self.out / METRICS if dist.main else None)
            self.bar = StepBar(progress and dist.main, cfg.max_steps, step)
            undo.pop_all()

    def _loop_state(self, saved: Checkpoint | None) -> RunState:
        """A fresh loop state, or the one a checkpoint saved (with the best model's weights)."""
        if saved is None:  # best_weights come with the first validation (it always beats none)
            return RunState()
        best_file = self.out / BEST
        best = load_checkpoint(best_file, self.dist.device) if best_file.exists() else saved
        return RunState(
            saved.step,
            config.from_dict(EarlyStopping, saved.extra.get("early_stopping") or {}),
            dict(saved.extra.get("best") or {}),
            dict(saved.extra.get("val") or {}),
            _copy(best.model, best.optimizer_state or self.optimizer.state_dict()),
            folded=(best.extra.get("fold_in") or {}).get("stopped") == "max_steps",
        )

    def _validation_set(self, table: dict[str, VideoLabels] | None, clip: float) -> Validation:
        """Decode the held-out moments once; label them for retrieval (class, else video)."""
        moments = read_val_set(
            self.val_videos,
            self.model.audio_cfg,
            self.model.video_cfg,
            self.cfg.val.val_samples,
            self._preprocessor(train=False, seed=self.cfg.seed),
            self.cfg.seed,
            self.cfg.data.decode_workers,
        )
        labels, by = retrieval_labels(table, moments, self.val_videos, clip)
        return Validation(moments, labels, by)

    @property
    def _pre_device(self) -> str:
        """Where DALI preprocesses: on the GPU when training on one."""
        return "cuda" if self.dist.device.startswith("cuda") else "cpu"

    def _preprocessor(self, train: bool, seed: int) -> Preprocessor:
        """DALI preprocessing for this run's model: augmented for training, plain for validation."""
        m = self.model
        return Preprocessor(
            m.audio_cfg,
            m.video_cfg,
            self.cfg.data.batch_size,
            device=self._pre_device,
            train=train,
            seed=seed,
            threads=1,  # measured: the model, not DALI, limits a 2-core machine
            augment=self.cfg.augment,
        )

    def run(self) -> TrainResult:
        """The main phase, then the fold-in; always ends with last.pt and best.pt."""
        cfg, dist, state = self.cfg, self.dist, self.state
        threads = torch.get_num_threads()
        if dist.device == "cpu":
            torch.set_num_threads(model_threads(dist.world, cfg.data.decode_workers))
        fold: dict[str, Any] = {}
        resumed_at = state.step
        try:
            with stop_signals() as flag:
                # Main phase: the training videos; validate, keep the best, stop early.
                stopped = self._steps(flag, self.main_steps, self.main_seconds, main=True)
                if self.val_videos and state.stopping.validated_at != state.step:
                    self._validate()
                self._save(LAST, stopped=stopped)
                # Fold-in: from the best model, every video (the held-out ones too); never twice
                # on one best model (a finished run resumed with nothing left to train).
                refold = not (state.folded and state.step == resumed_at)
                if self.val_videos and cfg.val.fold_in > 0 and stopped != "signal" and refold:
                    fold = self._fold_in(flag)
                    if fold["stopped"] != "signal":  # else best.pt keeps the best model itself
                        self._save(BEST, fold_in=fold)
                elif not self.val_videos:
                    self._save(BEST)  # nothing to choose between: the final model
            if dist.main:
                self.log.write(
                    {"kind": "best", **state.best, "choice": self._choice(), "stopped": stopped}
                    | ({"fold_in": fold} if fold else {})
                )
        finally:
            torch.set_num_threads(threads)
            for thing in (self.bar, self.stream, self.log):
                thing.close()
            if dist.initialised:
                torch.distributed.barrier()
                torch.distributed.destroy_process_group()
        seconds = time.monotonic() - self.started
        return TrainResult(self.out, state.step, stopped, state.last_val, state.best, fold, seconds)

    def _steps(
        self, flag: dict[str, bool], max_steps: int, seconds: float | None, main: bool
    ) -> str:
        """Optimiser steps until a stop reason (the same on every rank). The main phase also
        validates every `val_every` steps, stops early after `patience` steps without a better
        criterion, and writes last.pt every `checkpoint_every` steps; the fold-in only trains."""
        cfg, state = self.cfg, self.state
        patience = self.patience if main else 0
        while (stopped := self._stop_reason(flag, max_steps, seconds, patience)) is None:
            t0 = time.monotonic()
            batch = self.stream.next()
            wait = time.monotonic() - t0
            lr = learning_rate(state.step, cfg.optim, state.stopping.lr_drops)
            loss, acc = self._optimise(batch, lr)
            compute = time.monotonic() - t0 - wait
            pairs = len(batch.labels)
            self.log.write(
                {
                    "kind": "train" if main else "fold",
                    "step": state.step,
                    "loss": loss,
                    "acc": acc,
                    "pairs": pairs,
                    "data_wait_s": round(wait, 5),
                    "compute_s": round(compute, 5),
                    "pairs_per_s": round(pairs / (wait + compute), 2),
                    "lr": lr,
                    "elapsed_s": round(time.monotonic() - self.started, 3),
                }
            )
            self.bar.update(
                state.step, loss, acc, pairs / (wait + compute), wait / (wait + compute)
            )
            if (
                main
                and self.val_videos
                and cfg.val.val_every
                and state.step % cfg.val.val_every == 0
            ):
                self._validate()
            if main and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                self._save(LAST)
        return stopped

    def _stop_reason(
        self, flag: dict[str, bool], max_steps: int, seconds: float | None, patience: int
    ) -> str | None:
        """Why to stop now (the same answer on every rank), or None."""
        state = self.state
        reason = None
        if flag["stop"]:
            reason = "signal"
        elif seconds is not None and time.monotonic() - self.started >= seconds:
            reason = "time_limit"
        elif state.step >= max_steps:
            reason = "max_steps"
        elif (
            patience and state.stopping.step >= 0 and state.stopping.waited(state.step) >= patience
        ):
            reason = "patience"
        return (reason or "signal") if agree_stop(reason is not None, self.dist) else None

    def _optimise(self, batch: Batch, lr: float) -> tuple[float, float]:
        """One AdamW step on a batch at rate `lr`; returns (loss, AVC accuracy)."""
        device = self.dist.device
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        labels = batch.labels.to(device, non_blocking=True)
        frames = batch.frames.to(device, non_blocking=True)
        result = self.net(frames, batch.specs.to(device, non_blocking=True), labels)
        self.optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        self.optimizer.step()
        self.state.step += 1
        # .item() waits for the GPU, so the measured compute time is honest.
        return result.loss.item(), (result.logits.argmax(1) == labels).float().mean().item()

    def _validate(self) -> None:
        """Validate on rank 0 and share the criterion; on a new best every rank keeps a copy of
        the model (the fold-in starts from it) and rank 0 writes best.pt."""
        state = self.state
        value = loss = math.nan
        if self.validation is not None:
            v = self.validation
            metrics = validation_metrics(
                self.model, v.moments, v.labels, v.by, self.cfg.data.batch_size
            )
            state.last_val = {"step": state.step, **metrics}
            value, loss = metrics[CRITERION], metrics["val_loss"]
        value, loss = share_from_main(value, self.dist), share_from_main(loss, self.dist)
        best = state.stopping.update(state.step, value, loss, self.cfg.val.min_delta)
        dropped = state.stopping.drop_lr(state.step, self.cfg.optim.lr_drop_after)
        self.log.write({"kind": "val", **state.last_val, "best": best, "lr_dropped": dropped})
        if best:
            state.best = dict(state.last_val)
            state.best_weights = _copy(self.model, self.optimizer.state_dict())
            self._save(BEST)

    def _fold_in(self, flag: dict[str, bool]) -> dict[str, Any]:
        """Train from the best model on every video, whole, for fold_in x its steps (at least
        min_fold_steps) within the run's step and time budgets."""
        cfg, state, dist = self.cfg, self.state, self.dist
        self.model.load_state_dict(state.best_weights["model"])
        self.optimizer.load_state_dict(state.best_weights["optimizer"])
        self.stream.use(self.videos[dist.rank :: dist.world])
        start = state.step
        wanted = max(cfg.val.min_fold_steps, math.ceil(cfg.val.fold_in * state.stopping.step))
        planned = min(wanted, cfg.max_steps - start)
        stopped = self._steps(flag, start + planned, cfg.time_limit, main=False)
        return {
            "from_step": state.stopping.step,
            "held_out": cfg.val.holdout,
            "videos": len(self.val_videos),
            "steps": state.step - start,
            "planned_steps": planned,
            "stopped": stopped,  # max_steps: all planned steps done
        }

    def _choice(self) -> str:
        """Why best.pt holds its model, for metrics.jsonl."""
        if not self.state.best:
            return "no validation: the final model"
        return describe_choice(self.state.best)

    def _save(self, name: str, **extra: Any) -> None:
        """Rank 0 writes an atomic checkpoint: model, optimiser, step, RNG, configs, loop state."""
        if not self.dist.main:
            return
        state = self.state
        info = {
            "best": state.best,
            "val": state.last_val,
            "early_stopping": dataclasses.asdict(state.stopping),
            "seconds": time.monotonic() - self.started,
            **extra,
        }
        save_checkpoint(
            self.out / name, self.model, self.optimizer, state.step, capture_rng(), info, self.cfg
        )


def _copy(model: torch.nn.Module, optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """A detached copy of model and optimiser state (to return to the best model later)."""
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(optimizer_state),
    }


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
    resume=True the model, optimiser, step, RNG and early-stopping state come from out/last.pt;
    the train config (max steps, time limit...) comes from the caller. A fresh run refuses an
    `out` that already holds one unless overwrite=True, which deletes the old run's files only
    once the new run is set up.
    """
    return Trainer(videos, out, preset or SMALL, labels, resume, progress, overwrite).run()


def resume_train_config(out: str | Path, **overrides: Any) -> TrainConfig | None:
    """The train config saved in out/last.pt with the given (non-None) overrides, if it exists
    (a checkpoint of the earlier flat layout is read into the nested one)."""
    path = Path(out) / LAST
    if not path.exists():
        return None
    saved = load_checkpoint(path).train_cfg
    return config.replace(saved, **overrides) if saved is not None else None
