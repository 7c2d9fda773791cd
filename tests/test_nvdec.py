"""The NVDEC path without a GPU: a stand-in session decodes the very Annex-B packets the workers
send (with PyAV), so everything but the hardware decoder runs here. Against the CPU path: the same
clips (count, t0, has_audio, audio) and the same frames (the zoo's colour-coded frame index), on
the media zoo and on x264-default/HEVC/VP9 streams; the non-reference detection agrees with
libavcodec; fall-backs are counted; GPU tensors and uint8 frames mix in one batch."""

from __future__ import annotations

from pathlib import Path

import av
import mediafactory as mf
import numpy as np
import pytest
import torch
from nvdec_standin import PyAVSession

from avindex import bitstream, nvdec
from avindex.bitstream import PacketExport, ReferenceFinder, StreamHeader
from avindex.config import AudioConfig, EmbedConfig, VideoConfig
from avindex.decode import DecodeStats, read_clip_grid
from avindex.encoder import Encoder
from avindex.media import MediaError
from avindex.model import random_checkpoint
from avindex.nvdec import NvdecClipReader, NvdecError, VideoJoin, prepare_frame
from avindex.pipelines import reference_frame
from avindex.reader import ClipChunk, ClipReader, VideoRead
from avindex.store import VideoRecord

AUDIO = AudioConfig()
TINY = VideoConfig(resize_shorter=48, crop=40)  # downscaled frames keep the colour code clean
CFG = EmbedConfig(device="cpu", nvdec_sessions=3, decode_workers=2)
CPU = torch.device("cpu")

# Colour-coded frames (mediafactory.make_frames) through real encoders: x264 defaults (B-frames,
# b-pyramid), HEVC, VP9 and a stream without B-frames.
CODED = {
    "x264_defaults.mp4": ("libx264", {"preset": "medium"}),
    "x264_no_bframes.mp4": ("libx264", {"preset": "medium", "bf": "0"}),
    "hevc.mp4": ("libx265", {"x265-params": "log-level=error"}),
    "vp9.webm": ("libvpx-vp9", {"deadline": "good", "cpu-used": "4"}),
}
DROPS = {"x264_defaults.mp4", "hevc.mp4"}  # have non-reference frames NVDEC need not see
PYAV_ONLY = {  # zoo files NVDEC does not take, and why
    "mpeg4_pcm.avi": "codec mpeg4",
    "audio51_8k.avi": "codec mpeg4",
    "mjpeg_pcm.mov": "codec mjpeg",
    "rotated90.mp4": "rotated 90",
}


@pytest.fixture(scope="module")
def coded(tmp_path_factory) -> dict[str, Path]:
    """Each CODED file: 6 s of colour-coded frames at 25 fps, 160x96."""
    out = tmp_path_factory.mktemp("nvcoded")
    frames = mf.make_frames(150, (160, 96))
    return {name: mf.write_coded(out / name, c, o, frames) for name, (c, o) in CODED.items()}


def _records(paths: list[Path]) -> list[tuple[int, VideoRecord]]:
    return [(i, VideoRecord(str(p), 0, 0.0, 0.0)) for i, p in enumerate(paths)]


def _collect(events: list) -> tuple[dict[int, list], dict[int, VideoRead]]:
    clips: dict[int, list] = {}
    reads: dict[int, VideoRead] = {}
    for event in events:
        if isinstance(event, ClipChunk):
            rows = zip(event.t0, event.frames, event.audio, event.has_audio, strict=True)
            clips.setdefault(event.video, []).extend(rows)
        else:
            reads[event.video] = event
    return clips, reads


def _index(frame: np.ndarray | torch.Tensor) -> int:
    """The zoo frame index of a uint8 frame or of a prepared (normalised) crop."""
    if isinstance(frame, torch.Tensor):
        mean, std = np.asarray(TINY.mean), np.asarray(TINY.std)
        pixels = (frame.numpy().transpose(1, 2, 0) * std + mean) * 255.0
        frame = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    return mf.decode_index(frame)


def _both(paths: list[Path], hop: float, sessions: nvdec.SessionFactory = PyAVSession) -> tuple:
    cfg = EmbedConfig(device="cpu", nvdec_sessions=3, decode_workers=2, hop=hop)
    gpu = _collect(list(NvdecClipReader(_records(paths), AUDIO, TINY, cfg, sessions, CPU)))
    cpu = _collect(list(ClipReader(_records(paths), AUDIO, TINY, cfg)))
    return gpu, cpu


