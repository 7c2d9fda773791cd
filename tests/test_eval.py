"""eval: R@k and mAP of the four directions on a store of known 2-d embeddings, by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from avindex.cli import main
from avindex.config import EvalConfig
from avindex.errors import AvindexError
from avindex.evaluate import evaluate
from avindex.store import StoreMeta, StoreWriter, VideoRecord

TOL = 1e-6
# Clips 0,1 are class "dog", clips 2,3 class "cat"; clip 3 has no audio (left out of audio->*
# and *->audio). Pairs of scores were chosen without ties so every ranking is unambiguous.
VISUAL = np.array([[1, 0], [0.6, 0.8], [0, 1], [-0.8, 0.6]], np.float32)
AUDIO = np.array([[1, 0], [0, 1], [0.8, 0.6], [0.3, 0.3]], np.float32)
HAS_AUDIO = np.array([True, True, True, False])

# Hand-computed (see the rankings in each comment); chance from the exact formulas
# (R@1 of one relevant item among N is 1/N; E[AP] with one relevant item is H_N / N).
EXPECTED = {
    # v0 -> v1 hit; v1 -> v2(cat), v0 hit; v2 -> v1(dog), v3 hit; v3 -> v2 hit.
    "visual->visual": {"R@1": 2 / 4, "R@5": 1.0, "mAP": (1 + 1 / 2 + 1 / 2 + 1) / 4, "queries": 4},
    # a0 -> a2(cat), a1 hit; a1 -> a2, a0 hit; a2 has no other cat with audio: skipped.
    "audio->audio": {"R@1": 0.0, "R@5": 1.0, "mAP": 1 / 2, "queries": 2, "skipped": 1},
    # a0 -> v0, v1 (AP 1); a1 -> v2, v1, v3, v0 (AP (1/2+2/4)/2); a2 -> v1, v0, v2, v3 (AP 5/12).
    "audio->visual": {"R@1": 1 / 3, "R@5": 1.0, "mAP": (1 + 1 / 2 + 5 / 12) / 3, "queries": 3},
    # v0 -> a0, a2, a1 (5/6); v1 -> a2, a1, a0 (7/12); v2 -> a1, a2, a0 (1/2); v3 -> same (1/2).
    "visual->audio": {
        "R@1": 1 / 4,
        "R@5": 1.0,
        "mAP": (5 / 6 + 7 / 12 + 1 / 2 + 1 / 2) / 4,
        "queries": 4,
    },
}


def write_store(folder: Path, per_second: bool) -> Path:
    """The known clips in one 4-s video (per-second labels) or two 2-s videos (per-video), plus
    a clip of an unlabelled video."""
    store = folder / "store"
    meta = StoreMeta(model_sha256="known", visual_dim=2, audio_dim=2, hop=1.0)
    videos = [("one.mp4", slice(0, 4))] if per_second else [("dog.mp4", slice(0, 2))]
    if not per_second:
        videos.append(("cat.mp4", slice(2, 4)))
    with StoreWriter(store, meta) as writer:
        for name, rows in videos:
            path = str((folder / name).resolve())
            n = rows.stop - rows.start
            t0 = np.arange(n, dtype=np.float64)
            writer.add_video(
                VideoRecord(path, 1, 1.0, float(n)), VISUAL[rows], AUDIO[rows], HAS_AUDIO[rows], t0
            )
        extra = VideoRecord(str((folder / "unlabelled.mp4").resolve()), 1, 1.0, 1.0)
        writer.add_video(extra, VISUAL[:1], AUDIO[:1], HAS_AUDIO[:1], np.zeros(1))
    labels = folder / "labels.csv"
    if per_second:
        labels.write_text("video,second,label\none.mp4,0,dog\none.mp4,1,dog\n")
        with labels.open("a") as f:
            f.write("one.mp4,2,cat\none.mp4,3,cat\n")
    else:
        labels.write_text(f"video,label\ndog.mp4,dog\n{(folder / 'cat.mp4').resolve()},cat\n")
    return store


@pytest.mark.parametrize("per_second", [True, False], ids=["video,second,label", "video,label"])
def test_eval_matches_hand_computed_values(tmp_path: Path, per_second: bool) -> None:
    store = write_store(tmp_path, per_second)
    report = evaluate(store, tmp_path / "labels.csv")
    assert (report.clips, report.audio_clips, report.unlabelled, report.classes) == (4, 3, 1, 2)
    got = {name: r.to_dict() for name, r in report.results.items()}
    for name, want in EXPECTED.items():
        for key, value in want.items():
            assert got[name][key] == pytest.approx(value, abs=TOL), (name, key)
    assert got["visual->visual"]["chance_R@1"] == pytest.approx(1 / 3, abs=TOL)
    assert got["visual->visual"]["chance_mAP"] == pytest.approx(11 / 18, abs=TOL)
    # audio->visual: 2 of the 4 frames are relevant to every query; P(top 1 relevant) = 1/2.
    assert got["audio->visual"]["chance_R@1"] == pytest.approx(1 / 2, abs=TOL)


def test_sampled_queries_are_seeded_and_exclude_themselves(tmp_path: Path) -> None:
    store = write_store(tmp_path, per_second=True)
    cfg = EvalConfig(max_queries=2, seed=5)
    first = evaluate(store, tmp_path / "labels.csv", cfg).to_dict()
    again = evaluate(store, tmp_path / "labels.csv", cfg).to_dict()
    assert first == again
    vv = first["directions"]["visual->visual"]
    assert vv["queries"] == 2
    # Each sampled query's own frame is left out: its ranking has 3 items, as without sampling.
    assert vv["chance_R@1"] == pytest.approx(1 / 3, abs=TOL)
    assert any("sampled" in note for note in first["notes"])


def test_labels_that_match_no_video_are_an_error(tmp_path: Path) -> None:
    store = write_store(tmp_path, per_second=False)
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "labels.csv").write_text("video,label\ndog.mp4,dog\n")
    with pytest.raises(AvindexError, match=r"no video of .* is labelled"):
        evaluate(store, other / "labels.csv")


def test_cli_eval_table_and_json(tmp_path: Path, capsys, monkeypatch) -> None:
    store = write_store(tmp_path, per_second=True)
    labels = tmp_path / "labels.csv"
    for extra in ([], ["--json"]):
        monkeypatch.setattr(sys, "argv", ["avindex", "eval", str(store), "--labels", str(labels)])
        sys.argv += extra
        with pytest.raises(SystemExit) as exc:
            main()
        assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert "audio->visual" in out and "chance" in out
    data = json.loads(out[out.index("{") :])
    assert data["directions"]["visual->visual"]["R@1"] == pytest.approx(0.5)
    monkeypatch.setattr(sys, "argv", ["avindex", "eval", str(store), "--labels", "nope.csv"])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "nope.csv" in err[0]


def test_unlisted_seconds_are_left_out(tmp_path: Path) -> None:
    """A per-second file skipping second 0: that clip is unlabelled (-1), not a class of its own."""
    store = write_store(tmp_path, per_second=True)
    labels = tmp_path / "sparse.csv"
    labels.write_text("video,second,label\none.mp4,1,dog\none.mp4,2,cat\none.mp4,3,cat\n")
    report = evaluate(store, labels)
    # Clip 0 of one.mp4 and the unlabelled video's clip are left out.
    assert (report.clips, report.audio_clips, report.unlabelled, report.classes) == (3, 2, 2, 2)
    # a1 -> v2, v1 (dog at rank 2: AP 1/2); a2 -> v1, v2, v3 (cats at 2 and 3: AP 7/12).
    a2v = report.results["audio->visual"].to_dict()
    assert a2v["queries"] == 2
    assert a2v["R@1"] == pytest.approx(0.0, abs=TOL)
    assert a2v["mAP"] == pytest.approx((1 / 2 + 7 / 12) / 2, abs=TOL)
