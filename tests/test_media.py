"""media.py: probe on the zoo, clip counts, VFR frame choice, audio placement/resampling, memory."""

from __future__ import annotations

import tracemalloc

import mediafactory as mf
import numpy as np
import pytest
from PIL import Image

from avindex.config import AudioConfig, VideoConfig
from avindex.decode import Moment, read_moments
from avindex.media import (
    MediaError,
    clip_starts,
    decode_audio,
    load_image,
    probe,
    scaled_size,
)
from avindex.synth import write_video

AUDIO = AudioConfig()
VIDEO = VideoConfig(resize_shorter=48, crop=40)
SPECS = {s.name: s for s in mf.GOOD}


def clip_moments(duration: float, hop: float = 1.0) -> list[Moment]:
    """Embedding moments: frame at the clip centre, audio from the clip start."""
    return [Moment(t + 0.5, t) for t in clip_starts(duration, hop, AUDIO.clip_seconds)]


def rel_error(audio: np.ndarray, ref: np.ndarray) -> float:
    """Relative L2 error of a decoded window against its numpy reference."""
    return float(np.linalg.norm(audio - ref) / np.linalg.norm(ref))


def test_clip_starts_formula() -> None:
    """Clip counts follow the contract formula, including its float tolerance."""
    assert len(clip_starts(0.999, 1.0, 1.0)) == 0
    assert len(clip_starts(None, 1.0, 1.0)) == 0
    assert clip_starts(1.0, 1.0, 1.0).tolist() == [0.0]
    assert len(clip_starts(0.9999999, 1.0, 1.0)) == 1  # float noise within the 1e-6 tolerance
    assert clip_starts(3.0, 0.5, 1.0).tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert len(clip_starts(2.999, 1.0, 1.0)) == 2


def test_scaled_size() -> None:
    """Shorter side scaled exactly, aspect kept (landscape and portrait)."""
    assert scaled_size(177, 99, 48) == (86, 48)
    assert scaled_size(72, 128, 48) == (48, 85)


@pytest.mark.parametrize("name", list(SPECS))
def test_probe_good(media_zoo, name: str) -> None:
    """probe reports every field of a good file as written."""
    spec, info = SPECS[name], probe(media_zoo[name][0])
    assert info.usable, info.error
    # The last frame's duration is a muxer guess for VFR (mp4 stores no frame rate to infer it).
    assert info.duration == pytest.approx(spec.duration, abs=0.1 if spec.vfr else 1.5e-3)
    assert info.variable_fps == spec.vfr
    if not spec.vfr:
        assert info.avg_fps == pytest.approx(spec.fps, abs=0.01)
        assert info.n_frames == spec.n_frames
    assert (info.width, info.height, info.rotation) == (*spec.size, spec.rotation)
    assert info.video_codec == spec.video_codec
    assert info.audio_codec == spec.audio_codec
    if spec.rate is not None:
        assert (info.sample_rate, info.channels) == (spec.rate, spec.channels)
    assert info.to_dict()["usable"] is True


@pytest.mark.parametrize("name", list(mf.BAD))
def test_probe_bad(media_zoo, name: str) -> None:
    """probe gives a one-line reason for a broken file, never an exception."""
    info = probe(media_zoo[name][0])
    assert not info.usable
    assert mf.BAD[name] in info.error
    assert "\n" not in info.error


def test_probe_missing_file(tmp_path) -> None:
    """A missing path is a reason, not an exception."""
    assert probe(tmp_path / "nope.mp4").error == "no such file"


@pytest.mark.parametrize("name", [*SPECS, mf.CORRUPT_MIDDLE])
def test_clip_count_and_shapes(media_zoo, name: str) -> None:
    """Every good file yields exactly the documented clips, shaped per the contract."""
    path, expected = media_zoo[name]
    info = probe(path)
    moments = clip_moments(info.duration)
    assert len(moments) == expected
    out = list(read_moments(path, moments, AUDIO, VIDEO))
    assert [d.moment for d in out] == moments
    has_audio = name not in SPECS or SPECS[name].rate is not None
    for d in out:
        assert d.frame.dtype == np.uint8 and d.frame.ndim == 3 and d.frame.shape[2] == 3
        assert min(d.frame.shape[:2]) == VIDEO.resize_shorter
        assert d.audio.shape == (AUDIO.n_samples,) and d.audio.dtype == np.float32
        assert d.has_audio == has_audio
    if not has_audio:
        assert all(not d.audio.any() for d in out)


