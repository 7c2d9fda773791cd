"""synth.py and the probe/synth CLI: determinism, picture/sound correspondence, labels, commands."""

from __future__ import annotations

import colorsys
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_CORPUS
from typer.testing import CliRunner

from avindex import cli
from avindex.config import AudioConfig, SynthConfig, VideoConfig
from avindex.decode import Moment, read_moments
from avindex.errors import AvindexError
from avindex.labels import load_labels
from avindex.media import probe
from avindex.synth import LABELS_FILE, event_classes, make_corpus

AUDIO = AudioConfig()
VIDEO = VideoConfig(resize_shorter=48, crop=40)
TINY = SynthConfig(videos=2, seconds=3, classes=3, seed=7, width=48, height=32)


def seconds_of(path) -> list:
    """MomentData for every whole second of a video."""
    duration = probe(path).duration
    return list(
        read_moments(path, [Moment(t + 0.5, t) for t in range(int(duration))], AUDIO, VIDEO)
    )


def visual_class(frame: np.ndarray, k: int) -> int:
    """Class whose hue is nearest the bright (object) pixels' median colour."""
    bright = frame.reshape(-1, 3)[frame.reshape(-1, 3).max(axis=1) > 150]
    hue = colorsys.rgb_to_hsv(*(np.median(bright, axis=0) / 255))[0]
    return int(np.argmin([min(abs(hue - c / k), 1 - abs(hue - c / k)) for c in range(k)]))


def band_fraction(audio: np.ndarray, lo: float, hi: float) -> float:
    """Fraction of the window's energy between lo and hi Hz."""
    power = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(len(audio), 1 / AUDIO.sample_rate)
    return float(power[(freqs >= lo) & (freqs <= hi)].sum() / power.sum())


def test_corpus_layout_and_labels(small_corpus) -> None:
    """The corpus holds the videos and one label per second of each."""
    labels = load_labels(small_corpus / LABELS_FILE)
    assert sorted(labels) == [f"video_{i:04d}.mp4" for i in range(SMALL_CORPUS.videos)]
    for name, per_video in labels.items():
        per_second = per_video.dense()
        assert per_second.shape == (SMALL_CORPUS.seconds,)
        assert set(per_second.tolist()) <= set(range(SMALL_CORPUS.classes))
        info = probe(small_corpus / name)
        assert info.usable and info.duration == pytest.approx(SMALL_CORPUS.seconds)
        assert (info.video_codec, info.audio_codec) == ("h264", "aac")


def test_picture_and_sound_match_the_labels(small_corpus) -> None:
    """Every second's frame colour and sound band identify the labelled class."""
    classes = event_classes(SMALL_CORPUS.classes)
    for name, per_video in load_labels(small_corpus / LABELS_FILE).items():
        for second, data in enumerate(seconds_of(small_corpus / name)):
            label = int(per_video.dense()[second])
            assert visual_class(data.frame, SMALL_CORPUS.classes) == label, (name, second)
            f = classes[label].freq
            lo, hi = (0.9 * f, 2.1 * f) if classes[label].sound == "chirp" else (0.8 * f, 1.2 * f)
            assert band_fraction(data.audio, lo, hi) > 0.8, (name, second)


def test_same_seed_same_corpus(tmp_path) -> None:
    """Same seed: same labels and decoded media (1 or 2 workers); another seed differs."""
    a, b = make_corpus(tmp_path / "a", TINY, workers=1), make_corpus(tmp_path / "b", TINY)
    assert a.read_bytes() == b.read_bytes()
    for name in load_labels(a):
        fa = seconds_of(a.parent / name)[0]
        fb = seconds_of(b.parent / name)[0]
        assert np.array_equal(fa.frame, fb.frame) and np.array_equal(fa.audio, fb.audio)
    other = make_corpus(tmp_path / "c", dataclasses.replace(TINY, seed=8), workers=1)
    first = seconds_of(a.parent / "video_0000.mp4")[0].frame
    assert not np.array_equal(first, seconds_of(other.parent / "video_0000.mp4")[0].frame)


def test_webm_format(tmp_path) -> None:
    """--format webm writes VP9 + Opus."""
    cfg = dataclasses.replace(TINY, videos=1, format="webm")
    labels = make_corpus(tmp_path, cfg, workers=1)
    info = probe(labels.parent / "video_0000.webm")
    assert (info.video_codec, info.audio_codec, info.duration) == ("vp9", "opus", 3.0)


def test_bad_settings(tmp_path) -> None:
    """Unknown formats and too few classes are user errors."""
    with pytest.raises(AvindexError, match="format"):
        make_corpus(tmp_path, dataclasses.replace(TINY, format="avi"))
    with pytest.raises(AvindexError, match="classes"):
        make_corpus(tmp_path, dataclasses.replace(TINY, classes=1))