def _assert_same_clips(gpu: tuple, cpu: tuple, paths: list[Path]) -> None:
    (gclips, greads), (cclips, creads) = gpu, cpu
    assert greads.keys() == creads.keys() == set(range(len(paths)))
    for i, path in enumerate(paths):
        name = path.name
        assert (greads[i].error is None) == (creads[i].error is None), name
        got, want = gclips.get(i, []), cclips.get(i, [])
        assert greads[i].clips == len(got) == len(want) == creads[i].clips, name
        assert [r[0] for r in got] == [r[0] for r in want], name
        assert [r[3] for r in got] == [r[3] for r in want], name
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a[2], b[2], err_msg=name)
            assert _index(a[1]) == _index(b[1]), (name, a[0])


def test_nvdec_path_gives_the_cpu_clips_and_frames_on_the_zoo(media_zoo) -> None:
    paths = [path for path, _ in media_zoo.values()]
    gpu, cpu = _both(paths, 1.0)
    _assert_same_clips(gpu, cpu, paths)
    _, reads = gpu
    for i, path in enumerate(paths):
        read = reads[i]
        if path.name in PYAV_ONLY:
            assert read.decoder == "pyav" and PYAV_ONLY[path.name] in read.fallback, path.name
        elif media_zoo[path.name][1] is not None:
            assert read.decoder == "nvdec" and read.fallback is None, (path.name, read.fallback)


@pytest.mark.parametrize("hop", [0.5, 1.0])
def test_dropped_packets_never_hold_a_frame_a_clip_needs(coded, hop: float) -> None:
    paths = [coded[name] for name in sorted(CODED)]
    gpu, cpu = _both(paths, hop)
    _assert_same_clips(gpu, cpu, paths)
    _, reads = gpu
    for i, path in enumerate(paths):
        read = reads[i]
        assert read.decoder == "nvdec" and read.frames_total == 150, path.name
        if path.name in DROPS:  # fewer frames decoded than the stream has
            assert read.frames_decoded < 0.9 * read.frames_total, path.name


def _in_process(path: Path, hop: float) -> list[int]:
    """Frame indices of a video's clips through export + stand-in session in this process."""
    from avindex.decode import MomentData, read_for_nvdec
    from avindex.reader import _pack

    join = None
    stats = DecodeStats()
    for item in read_for_nvdec(path, hop, AUDIO, TINY, stats=stats):
        if isinstance(item, StreamHeader):
            join = VideoJoin(0, str(path), item, PyAVSession(item, CPU), hop, AUDIO, TINY)
        elif isinstance(item, MomentData):
            join.clip_audio(_pack([item]))
        else:
            join.packets(item)
    join.finish(stats.duration)
    return [_index(f) for chunk in join.ready() for f in chunk.frames]


def test_dropping_reference_packets_would_be_seen(coded, monkeypatch) -> None:
    """Guard for the tests above: if unneeded reference packets were dropped too, NVDEC would
    lose frames clips need (or the frames would change)."""
    path = coded["x264_defaults.mp4"]
    cpu = [_index(d.frame) for d in read_clip_grid(path, 1.0, AUDIO, TINY)]
    assert _in_process(path, 1.0) == cpu
    monkeypatch.setattr(ReferenceFinder, "droppable", lambda self, data: True)
    try:
        broken = _in_process(path, 1.0)
    except (NvdecError, MediaError):  # no frames, or a needed one missing: PyAV would take it
        return
    assert broken != cpu


