"""Fuzz: mutated media (bit flips, truncation at every 10%, swapped headers, garbage behind a valid
header) through probe, embed and search: no process dies, every bad file gets a reason, and the
intact files' clips are all there."""

from __future__ import annotations

from pathlib import Path

import mediafactory as mf
import numpy as np
import pytest
from PIL import Image

from avindex.config import EmbedConfig, SearchConfig
from avindex.embed import embed_paths
from avindex.index import build_index
from avindex.media import probe_files
from avindex.model import random_checkpoint
from avindex.queries import Query
from avindex.search import Searcher
from avindex.store import Store

pytestmark = pytest.mark.slow
SEED = 20261203


def mutations(data: bytes, other: bytes, rng: np.random.Generator) -> dict[str, bytes]:
    """Seeded damaged copies of one file."""
    out = {f"cut{p}": data[: len(data) * p // 10] for p in range(1, 10)}
    for flips in (1, 8, 64, 512):
        for round_ in range(3):
            buf = bytearray(data)
            for at in rng.integers(0, len(buf), flips):
                buf[at] ^= 1 << int(rng.integers(0, 8))
            out[f"flip{flips}_{round_}"] = bytes(buf)
    head = min(len(data), len(other), 1024)
    out["swapped_head"] = other[:head] + data[head:]
    out["garbage_body"] = data[:64] + rng.integers(0, 256, len(data), np.uint8).tobytes()
    out["garbage_tail"] = data[: len(data) // 2] + rng.integers(0, 256, 4096, np.uint8).tobytes()
    return out


@pytest.fixture(scope="module")
def fuzzed(media_zoo, tmp_path_factory) -> dict[str, object]:
    """Damaged copies of good videos, a sound and a picture, beside two intact videos."""
    rng = np.random.default_rng(SEED)
    out = tmp_path_factory.mktemp("fuzz")
    bases = ["h264_aac.mp4", "vp9_opus.webm", "mpeg4_pcm.avi", "audio16k_mono.mkv"]
    videos = out / "videos"
    videos.mkdir()
    for i, name in enumerate(bases):
        data = media_zoo[name][0].read_bytes()
        other = media_zoo[bases[(i + 1) % len(bases)]][0].read_bytes()
        stem, ext = name.rsplit(".", 1)
        for what, blob in mutations(data, other, rng).items():
            (videos / f"{stem}_{what}.{ext}").write_bytes(blob)
    intact = {}
    for name in ("h264_aac.mp4", "fps2997.mp4"):
        path = videos / f"intact_{name}"
        path.write_bytes(media_zoo[name][0].read_bytes())
        intact[path] = media_zoo[name][1]
    queries = out / "queries"
    queries.mkdir()
    wav = mf.write_wav(queries / "sound.wav", 2.0, 16_000, 2).read_bytes()
    Image.fromarray(mf.make_frames(1, (96, 64))[0]).save(queries / "picture.png")
    png = (queries / "picture.png").read_bytes()
    for what, blob in mutations(wav, png, rng).items():
        (queries / f"sound_{what}.wav").write_bytes(blob)
    for what, blob in mutations(png, wav, rng).items():
        (queries / f"picture_{what}.png").write_bytes(blob)
    return {"videos": videos, "queries": queries, "intact": intact}


def test_probe_reports_every_damaged_file_without_dying(fuzzed) -> None:
    paths = sorted(fuzzed["videos"].iterdir())
    infos = probe_files(paths, workers=2)
    assert len(infos) == len(paths) > 60
    for path, info in zip(paths, infos, strict=True):
        assert info.path == str(path)
        assert info.usable or (info.error and "\n" not in info.error), (path.name, info)
    intact = [info for path, info in zip(paths, infos, strict=True) if path.name[:6] == "intact"]
    assert len(intact) == 2 and all(info.usable for info in intact)


@pytest.fixture(scope="module")
def fuzz_store(fuzzed, tmp_path_factory) -> tuple[Path, object]:
    """Every damaged and intact video embedded into one store (then indexed)."""
    out = tmp_path_factory.mktemp("fuzz_store") / "store"
    cfg = EmbedConfig(device="cpu", batch_size=16, decode_workers=2, decode_stall_seconds=60)
    paths = sorted(fuzzed["videos"].iterdir())
    report = embed_paths(paths, out, random_checkpoint(0.125, seed=0), cfg)
    build_index(out)
    return out, report


def test_embed_fails_bad_files_with_reasons_and_keeps_the_good_ones(fuzzed, fuzz_store) -> None:
    out, report = fuzz_store
    paths = sorted(fuzzed["videos"].iterdir())
    assert report.videos_done + report.videos_failed == len(paths)
    assert all(reason and "\n" not in reason for _, reason in report.failures)
    store = Store(out)
    entries = {Path(e.path).name: e for e in store.videos().values()}
    assert len(entries) == len(paths), "every file is recorded, done or failed"
    rows = store.clips(np.arange(store.num_clips))
    for path, expected in fuzzed["intact"].items():
        assert entries[path.name].status == "done"
        got = sorted(r.t0 for r in rows if r.path == str(path.resolve()))
        assert got == list(range(expected)), path.name


def test_search_answers_or_refuses_every_damaged_query(fuzzed, fuzz_store) -> None:
    files = sorted(fuzzed["queries"].iterdir())
    queries = [Query("audio" if f.suffix == ".wav" else "image", str(f)) for f in files]
    with Searcher(fuzz_store[0], cfg=SearchConfig(device="cpu")) as searcher:
        results = searcher.run(queries, 3)
    assert len(results) == len(files) > 30
    for f, r in zip(files, results, strict=True):
        assert (r.error is None and r.hits) or (r.error and "\n" not in r.error), (f.name, r)
    for name in ("sound.wav", "picture.png"):
        (intact,) = [r for f, r in zip(files, results, strict=True) if f.name == name]
        assert intact.error is None and len(intact.hits) == 3
