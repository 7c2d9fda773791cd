"""search: Flat results equal brute-force numpy search, every query type, --batch, contact sheets,
and one-line CLI errors for bad queries."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from avindex.config import AudioConfig, EmbedConfig, VideoConfig, from_dict
from avindex.decode import Moment, read_moments
from avindex.embed import embed_paths
from avindex.index import build_index
from avindex.media import decode_audio
from avindex.model import random_checkpoint, save_checkpoint
from avindex.queries import Query, make_query, parse_batch
from avindex.search import Searcher, audio_windows
from avindex.sheet import sheet_size, write_sheet
from avindex.store import Store, StoreMeta, StoreWriter, VideoRecord
from avindex.synth import write_video

K = 5
SCORE_TOL = 1e-5  # faiss vs numpy inner products of the same float32 vectors
FLOAT16_TOL = 2e-3  # a fresh float32 embedding vs its float16 copy in the store (L2 distance)


# --- a store of known random vectors (ids and scores are unambiguous: no ties) ---


@pytest.fixture(scope="module")
def vector_store(tmp_path_factory) -> Path:
    """60 clips of random 16-d vectors in 3 videos (two shards); every 4th clip has no audio."""
    out = tmp_path_factory.mktemp("vectors") / "store"
    meta = StoreMeta(model_sha256="vectors", visual_dim=16, audio_dim=16, hop=1.0)
    rng = np.random.default_rng(7)
    for shard in range(2):
        with StoreWriter(out, meta) as writer:
            for video in range(3 if shard == 0 else 1):
                n = 15
                rec = VideoRecord(f"/v/{shard}-{video}.mp4", 1, 1.0, float(n))
                has_audio = np.arange(n) % 4 != 0
                visual, audio = rng.standard_normal((2, n, 16)).astype(np.float32)
                writer.add_video(rec, visual, audio, has_audio, np.arange(n, dtype=np.float64))
    build_index(out)
    return out


def brute_force(store: Store, modality: str, query: np.ndarray, k: int):
    """Exact top-k (scores, ids) by numpy over the normalised stored vectors."""
    ids, vecs = map(np.concatenate, zip(*store.iter_blocks(modality), strict=True))
    vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    scores = vecs @ (query / np.linalg.norm(query))
    order = np.argsort(-scores, kind="stable")[:k]
    return scores[order], ids[order]


@pytest.mark.parametrize("by,target", [("visual", "audio"), ("visual", "visual"), ("audio", None)])
def test_flat_search_equals_numpy_brute_force(vector_store: Path, by: str, target) -> None:
    searcher = Searcher(vector_store)
    rng = np.random.default_rng(3)
    queries = [Query("clip", str(i), by=by, target=target) for i in (1, 17, 33, 59)]
    results = searcher.run(queries, K)
    store = Store(vector_store)
    for q, r in zip(queries, results, strict=True):
        assert r.error is None
        stored = store.vectors([int(q.value)], q.modality)[0]
        want_scores, want_ids = brute_force(store, q.searched, stored, K)
        assert [h.id for h in r.hits] == want_ids.tolist()
        np.testing.assert_allclose([h.score for h in r.hits], want_scores, atol=SCORE_TOL)
        if q.searched == "audio":
            assert all(h.has_audio for h in r.hits)  # clips without audio are not indexed
    vec = rng.standard_normal(16).astype(np.float32)
    npy = vector_store.parent / "q.npy"
    np.save(npy, vec)
    (r,) = searcher.run([Query("vector", str(npy), by=by, target=target)], 7)
    want_scores, want_ids = brute_force(store, r.query.searched, vec, 7)
    assert [h.id for h in r.hits] == want_ids.tolist()
    np.testing.assert_allclose([h.score for h in r.hits], want_scores, atol=SCORE_TOL)
    refs = store.clips(want_ids)
    assert [(h.path, h.t0) for h in r.hits] == [(c.path, c.t0) for c in refs]


def test_k_above_the_store_size_returns_every_indexed_clip(vector_store: Path) -> None:
    (r,) = Searcher(vector_store).run([Query("clip", "0", target="visual")], 500)
    assert sorted(h.id for h in r.hits) == list(range(60))
    assert [h.rank for h in r.hits] == list(range(1, 61))


@pytest.mark.parametrize("k", [1, 5, 59])
def test_rows_the_store_hides_never_shorten_the_results(vector_store, k, monkeypatch) -> None:
    """An index built before duplicates were hidden still holds the hidden copies' rows: the
    results skip them and still come k long, the next shown clips in order (numpy reference)."""
    searcher = Searcher(vector_store)
    store = Store(vector_store)
    query = store.vectors([17], "visual")[0]
    _, order = brute_force(store, "visual", query, 60)
    hidden = set(order[: min(k + 3, 59)].tolist()) - {int(order[0])}  # all near ones but the top
    visible = searcher.store.visible
    monkeypatch.setattr(
        searcher.store, "visible", lambda ids: visible(ids) & ~np.isin(ids, list(hidden))
    )
    (r,) = searcher.run([Query("clip", "17", target="visual")], k)
    want = [int(i) for i in order if int(i) not in hidden][:k]
    assert r.error is None and [h.id for h in r.hits] == want
    assert [h.rank for h in r.hits] == list(range(1, len(want) + 1)) and len(want) == min(
        k, 60 - len(hidden)
    )


def test_k_over_the_gpu_limit_is_one_clear_error(vector_store: Path) -> None:
    from avindex.errors import AvindexError
    from avindex.index import search_vectors

    index = Searcher(vector_store).index("audio")
    index.device = "cuda"  # the check faiss GPU indexes need, without a GPU
    with pytest.raises(AvindexError, match="at most 2048"):
        search_vectors(index, np.ones((1, 16), np.float32), 4096)


@pytest.mark.parametrize("k", [2_000_000_000, 2**62])
def test_a_huge_k_is_clamped_to_the_index_size(vector_store: Path, k: int) -> None:
    (r,) = Searcher(vector_store).run([Query("clip", "3", target="visual")], k)
    assert r.error is None and len(r.hits) == 60


def test_batch_query_on_a_missing_index_fails_alone(vector_store: Path, tmp_path: Path) -> None:
    """A store indexed for visual only: the audio-index query is reported, the other runs."""
    store = tmp_path / "store"
    store.mkdir()
    for f in vector_store.iterdir():
        if f.name != "index":
            (store / f.name).symlink_to(f)
    build_index(store, modality="visual")
    batch = tmp_path / "batch.txt"
    batch.write_text("--clip 5 --in audio\n--clip 1 --in visual\n")
    bad, good = Searcher(store).run(parse_batch(batch), K)
    assert "no audio index" in bad.error and not bad.hits
    assert good.error is None
    want_scores, want_ids = brute_force(Store(store), "visual", good.vector, K)
    assert [h.id for h in good.hits] == want_ids.tolist()
    np.testing.assert_allclose([h.score for h in good.hits], want_scores, atol=SCORE_TOL)


def test_vector_shapes(vector_store: Path, tmp_path: Path) -> None:
    """(D,) and (1, D) are queries; (D, 1) and (2, D) are one-line errors."""
    vec = np.random.default_rng(5).standard_normal(16).astype(np.float32)
    searcher = Searcher(vector_store)
    shapes = {"flat": (16,), "row": (1, 16), "column": (16, 1), "two": (2, 8)}
    queries = []
    for name, shape in shapes.items():
        np.save(tmp_path / f"{name}.npy", vec.reshape(shape))
        queries.append(Query("vector", str(tmp_path / f"{name}.npy")))
    flat, row, column, two = searcher.run(queries, K)
    assert flat.error is None and [h.id for h in row.hits] == [h.id for h in flat.hits]
    for r in (column, two):
        assert "expected (16,) or (1, 16)" in r.error and "\n" not in r.error


# --- a real store: small synthetic corpus embedded with the random model ---


@pytest.fixture(scope="module")
def searcher(media_store: Path) -> Searcher:
    """One searcher reused by the tests (the model and DALI pipelines build once)."""
    return Searcher(media_store)


@pytest.fixture(scope="module")
def query_files(small_corpus: Path, media_store: Path, tmp_path_factory) -> dict[str, Path]:
    """Query media made from the corpus: audio in several formats, rates and channels; a frame
    as png and jpg; a stored vector as .npy."""
    out = tmp_path_factory.mktemp("queries")
    video = small_corpus / "video_0001.mp4"
    files = {"video": video}
    mono8k = decode_audio(video, 8_000)[: 2 * 8_000]
    files["wav8k_stereo"] = out / "q8k.wav"
    write_video(files["wav8k_stereo"], None, 25.0, np.stack([mono8k, 0.5 * mono8k], 1), 8_000)
    files["flac"] = out / "q.flac"
    write_video(files["flac"], None, 25.0, decode_audio(video, 44_100)[:66_150], 44_100)
    files["mp3"] = out / "q.mp3"
    write_video(files["mp3"], None, 25.0, decode_audio(video, 48_000)[:48_000], 48_000)
    files["wav_short"] = out / "short.wav"  # 0.3 s: zero padded to one clip
    write_video(files["wav_short"], None, 25.0, decode_audio(video, 48_000)[:14_400], 48_000)
    meta = Store(media_store).meta
    audio_cfg = from_dict(AudioConfig, meta.audio_config)
    video_cfg = from_dict(VideoConfig, meta.video_config)
    (moment,) = read_moments(video, [Moment(2.5, 2.0)], audio_cfg, video_cfg)
    files["png"] = out / "frame.png"
    Image.fromarray(moment.frame).save(files["png"])
    files["jpg"] = out / "frame.jpg"
    Image.fromarray(moment.frame).resize((300, 220)).save(files["jpg"], quality=90)
    files["npy"] = out / "clip3.npy"
    np.save(files["npy"], Store(media_store).vectors([3], "audio")[0])
    return files


QUERY_CASES = {
    "wav8k_stereo": {"audio": "wav8k_stereo"},
    "flac": {"audio": "flac"},
    "mp3": {"audio": "mp3"},
    "wav_short": {"audio": "wav_short"},
    "png": {"image": "png"},
    "jpg": {"image": "jpg"},
    "video": {"video": "video", "at": 2.0},
    "video_by_audio": {"video": "video", "at": 2.0, "by": "audio", "in": "audio"},
    "clip": {"clip": 7},
    "npy": {"vector": "npy", "by": "audio"},
}


@pytest.mark.parametrize("case", sorted(QUERY_CASES))
def test_every_query_type_returns_ranked_clips(searcher, query_files, media_store, case) -> None:
    fields = {
        key: str(query_files[value]) if key in ("audio", "image", "video", "vector") else value
        for key, value in QUERY_CASES[case].items()
    }
    (r,) = searcher.run([make_query(fields)], K)
    assert r.error is None, r.error
    assert len(r.hits) == K
    assert [h.rank for h in r.hits] == list(range(1, K + 1))
    scores = [h.score for h in r.hits]
    assert scores == sorted(scores, reverse=True)
    store = Store(media_store)
    for h in r.hits:
        ref = store.clip(h.id)
        assert (h.path, h.t0, h.has_audio) == (ref.path, ref.t0, ref.has_audio)
    want_scores, _ = brute_force(store, r.searched, r.vector, K)
    np.testing.assert_allclose(scores, want_scores, atol=SCORE_TOL)


def test_query_encoding_matches_the_stored_clip(searcher, query_files, media_store) -> None:
    """A video moment's embeddings equal the stored clip's (same decode and preprocessing); a png
    of that frame gives exactly the moment's visual embedding."""
    video = str(query_files["video"])
    by_visual, by_audio, png = searcher.run(
        [
            Query("video", video, at=2.0),
            Query("video", video, at=2.0, by="audio"),
            Query("image", str(query_files["png"])),
        ],
        K,
    )
    store = Store(media_store)
    (clip_id,) = [
        i
        for i, c in enumerate(store.clips(np.arange(store.num_clips)))
        if c.path == str(Path(video).resolve()) and c.t0 == 2.0
    ]
    assert np.linalg.norm(by_visual.vector - store.vectors([clip_id], "visual")[0]) < FLOAT16_TOL
    assert np.linalg.norm(by_audio.vector - store.vectors([clip_id], "audio")[0]) < FLOAT16_TOL
    np.testing.assert_allclose(png.vector, by_visual.vector, atol=1e-5)


