"""scan.py: media found under folders, missing paths reported, stable --part splits."""

from __future__ import annotations

from pathlib import Path

import pytest

from avindex.errors import AvindexError
from avindex.scan import find_media, scan_inputs, select_part


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for name in ("a.mp4", "b.MKV", "sub/c.webm", "sub/deep/d.mov", ".hidden.mp4", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_folders_are_searched_recursively_for_media(tree: Path) -> None:
    found = scan_inputs([tree, tree / "notes.txt"])
    names = sorted(p.relative_to(tree).as_posix() for p in found.paths)
    # Files named explicitly are always taken; folders give media extensions, no hidden files.
    assert names == ["a.mp4", "b.MKV", "notes.txt", "sub/c.webm", "sub/deep/d.mov"]
    assert found.missing == [] and all(p.is_absolute() for p in found.paths)


def test_missing_paths_are_reported_not_fatal_except_for_find_media(tree: Path) -> None:
    found = scan_inputs([tree / "a.mp4", tree / "nope.mp4"])
    assert [p.name for p in found.paths] == ["a.mp4"]
    assert found.missing == [str(tree / "nope.mp4")]
    with pytest.raises(AvindexError, match=r"nope\.mp4: no such file or folder"):
        find_media([tree / "nope.mp4"])


def test_parts_cover_every_path_once_and_are_stable(tmp_path: Path) -> None:
    paths = [tmp_path / f"v{i:03d}.mp4" for i in range(200)]
    for n in (1, 2, 3, 7):
        parts = [select_part(paths, f"{k}/{n}") for k in range(n)]
        assert sorted(p for part in parts for p in part) == sorted(paths)
        assert sum(len(part) for part in parts) == len(paths)
        if n > 1:
            assert all(len(part) > 200 / n / 3 for part in parts), "a roughly even split"
    # The split depends on the path alone: the same on every machine and in every order.
    assert select_part(list(reversed(paths)), "1/3") == list(reversed(select_part(paths, "1/3")))
    assert select_part(paths, None) == paths


@pytest.mark.parametrize("bad", ["2/2", "-1/3", "a/b", "1", "0/0"])
def test_bad_parts_are_one_line_errors(bad: str) -> None:
    with pytest.raises(AvindexError, match="--part"):
        select_part([Path("x.mp4")], bad)