def _packets(path: Path) -> list[tuple[bytes, int]]:
    """Every video packet of a file as Annex-B, with its pts."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        export = PacketExport(stream)
        for packet in container.demux(stream):
            if packet.size:
                export.add(packet, needed=True)
        export.flush()
        return [(data, pts) for data, pts, _ in export.take().packets]


@pytest.mark.parametrize("name", ["x264_defaults.mp4", "x264_no_bframes.mp4", "hevc.mp4"])
def test_reference_detection_agrees_with_libavcodec(coded, name: str) -> None:
    """The packets called droppable are exactly the frames skip_frame=NONREF does not output."""
    codec = "h264" if name.startswith("x264") else "hevc"
    packets = _packets(coded[name])
    finder = ReferenceFinder(codec)
    kept = {pts for data, pts in packets if not finder.droppable(data)}
    ctx = av.CodecContext.create(codec, "r")
    ctx.skip_frame = "NONREF"
    decoded = set()
    for data, pts in [*packets, (None, None)]:
        packet = None if data is None else av.Packet(data)
        if packet is not None:
            packet.pts = pts
        decoded.update(f.pts for f in ctx.decode(packet))
    assert kept == decoded
    assert len(kept) < len(packets) if name in DROPS else len(kept) == len(packets)


def test_nal_headers_find_every_unit() -> None:
    data = b"\x00\x00\x00\x01\x67\x42" + b"\x00\x00\x01\x68\xce" + b"\x00\x00\x01\x01"
    assert list(bitstream.nal_headers(data)) == [(0x67, 0x42), (0x68, 0xCE), (0x01, 0)]
    assert ReferenceFinder("h264").droppable(b"\x00\x00\x01\x01\x9a") is True
    assert ReferenceFinder("h264").droppable(b"\x00\x00\x01\x21\x9a") is False  # ref_idc 1
    assert ReferenceFinder("h264").droppable(b"\x00\x00\x01\x67\x42\x00\x00\x01\x01") is False
    assert ReferenceFinder("vp9").droppable(b"\x00\x00\x01\x01") is False


class _Breaks:
    """A session that fails after `after` packets."""

    def __init__(self, after: int) -> None:
        self.after = after

    def __call__(self, header: StreamHeader, device: torch.device) -> PyAVSession:
        session, after = PyAVSession(header, device), self.after
        decode = session.decode

        def failing(data: bytes, pts: int) -> list:
            nonlocal after
            after -= 1
            if after < 0:
                raise RuntimeError("decoder went away")
            return decode(data, pts)

        session.decode = failing
        return session


def test_session_errors_before_and_after_the_first_clip(coded) -> None:
    path = coded["x264_no_bframes.mp4"]
    (clips, reads), _ = _both([path], 1.0, sessions=_Breaks(0))
    assert reads[0].decoder == "pyav" and "before the first clip" in reads[0].fallback
    assert reads[0].error is None and len(clips[0]) == reads[0].clips == 6
    # Clip audio comes 8 clips a message: at hop 0.25 clips are out long before packet 120.
    (clips, reads), _ = _both([path], 0.25, sessions=_Breaks(120))
    assert reads[0].decoder == "nvdec" and "NVDEC failed after" in reads[0].error
    assert reads[0].clips == len(clips[0]) > 0


def test_embed_report_counts_decoders_and_fallbacks(media_zoo, tmp_path, monkeypatch) -> None:
    """Through embed: one batch mixes NVDEC tensors and PyAV uint8 frames; the report (and its
    JSON) says which decoder served each video and counts the fall-backs."""
    from avindex import embed
    from avindex.embed import embed_paths

    def reader(videos, audio_cfg, video_cfg, cfg, device, expected=None):
        return NvdecClipReader(videos, audio_cfg, video_cfg, cfg, PyAVSession, CPU)

    monkeypatch.setattr(embed, "clip_reader", reader)
    names = ["h264_aac.mp4", "mpeg4_pcm.avi", "rotated90.mp4", "vp9_opus.webm"]
    paths = [media_zoo[n][0] for n in names]
    cfg = EmbedConfig(device="cpu", batch_size=64, nvdec_sessions=2)
    report = embed_paths(paths, tmp_path / "store", random_checkpoint(0.125, seed=0), cfg)
    assert report.videos_done == 4 and report.clips == 10
    assert report.decoders == {"nvdec": 2, "pyav": 2} and report.fallbacks == 2
    rows = {Path(r["path"]).name: r for r in report.to_dict()["videos"]}
    assert (
        rows["rotated90.mp4"]["decoder"] == "pyav"
        and "rotated" in rows["rotated90.mp4"]["fallback"]
    )
    assert rows["h264_aac.mp4"]["decoder"] == "nvdec" and "fallback" not in rows["h264_aac.mp4"]


def test_mixed_batches_of_prepared_tensors_and_uint8_frames() -> None:
    """Encoder.clips takes NVDEC's prepared crops beside uint8 frames: same embeddings."""
    ckpt = random_checkpoint(0.125, seed=0)
    vcfg = ckpt.video_cfg
    rng = np.random.default_rng(0)
    side = vcfg.resize_shorter
    frames = [rng.integers(0, 256, (side, side + 20 * i, 3), dtype=np.uint8) for i in range(4)]
    audio = rng.standard_normal((4, ckpt.audio_cfg.n_samples)).astype(np.float32) * 0.1
    mixed = [
        prepare_frame(torch.from_numpy(f).permute(2, 0, 1), vcfg) if i % 2 else f
        for i, f in enumerate(frames)
    ]
    with Encoder(ckpt, "cpu", batch_size=4) as encoder:
        plain = encoder.clips(frames, audio)
        both = encoder.clips(mixed, audio)
    np.testing.assert_allclose(both[0], plain[0], atol=1e-4)
    np.testing.assert_array_equal(both[1], plain[1])