def test_long_audio_query_is_the_normalised_mean_of_its_windows(searcher, query_files) -> None:
    """A 1.5 s flac has one full clip window; a 2 s wav two, averaged and re-normalised."""
    (two,) = searcher.run([Query("audio", str(query_files["wav8k_stereo"]))], K)
    assert two.audio.shape == (2, 48_000)
    mean = searcher.encoder().sounds(two.audio).mean(axis=0)
    np.testing.assert_allclose(two.vector, mean / np.linalg.norm(mean), atol=1e-5)


def test_audio_windows_pad_short_and_split_long_queries() -> None:
    cfg = AudioConfig(sample_rate=100)
    short = audio_windows(np.ones(30, np.float32), cfg, hop=1.0)
    assert short.shape == (1, 100) and short[0, :30].all() and not short[0, 30:].any()
    ramp = np.arange(250, dtype=np.float32)
    windows = audio_windows(ramp, cfg, hop=1.0)
    np.testing.assert_array_equal(windows, np.stack([ramp[:100], ramp[100:200]]))
    assert audio_windows(ramp, cfg, hop=0.5).shape == (4, 100)


def test_batch_equals_single_queries(searcher, query_files, tmp_path) -> None:
    lines = [
        f"--audio {query_files['mp3']}",
        f"# a comment\n--image {query_files['png']} --in audio",
        f"--video {query_files['video']} --at 3 --by audio --in visual",
        "--clip 11",
        f"--vector {query_files['npy']} --by audio",
    ]
    text_file = tmp_path / "queries.txt"
    text_file.write_text("\n".join(lines) + "\n\n")
    json_file = tmp_path / "queries.json"
    json_file.write_text(
        json.dumps(
            [
                {"audio": str(query_files["mp3"])},
                {"image": str(query_files["png"]), "in": "audio"},
                {"video": str(query_files["video"]), "at": 3, "by": "audio", "in": "visual"},
                {"clip": 11},
                {"vector": str(query_files["npy"]), "by": "audio"},
            ]
        )
    )
    queries = parse_batch(text_file)
    assert queries == parse_batch(json_file)
    batch = searcher.run(queries, K)
    for q, got in zip(queries, batch, strict=True):
        (single,) = searcher.run([q], K)
        assert [h.id for h in got.hits] == [h.id for h in single.hits]
        np.testing.assert_allclose(
            [h.score for h in got.hits], [h.score for h in single.hits], atol=SCORE_TOL
        )


