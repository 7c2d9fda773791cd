"""AVC pair sampling, the training loop, validation, early stopping, fold-in, resume, refusing to
overwrite a run, signals and 2-process gloo training (CPU)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
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

from avindex import pairs
from avindex.config import SynthConfig
from avindex.errors import AvindexError
from avindex.model import L3Net, load_checkpoint
from avindex.pairs import (
    Sample,
    ValSet,
    build_pairs,
    mismatch_by_video,
    sample_moments,
    split_moments,
    split_videos,
)
from avindex.pairs import Video as PairVideo
from avindex.presets import SMALL
from avindex.scan import find_media
from avindex.synth import make_corpus
from avindex.train import BEST, LAST, METRICS, train, validation_metrics

CORPUS = SynthConfig(videos=8, seconds=6, classes=4, seed=4242, width=64, height=48)
# Tiny, fast settings: 2 held-out videos, small batches and validation sets.
FAST = {
    "batch_size": 16,
    "val_fraction": 0.25,
    "val_samples": 64,
    "shuffle_buffer": 64,
    "checkpoint_every": 10,
    "val_every": 20,
    "decode_workers": 1,
}
STEPS = 50
MAIN_STEPS = 40  # the main phase leaves the fold-in 1/(1 + fold_in) = 20% of the steps


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


@pytest.mark.parametrize("start", [0.0, 3.25])
def test_sampled_audio_windows_overlap_their_frames(start: float) -> None:
    """Within the video's span [start, start + duration): frames and whole audio windows."""
    rng = np.random.default_rng(0)
    for duration in (1.0, 1.04, 2.5, 7.0, 60.0):
        span = PairVideo(0, "v.mp4", start + duration, start=start)
        moments = sample_moments(span, 2000, rng, clip_seconds=1.0)
        tf = np.array([m.frame_time for m in moments]) - start
        ta = np.array([m.audio_start for m in moments]) - start
        assert np.all(np.diff(tf) >= 0), "read_moments needs moments sorted by frame time"
        assert np.all((tf >= 0) & (tf < duration))
        assert np.all((ta >= 0) & (ta <= duration - 1.0 + 1e-9)), "window inside the span"
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
    pairs = build_pairs([samples[i] for i in order], rng)
    assert pairs.labels.sum() == len(pairs.labels) // 2 == 8
    for i, (frame, sound, label) in enumerate(
        zip(pairs.frames, pairs.audio, pairs.labels, strict=True)
    ):
        f_id, a_id = int(frame[0, 0, 0]), int(sound[0])
        assert (pairs.frame_video[i], pairs.audio_video[i]) == (f_id // 10, a_id // 10)
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

    videos = [PairVideo(i, f"v{i}.mp4", 5.0) for i in range(5)]
    train_set, val = split_videos(videos, 0.2, seed=3)
    assert (len(train_set), len(val)) == (3, 2)
    assert sorted(v.index for v in train_set + val) == list(range(5))
    assert split_videos(videos[:3], 0.0, seed=3) == (videos[:3], [])
    with pytest.raises(AvindexError, match=r"3 usable videos: .* at least 4"):
        split_videos(videos[:3], 0.2, seed=3)


def test_moments_holdout_keeps_the_end_of_every_video_out_of_training() -> None:
    """--holdout moments: every video long enough trains on its first 80% and validates on the
    rest, no moment sampled for training reaches the cut; a video too short to give a 1 s clip
    to each side trains whole."""

    videos = [PairVideo(i, f"v{i}.mp4", d) for i, d in enumerate([10.0, 20.0, 6.0, 1.5])]
    train_set, val = split_moments(videos, 0.2, clip_seconds=1.0)

    def spans(parts: list) -> list:
        return [(v.index, v.path, round(v.start, 9), round(v.end, 9)) for v in parts]

    assert spans(val) == [
        (0, "v0.mp4", 8.0, 10.0),
        (1, "v1.mp4", 16.0, 20.0),
        (2, "v2.mp4", 4.8, 6.0),
    ]
    assert spans(train_set) == [
        (0, "v0.mp4", 0.0, 8.0),
        (1, "v1.mp4", 0.0, 16.0),
        (2, "v2.mp4", 0.0, 4.8),
        (3, "v3.mp4", 0.0, 1.5),
    ]
    rng = np.random.default_rng(5)
    for part, held in zip(train_set, val, strict=False):
        moments = sample_moments(part, 500, rng, clip_seconds=1.0)
        assert all(m.audio_start + 1.0 <= held.start + 1e-9 for m in moments)  # sound too
        assert all(m.frame_time < held.start for m in moments)
    assert split_moments(videos, 0.0, 1.0) == (videos, [])
    with pytest.raises(AvindexError, match=r"1 of 2 videos are long enough .* at least 2"):
        split_moments([videos[1], videos[3]], 0.2, clip_seconds=1.0)


def test_decode_error_skips_only_that_video(corpus, tmp_path, caplog) -> None:
    """A video whose decoder fails (in its decoder process) is marked bad with one warning; the
    stream goes on with the others."""
    good = sorted(corpus.glob("video_*.mp4"))[:2]
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    videos = [
        PairVideo(0, str(good[0]), 6.0),
        PairVideo(1, str(garbage), 4.0),
        PairVideo(2, str(good[1]), 6.0),
    ]
    p = _preset(shuffle_buffer=8, decode_workers=2)
    stream = pairs.PairStream(
        videos, p.audio, p.video, p.train.data, p.train.augment, preprocess=None, seed=(0,)
    )
    with caplog.at_level(logging.WARNING, logger="avindex.pairs"):
        stream.start_decoding()  # the decoder processes alone: no preprocessing here
        seen: set[int] = set()
        deadline = time.monotonic() + 60
        while (stream.bad != {1} or seen != {0, 2}) and time.monotonic() < deadline:
            seen.add(stream.samples.get(timeout=30).video)
        for _ in range(40):  # keep the decoders visiting videos after the garbage failed
            seen.add(stream.samples.get(timeout=30).video)
        stream.close()
    assert stream.error is None and stream.bad == {1} and seen == {0, 2}
    skipped = [r.getMessage() for r in caplog.records if "skipped in training" in r.getMessage()]
    assert len(skipped) == 1 and skipped[0].startswith(f"{garbage}: skipped in training ("), skipped


def test_videos_that_failed_before_the_fold_in_do_not_end_it_while_one_still_decodes():
    """Videos marked bad in the main phase (another rank's shard, or gone from the list) do not
    count against the videos the stream samples now: it ends only when all of those failed."""
    p = _preset()
    videos = [PairVideo(i, f"v{i}.mp4", 6.0) for i in range(3)]
    stream = pairs.PairStream(
        videos, p.audio, p.video, p.train.data, p.train.augment, preprocess=None, seed=(0,)
    )
    stream.bad = {1, 5, 7}  # 5 and 7 failed in the main phase and are not sampled now
    visits = stream._visits()
    assert {next(visits).key[1].index for _ in range(20)} == {0, 2}
    stream.bad |= {0, 2}
    with pytest.raises(AvindexError, match="every training video failed to decode"):
        next(visits)


def test_short_training_run_learns(trained) -> None:
    run, result, warnings = trained
    assert result.step == STEPS and result.stopped == "max_steps"
    steps = _records(run, "train")
    assert [r["step"] for r in steps] == list(range(1, MAIN_STEPS + 1))
    assert all(r["data_wait_s"] >= 0 and r["compute_s"] > 0 for r in steps)
    first = np.mean([r["loss"] for r in steps[:8]])
    last = np.mean([r["loss"] for r in steps[-8:]])
    assert last < 0.9 * first, (first, last)
    # AVC accuracy (chance 0.5) on the last training batches and on the held-out pairs.
    assert np.mean([r["acc"] for r in steps[-10:]]) > 0.65
    # Held-out pairs: the criterion (0.85-0.89 measured over runs) is far above chance (0.5), and
    # cross-modal retrieval by class beats chance (1/4 of the gallery matches). One direction
    # alone swings between 0.39 and 0.94 on these 64 clips (batch order depends on timing), so
    # the two directions are averaged.
    val = result.val
    assert val["retrieval_by"] == "class" and val["val_avc"] > 0.75 and val["val_acc"] > 0.6, val
    assert (val["a2v_R@1"] + val["v2a_R@1"]) / 2 > val["chance_R@1"] + 0.15, val
    # Broken files were skipped with one warning each, not a crash.
    assert any("random_bytes.mp4" in w for w in warnings)
    assert sum("text.mp4" in w for w in warnings) == 1


def test_validation_criterion_with_standard_error_chooses_best(trained) -> None:
    """Every validation logs the criterion with its standard error; best.pt holds the highest,
    and the run's last record says which step was chosen and why."""
    run, result, _ = trained
    vals = _records(run, "val")
    assert [v["step"] for v in vals] == [20, MAIN_STEPS]
    for v in vals:
        n, p = v["val_pairs"], v["val_avc"]
        assert n >= 2 * FAST["val_samples"] - 8 and v["val_videos"] == 2
        assert v["val_avc_se"] == pytest.approx(np.sqrt(p * (1 - p) / n))
        assert v["val_avc"] >= v["val_acc"], "the best threshold is at least as good"
    best_val = max(vals, key=lambda v: v["val_avc"])
    assert [v["step"] for v in vals if v["best"]][-1] == best_val["step"] == result.best["step"]
    (choice,) = _records(run, "best")
    assert choice["step"] == best_val["step"] and "highest AVC accuracy" in choice["choice"]
    assert f"+/- {best_val['val_avc_se']:.3f}" in choice["choice"]
    assert f"best.pt: step {best_val['step']}" in result.summary()


def test_fold_in_trains_the_best_model_on_every_video(trained) -> None:
    """After the main phase, best.pt is the best model trained a few steps more on every video
    (the held-out ones too); last.pt stays the main phase's state for --resume."""
    run, result, _ = trained
    folds = _records(run, "fold")
    assert [r["step"] for r in folds] == list(range(MAIN_STEPS + 1, STEPS + 1))
    assert result.fold_in == {
        "from_step": result.best["step"],
        "held_out": "videos",
        "videos": 2,
        "steps": STEPS - MAIN_STEPS,
        "planned_steps": STEPS - MAIN_STEPS,
        "stopped": "max_steps",
    }
    best = load_checkpoint(run / BEST)
    assert best.step == STEPS and best.extra["fold_in"] == result.fold_in
    assert "on every video, whole, the 2 held-out ones included" in result.summary()
    assert best.extra["best"]["step"] == result.best["step"]
    assert load_checkpoint(run / LAST).step == MAIN_STEPS


def test_checkpoints_rebuild_the_model(trained, corpus: Path) -> None:
    run, _result, _ = trained
    last = load_checkpoint(run / LAST)
    assert last.step == MAIN_STEPS and last.train_cfg.data.batch_size == FAST["batch_size"]
    assert last.optimizer_state["state"], "Adam moments are saved"
    assert last.extra["early_stopping"]["step"] == last.extra["best"]["step"]
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
        _preset(max_steps=STEPS + 10),  # main phase to 60 / 1.25 = 48, then 12 fold-in steps
        labels=corpus / "labels.csv",
        resume=True,
        progress=False,
    )
    assert result.step == STEPS + 10
    steps = _records(resumed, "train")
    after = [r for r in steps if r["step"] > MAIN_STEPS]
    assert [r["step"] for r in after] == list(range(MAIN_STEPS + 1, 49))
    initial = np.mean([r["loss"] for r in steps[:5]])
    assert np.mean([r["loss"] for r in after]) < 0.8 * initial, "loss jumped back after resume"
    ck = load_checkpoint(resumed / LAST)
    adam_steps = {int(s["step"]) for s in ck.optimizer_state["state"].values()}
    assert adam_steps == {48}, "Adam state carried over, not restarted"


