"""Training quality as a user gets it: synth -> train (no labels) -> embed -> eval, JSON out.

Measures, for one head and corpus difficulty: the step best.pt was chosen at, its validation
criterion with its standard error, the highest AVC accuracy any validation saw, AVC accuracy and
cross-modal R@1/mAP by class on videos never seen in training (`avindex eval` on a separate
synthetic set), and R@1 by video when searching the training collection itself.

Example (the README's table; one run of the small preset on the CPU, 10 minutes of training):
  .venv/bin/python benchmarks/train_quality.py --difficulty hard --seed 101 --eval-seed 901 \\
      --time-limit 600 --json hard.json
Screen a setting at an equal number of steps (load on a shared machine then cannot bias it):
  .venv/bin/python benchmarks/train_quality.py --difficulty hard --max-steps 1500 \\
      --set weight_decay=0.05 --set dropout=0.2 --json wd.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from avindex import config
from avindex.config import EmbedConfig, EvalConfig, SynthConfig
from avindex.embed import embed_paths
from avindex.evaluate import evaluate
from avindex.labels import write_labels
from avindex.model import load_checkpoint
from avindex.pairs import read_val_set, usable_videos
from avindex.pipelines import Preprocessor
from avindex.presets import SMALL
from avindex.scan import find_media
from avindex.synth import DIFFICULTIES, LABELS_FILE, make_corpus
from avindex.train import BEST, METRICS, train, validation_metrics

MODEL_FIELDS = ("head", "width", "dropout")
VALIDATION_KEYS = ("step", "val_avc", "val_acc", "val_loss")


def corpus(root: Path, cfg: SynthConfig) -> Path:
    """The synthetic corpus for `cfg` under `root`, made once and reused (keyed by its config)."""
    key = "-".join(
        str(v)
        for v in (cfg.difficulty, cfg.videos, cfg.seconds, cfg.classes, cfg.seed)
        + (("one-per-video",) if cfg.one_class_per_video else ())
    )
    folder = root / f"corpus-{key}"
    if not folder.exists():
        # Made aside and renamed: runs started together never see (or delete) a half corpus.
        tmp = root / f".{folder.name}.{os.getpid()}"
        make_corpus(tmp, cfg)
        try:
            tmp.rename(folder)
        except OSError:  # another run finished the same corpus first
            shutil.rmtree(tmp)
    return folder


def by_video_labels(folder: Path, out: Path) -> Path:
    """A labels file giving every video its own id from second 0 on (one row each: later
    seconds take the last listed one), so `evaluate` scores R@1 by video."""
    videos = sorted(p for p in folder.iterdir() if p.suffix == ".mp4")
    return write_labels(out, {str(v.resolve()): np.array([i]) for i, v in enumerate(videos)})


def unseen_avc(checkpoint_path: Path, folder: Path, samples: int, seed: int) -> dict[str, float]:
    """AVC accuracy (+/- standard error; at the best threshold and at the model's own) of a
    checkpoint on pairs of unseen videos, the same measurement as training's validation."""
    ck = load_checkpoint(checkpoint_path)
    videos = usable_videos(find_media([folder]), ck.audio_cfg.clip_seconds)
    pre = Preprocessor(ck.audio_cfg, ck.video_cfg, 64, device="cpu", seed=seed)
    val = read_val_set(videos, ck.audio_cfg, ck.video_cfg, samples, pre, seed)
    metrics = validation_metrics(ck.model, val, val.video, "video", 64)
    keys = ("val_avc", "val_avc_se", "val_acc", "val_acc_se", "val_loss", "val_pairs")
    return {k: metrics[k] for k in keys}


def retrieval_summary(report: Any) -> dict[str, Any]:
    """R@1, R@10 and mAP beside chance for the two cross-modal directions of an eval report."""
    out = {}
    for name in ("audio->visual", "visual->audio"):
        r = report.results[name]
        out[name] = {
            "R@1": r.recall[1],
            "R@10": r.recall[10],
            "mAP": r.mean_ap,
            "chance_R@1": r.chance_recall[1],
            "chance_mAP": r.chance_map,
        }
    return out


def embed_and_eval(ck_path: Path, folder: Path, labels: Path, store: Path) -> dict[str, Any]:
    """`avindex embed` + `avindex eval` of a folder with a checkpoint."""
    shutil.rmtree(store, ignore_errors=True)
    embed_paths(
        find_media([folder]),
        store,
        load_checkpoint(ck_path),
        EmbedConfig(device="cpu", decode_workers=2),
        model_path=ck_path,
    )
    return retrieval_summary(evaluate(store, labels, EvalConfig()))


def run_summary(run: Path) -> dict[str, Any]:
    """Best step, criterion, highest AVC seen and stop reason from metrics.jsonl."""
    records = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    vals = [r for r in records if r["kind"] == "val"]
    (best,) = [r for r in records if r["kind"] == "best"]
    steps = [r for r in records if r["kind"] in ("train", "fold")]
    return {
        "stopped": best["stopped"],
        "steps": steps[-1]["step"] if steps else 0,
        "train_seconds": steps[-1]["elapsed_s"] if steps else 0.0,
        "best_step": best.get("step"),
        "criterion": best.get("val_avc"),
        "criterion_se": best.get("val_avc_se"),
        "val_acc": best.get("val_acc"),
        "highest_val_avc": max((v["val_avc"] for v in vals), default=None),
        "highest_val_avc_step": max(vals, key=lambda v: v["val_avc"])["step"] if vals else None,
        "validations": [
            {k: v[k] if k == "step" else round(v[k], 4) for k in VALIDATION_KEYS} for v in vals
        ],
        "fold_in": best.get("fold_in"),
        "choice": best.get("choice"),
    }


def parse_value(text: str) -> Any:
    """A --set value as JSON when it parses (numbers, null, true), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--difficulty", default="hard", choices=DIFFICULTIES)
    parser.add_argument("--videos", type=int, default=30)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--one-class-per-video", action="store_true")
    parser.add_argument("--seed", type=int, default=101, help="training corpus seed")
    parser.add_argument("--eval-seed", type=int, default=901, help="unseen corpus seed")
    parser.add_argument("--eval-videos", type=int, default=20)
    parser.add_argument("--time-limit", type=float, default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--train-seed", type=int, default=None, help="training seed")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a train config field by name (lr, weight_decay, min_crop_area...) or "
        "head / width / dropout",
    )
    parser.add_argument("--no-unseen", action="store_true", help="skip the unseen-video eval")
    parser.add_argument("--no-within", action="store_true", help="skip the within-collection eval")
    parser.add_argument("--workdir", default="/tmp/avindex-train-quality")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()

    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    synth = SynthConfig(
        videos=args.videos,
        seconds=args.seconds,
        classes=args.classes,
        seed=args.seed,
        difficulty=args.difficulty,
        one_class_per_video=args.one_class_per_video,
    )
    train_corpus = corpus(root, synth)
    overrides = dict(item.split("=", 1) for item in args.set)
    overrides = {k: parse_value(v) for k, v in overrides.items()}
    model = {k: overrides.pop(k) for k in MODEL_FIELDS if k in overrides}
    preset = SMALL.configure(
        time_limit=args.time_limit,
        max_steps=args.max_steps,
        seed=args.train_seed,
        device="cpu",
        **overrides,
    )
    preset = dataclasses.replace(preset, model=config.replace(preset.model, **model))
    run = root / f"run-{os.getpid()}"
    shutil.rmtree(run, ignore_errors=True)
    result: dict[str, Any] = {
        "corpus": vars(args) | {"path": str(train_corpus)},
        "preset": preset.name,
        "model": {"head": preset.model.head, "width": preset.model.width},
        "overrides": overrides | model,
        "load_before": os.getloadavg(),
    }
    started = time.monotonic()
    trained = train([train_corpus], run, preset, progress=False)
    result["train"] = run_summary(run) | {"wall_seconds": round(time.monotonic() - started, 1)}
    result["load_after_train"] = os.getloadavg()
    best = run / BEST
    if not args.no_unseen:
        unseen_cfg = dataclasses.replace(synth, seed=args.eval_seed, videos=args.eval_videos)
        unseen = corpus(root, unseen_cfg)
        result["unseen"] = {
            "avc": unseen_avc(best, unseen, 1024, args.eval_seed),
            "by_class": embed_and_eval(best, unseen, unseen / LABELS_FILE, run / "store-unseen"),
        }
    if not args.no_within:
        by_video = by_video_labels(train_corpus, run / "by_video.csv")
        result["within"] = {
            "by_video": embed_and_eval(best, train_corpus, by_video, run / "store-within")
        }
    result["load_after"] = os.getloadavg()
    result["stopped"] = trained.stopped
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(
        json.dumps({k: result[k] for k in ("train", "unseen", "within") if k in result}, indent=1)
    )
    shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