@pytest.mark.parametrize("name", ["vfr.mp4", "fps23976.mp4", "vp9_opus.webm", "mpeg4_pcm.avi"])
def test_frame_choice_by_timestamps(media_zoo, name: str) -> None:
    """The chosen frame is the one whose pts is nearest the request (ties: the earlier)."""
    spec = SPECS[name]
    pts = mf.vfr_pts() if spec.vfr else np.arange(spec.n_frames) / (round(spec.fps * 1001) / 1001)
    targets = np.arange(0.0, spec.duration, 0.037)
    moments = [Moment(t, max(0.0, t - 0.5)) for t in targets]
    got = [
        mf.decode_index(d.frame) for d in read_moments(media_zoo[name][0], moments, AUDIO, VIDEO)
    ]
    # Container timestamps are rounded (WebM: 1 ms), so skip targets within 1 ms of a midpoint.
    dist = np.abs(pts[None, :] - targets[:, None])
    expected = dist.argmin(axis=1)
    second = np.partition(dist, 1, axis=1)[:, 1]
    clear = second - dist.min(axis=1) > 1e-3
    assert np.array_equal(np.asarray(got)[clear], expected[clear])


def test_rotation_and_portrait(media_zoo) -> None:
    """Display rotation is applied: the coded top-left mark ends bottom-left after 90 deg CCW."""
    moments = [Moment(0.5, 0.0)]
    rotated = next(read_moments(media_zoo["rotated90.mp4"][0], moments, AUDIO, VIDEO)).frame
    portrait = next(read_moments(media_zoo["portrait_72x128.mp4"][0], moments, AUDIO, VIDEO)).frame
    for frame in (rotated, portrait):
        assert frame.shape[1] == VIDEO.resize_shorter and frame.shape[0] > frame.shape[1]
    h = rotated.shape[0]
    assert rotated[h - 3, 2].min() > 200 and rotated[2, 2].max() < 200
    assert portrait[2, 2].min() > 200


# Tolerances (relative L2 error vs the numpy reference): PCM only sees resampling (< 1%); lossy
# codecs add their own error (AAC ~3.5%, Opus ~1%) at these bitrates; 5-channel AAC at its default
# bitrate smears the burst onset (pre-echo, ~10% on that clip).
@pytest.mark.parametrize(
    ("name", "tol"),
    [
        ("h264_aac.mp4", 0.06),
        ("vp9_opus.webm", 0.03),
        ("mpeg4_pcm.avi", 0.01),
        ("mjpeg_pcm.mov", 0.01),
        ("audio8k_stereo.mp4", 0.06),
        ("audio51.mp4", 0.12),
        ("audio51_8k.avi", 0.01),
        ("fps60.mp4", 0.06),
    ],
)
def test_audio_matches_reference(media_zoo, name: str, tol: float) -> None:
    """Resampled mono audio of every clip equals the generated signal, placed at the right time."""
    spec = SPECS[name]
    path = media_zoo[name][0]
    gains = mf.channel_gains(spec.channels)
    if name == "audio51.mp4":
        gains[3] = 0.0  # AAC low-passes the LFE channel (<120 Hz): our 440 Hz tone is gone there
    for d in read_moments(path, clip_moments(probe(path).duration), AUDIO, VIDEO):
        t = d.moment.audio_start + np.arange(AUDIO.n_samples) / AUDIO.sample_rate
        ref = mf.mono_reference(t, 1) * gains.mean()
        assert rel_error(d.audio, ref) < tol, d.moment