def test_resuming_a_finished_run_does_not_fold_in_again(trained, corpus: Path, tmp_path: Path):
    """Nothing left to train: best.pt (the folded model) stays as it is, no second fold-in."""
    run, _, _ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    before = (resumed / BEST).read_bytes()
    folds = len(_records(resumed, "fold"))
    result = train([corpus], resumed, _preset(max_steps=STEPS), resume=True, progress=False)
    assert result.step == MAIN_STEPS and not result.fold_in  # last.pt: the main phase
    assert (resumed / BEST).read_bytes() == before
    assert len(_records(resumed, "fold")) == folds


def test_resuming_with_another_holdout_is_refused(trained, corpus: Path, tmp_path: Path):
    """The best criterion so far was measured on the run's own split: another one on resume is a
    one-line error before anything is read or written."""
    run, _, _ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    before = {p.name: p.read_bytes() for p in resumed.iterdir()}
    preset = _preset(max_steps=STEPS + 10, holdout="moments")
    with pytest.raises(AvindexError, match="validated with --holdout videos; resume with that"):
        train([corpus], resumed, preset, resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in resumed.iterdir()} == before


@pytest.mark.parametrize("name", [LAST, BEST, METRICS])
def test_any_run_file_means_a_run_is_there(corpus: Path, tmp_path: Path, name: str) -> None:
    """last.pt, best.pt or metrics.jsonl alone: a fresh run refuses and deletes nothing."""
    (tmp_path / name).write_text("precious")
    with pytest.raises(AvindexError, match=f"already holds a run \\({name}\\)"):
        train([corpus], tmp_path, _preset(max_steps=1), progress=False)
    assert (tmp_path / name).read_text() == "precious"


