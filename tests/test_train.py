"""AVC pair sampling, the training loop, resume, signals and 2-process gloo training (CPU)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mediafactory import write_bad

from avindex.config import SynthConfig
from avindex.model import load_checkpoint
from avindex.pairs import Sample, build_pairs, mismatch_by_video, sample_moments, split_videos
from avindex.pairs import Video as PairVideo
from avindex.presets import SMALL
from avindex.synth import make_corpus
from avindex.train import BEST, LAST, METRICS, train

CORPUS = SynthConfig(videos=8, seconds=6, classes=4, seed=4242, width=64, height=48)
# Tiny, fast settings: 2 held-out videos, small batches and validation sets.
FAST = {
    "batch_size": 16,
    "val_fraction": 0.25,
    "val_pairs": 48,
    "val_clips": 24,
    "shuffle_buffer": 64,
    "checkpoint_every": 10,
    "val_every": 20,
    "decode_workers": 1,
}
STEPS = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Labelled synthetic corpus plus broken files that training must skip with a warning."""
    out = tmp_path_factory.mktemp("train_corpus")
    make_corpus(out, CORPUS, workers=1)
    write_bad(out)
    return out


def _preset(**train_overrides):
    return SMALL.configure(**{**FAST, **train_overrides})


def _records(run: Path, kind: str) -> list[dict]:
    lines = (run / METRICS).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture(scope="module")
def trained(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, list]:
    """One short seeded run shared by the learning, resume and checkpoint tests."""
    run = tmp_path_factory.mktemp("run")
    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logging.getLogger("avindex").addHandler(handler)
    try:
        result = train(
            [corpus], run, _preset(max_steps=STEPS), labels=corpus / "labels.csv", progress=False
        )
    finally:
        logging.getLogger("avindex").removeHandler(handler)
    return run, result, warnings


def test_sampled_audio_windows_overlap_their_frames() -> None:
    rng = np.random.default_rng(0)
    for duration in (1.0, 1.04, 2.5, 7.0, 60.0):
        moments = sample_moments(duration, 2000, rng, clip_seconds=1.0)
        tf = np.array([m.frame_time for m in moments])
        ta = np.array([m.audio_start for m in moments])
        assert np.all(np.diff(tf) >= 0), "read_moments needs moments sorted by frame time"
        assert np.all((tf >= 0) & (tf < duration))
        assert np.all((ta >= 0) & (ta <= duration - 1.0 + 1e-9)), "window inside the video"
        assert np.all((ta <= tf) & (tf < ta + 1.0)), "the paper's rule: audio overlaps the frame"
        if duration >= 7:
            # Offsets spread over the whole allowed second, not a fixed alignment.
            offsets = tf - ta
            assert offsets.min() < 0.05 and offsets.max() > 0.95


def test_mismatch_by_video_never_pairs_a_video_with_itself() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        videos = rng.integers(0, rng.integers(2, 6), size=rng.integers(2, 20))
        perm = mismatch_by_video(videos)
        ok = perm >= 0
        assert np.all(videos[perm[ok]] != videos[ok])
        assert len(set(perm[ok].tolist())) == ok.sum(), "each audio used once"
        if np.max(np.unique(videos, return_counts=True)[1]) <= len(videos) / 2:
            assert ok.all()


def test_build_pairs_is_half_positive_half_cross_video() -> None:
    rng = np.random.default_rng(2)
    # Each sample's frame and audio carry its (video, moment) identity so pairs can be checked.
    samples = [
        Sample(v, np.full((4, 4, 3), 10 * v + k, np.uint8), np.full(8, 10 * v + k, np.float32))
        for v in range(4)
        for k in range(4)
    ]
    order = rng.permutation(len(samples))
    frames, audio, labels = build_pairs([samples[i] for i in order], rng)
    assert labels.sum() == len(labels) // 2 == 8
    for frame, sound, label in zip(frames, audio, labels, strict=True):
        f_id, a_id = int(frame[0, 0, 0]), int(sound[0])
        if label:
            assert f_id == a_id
        else:
            assert f_id // 10 != a_id // 10, "negative audio comes from a different video"


