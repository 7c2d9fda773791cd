"""labels.py: both CSV formats, clip lookup, and hostile files that must fail in one line."""

from __future__ import annotations

import resource
import sys

import numpy as np
import pytest

from avindex import cli
from avindex.errors import AvindexError
from avindex.labels import MAX_SECOND, clip_labels, labels_by_path, load_labels, write_labels


def _dense(labels: dict) -> dict[str, list[int]]:
    return {k: v.dense().tolist() for k, v in labels.items()}


def test_per_video_and_per_second_formats(tmp_path) -> None:
    """Per-second and per-video label files load; clip_labels takes the clip centre."""
    per_video = tmp_path / "per_video.csv"
    per_video.write_text("video,label\na.mp4,dog\nb.mp4,cat\nc.mp4,dog\n")
    labels = load_labels(per_video)
    assert _dense(labels) == {"a.mp4": [1], "b.mp4": [0], "c.mp4": [1]}
    assert clip_labels(labels["a.mp4"], np.array([0.0, 7.0])).tolist() == [1, 1]
    per_second = tmp_path / "per_second.csv"
    per_second.write_text("video,second,label\nx.mp4,1,5\nx.mp4,0,3\nx.mp4,2,5\n")
    x = load_labels(per_second)["x.mp4"]
    assert x.dense().tolist() == [3, 5, 5]
    # Clip centre decides: t0=0.5 covers 0.5-1.5 s, centre 1.0 s -> second 1; past the end clamps.
    assert clip_labels(x, np.array([0.0, 0.5, 0.4, 9.0])).tolist() == [3, 5, 3, 5]


def test_sparse_seconds_stay_at_their_second_and_paths_resolve(tmp_path) -> None:
    """Unlisted seconds are -1; paths resolve under the file's folder."""
    sparse = tmp_path / "sparse.csv"
    sparse.write_text("video,second,label\nx.mp4,5,2\nx.mp4,7,4\nx.mp4,6,3\n")
    x = load_labels(sparse)["x.mp4"]
    assert x.dense().tolist() == [-1, -1, -1, -1, -1, 2, 3, 4]
    assert clip_labels(x, np.array([0.0, 5.0, 6.6, -3.0])).tolist() == [-1, 2, 4, -1]
    assert list(labels_by_path(sparse)) == [str((tmp_path / "x.mp4").resolve())]


def test_write_then_load_round_trips(tmp_path) -> None:
    per_second = {"a.mp4": np.array([0, 0, 3]), "sub/b.mp4": np.array([2])}
    path = write_labels(tmp_path / "labels.csv", per_second)
    assert _dense(load_labels(path)) == {k: v.tolist() for k, v in per_second.items()}
    assert not list(tmp_path.glob("*.tmp"))


def test_a_huge_second_is_refused_and_a_large_one_stays_small(tmp_path) -> None:
    """second=1e11 once asked for 745 GiB; now a refusal. A legal far second is stored sparsely."""
    for text in ("99999999999", "1" + "0" * 30, str(MAX_SECOND + 1)):
        bad = tmp_path / "far.csv"
        bad.write_text(f"video,second,label\nx.mp4,{text},1\n")
        with pytest.raises(AvindexError, match=r"far\.csv: row 2: second .* beyond"):
            load_labels(bad)
    far = tmp_path / "legal.csv"
    far.write_text(f"video,second,label\nx.mp4,{MAX_SECOND},1\ny.mp4,0,2\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    x = load_labels(far)["x.mp4"]
    assert x.seconds.nbytes + x.classes.nbytes == 16, "one row, one entry"
    assert clip_labels(x, np.array([MAX_SECOND - 0.5, 3.0, 1e15])).tolist() == [1, -1, 1]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 20_000  # kB


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe\x80" * 20, r"not a text CSV"),
        (b"video,second,label\nx.mp4,0,\xff\xfe\n", r"not a text CSV"),
        (b"video,label\na.mp4," + b"7" * 200_000 + b"\n", r"not a readable CSV"),
        (b"", r"header .*\(the file is empty\)"),
        (b"video,second,label\n", r"no label rows"),
        (b"file,class\na.mp4,1\n", r"header"),
        (b"video,second\na.mp4,1\n", r"header"),
        (b"video,second,label\nx.mp4,0,1\nx.mp4,one,1\n", r"row 3: second 'one'"),
        (b"video,second,label\nx.mp4,0,1\nx.mp4,1.5,1\n", r"row 3: second '1\.5'"),
        (b"video,second,label\nx.mp4,-1,1\n", r"row 2: second '-1'"),
        (b"video,second,label\nx.mp4,\xd9\xa3,1\n", r"row 2: second"),
        (b"video,second,label\nx.mp4,0,1\nx.mp4,1\n", r"row 3 is missing fields"),
        (b"video,second,label\nx.mp4,0,   \n", r"row 2 is missing fields"),
        (b"video,second,label\n,0,1\n", r"row 2 is missing fields"),
    ],
    ids=[
        "binary",
        "undecodable",
        "giant field",
        "empty",
        "header only",
        "wrong columns",
        "no label column",
        "word",
        "fraction",
        "negative",
        "arabic digit",
        "short row",
        "blank label",
        "blank video",
    ],
)
def test_hostile_files_fail_in_one_line_naming_the_file(tmp_path, content, match) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_bytes(content)
    with pytest.raises(AvindexError, match=match) as info:
        load_labels(bad)
    message = str(info.value)
    assert message.startswith(f"{bad}:") and "\n" not in message


def test_missing_file_and_unusable_path(tmp_path) -> None:
    with pytest.raises(AvindexError, match="cannot read"):
        load_labels(tmp_path / "missing.csv")
    nul = tmp_path / "nul.csv"
    nul.write_bytes(b"video,label\na\x00b.mp4,1\n")
    with pytest.raises(AvindexError, match=r"nul\.csv: video 'a\\x00b\.mp4' is not a usable path"):
        labels_by_path(nul)


def test_integer_labels_keep_values_unless_they_do_not_fit(tmp_path) -> None:
    ints = tmp_path / "ints.csv"
    ints.write_text("video,label\na.mp4,-4\nb.mp4,17\n")
    assert _dense(load_labels(ints)) == {"a.mp4": [-4], "b.mp4": [17]}
    odd = tmp_path / "odd.csv"
    odd.write_text("video,label\na.mp4,--5\nb.mp4,99999999999999999999999\n")
    assert _dense(load_labels(odd)) == {"a.mp4": [0], "b.mp4": [1]}, "names, not an overflow"


def test_cli_train_with_binary_labels_is_one_line(monkeypatch, tmp_path, capsys) -> None:
    """`avindex train ... --labels binary.csv` prints one line, not a UnicodeDecodeError."""
    bad = tmp_path / "labels.csv"
    bad.write_bytes(bytes(range(256)) * 4)
    argv = ["avindex", "train", str(tmp_path), "--labels", str(bad), "--out", str(tmp_path / "r")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "not a text CSV" in err, err
