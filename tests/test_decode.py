"""decode.py: frame skipping is frame-exact on every codec, the single-pass clip grid equals probe
+ read_moments on the whole zoo, and hostile timestamps cost no memory."""

from __future__ import annotations

import tracemalloc

import mediafactory as mf
import numpy as np
import pytest

from avindex.config import AudioConfig, VideoConfig
from avindex.decode import (
    DecodeStats,
    FramePicker,
    Moment,
    Schedule,
    _AudioTimeline,
    clip_moment,
    read_clip_grid,
    read_moments,
)
from avindex.media import MediaError, clip_starts, probe

AUDIO = AudioConfig()
VIDEO = VideoConfig(resize_shorter=48, crop=40)

# Encoders and settings the skipping must be exact on: x264 defaults (B-frames, b-pyramid,
# keyint 250), HEVC, VP9, a stream without B-frames, MPEG-4 part 2 and MPEG-2 with B-frames.
CODED = {
    "x264_defaults.mp4": ("libx264", {"preset": "medium"}),
    "x264_no_bframes.mp4": ("libx264", {"preset": "medium", "bf": "0"}),
    "hevc.mp4": ("libx265", {"x265-params": "log-level=error"}),
    "vp9.webm": ("libvpx-vp9", {"deadline": "good", "cpu-used": "4"}),
    "mpeg4_b.avi": ("mpeg4", {"bf": "2", "qscale": "3"}),
    "mpeg2_b.mpg": ("mpeg2video", {"bf": "2", "qscale": "3"}),
}
SKIPS = {"x264_defaults.mp4", "hevc.mp4", "mpeg4_b.avi", "mpeg2_b.mpg"}  # have non-ref frames


@pytest.fixture(scope="module")
def coded(tmp_path_factory) -> dict[str, object]:
    """Each CODED file: 6 s of smooth motion at 25 fps, 160x96."""
    out = tmp_path_factory.mktemp("coded")
    frames = mf.moving_frames(150, (160, 96))
    return {name: mf.write_coded(out / name, c, o, frames) for name, (c, o) in CODED.items()}


def _frames(data: list) -> list[bytes]:
    return [d.frame.tobytes() for d in data]


@pytest.mark.parametrize("name", sorted(CODED))
def test_skipping_gives_the_frames_of_a_full_decode(coded, name: str) -> None:
    path = coded[name]
    fast, full = DecodeStats(), DecodeStats()
    skipped = list(read_clip_grid(path, 0.5, AUDIO, VIDEO, stats=fast))
    everything = list(read_clip_grid(path, 0.5, AUDIO, VIDEO, skip=False, stats=full))
    assert [d.moment for d in skipped] == [d.moment for d in everything]
    assert _frames(skipped) == _frames(everything), "a chosen frame differs from a full decode"
    assert full.frames_decoded == full.frames_total == 150
    assert fast.frames_total == 150
    if name in SKIPS:
        assert fast.skipping and fast.frames_decoded < 0.9 * fast.frames_total
    else:
        assert fast.frames_decoded <= fast.frames_total


@pytest.mark.parametrize("name", ["x264_defaults.mp4", "hevc.mp4"])
def test_random_moments_and_threads_skip_exactly(coded, name: str) -> None:
    """Training reads random sorted moments; FFmpeg frame threads see the same skip decisions."""
    rng = np.random.default_rng(5)
    times = np.sort(rng.uniform(0, 6.0, 40))
    moments = [Moment(t, max(0.0, t - 0.5)) for t in times]
    reference = _frames(read_moments(coded[name], moments, AUDIO, VIDEO, skip=False))
    for threads in (1, 2):
        got = read_moments(coded[name], moments, AUDIO, VIDEO, threads=threads)
        assert _frames(got) == reference, threads


def test_the_planner_breaking_would_be_seen(coded, monkeypatch) -> None:
    """Guard for the test above: if every frame were skippable, chosen frames would differ."""
    from avindex import decode

    monkeypatch.setattr(decode.Schedule, "has_target", lambda self, lo, hi: False)
    path = coded["x264_defaults.mp4"]
    broken = _frames(read_clip_grid(path, 0.5, AUDIO, VIDEO))
    assert broken != _frames(read_clip_grid(path, 0.5, AUDIO, VIDEO, skip=False))