def test_split_is_seeded_and_by_video() -> None:
    videos = [PairVideo(i, f"v{i}.mp4", 5.0) for i in range(10)]
    train_a, val_a = split_videos(videos, 0.2, seed=3)
    train_b, val_b = split_videos(videos, 0.2, seed=3)
    assert (train_a, val_a) == (train_b, val_b)
    assert len(val_a) == 2 and not {v.index for v in train_a} & {v.index for v in val_a}
    assert split_videos(videos, 0.2, seed=4)[1] != val_a


def test_split_holds_out_two_videos_from_few() -> None:
    """Validation pairs need two held-out videos: 5 videos split 3 + 2; 3 videos are too few."""
    from avindex.errors import AvindexError

    videos = [PairVideo(i, f"v{i}.mp4", 5.0) for i in range(5)]
    train_set, val = split_videos(videos, 0.2, seed=3)
    assert (len(train_set), len(val)) == (3, 2)
    assert sorted(v.index for v in train_set + val) == list(range(5))
    assert split_videos(videos[:3], 0.0, seed=3) == (videos[:3], [])
    with pytest.raises(AvindexError, match=r"3 usable videos: .* at least 4"):
        split_videos(videos[:3], 0.2, seed=3)


def test_decode_error_skips_only_that_video(monkeypatch, caplog) -> None:
    """Any exception while decoding one video (not only MediaError) marks it bad, warning once."""
    from types import SimpleNamespace

    from avindex import pairs

    videos = [PairVideo(i, f"v{i}.mp4", 4.0) for i in range(3)]

    def fake_read_moments(path, moments, *_args, **_kwargs):
        if path == "v1.mp4":
            raise ValueError("Invalid data found when processing input")
        for _ in moments:
            yield SimpleNamespace(
                frame=np.zeros((4, 4, 3), np.uint8), audio=np.zeros(8, np.float32)
            )

    monkeypatch.setattr(pairs, "read_moments", fake_read_moments)
    p = _preset(shuffle_buffer=8)
    stream = pairs.PairStream(videos, p.audio, p.video, p.train, preprocess=None, seed=(0,))
    with caplog.at_level(logging.WARNING, logger="avindex.pairs"):
        stream._spawn(stream._decode_loop, 0)  # the decode worker alone: no preprocessing here
        seen: set[int] = set()
        deadline = time.monotonic() + 20
        while (stream.bad != {1} or seen != {0, 2}) and time.monotonic() < deadline:
            seen.add(stream.samples.get(timeout=5).video)
        for _ in range(20):  # keep the worker visiting videos, v1 included, after it failed
            seen.add(stream.samples.get(timeout=5).video)
        stream.close()
    assert stream.error is None and stream.bad == {1} and seen == {0, 2}
    skipped = [r.getMessage() for r in caplog.records if "skipped in training" in r.getMessage()]
    assert skipped == ["v1.mp4: skipped in training (Invalid data found when processing input)"]


def test_short_training_run_learns(trained) -> None:
    run, result, warnings = trained
    assert result.step == STEPS and result.stopped == "max_steps"
    steps = _records(run, "train")
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert all(r["data_wait_s"] >= 0 and r["compute_s"] > 0 for r in steps)
    first = np.mean([r["loss"] for r in steps[:8]])
    last = np.mean([r["loss"] for r in steps[-8:]])
    assert last < 0.9 * first, (first, last)
    # AVC accuracy (chance 0.5) on the last training batches and on the held-out pairs.
    assert np.mean([r["acc"] for r in steps[-10:]]) > 0.65
    # Held-out clips: cross-modal retrieval by class beats chance (1/4 of the gallery matches).
    val = result.val
    assert min(val["a2v_R@1"], val["v2a_R@1"]) > val["chance_R@1"] + 0.15, val
    # Broken files were skipped with one warning each, not a crash.
    assert any("random_bytes.mp4" in w for w in warnings)
    assert sum("text.mp4" in w for w in warnings) == 1


