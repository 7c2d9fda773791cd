"""Smoke test of `avindex bench` on a tiny corpus: every stage runs, ratios and targets are
computed, JSON and PNG are written. Timings are never asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avindex.bench.report import print_table, write_json, write_plot
from avindex.bench.runner import STAGES, parse_stages, run_bench
from avindex.config import BenchConfig, EmbedConfig
from avindex.errors import AvindexError

TINY = BenchConfig(
    batch_sizes=(1, 2),
    repeats=1,
    min_seconds=0.05,
    naive_videos=1,
    train_steps=1,
    train_batch=8,
    index_vectors=3_000,
    index_dim=16,
    queries=20,
    device="cpu",
)


def test_parse_stages_adds_what_comparisons_need() -> None:
    assert parse_stages("embed") == ["decode", "model", "embed", "naive"]
    assert parse_stages("search") == ["index", "search"]
    assert parse_stages(None)[: len(STAGES[:4])] == list(STAGES[:4])
    with pytest.raises(AvindexError, match="unknown"):
        parse_stages("decode,warp")


@pytest.fixture(scope="module")
def result(small_corpus: Path) -> dict:
    seen: list[str] = []
    out = run_bench(
        parse_stages(None),
        small_corpus,
        TINY,
        EmbedConfig(batch_size=4, decode_workers=1),
        on_stage=seen.append,
        command="avindex bench",
    )
    assert seen[0] == "corpus" and set(seen[1:]) == {*STAGES, "naive"} - {"search"}
    return out


def test_every_stage_reports_rates_and_ratios(result: dict) -> None:
    stages = result["stages"]
    assert set(stages) == {"decode", "frontend", "model", "naive", "embed", "train", "index"}
    assert stages["embed"]["clips"] == stages["embed"]["videos"] * 6  # 4 videos of 6 s, hop 1
    assert [e["batch"] for e in stages["model"]["sweep"]] == [1, 2, 4]
    assert stages["frontend"]["max_abs_db_difference"] < 0.1  # DALI matches the numpy STFT
    index = stages["index"]
    assert index["factory"] == "Flat" and index["recall_at_10"] == pytest.approx(1.0)
    rows = {(r["stage"], r["what"]): r for r in result["rows"]}
    embed = rows[("embed", "embed end to end")]
    decode = stages["decode"]
    assert embed["bound_name"] == "PyAV decode-all"  # the bound of the decoder embed used
    assert embed["bound"] == decode["decode_all"]["video_s_per_s"]
    assert embed["vs_bound"] == pytest.approx(embed["value"] / embed["bound"])
    assert stages["embed"]["decoders"] == {"pyav": 4} and stages["embed"]["fallbacks"] == 0
    (ours,) = [r for r in result["rows"] if r["what"].startswith("avindex decode")]
    assert ours["bound"] == decode["skip_nonref"]["video_s_per_s"]
    assert decode["skip_nonref"]["frames"] < decode["decode_all"]["frames"]
    assert embed["vs_naive"] == pytest.approx(embed["value"] / stages["naive"]["video_s_per_s"])
    for row in result["rows"]:
        assert row["value"] > 0 and row["unit"]
    names = [t["name"] for t in result["targets"]]
    assert len(names) == 6 and any("naive" in n for n in names)
    assert {"embed >= 1 x PyAV decode-all", "embed >= 0.8 x PyAV skip-non-reference"} <= set(names)
    for target in result["targets"]:
        assert isinstance(target["met"], bool)
        assert (target["bottleneck"] is None) == target["met"]


def test_outputs_json_plot_and_table(result: dict, tmp_path: Path, capsys) -> None:
    write_json(result, tmp_path / "out" / "bench.json")
    write_plot(result, tmp_path / "out" / "bench.png")
    loaded = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert loaded["schema"] == 1 and loaded["config"]["width"] == 0.125
    assert {"machine", "corpus", "stages", "rows", "targets", "date", "command"} <= set(loaded)
    assert (tmp_path / "out" / "bench.png").read_bytes()[:4] == b"\x89PNG"
    print_table(result)
    assert "embed end to end" in capsys.readouterr().out


def test_natural_videos_look_like_camera_footage(tmp_path: Path) -> None:
    """x264 defaults give B-frames (skip-non-reference decodes fewer frames); the frames carry
    texture (not flat) and the camera moves; HEVC encodes too."""
    import av
    import numpy as np

    from avindex.bench.decode import decode_file
    from avindex.config import NaturalConfig
    from avindex.natural import make_natural_corpus

    cfg = NaturalConfig(videos=1, seconds=2, width=160, height=96, fps=25.0)
    (path,) = make_natural_corpus(tmp_path / "h264", cfg, workers=1)
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 50
    assert min(f.std() for f in frames) > 20  # texture everywhere
    assert np.abs(frames[10].astype(int) - frames[0]).mean() > 5  # motion
    everything, _ = decode_file(str(path), 1, False)
    referenced, _ = decode_file(str(path), 1, True)
    assert everything == 50 and referenced < 40  # B-frames nobody refers to
    hevc = make_natural_corpus(tmp_path / "hevc", NaturalConfig(1, 1, 160, 96, 25.0, "hevc"), 1)
    with av.open(str(hevc[0])) as container:
        assert container.streams.video[0].codec_context.name == "hevc"


def test_a_looped_natural_video_is_the_encode_played_again(tmp_path: Path) -> None:
    from avindex.bench.decode import decode_file
    from avindex.config import NaturalConfig
    from avindex.media import probe
    from avindex.natural import make_natural_corpus

    once = make_natural_corpus(tmp_path / "a", NaturalConfig(1, 2, 160, 96, 25.0), workers=1)
    looped = make_natural_corpus(tmp_path / "b", NaturalConfig(1, 2, 160, 96, 25.0, loops=3), 1)
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["natural_000.mp4"]
    info = probe(looped[0])
    assert info.error is None and info.duration == pytest.approx(6.0, abs=0.05)
    assert info.n_frames == 150 and not info.variable_fps
    assert decode_file(str(looped[0]), 1, True)[0] == 3 * decode_file(str(once[0]), 1, True)[0]
