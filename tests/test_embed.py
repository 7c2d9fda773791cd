"""Bulk embedding: exact clip counts over the media zoo, failures recorded, resume after kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from mediafactory import BAD, CORRUPT_MIDDLE

from avindex.config import EmbedConfig
from avindex.decode import Moment, read_moments
from avindex.embed import embed_paths
from avindex.media import clip_starts, probe
from avindex.model import random_checkpoint
from avindex.pipelines import reference_frame, reference_log_spectrograms
from avindex.scan import find_media
from avindex.store import Store

CFG = EmbedConfig(device="cpu", batch_size=16, decode_workers=2)
# float16 storage: rounding is half an ulp of an 11-bit significand (2^-11 relative), one ulp when
# the float32 value sits on a rounding boundary that the two float32 paths (embed with one torch
# thread, the reference with all) put on different sides.
FP16_RTOL = 2**-10


def checkpoint():
    """The small untrained model every embed test uses (deterministic)."""
    return random_checkpoint(0.125, seed=0)


def ids_by_clip(store: Store) -> np.ndarray:
    """Clip ids ordered by (path, t0), so two stores of the same videos line up."""
    refs = store.clips(np.arange(store.num_clips))
    return np.lexsort(([r.t0 for r in refs], [r.path for r in refs]))


def clip_rows(store: Store) -> Counter:
    """(path, t0) -> number of rows holding that clip."""
    refs = store.clips(np.arange(store.num_clips))
    return Counter((r.path, round(r.t0, 3)) for r in refs)


@pytest.fixture(scope="module")
def zoo_store(media_zoo, tmp_path_factory) -> tuple[Path, object]:
    """The whole zoo folder embedded once with the random model."""
    folder = next(iter(media_zoo.values()))[0].parent
    out = tmp_path_factory.mktemp("zoo_store") / "store"
    report = embed_paths(find_media([folder]), out, checkpoint(), CFG)
    return out, report


def test_every_good_video_gives_its_clips_and_bad_files_are_reported(media_zoo, zoo_store):
    out, report = zoo_store
    store = Store(out)
    videos = {Path(e.path).name: e for e in store.videos().values()}
    rows = clip_rows(store)
    for name, (path, expected) in media_zoo.items():
        entry = videos[name]
        if expected is None:
            assert entry.status == "failed", name
            assert BAD[name] in entry.error, (name, entry.error)
            continue
        assert entry.status == "done", (name, entry.error)
        assert entry.n_clips == expected, name
        t0 = sorted(t for (p, t) in rows if p == str(path.resolve()))
        np.testing.assert_allclose(t0, np.arange(expected, dtype=float), err_msg=name)
    assert all(n == 1 for n in rows.values()), "duplicate clip rows"
    assert report.videos_failed == len(BAD)
    assert report.videos_done == len(media_zoo) - len(BAD)
    assert report.clips == store.num_clips


def test_a_decoders_warnings_become_the_commands_warning_lines(
    media_zoo, tmp_path, capfd, monkeypatch
):
    """A damaged video decodes in a worker process; what the decoder warns about reaches the
    user as the command's own warning line, not as a worker's bare stderr."""
    path = media_zoo[CORRUPT_MIDDLE][0]
    args = ["embed", path, "--model", "random", "--store", tmp_path / "store"]
    code, _, err = run_cli(args, capfd, monkeypatch)
    assert code == 0, err
    lines = [line for line in err.splitlines() if "undecodable packets" in line]
    assert len(lines) == 1 and lines[0].startswith(
        f"avindex: warning: {path.resolve()}: skipped"
    ), err


def test_video_without_audio_track_has_visual_rows_only(media_zoo, zoo_store):
    store = Store(zoo_store[0])
    path = str(media_zoo["no_audio.mp4"][0].resolve())
    refs = [r for r in store.clips(np.arange(store.num_clips)) if r.path == path]
    assert refs and not any(r.has_audio for r in refs)
    assert any(r.has_audio for r in store.clips(np.arange(store.num_clips)) if r.path != path)


def test_rerun_skips_finished_and_failed_videos(media_zoo, zoo_store):
    out, _ = zoo_store
    before = sorted(p.name for p in out.glob("shard-*.h5"))
    folder = next(iter(media_zoo.values()))[0].parent
    report = embed_paths(find_media([folder]), out, checkpoint(), CFG)
    assert report.videos_done == report.videos_failed == 0
    assert report.videos_skipped == len(media_zoo)
    assert sorted(p.name for p in out.glob("shard-*.h5")) == before


def test_batched_embeddings_match_per_clip_reference(small_corpus, tmp_path):
    """The batched DALI + model path equals plain per-clip PIL/numpy preprocessing."""
    ckpt = checkpoint()
    video = sorted(small_corpus.glob("*.mp4"))[0]
    embed_paths([video], tmp_path / "store", ckpt, CFG)
    store = Store(tmp_path / "store")
    starts = clip_starts(probe(video).duration, CFG.hop, ckpt.audio_cfg.clip_seconds)
    moments = [Moment(t + 0.5, t) for t in starts]
    data = list(read_moments(video, moments, ckpt.audio_cfg, ckpt.video_cfg))
    frames = torch.from_numpy(np.stack([reference_frame(d.frame, ckpt.video_cfg) for d in data]))
    specs = reference_log_spectrograms(np.stack([d.audio for d in data]), ckpt.audio_cfg)
    with torch.inference_mode():
        visual = ckpt.model.encode_visual(frames).numpy()
        audio = ckpt.model.encode_audio(torch.from_numpy(specs[:, None]).float()).numpy()
    ids = np.arange(store.num_clips)
    # Frames arrive at the preset's scale, so DALI only crops and normalises, as the reference
    # does: the gap is float16 storage (measured up to 0.97 of half an ulp for the visual rows)
    # plus, for audio, DALI's spectrogram vs numpy's (measured up to 1e-4 on quiet clips, whose
    # low dB bins differ most).
    np.testing.assert_allclose(store.vectors(ids, "visual"), visual, rtol=FP16_RTOL, atol=1e-7)
    np.testing.assert_allclose(store.vectors(ids, "audio"), audio, rtol=FP16_RTOL, atol=2e-4)


KILLABLE = textwrap.dedent(
    """
    import sys
    import time
    from pathlib import Path
    from avindex.config import EmbedConfig
    from avindex.embed import embed_paths
    from avindex.model import random_checkpoint
    from avindex.scan import find_media

    # One shard per video, one decoder, and a pause after each video: however fast the machine,
    # the run is still going when the first shard appears.
    cfg = EmbedConfig(device="cpu", batch_size=4, decode_workers=1, shard_clips=1)
    embed_paths(
        find_media([sys.argv[1]]),
        Path(sys.argv[2]),
        random_checkpoint(0.125, 0),
        cfg,
        on_progress=lambda report: time.sleep(2.0),
    )
    """
)


def test_kill_9_then_rerun_gives_exactly_the_uninterrupted_clip_set(small_corpus, tmp_path):
    reference = tmp_path / "reference"
    embed_paths(find_media([small_corpus]), reference, checkpoint(), CFG)
    store_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE, str(small_corpus), str(store_dir)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 120
    while not list(store_dir.glob("shard-*.h5")) and time.monotonic() < deadline:
        assert proc.poll() is None, "embed finished before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = Store(store_dir).num_clips
    assert 0 < partial < Store(reference).num_clips
    embed_paths(find_media([small_corpus]), store_dir, checkpoint(), CFG)
    resumed = Store(store_dir)
    assert not resumed.warnings
    assert clip_rows(resumed) == clip_rows(Store(reference))


def flaky_decode(path, *args):
    """A worker job that fails the way an unexpected library error would, for one file."""
    from avindex.reader import decode_video

    if Path(path).name == "video_0001.mp4":
        raise ValueError("resampler input changed")
    if Path(path).name == "video_0002.mp4":
        os.kill(os.getpid(), signal.SIGSEGV)  # a native crash inside the decoder
    return (yield from decode_video(path, *args))


def test_an_error_or_crash_in_one_file_fails_that_file_only(small_corpus, tmp_path, monkeypatch):
    import avindex.reader as reader

    videos = sorted(small_corpus.glob("*.mp4"))[:4]
    monkeypatch.setattr(reader, "decode_video", flaky_decode)
    report = embed_paths(videos, tmp_path / "store", checkpoint(), CFG)
    assert (report.videos_done, report.videos_failed) == (2, 2)
    failures = dict(report.failures)
    assert failures[str(videos[1].resolve())].startswith("ValueError: resampler input changed")
    assert failures[str(videos[2].resolve())] == "decoder crashed (SIGSEGV)"
    store = Store(tmp_path / "store")
    assert {Path(r.path).name for r in store.clips(np.arange(store.num_clips))} == {
        videos[0].name,
        videos[3].name,
    }


def test_report_names_the_decoder_and_the_frames_decoded(small_corpus, tmp_path):
    videos = sorted(small_corpus.glob("*.mp4"))[:2]
    report = embed_paths(videos, tmp_path / "store", checkpoint(), CFG)
    assert report.decoders == {"pyav": 2} and report.fallbacks == 0
    rows = {Path(r["path"]).name: r for r in report.videos}
    assert set(rows) == {v.name for v in videos}
    for row in rows.values():
        assert row["decoder"] == "pyav" and 0 < row["decoded_fraction"] <= 1
    assert 0 < report.decoded_fraction < 1, "x264's non-reference frames are skipped"


@pytest.mark.parametrize("field", ["decode_workers", "batch_size", "hop"])
def test_settings_below_their_minimum_are_one_line_errors(small_corpus, tmp_path, field):
    from avindex.config import replace
    from avindex.errors import AvindexError

    with pytest.raises(AvindexError, match="must be at least"):
        embed_paths([], tmp_path / "store", checkpoint(), replace(CFG, **{field: 0}))
