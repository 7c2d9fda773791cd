"""synth.py and the probe/synth CLI: determinism, picture/sound correspondence, labels, commands."""

from __future__ import annotations

import colorsys
import dataclasses
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
from avindex.media import probe
from avindex.synth import LABELS_FILE, clip_labels, event_classes, load_labels, make_corpus

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
    for name, per_second in labels.items():
        assert per_second.shape == (SMALL_CORPUS.seconds,)
        assert set(per_second.tolist()) <= set(range(SMALL_CORPUS.classes))
        info = probe(small_corpus / name)
        assert info.usable and info.duration == pytest.approx(SMALL_CORPUS.seconds)
        assert (info.video_codec, info.audio_codec) == ("h264", "aac")


def test_picture_and_sound_match_the_labels(small_corpus) -> None:
    """Every second's frame colour and sound band identify the labelled class."""
    classes = event_classes(SMALL_CORPUS.classes)
    for name, per_second in load_labels(small_corpus / LABELS_FILE).items():
        for second, data in enumerate(seconds_of(small_corpus / name)):
            label = int(per_second[second])
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


def test_load_labels_formats(tmp_path) -> None:
    """Per-second and per-video label files load; clip_labels takes the clip centre."""
    per_video = tmp_path / "per_video.csv"
    per_video.write_text("video,label\na.mp4,dog\nb.mp4,cat\nc.mp4,dog\n")
    labels = load_labels(per_video)
    assert {k: v.tolist() for k, v in labels.items()} == {"a.mp4": [1], "b.mp4": [0], "c.mp4": [1]}
    assert clip_labels(labels["a.mp4"], np.array([0.0, 7.0])).tolist() == [1, 1]
    per_second = tmp_path / "per_second.csv"
    per_second.write_text("video,second,label\nx.mp4,1,5\nx.mp4,0,3\nx.mp4,2,5\n")
    x = load_labels(per_second)["x.mp4"]
    assert x.tolist() == [3, 5, 5]
    # Clip centre decides: t0=0.5 covers 0.5-1.5 s, centre 1.0 s -> second 1; past the end clamps.
    assert clip_labels(x, np.array([0.0, 0.5, 0.4, 9.0])).tolist() == [3, 5, 3, 5]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na.mp4,1\n")
    with pytest.raises(AvindexError, match="header"):
        load_labels(bad)
    with pytest.raises(AvindexError, match="cannot read"):
        load_labels(tmp_path / "missing.csv")


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


def test_load_labels_keeps_real_seconds_and_resolves_paths(tmp_path) -> None:
    """Sparse seconds stay at their second (unlisted ones are -1); paths resolve under the file."""
    from avindex.synth import labels_by_path

    sparse = tmp_path / "sparse.csv"
    sparse.write_text("video,second,label\nx.mp4,5,2\nx.mp4,7,4\nx.mp4,6,3\n")
    x = load_labels(sparse)["x.mp4"]
    assert x.tolist() == [-1, -1, -1, -1, -1, 2, 3, 4]
    assert clip_labels(x, np.array([0.0, 5.0, 6.6])).tolist() == [-1, 2, 4]
    assert list(labels_by_path(sparse)) == [str((tmp_path / "x.mp4").resolve())]


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ("x.mp4,0,1\nx.mp4,one,1\n", r"bad\.csv: row 3: second 'one'"),
        ("x.mp4,0,1\nx.mp4,1.5,1\n", r"row 3: second '1\.5'"),
        ("x.mp4,-1,1\n", r"row 2: second '-1'"),
        ("x.mp4,0,1\nx.mp4,1\n", r"bad\.csv: row 3 is missing fields"),
    ],
    ids=["word", "fraction", "negative", "short row"],
)
def test_load_labels_bad_rows_name_file_and_row(tmp_path, rows: str, match: str) -> None:
    """A bad second or a short row is a one-line error naming the file and row, not a traceback."""
    bad = tmp_path / "bad.csv"
    bad.write_text("video,second,label\n" + rows)
    with pytest.raises(AvindexError, match=match):
        load_labels(bad)


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