@pytest.mark.parametrize("broken", ["no media", "labels", "too few videos"])
def test_overwrite_deletes_nothing_when_set_up_fails(
    corpus: Path, tmp_path: Path, broken: str
) -> None:
    """--overwrite checks the inputs first: a bad input leaves the previous run intact."""
    run = tmp_path / "run"
    run.mkdir()
    for name in (LAST, BEST, METRICS):
        (run / name).write_text("precious")
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_labels = tmp_path / "labels.csv"
    bad_labels.write_bytes(b"\xff\xfe\x00binary")
    videos, labels = {
        "no media": ([empty], None),
        "labels": ([corpus], bad_labels),
        "too few videos": ([corpus / "video_0000.mp4", corpus / "video_0001.mp4"], None),
    }[broken]
    with pytest.raises(AvindexError):
        train(videos, run, _preset(max_steps=1), labels=labels, progress=False, overwrite=True)
    assert all((run / name).read_text() == "precious" for name in (LAST, BEST, METRICS))


def test_overwrite_replaces_the_run_once_set_up(corpus: Path, tmp_path: Path) -> None:
    (tmp_path / BEST).write_text("old")
    (tmp_path / METRICS).write_text('{"kind": "old"}\n')
    result = train([corpus], tmp_path, _preset(max_steps=2), progress=False, overwrite=True)
    assert result.step == 2 and load_checkpoint(tmp_path / BEST).step == 2
    kinds = {json.loads(line)["kind"] for line in (tmp_path / METRICS).read_text().splitlines()}
    assert "old" not in kinds