def test_burst_lands_in_its_clip(media_zoo) -> None:
    """The loud 1 kHz burst at 1.25-1.5 s shows up in clip 1 at 0.25-0.5 s and nowhere else."""
    out = list(read_moments(media_zoo["h264_aac.mp4"][0], clip_moments(3.0), AUDIO, VIDEO))
    rate = AUDIO.sample_rate
    loud = [np.flatnonzero(np.abs(d.audio) > 0.4) / rate for d in out]
    assert len(loud[0]) == 0 and len(loud[2]) == 0
    assert loud[1][0] == pytest.approx(0.25, abs=0.005)
    assert loud[1][-1] == pytest.approx(0.5, abs=0.005)


def test_moments_with_offset_audio_and_threads(media_zoo) -> None:
    """Training-style moments (audio window offset from the frame) and threaded decoding agree."""
    path = media_zoo["h264_aac.mp4"][0]
    moments = [Moment(t, min(max(0.0, t - 0.7), 2.0)) for t in np.linspace(0.2, 2.9, 9)]
    one = list(read_moments(path, moments, AUDIO, VIDEO, threads=1))
    two = list(read_moments(path, moments, AUDIO, VIDEO, threads=2))
    for a, b in zip(one, two, strict=True):
        assert np.array_equal(a.frame, b.frame) and np.array_equal(a.audio, b.audio)
        t = a.moment.audio_start + np.arange(AUDIO.n_samples) / AUDIO.sample_rate
        assert rel_error(a.audio, mf.mono_reference(t, 2)) < 0.06