def test_cli_synth_and_probe(tmp_path, media_zoo) -> None:
    """synth writes a corpus; probe lists good and bad files with exit code 0."""
    runner = CliRunner()
    out = tmp_path / "corpus"
    args = [
        "synth",
        str(out),
        "--videos",
        "1",
        "--seconds",
        "2",
        "--classes",
        "2",
        "--size",
        "32x24",
    ]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert (out / "video_0000.mp4").exists() and (out / LABELS_FILE).exists()
    folder = next(iter(media_zoo.values()))[0].parent
    result = runner.invoke(cli.app, ["probe", str(folder), str(out), "--json"])
    assert result.exit_code == 0, result.output
    infos = {i["path"].rsplit("/", 1)[-1]: i for i in json.loads(result.output)}
    for name, (_, clips) in media_zoo.items():
        assert infos[name]["usable"] == (clips is not None), name
        assert (infos[name]["error"] is None) == (clips is not None), name
    assert infos["video_0000.mp4"]["usable"]
    result = runner.invoke(cli.app, ["probe", str(folder)])
    assert result.exit_code == 0 and "unusable" in result.output and "h264" in result.output


def test_cli_usage_errors(monkeypatch, tmp_path, capsys) -> None:
    """A bad --size is a one-line error with exit code 2."""
    monkeypatch.setattr(sys, "argv", ["avindex", "synth", str(tmp_path), "--size", "big"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("avindex: error:") and err.count("\n") == 1


def test_probe_reports_a_missing_path_and_goes_on(monkeypatch, media_zoo, tmp_path, capsys):
    """`avindex probe a.mp4 missing.mp4` reports both (the missing one as unusable), exit 1."""
    good = media_zoo["h264_aac.mp4"][0]
    argv = ["avindex", "probe", str(tmp_path / "nope.mp4"), str(good), "--json"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    report = {Path(i["path"]).name: i for i in json.loads(capsys.readouterr().out)}
    assert report["nope.mp4"]["error"] == "no such file or folder"
    assert report["h264_aac.mp4"]["usable"]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"width": 127, "height": 95}, "127x95: width and height must be even"),
        ({"width": 8, "height": 8}, "at least 16"),
        ({"fps": 0.0}, "--fps 0.0: must be above 0"),
    ],
    ids=["odd size", "tiny size", "zero fps"],
)
def test_make_corpus_rejects_bad_size_and_fps(tmp_path, change: dict, match: str) -> None:
    """Sizes the encoder refuses and a zero frame rate are caught before any file is written."""
    with pytest.raises(AvindexError, match=match):
        make_corpus(tmp_path / "out", dataclasses.replace(TINY, **change))
    assert not (tmp_path / "out").exists()