def test_batch_reports_bad_entries_and_runs_the_rest(searcher, query_files, tmp_path) -> None:
    batch = tmp_path / "mixed.txt"
    batch.write_text(
        f"--clip 2\n--audio missing.wav\n--image {query_files['png']} --by audio\n--bogus 1\n"
    )
    results = searcher.run(parse_batch(batch), K)
    assert [r.error is None for r in results] == [True, False, False, False]
    assert "missing.wav: no such file" in results[1].error
    assert "mixed.txt:3" in results[2].error and "mixed.txt:4" in results[3].error


def test_contact_sheet_is_a_png_of_the_expected_size(searcher, query_files, tmp_path) -> None:
    queries = [
        Query("audio", str(query_files["flac"])),
        Query("video", str(query_files["video"]), at=1.0),
        Query("clip", "4", by="audio", target="audio"),
        Query("vector", str(query_files["npy"]), by="audio"),
    ]
    results = searcher.run(queries, 3)
    # A video moved since embedding is drawn as a placeholder, not an error.
    results[0].hits[0] = dataclasses.replace(results[0].hits[0], path=str(tmp_path / "moved.mp4"))
    out = write_sheet(results, tmp_path / "sheet.png", searcher.audio_cfg, per_row=3)
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == sheet_size(rows=4, cols=4)
        image.verify()