def test_read_moments_edges(media_zoo) -> None:
    """Moments past the end get the last frame and zero-padded audio; unsorted input is refused."""
    path = media_zoo["h264_aac.mp4"][0]
    last = next(read_moments(path, [Moment(2.99, 2.5)], AUDIO, VIDEO))
    past = next(read_moments(path, [Moment(10.0, 2.5)], AUDIO, VIDEO))
    assert np.array_equal(last.frame, past.frame)
    # The 3 s track ends mid-window: zeros after it (25 ms allowance for the AAC frame tail).
    assert past.has_audio and not past.audio[AUDIO.sample_rate // 2 + 1200 :].any()
    beyond = next(read_moments(path, [Moment(10.0, 5.0)], AUDIO, VIDEO))
    assert not beyond.has_audio
    with pytest.raises(ValueError):
        list(read_moments(path, [Moment(2.0, 1.0), Moment(1.0, 0.0)], AUDIO, VIDEO))


@pytest.mark.parametrize(
    "name", ["zero_bytes.mp4", "text.mp4", "random_bytes.mp4", "audio_only.mp4"]
)
def test_read_moments_bad_files(media_zoo, name: str) -> None:
    """Undecodable files raise MediaError naming the file."""
    with pytest.raises(MediaError, match=name):
        list(read_moments(media_zoo[name][0], [Moment(0.5, 0.0)], AUDIO, VIDEO))


def test_truncated_tail_reports_real_length(tmp_path) -> None:
    """A WebM cut short: probe gives the length actually present and every clip of it decodes."""
    whole = tmp_path / "whole.webm"
    mf.write_spec(whole, mf.Spec("whole.webm", seconds=4.0))
    cut = tmp_path / "cut.webm"
    data = whole.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    info = probe(cut)
    assert info.usable and 1.0 <= info.duration < 3.9
    moments = clip_moments(info.duration)
    assert len(list(read_moments(cut, moments, AUDIO, VIDEO))) == len(moments)


def test_memory_stays_bounded(tmp_path) -> None:
    """A 60 s video streams through with Python-side buffers far below its decoded size."""
    path = tmp_path / "long.mp4"
    seconds, fps, size = 60, 25, (160, 120)
    frames = (f for i in range(seconds * fps) for f in mf.make_frames(1, size))
    write_video(path, frames, fps, mf.soundtrack(seconds, 16_000, 1), 16_000)
    video = VideoConfig(resize_shorter=120, crop=112)
    moments = clip_moments(probe(path).duration)
    decoded_bytes = seconds * fps * 160 * 120 * 3 + seconds * AUDIO.sample_rate * 4
    tracemalloc.start()
    try:
        count = sum(1 for _ in read_moments(path, moments, AUDIO, video))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == seconds
    assert peak < 8e6 < decoded_bytes / 10, peak


@pytest.mark.parametrize(
    ("ext", "tol"), [(".wav", 0.01), (".flac", 0.01), (".ogg", 0.05), (".mp3", 0.1)]
)
def test_decode_audio_formats(tmp_path, ext: str, tol: float) -> None:
    """Query audio in any format, 8 kHz stereo, decodes to the 48 kHz mono reference."""
    path = tmp_path / f"query{ext}"
    rate = 48_000 if ext == ".ogg" else 8_000  # Opus only takes 8/12/16/24/48 kHz; 48k is typical
    write_video(path, None, 25, mf.soundtrack(2.0, rate, 2), rate)
    audio = decode_audio(path, AUDIO.sample_rate)
    assert abs(len(audio) - 2 * AUDIO.sample_rate) < 0.05 * AUDIO.sample_rate
    n = min(len(audio), 2 * AUDIO.sample_rate) - 2400  # skip the last 50 ms (codec tail)
    ref = mf.mono_reference(np.arange(n) / AUDIO.sample_rate, 2)
    assert rel_error(audio[:n], ref) < tol


def test_decode_audio_soundtrack_and_errors(media_zoo) -> None:
    """A video's 5.1 soundtrack decodes to the reference; files without audio are MediaErrors."""
    audio = decode_audio(media_zoo["audio51_8k.avi"][0], 16_000)
    ref = mf.mono_reference(np.arange(len(audio)) / 16_000, 6)
    assert rel_error(audio[:-800], ref[:-800]) < 0.01
    for name in ("no_audio.mp4", "text.mp4", "zero_bytes.mp4"):
        with pytest.raises(MediaError, match=name):
            decode_audio(media_zoo[name][0], 48_000)


def test_load_image(tmp_path) -> None:
    """png/jpg queries are scaled like frames; non-images and missing files are MediaErrors."""
    rgb = np.zeros((100, 200, 3), dtype=np.uint8)
    rgb[:, :100] = (255, 0, 0)
    for ext in (".png", ".jpg"):
        Image.fromarray(rgb).save(tmp_path / f"q{ext}")
        image = load_image(tmp_path / f"q{ext}", VIDEO)
        assert image.shape == (48, 96, 3) and image.dtype == np.uint8
        assert image[24, 10, 0] > 200 and image[24, 80, 0] < 50
    (tmp_path / "t.png").write_text("not an image")
    with pytest.raises(MediaError, match=r"t\.png"):
        load_image(tmp_path / "t.png")
    with pytest.raises(MediaError, match="no such file"):
        load_image(tmp_path / "missing.jpg")


def test_audio_only_reading_gives_the_same_windows(media_zoo):
    """frames=False (frames decoded by NVDEC elsewhere) keeps the audio and its placement."""
    from avindex.config import AudioConfig, VideoConfig

    for name in ("h264_aac.mp4", "vfr.mp4", "no_audio.mp4", "audio51_8k.avi"):
        path = media_zoo[name][0]
        moments = [Moment(t + 0.5, t) for t in (0.0, 0.7, 1.0, 1.5)]
        both = list(read_moments(path, moments, AudioConfig(), VideoConfig()))
        alone = list(read_moments(path, moments, AudioConfig(), VideoConfig(), frames=False))
        assert [d.frame for d in alone] == [None] * len(moments)
        for x, y in zip(both, alone, strict=True):
            np.testing.assert_array_equal(x.audio, y.audio, err_msg=name)
            assert x.has_audio == y.has_audio


@pytest.mark.parametrize("channels", [8, 9, 24, 63])
def test_many_channel_wav_mixes_down_without_crashing(tmp_path, channels: int) -> None:
    """PyAV's planar frames of 8+ channels crashed the process (SIGSEGV); packed float does not."""
    path = mf.write_wav(tmp_path / f"ch{channels}.wav", 1.5, 16_000, channels)
    got = decode_audio(path, 16_000)
    want = mf.mono_reference(np.arange(len(got)) / 16_000, channels)
    assert rel_error(got[100:-100], want[100:-100]) < 1e-3
    assert probe(path).error == "no video stream (audio only)"


def test_71_aac_video_probes_and_reads(media_zoo) -> None:
    path = media_zoo["audio71.mp4"][0]
    info = probe(path)
    assert info.usable and info.channels == 8 and not info.warnings
    data = list(read_moments(path, clip_moments(info.duration), AUDIO, VIDEO))
    assert len(data) == 3 and all(d.has_audio for d in data)


def test_extreme_aspect_video_is_refused_in_one_line(tmp_path) -> None:
    """A 2.5 kB 4096x16 video would be 48 MiB per frame once scaled to a 256 px short side."""
    path = tmp_path / "strip.mp4"
    write_video(path, mf.make_frames(25, (4096, 16)), 25.0, mf.soundtrack(1.0, 48_000, 1))
    assert "aspect ratio beyond 8:1" in probe(path).error
    with pytest.raises(MediaError, match="aspect ratio beyond 8:1"):
        list(read_moments(path, [Moment(0.5, 0.0)], AUDIO, VIDEO))


def test_a_lying_wav_costs_bounded_memory(tmp_path) -> None:
    """A 200 kB WAV of 1,000 s at 100 Hz was resampled whole to 48 kHz (820 MB); a query now
    decodes at most max_seconds. Rates that are not sound (1 Hz) are refused."""
    mf.write_wav(tmp_path / "slow.wav", 1000.0, 100, 1)  # below the 2 kHz floor: refused
    with pytest.raises(MediaError, match="100 Hz is outside"):
        decode_audio(tmp_path / "slow.wav", 48_000, max_seconds=300)
    long = mf.write_wav(tmp_path / "long.wav", 600.0, 2_000, 1)
    tracemalloc.start()
    samples = decode_audio(long, 48_000, max_seconds=60)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(samples) == 60 * 48_000
    assert peak < 80 << 20, f"{peak >> 20} MiB for a 60 s query"


def test_seek_reads_the_same_moment_without_decoding_what_precedes_it(tmp_path, monkeypatch):
    """read_moments(seek=True) (one result of a long video) gives the frame and audio a full
    pass gives, starting from the keyframe before the moment instead of the file's start."""
    from avindex import decode

    path = tmp_path / "long.mp4"  # 10 s, keyframes every 2 s (write_video's GOP)
    write_video(path, mf.make_frames(250, (96, 64)), 25.0, mf.soundtrack(10.0, 48_000, 2))
    decoded = []
    add_video = decode._MomentReader.add_video
    monkeypatch.setattr(
        decode._MomentReader, "add_video", lambda self, f: decoded.append(f) or add_video(self, f)
    )
    moments = [Moment(7.32, 6.8), Moment(8.52, 8.0)]
    full = list(read_moments(path, moments, AUDIO, VIDEO, skip=False))
    from_start = len(decoded)
    decoded.clear()
    sought = list(read_moments(path, moments, AUDIO, VIDEO, skip=False, seek=True))
    assert len(decoded) < from_start - 50  # began at the 4 s keyframe, not at 0 s
    for a, b in zip(full, sought, strict=True):
        assert (
            mf.decode_index(a.frame) == mf.decode_index(b.frame) == round(a.moment.frame_time * 25)
        )
        t = a.moment.audio_start + np.arange(AUDIO.n_samples) / AUDIO.sample_rate
        assert rel_error(b.audio, mf.mono_reference(t, 2)) < 0.06
        np.testing.assert_allclose(b.audio, a.audio, atol=1e-3)
        assert b.has_audio
    # A moment within the margin of the start is read from the start (nothing to skip).
    decoded.clear()
    (early,) = read_moments(path, [Moment(0.5, 0.0)], AUDIO, VIDEO, skip=False, seek=True)
    assert mf.decode_index(early.frame) == round(0.5 * 25) and decoded[0].pts == 0