def test_cli_refusal_is_one_line(corpus: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from avindex import cli

    (tmp_path / BEST).write_text("precious")
    argv = ["avindex", "train", str(corpus), "--out", str(tmp_path), "--max-steps", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "--overwrite" in err
    assert (tmp_path / BEST).read_text() == "precious"


def test_resume_without_checkpoint_is_a_user_error(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(AvindexError, match="nothing to resume"):
        train([corpus], tmp_path, _preset(max_steps=1), resume=True, progress=False)


def test_init_error_destroys_the_process_group(corpus: Path, tmp_path: Path, monkeypatch) -> None:
    """A user error in Trainer setup after the process group started leaves no group behind."""
    import torch.distributed as td

    from avindex import train as train_module
    from avindex.distributed import Dist

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


@pytest.mark.slow
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


DDP_ENTRY = """
import os, sys
import torch
from avindex.presets import SMALL
from avindex.train import Trainer

corpus, out, dump = sys.argv[1:4]
preset = SMALL.configure(
    device="cpu", max_steps=10, batch_size=8, val_every=4, val_samples=32, shuffle_buffer=32,
    decode_workers=1, checkpoint_every=0, val_fraction=0.25,
)
trainer = Trainer([corpus], out, preset, None, resume=False, progress=False)
start = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
trainer.run()
end = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
shard = [v.path for v in trainer.train_videos][int(os.environ["RANK"])::2]
torch.save({"start": start, "end": end, "shard": shard}, f"{dump}/rank{os.environ['RANK']}.pt")
"""


@pytest.mark.slow
def test_two_gloo_ranks_on_different_data_end_with_identical_weights(
    corpus: Path, tmp_path: Path
) -> None:
    """torchrun, 2 CPU processes, each on its own shard of videos: DDP averages the gradients,
    so both ranks hold the same weights after the main phase, validation on rank 0 alone, and
    the fold-in from the best model (without the wrapping they would drift apart)."""
    run, dump = tmp_path / "ddp", tmp_path / "dump"
    dump.mkdir()
    entry = tmp_path / "ddp_entry.py"
    entry.write_text(DDP_ENTRY)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", str(entry), str(corpus)]
    env = {**_cli_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, str(run), str(dump)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(dump / f"rank{r}.pt") for r in (0, 1)]
    assert not set(ranks[0]["shard"]) & set(ranks[1]["shard"]), "each rank has its own videos"
    for name, weight in ranks[0]["end"].items():
        assert torch.equal(weight, ranks[1]["end"][name]), f"{name} differs between ranks"
    moved = [n for n, w in ranks[0]["end"].items() if not torch.equal(w, ranks[0]["start"][n])]
    assert len(moved) > len(ranks[0]["end"]) // 2, "the weights were trained"
    assert [r["step"] for r in _records(run, "train")] == list(range(1, 9)), "rank 0 logs once"
    assert [r["step"] for r in _records(run, "fold")] == [9, 10]
    assert load_checkpoint(run / BEST).step == 10


def test_validation_metrics_match_the_model_forward_on_the_pairs() -> None:
    """The fast path (towers once per moment, the head on the pairs) against a plain reference:
    the model's forward on the same pairs in the same batches (each moment's positive, and its
    frame with the audio of `negative_audio`)."""
    torch.manual_seed(0)
    p = _preset()
    model = L3Net(p.model, p.audio, p.video).eval()
    model.set_spec_stats(-60.0, 20.0)
    n, c = 12, p.video.crop
    val = ValSet(
        frames=torch.randn(n, 3, c, c).half(),
        specs=(torch.randn(n, 1, p.audio.n_freq, p.audio.n_frames) * 20 - 60).half(),
        video=np.repeat(np.arange(4), 3),
        audio_start=np.zeros(n),
        negative_audio=np.array([3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 1, -1]),
    )
    labels = val.video.copy()
    frames_of = np.array(list(range(n)) + [i for i in range(n) if val.negative_audio[i] >= 0])
    audio_of = np.array(list(range(n)) + [int(j) for j in val.negative_audio if j >= 0])
    truth = torch.tensor([1] * n + [0] * (len(frames_of) - n))
    vis = model.encode_visual(val.frames.float())
    aud = model.encode_audio(val.specs.float())
    # An AVC threshold midway between the two middle pair similarities: about half the pairs
    # called positive, so the accuracy depends on which audio each frame is paired with.
    sims = torch.sort((vis[frames_of] * aud[audio_of]).sum(1)).values
    model.head.threshold.fill_(float(sims[len(sims) // 2 - 1 : len(sims) // 2 + 1].mean()))
    metrics = validation_metrics(model, val, labels, "video", batch_size=5)
    order = np.random.default_rng(0).permutation(len(truth))  # the batches validation makes
    correct, losses, scores = 0, [], []
    with torch.no_grad():
        for i in range(0, len(order), 5):
            rows = order[i : i + 5]
            frames = val.frames[frames_of[rows]].float()
            out = model(frames, val.specs[audio_of[rows]].float(), truth[rows])
            correct += int((out.logits.argmax(1) == truth[rows]).sum())
            losses.append(float(out.loss))
            scores += (out.logits[:, 1] - out.logits[:, 0]).tolist()
    assert metrics["val_pairs"] == len(truth) == 23 and metrics["val_videos"] == 4
    assert metrics["val_acc"] == pytest.approx(correct / len(truth))
    assert 0.2 < metrics["val_acc"] < 0.8
    # The criterion: accuracy at the best threshold, tried at every score (plain search).
    positive = truth[order].numpy() == 1
    best = max(np.mean((np.array(scores) >= t) == positive) for t in [*scores, np.inf])
    assert metrics["val_avc"] == pytest.approx(best) and best > metrics["val_acc"]
    assert metrics["val_loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert metrics["val_loss_se"] == pytest.approx(np.std(losses) / np.sqrt(len(losses)))
    a2v_hits = [labels[int(torch.argmax(vis @ aud[i]))] == labels[i] for i in range(n)]
    assert metrics["a2v_R@1"] == pytest.approx(np.mean(a2v_hits))


def test_early_stopping_stops_and_reports_where_the_best_was(corpus: Path, tmp_path: Path) -> None:
    """A criterion that cannot rise by min_delta stops the run `patience` steps after the first
    validation; the fold-in still follows, and the summary says where the best was."""
    run = tmp_path / "run"
    preset = _preset(max_steps=500, val_every=5, patience=10, min_delta=2.0, min_fold_steps=3)
    result = train([corpus], run, preset, progress=False)
    assert result.stopped == "patience"
    vals = _records(run, "val")
    assert [v["step"] for v in vals] == [5, 10, 15]
    # The fold-in trains fold_in x the best step, at least min_fold_steps (which step was best
    # depends on the machine's arithmetic: any rise counts for best.pt, none counts for patience).
    best_step = result.best["step"]
    assert best_step in (5, 10, 15)
    share = preset.train.val.fold_in
    assert result.fold_in["from_step"] == best_step
    assert result.fold_in["steps"] == max(3, math.ceil(share * best_step))
    assert result.step == 15 + result.fold_in["steps"]
    assert "(patience)" in result.summary() and f"best.pt: step {result.best['step']}" in (
        result.summary()
    )


def test_moments_holdout_validates_every_video_and_folds_in_their_ends(
    corpus, tmp_path, monkeypatch
):
    """--holdout moments: validation holds moments of every usable video (its end), so the
    criterion measures search within the collection; the fold-in trains on whole videos."""
    folded: list = []
    use = pairs.PairStream.use
    monkeypatch.setattr(
        pairs.PairStream, "use", lambda self, videos: (folded.extend(videos), use(self, videos))
    )
    run = tmp_path / "run"
    preset = _preset(max_steps=14, val_every=5, holdout="moments", min_fold_steps=3)
    result = train([corpus], run, preset, progress=False)
    usable = CORPUS.videos + 1  # the labelled corpus and corrupt_middle.mp4 (still usable)
    vals = _records(run, "val")
    # The main phase: floor(14 / (1 + fold_in 0.25)) = 11 steps, validated at its end too.
    assert [v["step"] for v in vals] == [5, 10, 11]
    assert all(v["val_videos"] == usable for v in vals)
    assert result.fold_in["videos"] == usable and result.fold_in["steps"] == 3
    assert f"whole, the held-out ends of {usable} included" in result.summary()
    whole = pairs.usable_videos(find_media([corpus]), 1.0, workers=1)
    assert sorted((v.path, v.start, v.end) for v in folded) == sorted(
        (v.path, v.start, v.end) for v in whole
    )
    with pytest.raises(AvindexError, match="--holdout 'clips': use one of videos, moments"):
        train([corpus], tmp_path / "bad", _preset(holdout="clips"), progress=False)


def test_patience_is_on_by_default_only_with_a_time_limit() -> None:
    from avindex.config import ValConfig
    from avindex.train import patience_steps

    assert patience_steps(ValConfig(val_every=50), time_limit=600.0) == 500
    assert patience_steps(ValConfig(val_every=50), time_limit=None) == 0
    assert patience_steps(ValConfig(patience=7), time_limit=None) == 7
    assert patience_steps(ValConfig(patience=0), time_limit=600.0) == 0


def test_early_stopping_state() -> None:
    from avindex.train import EarlyStopping

    stop = EarlyStopping()
    assert stop.update(10, 0.70, 0.9, min_delta=0.01)
    assert stop.update(20, 0.705, 0.9, min_delta=0.01), "a new best, though too small to count"
    assert (stop.step, stop.improved_at, stop.waited(30), stop.validated_at) == (20, 10, 20, 20)
    assert not stop.update(30, 0.60, 0.1, min_delta=0.01), "a lower loss alone is not better"
    assert stop.update(40, 0.80, 0.9, min_delta=0.01) and stop.waited(40) == 0


def test_a_saturated_criterion_is_decided_by_the_loss() -> None:
    """Every held-out pair told apart (criterion 1.0) at several validations: the one with the
    lowest loss is best, and a loss falling by min_delta keeps the run from stopping early."""
    from avindex.train import EarlyStopping

    stop = EarlyStopping()
    assert stop.update(50, 1.0, 0.80, min_delta=0.01)
    assert stop.update(100, 1.0, 0.70, min_delta=0.01) and stop.improved_at == 100
    assert stop.update(150, 1.0, 0.695, min_delta=0.01), "lower: the better model"
    assert stop.improved_at == 100, "too small a fall to count for patience"
    assert not stop.update(200, 1.0, 0.75, min_delta=0.01) and stop.step == 150
    assert not stop.update(250, 0.99, 0.10, min_delta=0.01) and stop.step == 150


def test_checkpoint_with_the_flat_train_config_of_before_loads_and_resumes(
    trained, corpus: Path, tmp_path: Path
) -> None:
    """Checkpoints written before TrainConfig was split hold flat keys (and keys that no longer
    exist): they load into the nested configs, and --resume continues from them."""
    from avindex.train import resume_train_config

    run, _, _ = trained
    old = tmp_path / "old"
    old.mkdir()
    state = torch.load(run / LAST, weights_only=True)
    state["train_cfg"] = {
        "batch_size": 16,
        "lr": 0.002,
        "max_steps": 40,
        "time_limit": None,
        "checkpoint_every": 10,
        "val_every": 20,
        "val_fraction": 0.25,
        "seed": 0,
        "moments_per_video": 8,
        "moments_per_second": 2.0,
        "shuffle_buffer": 64,
        "decode_workers": 1,
        "prefetch_batches": 2,
        "val_pairs": 48,
        "val_clips": 24,
        "device": "auto",
        "augment": {"volume_jitter": 0.1, "brightness_jitter": 0.2, "saturation_jitter": 0.2},
    }
    state["extra"] = {"best": state["extra"]["best"], "val": state["extra"]["val"]}
    torch.save(state, old / LAST)
    shutil.copy(run / METRICS, old / METRICS)
    cfg = load_checkpoint(old / LAST).train_cfg
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.val.val_every) == (0.002, 16, 20)
    assert (cfg.data.decode_workers, cfg.val.val_fraction, cfg.checkpoint_every) == (1, 0.25, 10)
    assert cfg.val.val_samples == type(cfg.val)().val_samples, "gone keys fall back to defaults"
    resumed = resume_train_config(old, max_steps=STEPS + 5, val_samples=64)
    assert resumed.max_steps == STEPS + 5 and resumed.optim.lr == 0.002
    result = train(
        [corpus],
        old,
        dataclasses.replace(_preset(), train=resumed),
        resume=True,
        progress=False,
    )
    assert result.step == STEPS + 5