def test_flat_search_matches_numpy_on_the_media_store(searcher, media_store) -> None:
    store = Store(media_store)
    for modality in ("visual", "audio"):
        stored = store.vectors([5], modality)[0]
        (r,) = searcher.run([Query("clip", "5", by=modality)], store.num_clips)
        want_scores, want_ids = brute_force(store, r.searched, stored, store.num_clips)
        assert sorted(h.id for h in r.hits) == sorted(want_ids.tolist())
        np.testing.assert_allclose([h.score for h in r.hits], want_scores, atol=SCORE_TOL)


# --- CLI: results and one-line errors ---


def test_cli_search_json_and_sheet(media_store, query_files, tmp_path, capsys, monkeypatch):
    sheet = tmp_path / "s.png"
    args = ["search", media_store, "--audio", query_files["mp3"], "-k", 3, "--json"]
    code, out, err = run_cli([*args, "--sheet", sheet], capsys, monkeypatch)
    assert code == 0, err
    (entry,) = json.loads(out)
    assert entry["query"]["by"] == "audio" and entry["query"]["in"] == "visual"
    assert [h["rank"] for h in entry["results"]] == [1, 2, 3]
    assert sheet.exists()
    code, out, err = run_cli(["search", media_store, "--clip", 0, "-k", 2], capsys, monkeypatch)
    assert code == 0 and "clip 0 (visual) -> audio index" in out
    assert "│ 2    │" in out and "│ 3    │" not in out