def test_clip_grid_equals_probe_then_read_moments_on_the_zoo(media_zoo) -> None:
    """One pass without probing gives exactly the clips, frames and audio of probe + read."""
    for name, (path, expected) in media_zoo.items():
        if expected is None:
            with pytest.raises(MediaError) as err:
                list(read_clip_grid(path, 1.0, AUDIO, VIDEO))
            assert mf.BAD[name] in str(err.value), name
            assert probe(path).error in str(err.value), name
            continue
        stats = DecodeStats()
        grid = list(read_clip_grid(path, 1.0, AUDIO, VIDEO, stats=stats))
        info = probe(path)
        assert stats.duration == info.duration, name
        moments = [clip_moment(t, 1.0) for t in clip_starts(info.duration, 1.0, 1.0)]
        ref = list(read_moments(path, moments, AUDIO, VIDEO, skip=False))
        assert len(grid) == len(ref) == expected, name
        assert [d.moment for d in grid] == [d.moment for d in ref], name
        assert [d.has_audio for d in grid] == [d.has_audio for d in ref], name
        assert _frames(grid) == _frames(ref), name
        for a, b in zip(grid, ref, strict=True):
            np.testing.assert_array_equal(a.audio, b.audio, err_msg=name)


@pytest.mark.parametrize("hop", [0.25, 0.7, 2.0])
def test_clip_grid_follows_the_clip_formula_at_any_hop(media_zoo, hop: float) -> None:
    path = media_zoo["vfr.mp4"][0]
    got = [d.moment.audio_start for d in read_clip_grid(path, hop, AUDIO, VIDEO)]
    np.testing.assert_allclose(got, clip_starts(probe(path).duration, hop, 1.0))


def test_a_timestamp_gap_costs_no_memory() -> None:
    """Audio claiming to resume a million seconds later is placed there without filling the gap."""
    timeline = _AudioTimeline(48_000)
    tracemalloc.start()
    timeline.add(np.ones(48_000, np.float32), 0)
    timeline.add(np.ones(48_000, np.float32), 48_000 * 1_000_000)
    window, real = timeline.window(48_000 * 1_000_000 - 24_000, 48_000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 5 << 20
    assert real and window[:24_000].sum() == 0 and window[24_000:].sum() == 24_000


@pytest.mark.parametrize(
    "name", ["h264_aac.mp4", "vfr.mp4", "fps23976.mp4", "vp9_opus.webm", "mjpeg_pcm.mov"]
)
def test_frame_choice_is_the_nearest_pts(media_zoo, name: str) -> None:
    """FramePicker (every decode path's rule) against a plain numpy rule on packet timestamps;
    each zoo frame shows its presentation index as its colour."""
    import av

    from avindex.media import start_pts

    path = media_zoo[name][0]
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stamps = sorted(p.pts for p in container.demux(stream) if p.pts is not None and p.size)
        seconds = (np.asarray(stamps) - start_pts(stream, stamps[0])) * float(stream.time_base)
    mids = (seconds[:-1] + seconds[1:]) / 2
    # Times on both sides of the mid-points (1 us away: float rounding cannot flip them).
    times = np.sort(np.r_[np.linspace(0.0, 1.9, 23), mids[::3] - 1e-6, mids[1::3] + 1e-6])
    want = [int(np.searchsorted(mids, t)) for t in times]
    moments = [Moment(float(t), 0.0) for t in times]
    got = [mf.decode_index(d.frame) for d in read_moments(path, moments, AUDIO, VIDEO)]
    assert got == want


def test_a_tie_goes_to_the_earlier_frame() -> None:
    schedule = Schedule([Moment(0.25, 0.0), Moment(0.75, 0.0), Moment(0.8, 0.0)], None, 1.0)
    picker = FramePicker(schedule)
    chosen = picker.add(0.0, "a") + picker.add(0.5, "b") + picker.add(1.0, "c")
    assert chosen == [(0, "a"), (1, "b"), (2, "c")]