def test_cli_synth_odd_size_is_one_line(monkeypatch, tmp_path, capsys) -> None:
    """`avindex synth --size 127x95` says what to do in one line instead of a libx264 traceback."""
    monkeypatch.setattr(sys, "argv", ["avindex", "synth", str(tmp_path), "--size", "127x95"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code != 0 and err.count("\n") == 1 and "even" in err


# Raw frames + audio (sha256) and labels of SynthConfig(videos=3, seconds=4, classes=5, seed=11,
# 64x48) as the easy renderer wrote them before the hard mode existed: easy must not change.
EASY_BEFORE = {
    0: ([0, 0, 2, 2], "3c899a596690f7b2bfa7927698c7059ec88b013419eeff4bfc288a60309ff763"),
    1: ([1, 1, 4, 4], "bdaee365fe3b52afe2c4a97607a12a2069cd575f54b1ad582b73d8a849aa8b6b"),
    2: ([4, 4, 1, 1], "fe43eba47a54c5bb43f3ba2024d053b6445177170cacc87c29555e2d08bfa7a9"),
}


def _rendered(monkeypatch, cfg: SynthConfig, index: int) -> tuple[list[int], str]:
    """Labels and sha256 of the frames and audio make_video hands to the encoder."""
    import hashlib

    from avindex import synth

    digest = {}

    def capture(path, frames, fps, audio=None, sample_rate=48_000, **kwargs):
        h = hashlib.sha256()
        for frame in frames:
            h.update(np.ascontiguousarray(frame).tobytes())
        h.update(np.ascontiguousarray(audio, dtype=np.float32).tobytes())
        digest["sha"] = h.hexdigest()

    monkeypatch.setattr(synth, "write_video", capture)
    labels = synth.make_video("unused.mp4", cfg, index)
    return labels.tolist(), digest["sha"]


def test_easy_mode_renders_exactly_what_it_did_before_hard_mode(monkeypatch) -> None:
    """Same seed, same pictures, sound and labels as before (the H.264 bytes themselves vary
    with encoder threading from run to run, before and after)."""
    cfg = SynthConfig(videos=3, seconds=4, classes=5, seed=11, width=64, height=48)
    assert SynthConfig().difficulty == "easy" and not SynthConfig().one_class_per_video
    for index, expected in EASY_BEFORE.items():
        assert _rendered(monkeypatch, cfg, index) == expected


HARD = SynthConfig(videos=3, seconds=6, classes=5, seed=3, width=128, height=96, difficulty="hard")


@pytest.fixture(scope="module")
def hard_corpus(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("hard")
    make_corpus(out, HARD, workers=1)
    return out


def test_hard_mode_small_moving_object_over_its_own_scene(hard_corpus) -> None:
    """The pixels that differ most from a video's static scene (its median frame) are a small
    object, of the labelled class's colour in most seconds (the scene hides it now and then), at
    another place each second; every video has a textured scene of its own."""
    video = VideoConfig(resize_shorter=96, crop=96)
    medians, right = [], []
    for name, per_video in load_labels(hard_corpus / LABELS_FILE).items():
        datas = list(
            read_moments(
                hard_corpus / name, [Moment(t + 0.5, t) for t in range(HARD.seconds)], AUDIO, video
            )
        )
        frames = np.stack([d.frame for d in datas]).astype(np.int16)
        scene = np.median(frames, axis=0)
        medians.append(scene)
        centres = []
        for second, frame in enumerate(frames):
            change = np.abs(frame - scene).max(axis=2)
            moving = change > 60
            assert 0.002 < moving.mean() < 0.12, (name, second, moving.mean())
            core = moving & (change >= np.median(change[moving]))
            hue = colorsys.rgb_to_hsv(*(np.median(frame[core], axis=0) / 255))[0]
            k = HARD.classes
            nearest = int(
                np.argmin([min(abs(hue - c / k), 1 - abs(hue - c / k)) for c in range(k)])
            )
            right.append(nearest == int(per_video.dense()[second]))
            centres.append(np.argwhere(moving).mean(axis=0))
        assert np.ptp(np.array(centres), axis=0).max() > 10, "the object moves across the scene"
        assert scene.std() > 15, "a textured scene, not a plain backdrop"
    assert np.mean(right) >= 0.8, right
    assert np.abs(medians[0] - medians[1]).mean() > 20, "each video has a scene of its own"


def _band(event) -> tuple[float, float]:
    """The frequency band holding an event class's sound."""
    f = event.freq
    return (0.9 * f, 2.1 * f) if event.sound == "chirp" else (0.8 * f, 1.2 * f)


def test_hard_mode_sound_is_in_noise_but_still_the_labelled_class(hard_corpus) -> None:
    """Each second's densest class band is the labelled one, though a good part of the energy
    lies outside it (ambient noise, the distractor); the easy mode keeps > 99% in the band."""
    classes = event_classes(HARD.classes)
    shares, right = [], []
    for name, per_video in load_labels(hard_corpus / LABELS_FILE).items():
        for second, data in enumerate(seconds_of(hard_corpus / name)):
            label = int(per_video.dense()[second])
            bands = [_band(c) for c in classes]
            density = [band_fraction(data.audio, lo, hi) / (hi - lo) for lo, hi in bands]
            right.append(int(np.argmax(density)) == label)
            shares.append(band_fraction(data.audio, *bands[label]))
    assert np.mean(right) >= 0.8, right
    assert np.median(shares) < 0.9, "noisy, unlike the easy mode"


def test_one_class_per_video(tmp_path) -> None:
    cfg = dataclasses.replace(TINY, videos=3, classes=3, one_class_per_video=True)
    labels = load_labels(make_corpus(tmp_path, cfg, workers=1))
    assert {name: set(v.dense().tolist()) for name, v in labels.items()} == {
        "video_0000.mp4": {0},
        "video_0001.mp4": {1},
        "video_0002.mp4": {2},
    }


def test_one_class_per_video_makes_every_class_its_own_look_and_sound() -> None:
    """Up to 48 classes, no two share shape, sound and motion; classes next to each other in
    index differ in shape and by at least a sixth of the colour wheel and a fifth of an octave.
    The default classes (segments of shared classes) stay as they were."""
    for k in (2, 10, 30, 48):
        classes = event_classes(k, distinct=True)
        assert len({(c.shape, c.sound, c.motion) for c in classes}) == k
        for a, b in itertools.pairwise(classes):
            hue_a, hue_b = (colorsys.rgb_to_hsv(*c.colour)[0] for c in (a, b))
            assert a.shape != b.shape and min(abs(hue_a - hue_b), 1 - abs(hue_a - hue_b)) > 1 / 6
            assert abs(np.log2(a.freq / b.freq)) > 0.2
            assert 200 <= a.freq <= 6400
    assert event_classes(30)[4].shape == event_classes(30)[0].shape == "disc"
    assert event_classes(30)[4].sound == event_classes(30)[0].sound == "tone"


def test_cli_synth_hard_and_bad_difficulty(tmp_path, monkeypatch, capsys) -> None:
    runner = CliRunner()
    args = ["synth", str(tmp_path / "c"), "--videos", "2", "--seconds", "2", "--classes", "2"]
    result = runner.invoke(cli.app, [*args, "--difficulty", "hard", "--one-class-per-video"])
    assert result.exit_code == 0 and "2 hard videos" in result.output, result.output
    labels = load_labels(tmp_path / "c" / LABELS_FILE)
    assert [v.dense().tolist() for v in labels.values()] == [[0, 0], [1, 1]]
    monkeypatch.setattr(sys, "argv", ["avindex", *args[:2], "--difficulty", "medium"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "easy, hard, harder" in err