@pytest.fixture(scope="module")
def bad_inputs(media_store: Path, small_corpus: Path, tmp_path_factory) -> dict[str, Path]:
    """Broken query files, a store without an index, an index of another model, a checkpoint
    of another model."""
    out = tmp_path_factory.mktemp("bad")
    (out / "text.wav").write_text("not audio at all\n")
    (out / "text.jpg").write_text("not an image\n")
    (out / "matrix.npy").write_bytes(b"")
    np.save(out / "wrong.npy", np.zeros((3, 5), np.float32))
    unindexed = out / "unindexed"
    embed_paths(
        [small_corpus / "video_0000.mp4"],
        unindexed,
        random_checkpoint(0.125, seed=0),
        EmbedConfig(device="cpu", decode_workers=1),
    )
    other_index = out / "other_index"
    other_index.mkdir()
    for shard in media_store.glob("shard-*.h5"):
        (other_index / shard.name).symlink_to(shard)
    (other_index / "index").mkdir()
    for f in (media_store / "index").iterdir():
        (other_index / "index" / f.name).symlink_to(f)
    info = json.loads((media_store / "index" / "index.json").read_text())
    (other_index / "index" / "index.json").unlink()
    (other_index / "index" / "index.json").write_text(
        json.dumps({**info, "model_sha256": "x" * 64})
    )
    save_checkpoint(out / "other.pt", random_checkpoint(0.125, seed=1).model)
    Image.new("RGB", (2000, 1)).save(out / "line.png")  # 90 bytes; 93 MiB once scaled
    with open(out / "huge.npy", "wb") as fh:  # a header claiming 10^12 floats, 16 bytes of data
        header = {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(bytes(16))
    np.savez(out / "vec.npz", v=np.zeros(128, np.float32))
    (out / "nested.json").write_text("[" * 100_000 + "]" * 100_000)
    return {"dir": out, "unindexed": unindexed, "other_index": other_index}


BAD_QUERIES = {
    "missing audio": (["--audio", "{dir}/nothere.wav"], "nothere.wav: no such file"),
    "unreadable audio": (["--audio", "{dir}/text.wav"], "not a readable media file"),
    "image not an image": (["--image", "{dir}/text.jpg"], "not a readable image"),
    "missing image": (["--image", "{dir}/nothere.png"], "no such file"),
    "clip out of range": (["--clip", "999"], "clip id 999 out of range"),
    "video without --at": (["--video", "{video}"], "needs --at"),
    "--at past the end": (["--video", "{video}", "--at", "5.5"], "a clip starts at 0..5.00 s"),
    "empty npy": (["--vector", "{dir}/matrix.npy"], "not a .npy array"),
    "npy of wrong shape": (["--vector", "{dir}/wrong.npy"], "expected (128,)"),
    "two queries": (["--clip", "1", "--image", "{dir}/x.png"], "exactly one of"),
    "bad --in": (["--clip", "1", "--in", "sound"], "--in 'sound'"),
    "audio by visual": (["--audio", "{dir}/text.wav", "--by", "visual"], "is audio"),
    "k zero": (["--clip", "1", "-k", "0"], "must be at least 1"),
    "clip id beyond int64": (["--clip", "99999999999999999999999"], "expected a clip id"),
    "2000x1 picture": (["--image", "{dir}/line.png"], "aspect ratio beyond 8:1"),
    "npy claiming 10^12 floats": (["--vector", "{dir}/huge.npy"], "(1000000000000,)"),
    "npz instead of npy": (["--vector", "{dir}/vec.npz"], "not a .npy array"),
    "deeply nested batch": (["--batch", "{dir}/nested.json"], "nested too deeply"),
    "other model": (["--audio", "{flac}", "--model", "{dir}/other.pt"], "another model"),
    "not a checkpoint": (
        ["--image", "{png}", "--model", "{dir}/text.wav"],
        "not an avindex checkpoint",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_QUERIES))
def test_bad_query_is_one_line_error(
    case, media_store, bad_inputs, query_files, capsys, monkeypatch
):
    args, message = BAD_QUERIES[case]
    paths = {
        "dir": bad_inputs["dir"],
        "video": query_files["video"],
        "flac": query_files["flac"],
        "png": query_files["png"],
    }
    args = [a.format(**paths) for a in args]
    code, out, err = run_cli(["search", media_store, *args], capsys, monkeypatch)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("avindex: error:"), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err + out


@pytest.mark.parametrize(
    "store,message",
    [
        ("unindexed", "store has no index; run `avindex index"),
        ("other_index", "index was built from another model"),
        ("missing", "no such store directory"),
    ],
)
def test_bad_store_is_one_line_error(store, message, bad_inputs, capsys, monkeypatch):
    path = bad_inputs.get(store, bad_inputs["dir"] / "missing")
    code, _, err = run_cli(["search", path, "--clip", "0"], capsys, monkeypatch)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