def test_prepare_frame_matches_the_reference_preprocessing() -> None:
    """Scaled frames: crop + normalise exactly; larger frames: bilinear scaling within a few
    grey levels of PIL's."""
    rng = np.random.default_rng(1)
    scaled = rng.integers(0, 256, (48, 61, 3), dtype=np.uint8)
    got = prepare_frame(torch.from_numpy(scaled).permute(2, 0, 1), TINY).numpy()
    np.testing.assert_allclose(got, reference_frame(scaled, TINY), atol=1e-5)
    yy, xx = np.mgrid[0:96, 0:160]
    smooth = np.stack([xx * 1.5, yy * 2.5, (xx + yy) * 0.9], -1).astype(np.uint8)
    got = prepare_frame(torch.from_numpy(smooth).permute(2, 0, 1), TINY).numpy()
    assert got.shape == (3, 40, 40)
    assert np.abs(got - reference_frame(smooth, TINY)).mean() < 0.05


gpu = pytest.mark.gpu


@gpu
def test_pynvvideocodec_gives_the_cpu_clips_and_frames_on_the_zoo(media_zoo) -> None:
    """The real sessions (NVDEC) against the CPU path: same clips, same frames by colour code."""
    from avindex.nvdec_session import PyNvSession

    paths = [path for path, _ in media_zoo.values()]
    device = torch.device("cuda", torch.cuda.current_device())
    cfg = EmbedConfig(device="cuda", nvdec_sessions=4, decode_workers=2)
    events = list(NvdecClipReader(_records(paths), AUDIO, TINY, cfg, PyNvSession, device))
    clips, reads = _collect(events)
    gpu = ({k: [(r[0], r[1].cpu(), r[2], r[3]) for r in v] for k, v in clips.items()}, reads)
    cpu = _collect(list(ClipReader(_records(paths), AUDIO, TINY, cfg)))
    _assert_same_clips(gpu, cpu, paths)
    for i, path in enumerate(paths):
        if media_zoo[path.name][1] is not None and path.name not in PYAV_ONLY:
            assert reads[i].decoder == "nvdec", (path.name, reads[i].fallback)


@gpu
def test_pynvvideocodec_skips_exactly_on_coded_streams(coded) -> None:
    from avindex.nvdec_session import PyNvSession

    paths = [coded[name] for name in sorted(CODED)]
    device = torch.device("cuda", torch.cuda.current_device())
    cfg = EmbedConfig(device="cuda", nvdec_sessions=4, hop=0.5)
    events = list(NvdecClipReader(_records(paths), AUDIO, TINY, cfg, PyNvSession, device))
    clips, reads = _collect(events)
    gpu = ({k: [(r[0], r[1].cpu(), r[2], r[3]) for r in v] for k, v in clips.items()}, reads)
    cpu = _collect(list(ClipReader(_records(paths), AUDIO, TINY, cfg)))
    _assert_same_clips(gpu, cpu, paths)
    assert all(reads[i].decoder == "nvdec" for i in range(len(paths)))


def test_a_packet_without_timestamp_is_an_nvdec_limit(coded) -> None:
    """Such a worker failure sends the video to PyAV (NVDEC_UNFIT), not to the failed list."""
    with av.open(str(coded["vp9.webm"])) as container:
        export = PacketExport(container.streams.video[0])
        packet = next(p for p in container.demux(video=0) if p.size)
        packet.pts = None
        with pytest.raises(ValueError, match=nvdec.NVDEC_UNFIT):
            export.add(packet, needed=True)