def test_checkpoints_rebuild_the_model(trained, corpus: Path) -> None:
    run, _result, _ = trained
    last = load_checkpoint(run / LAST)
    best = load_checkpoint(run / BEST)
    assert last.step == STEPS and last.train_cfg.batch_size == FAST["batch_size"]
    assert last.optimizer_state["state"], "Adam moments are saved"
    assert best.extra["best"]["step"] == best.step <= STEPS
    assert last.model.audio.spec_std.item() != 1.0, "spectrogram stats set from training data"
    # Loading twice gives the same embeddings (eval mode, no state changed by encoding).
    frames = torch.randn(3, 3, last.video_cfg.crop, last.video_cfg.crop)
    again = load_checkpoint(run / LAST)
    assert torch.equal(last.model.encode_visual(frames), again.model.encode_visual(frames))


def test_resume_continues_with_optimizer_state(trained, corpus: Path, tmp_path: Path) -> None:
    run, _, _ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    result = train(
        [corpus],
        resumed,
        _preset(max_steps=STEPS + 10),
        labels=corpus / "labels.csv",
        resume=True,
        progress=False,
    )
    assert result.step == STEPS + 10
    steps = _records(resumed, "train")
    after = [r for r in steps if r["step"] > STEPS]
    assert [r["step"] for r in after] == list(range(STEPS + 1, STEPS + 11))
    initial = np.mean([r["loss"] for r in steps[:5]])
    assert np.mean([r["loss"] for r in after]) < 0.8 * initial, "loss jumped back after resume"
    ck = load_checkpoint(resumed / LAST)
    adam_steps = {int(s["step"]) for s in ck.optimizer_state["state"].values()}
    assert adam_steps == {STEPS + 10}, "Adam state carried over, not restarted"


def test_fresh_run_refuses_a_folder_holding_a_run(trained, corpus: Path) -> None:
    from avindex.errors import AvindexError

    run, _, _ = trained
    with pytest.raises(AvindexError, match="already holds a run"):
        train([corpus], run, _preset(max_steps=1), progress=False)


def test_resume_without_checkpoint_is_a_user_error(corpus: Path, tmp_path: Path) -> None:
    from avindex.errors import AvindexError

    with pytest.raises(AvindexError, match="nothing to resume"):
        train([corpus], tmp_path, _preset(max_steps=1), resume=True, progress=False)


def test_init_error_destroys_the_process_group(corpus: Path, tmp_path: Path, monkeypatch) -> None:
    """A user error in Trainer setup after the process group started leaves no group behind."""
    import torch.distributed as td

    from avindex import train as train_module
    from avindex.distributed import Dist
    from avindex.errors import AvindexError

    def one_process_group(device: str) -> Dist:
        td.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
        return Dist(device="cpu", initialised=True)

    monkeypatch.setattr(train_module, "setup_dist", one_process_group)
    with pytest.raises(AvindexError, match="nothing to resume"):
        train([corpus], tmp_path / "run", _preset(max_steps=1), resume=True, progress=False)
    assert not td.is_initialized()


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return env


def test_sigint_stops_with_a_checkpoint(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-c",
        "from avindex.cli import main; main()",
        "train",
        str(corpus),
        "--out",
        str(run),
        "--small",
        "--max-steps",
        "100000",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--json",
    ]
    proc = subprocess.Popen(cmd, env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not ((run / METRICS).exists() and _records(run, "train")):
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr.decode()
    result = json.loads(stdout)
    assert result["stopped"] == "signal"
    assert load_checkpoint(run / LAST).step == result["step"] >= 1


def test_two_process_gloo_torchrun(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    entry = tmp_path / "avindex_entry.py"  # what the `avindex` console script does
    entry.write_text("from avindex.cli import main\nmain()\n")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc-per-node",
        "2",
        str(entry),
        "train",
        str(corpus),
        "--out",
        str(run),
        "--small",
        "--device",
        "cpu",
        "--max-steps",
        "3",
        "--batch-size",
        "8",
        "--json",
    ]
    env = {**_cli_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = load_checkpoint(run / LAST)
    assert ck.step == 3
    frames = torch.randn(2, 3, ck.video_cfg.crop, ck.video_cfg.crop)
    assert torch.isfinite(ck.model.encode_visual(frames)).all()
    assert [r["step"] for r in _records(run, "train")] == [1, 2, 3], "rank 0 logs once per step"
