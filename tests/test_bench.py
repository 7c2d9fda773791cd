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


def test_nvdec_sweep_machinery_with_a_stand_in_session(tmp_path: Path) -> None:
    """The sweep's demux and session threads (CPU stand-in for NVDEC): every frame decoded with
    any number of sessions; leaving non-reference packets out decodes fewer."""
    import torch
    from nvdec_standin import PyAVSession

    from avindex.bench.gpu import Demuxed, decode_files
    from avindex.config import NaturalConfig
    from avindex.natural import make_natural_corpus

    (path,) = make_natural_corpus(tmp_path, NaturalConfig(1, 2, 160, 96, 25.0), workers=1)
    demuxed = Demuxed(path, 2.0)
    assert demuxed.header.codec == "h264" and len(demuxed.packets) == 50
    cpu = torch.device("cpu")
    for sessions in (1, 3):
        frames, _ = decode_files([demuxed] * 3, sessions, PyAVSession, cpu, skip=False)
        assert frames == 150
    frames, _ = decode_files([demuxed], 1, PyAVSession, cpu, skip=True)
    assert frames == sum(not d for _, _, d in demuxed.packets) < 40


def test_gpu_rows_compare_embed_with_the_nvdec_bound(tmp_path: Path) -> None:
    """Report logic for a GPU run (numbers made up): embed served by NVDEC is compared with the
    multi-session NVDEC bound; the GPU targets name the stage to blame; the plot has the sweep."""
    from avindex.bench.report import assess

    sweep = [
        {"sessions": s, "video_s_per_s": v, "frames_per_s": 30 * v}
        for s, v in ((1, 20.0), (7, 120.0), (14, 150.0))
    ]
    stages = {
        "nvdec": {
            "codec": "h264",
            "size": "1920x1080",
            "engines": 7,
            "sweep": sweep,
            "best": sweep[-1],
            "per_engine_frames_per_s": 600.0,
            "physical_frames_per_s": 4200.0,
            "physical_video_s_per_s": 140.0,
            "skip": {
                "sessions": 14,
                "video_s_per_s": 200.0,
                "frames_per_s": 6000.0,
                "submitted_fraction": 0.4,
            },
        },
        "dali": {"batch": 4, "video_s_per_s": 30.0, "frames_per_s": 900.0},
        "embed": {
            "video_s_per_s": 100.0,
            "clips_per_s": 100.0,
            "clips": 1000,
            "batch_size": 64,
            "hop": 1.0,
            "decoders": {"nvdec": 27, "pyav": 1},
            "fallbacks": 1,
            "nvdec_sessions": 14,
            "nvdec_utilisation": 70.0,
            "stage_seconds": {"model": 1.0, "wait": 8.0},
            "stage_fraction": {"wait": 0.8, "model": 0.1},
        },
    }
    rows, targets = assess(stages, {"sizes": ["1920x1080"]})
    embed = next(r for r in rows if r.what == "embed end to end")
    assert embed.bound == 150.0 and embed.bound_name.startswith("NVDEC decode-all (14")
    met = {t.name: t.met for t in targets}
    assert met == {
        "embed >= 0.8 x NVDEC decode-all (best sessions)": False,
        "embed 1080p >= 90 video s/s": True,
        "NVDEC utilisation during embed >= 85%": False,
    }
    assert all("decode" in t.bottleneck for t in targets if not t.met)
    result = {
        "rows": [r.to_dict() for r in rows],
        "targets": [t.to_dict() for t in targets],
        "stages": stages,
        "machine": {"cpu": "x", "cpu_count": 16},
        "date": "today",
    }
    write_plot(result, tmp_path / "gpu.png")
    assert (tmp_path / "gpu.png").stat().st_size > 10_000
