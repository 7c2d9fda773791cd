"""avindex serve: every endpoint through FastAPI's TestClient, results equal to the Searcher's,
clip media equal to a plain read, range requests, every error path a client can cause (JSON 4xx,
never a 500), the token and host guard, metrics, and the server surviving bad requests."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import threading
import wave
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from avindex.cli import main
from avindex.config import AudioConfig, ServeConfig, VideoConfig
from avindex.decode import Moment, clip_moment, read_moments
from avindex.errors import AvindexError
from avindex.media import decode_audio, stream_seconds
from avindex.queries import Query
from avindex.search import Searcher
from avindex.serve.app import PAGE_DIR, create_app
from avindex.serve.catalog import display_names, video_id
from avindex.serve.guard import bind_warning
from avindex.serve.state import ServeState
from avindex.serve.uploads import display_name, too_long
from avindex.synth import write_video
from avindex.workers import Sandbox

BASE = "http://127.0.0.1:8000"  # the Host a loopback server accepts
CFG = ServeConfig(device="cpu", k=5, max_k=20, max_upload_bytes=2 << 20, max_upload_seconds=8.0)
SCORE_TOL = 1e-5


@pytest.fixture(scope="module")
def state(media_store: Path) -> ServeState:
    """The store opened once, as `avindex serve` opens it."""
    return ServeState(media_store, CFG)


@pytest.fixture
def client(state: ServeState) -> TestClient:
    """A client that sees errors as a browser would (a 500 is a response, not an exception)."""
    return TestClient(create_app(state), base_url=BASE, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def reference(media_store: Path) -> Searcher:
    """A separate Searcher: what the CLI answers for the same queries."""
    return Searcher(media_store)


@pytest.fixture(scope="module")
def uploads(small_corpus: Path, tmp_path_factory) -> dict[str, Path]:
    """Query files cut from the corpus, in formats a browser might send."""
    out = tmp_path_factory.mktemp("uploads")
    video = small_corpus / "video_0002.mp4"
    sound = decode_audio(video, 16_000)[16_000:48_000]  # 2 s at 16 kHz, stereo below
    files = {"video": video, "wav": out / "bark.wav", "ogg": out / "bark.ogg"}
    write_video(files["wav"], None, 25.0, np.stack([sound, sound], 1), 16_000)
    write_video(files["ogg"], None, 25.0, decode_audio(video, 48_000)[:48_000], 48_000)
    (moment,) = read_moments(video, [Moment(3.5, 3.0)], AudioConfig(), VideoConfig())
    files["png"] = out / "frame.png"
    Image.fromarray(moment.frame).save(files["png"])
    files["long"] = out / "long.wav"  # 10 s: over CFG.max_upload_seconds
    write_video(files["long"], None, 25.0, np.zeros(10 * 8_000, np.float32), 8_000)
    files["noise"] = out / "noise.wav"
    files["noise"].write_bytes(np.random.default_rng(0).bytes(5000))
    files["empty"] = out / "empty.png"
    files["empty"].write_bytes(b"")
    return files


def upload(client: TestClient, path: Path, kind: str, **fields) -> object:
    """POST /api/search with one file and form fields."""
    data = {"kind": kind, **{k: str(v) for k, v in fields.items()}}
    with open(path, "rb") as f:
        return client.post("/api/search", files={"file": (path.name, f)}, data=data)


def assert_error(response, status: int, *words: str) -> str:
    """A JSON error of the expected status: one line, naming no server path."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    assert "\n" not in message and "Traceback" not in message
    assert "/tmp" not in message and "avindex-upload" not in message
    for word in words:
        assert word in message, message
    return message


def assert_same_hits(body: dict, want) -> None:
    """API hits equal the Searcher's: ids, ranks, scores, times."""
    assert [h["clip"] for h in body["hits"]] == [h.id for h in want.hits]
    assert [h["rank"] for h in body["hits"]] == [h.rank for h in want.hits]
    np.testing.assert_allclose(
        [h["score"] for h in body["hits"]], [h.score for h in want.hits], atol=SCORE_TOL
    )
    assert [h["t0"] for h in body["hits"]] == [h.t0 for h in want.hits]


# --- search ---


@pytest.mark.parametrize(
    "name,kind,fields,query",
    [
        ("wav", "audio", {}, {}),
        ("ogg", "audio", {"in": "audio"}, {"target": "audio"}),
        ("png", "image", {"k": 7}, {}),
        ("video", "video", {"at": 2}, {"at": 2.0}),
        ("video", "video", {"at": 3, "by": "audio"}, {"at": 3.0, "by": "audio"}),
    ],
)
def test_upload_search_equals_the_searcher(client, reference, uploads, name, kind, fields, query):
    response = upload(client, uploads[name], kind, **fields)
    assert response.status_code == 200, response.text
    body = response.json()
    (want,) = reference.run([Query(kind, str(uploads[name]), **query)], fields.get("k", CFG.k))
    assert want.error is None and len(want.hits) == fields.get("k", CFG.k)
    assert_same_hits(body, want)
    assert body["query"]["name"] == uploads[name].name
    assert body["query"]["searched"] == want.query.searched
    assert body["picture"] is None  # only when asked for
    hit = body["hits"][0]
    assert hit["frame_url"] == f"/api/clips/{hit['clip']}/frame.jpg"
    assert hit["video_url"] == f"/api/videos/{hit['video']['id']}"
    assert re.fullmatch(r"video_000\d\.mp4", hit["video"]["name"])


def test_query_picture_is_what_the_model_saw(client, state, uploads):
    """picture=true returns the query's frame (image) or spectrogram (sound) as a JPEG data URL."""
    for name, kind in (("png", "image"), ("wav", "audio")):
        body = upload(client, uploads[name], kind, picture="true").json()
        prefix = "data:image/jpeg;base64,"
        assert body["picture"].startswith(prefix)
        picture = Image.open(io.BytesIO(base64.b64decode(body["picture"][len(prefix) :])))
        if kind == "image":  # scaled as the store's frames are
            assert min(picture.size) == state.searcher.video_cfg.resize_shorter
        else:
            assert picture.height == AudioConfig().n_fft // 2 + 1  # frequency bins


@pytest.mark.parametrize("by,target", [("visual", None), ("audio", "audio"), ("visual", "visual")])
def test_more_like_this_equals_the_searcher(client, reference, by, target):
    params = {"by": by, "k": 6, **({"in": target} if target else {})}
    response = client.get("/api/clips/9/similar", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    (want,) = reference.run([Query("clip", "9", by=by, target=target)], 6)
    assert_same_hits(body, want)
    assert body["query"]["clip"]["clip"] == 9 and body["query"]["by"] == by
    if target == by:
        assert body["hits"][0]["clip"] == 9  # a clip is its own nearest neighbour


# --- media ---


def test_clip_facts_and_media_equal_a_plain_read(client, state):
    clip = state.store.clip(8)
    body = client.get("/api/clips/8").json()
    assert body["t0"] == clip.t0 and body["video"]["name"] == Path(clip.path).name
    audio_cfg = state.audio_cfg

    frame = client.get(body["frame_url"])
    assert frame.status_code == 200 and frame.headers["content-type"] == "image/jpeg"
    shown = np.asarray(Image.open(io.BytesIO(frame.content)).convert("RGB"), dtype=float)
    thumb = VideoConfig(resize_shorter=CFG.thumb_height)
    (want,) = read_moments(clip.path, [clip_moment(clip.t0, 1.0)], audio_cfg, thumb)
    assert shown.shape == want.frame.shape
    assert np.abs(shown - want.frame).mean() < 3.0  # JPEG loss only

    sound = client.get(body["audio_url"])
    assert sound.headers["content-type"] == "audio/wav"
    with wave.open(io.BytesIO(sound.content)) as w:
        assert (w.getnchannels(), w.getframerate()) == (1, audio_cfg.sample_rate)
        played = np.frombuffer(w.readframes(w.getnframes()), "<i2") / 32767.0
    context = CFG.audio_context
    longer = AudioConfig(clip_seconds=1.0 + 2 * context)
    (plain,) = read_moments(clip.path, [Moment(clip.t0 + 0.5, clip.t0 - context)], longer, thumb)
    assert len(played) == longer.n_samples
    np.testing.assert_allclose(played, plain.audio, atol=1e-3)

    spec = client.get(body["spectrogram_url"])
    assert spec.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(spec.content)).height == audio_cfg.n_freq


def test_first_clip_sound_has_no_context_before_the_video(client, state):
    with wave.open(io.BytesIO(client.get("/api/clips/0/audio.wav").content)) as w:
        assert w.getnframes() == round((1.0 + CFG.audio_context) * state.audio_cfg.sample_rate)


def test_videos_list_and_range_requests(client, state, small_corpus):
    videos = client.get("/api/videos").json()
    assert len(videos) == 4 and all(v["clips"] == 6 for v in videos)
    path = state.catalog.get(videos[1]["id"]).path
    data = Path(path).read_bytes()
    size = len(data)
    url = videos[1]["url"]
    full = client.get(url)
    assert full.status_code == 200 and full.content == data
    assert full.headers["accept-ranges"] == "bytes" and full.headers["content-type"] == "video/mp4"
    cases = {
        "bytes=0-99": (0, 99),  # first bytes
        "bytes=1000-1999": (1000, 1999),  # middle
        "bytes=-500": (size - 500, size - 1),  # suffix: the last 500
        f"bytes={size - 10}-": (size - 10, size - 1),  # open-ended
        f"bytes=100-{size + 1000}": (100, size - 1),  # end past the file: clipped
    }
    for header, (first, last) in cases.items():
        part = client.get(url, headers={"Range": header})
        assert part.status_code == 206, header
        assert part.headers["content-range"] == f"bytes {first}-{last}/{size}", header
        assert part.content == data[first : last + 1], header
        assert int(part.headers["content-length"]) == last - first + 1
    for header in (f"bytes={size}-", f"bytes={size + 5}-{size + 10}", "bytes=-0"):
        refused = client.get(url, headers={"Range": header})
        assert refused.status_code == 416, header
        assert refused.headers["content-range"] == f"bytes */{size}"


# --- errors a client can cause ---


@pytest.mark.parametrize(
    "name,kind,fields,status,words",
    [
        ("noise", "audio", {}, 422, ["noise.wav", "not a readable media file"]),
        ("empty", "image", {}, 422, ["empty.png", "not a readable image"]),
        ("wav", "image", {}, 422, ["bark.wav", "not a readable image"]),
        ("png", "audio", {}, 422, ["frame.png"]),
        ("png", "image", {"by": "audio"}, 422, ["is visual"]),  # wrong modality
        ("wav", "audio", {"by": "visual"}, 422, ["is audio"]),
        ("video", "video", {}, 422, ["needs --at"]),
        ("video", "video", {"at": 5.5}, 422, ["0..5.00 s"]),
        ("video", "video", {"at": -1}, 422, ["at:"]),
        ("wav", "audio", {"at": 1}, 422, ["--video queries only"]),
        ("wav", "text", {}, 422, ["kind:"]),
        ("wav", "audio", {"k": 0}, 422, ["k:"]),
        ("wav", "audio", {"k": CFG.max_k + 1}, 422, ["k:", "20"]),
        ("wav", "audio", {"k": "many"}, 422, ["k:"]),
        ("wav", "audio", {"in": "text"}, 422, ["in:"]),
        ("long", "audio", {}, 413, ["long.wav", "longer than 8 s"]),
    ],
)
def test_bad_uploads_are_json_4xx(client, uploads, name, kind, fields, status, words):
    assert_error(upload(client, uploads[name], kind, **fields), status, *words)
    assert upload(client, uploads["png"], "image").status_code == 200  # still serving


def test_oversize_upload_is_refused_while_it_streams(client, state, uploads):
    """Over max_upload_bytes: 413 from the declared Content-Length, and, when the body comes in
    chunks without a length, as soon as the bytes read pass the limit (the rest is never read)."""
    big = np.random.default_rng(1).bytes(CFG.max_upload_bytes + 1)
    response = client.post("/api/search", files={"file": ("big.wav", big)}, data={"kind": "audio"})
    assert_error(response, 413, "limited to")

    chunk = 1 << 16
    head = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
    )
    pulled, sent = 0, []

    async def receive() -> dict:
        nonlocal pulled
        pulled += 1  # 64 KiB a message, up to 4x the limit (a server that reads it all fails)
        return {
            "type": "http.request",
            "body": head if pulled == 1 else b"x" * chunk,
            "more_body": pulled * chunk < 4 * CFG.max_upload_bytes,
        }

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/search",
        "raw_path": b"/api/search",
        "root_path": "",
        "query_string": b"",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 5000),
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"content-type", b"multipart/form-data; boundary=b"),
        ],
    }
    asyncio.run(create_app(state)(scope, receive, send))
    assert sent[0]["status"] == 413
    assert "limit" in json.loads(b"".join(m.get("body", b"") for m in sent[1:]))["error"]
    read = len(head) + (pulled - 1) * chunk  # stopped at the first message over the limit
    assert read - chunk <= CFG.max_upload_bytes < read
    assert upload(client, uploads["wav"], "audio").status_code == 200


def test_missing_file_and_malformed_forms(client):
    assert_error(client.post("/api/search", data={"kind": "audio"}), 422, "file:")
    two = {"file": [("a.wav", b"1"), ("b.wav", b"2")]}
    assert client.post("/api/search", files=two, data={"kind": "audio"}).status_code in (400, 422)
    garbage = {"Content-Type": "multipart/form-data; boundary=zz"}
    assert (
        client.post("/api/search", content=b"--zz\r\nnonsense", headers=garbage).status_code < 500
    )


@pytest.mark.parametrize(
    "url,status",
    [
        ("/api/clips/24", 404),  # 4 videos x 6 clips: ids 0..23
        ("/api/clips/-1/frame.jpg", 404),
        ("/api/clips/99999/audio.wav", 404),
        ("/api/clips/24/spectrogram.png", 404),
        ("/api/clips/24/similar", 404),
        ("/api/clips/abc", 422),
        ("/api/clips/1.5/similar", 422),
        ("/api/clips/3/similar?k=0", 422),
        ("/api/clips/3/similar?k=21", 422),
        ("/api/clips/3/similar?by=text", 422),
        ("/api/videos/0123456789abcdef", 404),
        ("/api/videos/..%2F..%2Fetc%2Fpasswd", 404),
        ("/api/videos/%2e%2e%2f%2e%2e%2fetc%2fpasswd", 404),
        ("/api/videos/%2Fetc%2Fpasswd", 404),
        ("/api/videos//etc/passwd", 404),
        ("/api/videos/..", 404),
        ("/api/videos/../../etc/passwd", 404),
        ("/api/nothing", 404),
    ],
)
def test_unknown_ids_and_path_like_ids(client, url, status):
    response = client.get(url)
    assert_error(response, status)
    assert b"root:" not in response.content


def test_a_stored_path_is_not_an_id(client, state):
    video = next(iter(state.catalog.by_id.values()))
    assert client.get("/api/videos/" + video.path.replace("/", "%2F")).status_code == 404
    assert client.get("/api/videos/" + video.name).status_code == 404
    assert client.get(f"/api/videos/{video.id}").status_code == 200


def test_a_clip_without_sound_cannot_be_queried_by_it(client, state, monkeypatch):
    clip = state.store.clip(4)
    silent = type(clip)(clip.id, clip.path, clip.t0, False, clip.shard)
    monkeypatch.setattr(state.store, "clip", lambda i: silent)
    assert_error(client.get("/api/clips/4/similar?by=audio"), 422, "no audio")


def test_no_server_path_reaches_a_client(client, state, small_corpus, uploads):
    texts = [
        client.get("/api/info").text,
        client.get("/api/videos").text,
        client.get("/api/clips/3").text,
        client.get("/api/clips/3/similar").text,
        upload(client, uploads["wav"], "audio").text,
        upload(client, uploads["noise"], "audio").text,
    ]
    for text in texts:
        assert str(small_corpus) not in text and "/tmp" not in text


def test_an_internal_error_is_a_json_500_and_the_server_goes_on(
    client, state, uploads, monkeypatch
):
    def crash(results, k=None):
        raise RuntimeError("boom at /secret/path")

    monkeypatch.setattr(state.searcher, "answer", crash)
    response = client.get("/api/clips/3/similar")
    assert_error(response, 500, "internal error")
    assert "boom" not in response.text and "secret" not in response.text
    monkeypatch.undo()
    assert client.get("/api/clips/3/similar").status_code == 200


def test_a_slow_upload_does_not_hold_up_other_searches(client, state, uploads, monkeypatch):
    """An upload's media is read on its request thread: while one is still decoding, a search
    by a stored clip is answered (the model and index thread is not waiting on the decode)."""
    decoding, release = threading.Event(), threading.Event()
    gather = state.searcher.gather

    def slow_gather(queries):
        if queries[0].kind == "audio":
            decoding.set()
            release.wait(60)
        return gather(queries)

    monkeypatch.setattr(state.searcher, "gather", slow_gather)
    slow: list = []
    uploading = threading.Thread(
        target=lambda: slow.append(upload(client, uploads["wav"], "audio"))
    )
    uploading.start()
    try:
        assert decoding.wait(30)
        other: list = []
        searching = threading.Thread(
            target=lambda: other.append(client.get("/api/clips/3/similar"))
        )
        searching.start()
        searching.join(30)
        assert [r.status_code for r in other] == [200] and not slow  # the upload still decodes
    finally:
        release.set()
        uploading.join(60)
    assert [r.status_code for r in slow] == [200]


def test_a_sequence_of_bad_requests_then_good_ones(client, uploads):
    bad = [
        lambda: upload(client, uploads["noise"], "audio"),
        lambda: client.get("/api/videos/..%2Fetc%2Fpasswd"),
        lambda: upload(client, uploads["long"], "audio"),
        lambda: client.get("/api/clips/3/similar?k=9999"),
        lambda: upload(client, uploads["empty"], "image"),
    ]
    for request in bad:
        assert 400 <= request().status_code < 500
        assert upload(client, uploads["wav"], "audio").status_code == 200
        assert client.get("/api/clips/2/frame.jpg").status_code == 200


# --- facts, page, docs, metrics ---


def test_info_and_health(client, media_store):
    info = client.get("/api/info").json()
    index = json.loads((media_store / "index" / "index.json").read_text())
    assert info["clips"] == info["indexed_clips"] == 24 and info["videos"] == 4
    assert info["model"]["source"] == "random (untrained)" and info["model"]["width"] == 0.125
    for modality in ("visual", "audio"):
        entry = index["modalities"][modality]
        assert info["indexes"][modality]["factory"] == entry["factory"]
        assert info["indexes"][modality]["recall"]["recall_at_10"] == entry["recall_at_10"]
    assert any("random untrained weights" in n for n in info["notes"])
    assert info["limits"]["max_k"] == CFG.max_k
    assert client.get("/api/health").json() == {"status": "ok", "clips": 24}


def test_notes_name_the_store_folder_not_its_path(client, state, monkeypatch):
    folder = state.searcher.dir
    monkeypatch.setattr(state.searcher, "notes", lambda: [f"run `avindex index {folder} --update`"])
    assert client.get("/api/info").json()["notes"] == [
        f"run `avindex index {folder.name} --update`"
    ]


def test_page_docs_and_schema_need_nothing_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and 'src="/static/app.js"' in page.text
    for name in ("app.js", "style.css", "favicon.svg"):
        assert client.get(f"/static/{name}").status_code == 200
    for path in PAGE_DIR.iterdir():  # no CDN, no external font or script
        text = re.sub(r'xmlns="[^"]*"', "", path.read_text())  # a name, not a fetch
        assert not re.search(r"https?://", text), path.name
    docs = client.get("/docs")
    assert docs.status_code == 200 and not re.search(r"https?://(?!127\.0\.0\.1)", docs.text)
    for asset in re.findall(r"(/static/docs/[\w.-]+)", docs.text):
        assert client.get(asset).status_code == 200
    schema = client.get("/openapi.json").json()
    for path in (
        "/api/search",
        "/api/clips/{clip_id}/similar",
        "/api/videos/{video_id}",
        "/metrics",
    ):
        assert path in schema["paths"]
    assert "multipart/form-data" in schema["paths"]["/api/search"]["post"]["requestBody"]["content"]


def metric(text: str, name: str, **labels: str) -> float:
    """Value of one sample in Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_counters_move(client, uploads):
    before = client.get("/metrics").text
    for _ in range(3):
        client.get("/api/health")
    client.get("/api/clips/999/frame.jpg")
    upload(client, uploads["wav"], "audio")
    after = client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = after.text

    def moved(name: str, **labels: str) -> float:
        return metric(text, name, **labels) - metric(before, name, **labels)

    health = {"method": "GET", "route": "/api/health", "status": "200"}
    assert moved("avindex_serve_requests_total", **health) == 3
    frame = "/api/clips/{clip_id}/frame.jpg"
    assert moved("avindex_serve_requests_total", method="GET", route=frame, status="404") == 1
    assert moved("avindex_serve_errors_total", route=frame, side="client") == 1
    assert moved("avindex_serve_request_seconds_count", route="/api/search") == 1
    search_inf = {"route": "/api/search", "le": "+Inf"}
    assert moved("avindex_serve_request_seconds_bucket", **search_inf) == 1
    assert metric(text, "avindex_serve_clips") == 24
    client.get("/no/such/path/at/all")
    unmatched = client.get("/metrics").text  # unknown paths share one label
    assert "no/such" not in unmatched and 'route="unmatched"' in unmatched


# --- token and host ---


def test_token_is_needed_on_every_api_and_media_request(state):
    secret = "s3cret-token"
    guarded = create_app(_with_cfg(state, token=secret))
    client = TestClient(guarded, base_url=BASE)
    for url in (
        "/api/info",
        "/api/clips/1/frame.jpg",
        "/api/clips/1/similar",
        "/metrics",
        "/docs",
        "/openapi.json",
        f"/api/videos/{next(iter(state.catalog.by_id))}",
    ):
        assert_error(client.get(url), 401, "token")
        assert_error(client.get(url, params={"token": "wrong"}), 401)
        assert client.get(url, params={"token": secret}).status_code == 200, url
        assert client.get(url, headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    assert client.get("/").status_code == 200  # the page itself holds no data
    assert client.get("/api/health").status_code == 200
    opened = client.get("/", params={"token": secret}, follow_redirects=False)
    assert opened.status_code == 303 and opened.headers["location"] == "/"
    assert "httponly" in opened.headers["set-cookie"].lower()
    assert client.get("/api/clips/1/frame.jpg").status_code == 200  # the cookie carries it
    assert_error(TestClient(guarded, base_url=BASE).get("/", params={"token": "x"}), 401)


def test_a_loopback_server_refuses_foreign_host_names(client):
    assert_error(client.get("/api/info", headers={"Host": "evil.example:8000"}), 400, "loopback")
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert client.get("/api/health", headers={"Host": host}).status_code == 200


def test_binding_off_loopback_needs_a_token():
    assert bind_warning(ServeConfig()) is None
    assert bind_warning(ServeConfig(host="::1")) is None
    with pytest.raises(AvindexError, match="--token"):
        bind_warning(ServeConfig(host="0.0.0.0"))
    assert "reachable from other machines" in bind_warning(ServeConfig(host="0.0.0.0", token="t"))


@pytest.mark.parametrize(
    "args,words",
    [
        (["--host", "0.0.0.0"], "--token"),
        (["--k", "500"], "--k 500: expected 1..100"),
        (["--port", "70000"], "--port 70000"),
        (["--max-upload-seconds", "0"], "must be positive"),
    ],
)
def test_cli_serve_refuses_bad_settings_in_one_line(media_store, capsys, monkeypatch, args, words):
    monkeypatch.delenv("AVINDEX_SERVE_TOKEN", raising=False)
    monkeypatch.setattr("sys.argv", ["avindex", "serve", str(media_store), *args])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and words in err


# --- helpers ---


def test_upload_helpers(uploads, tmp_path):
    assert stream_seconds(uploads["wav"], "audio", 100) == pytest.approx(2.0, abs=0.05)
    assert stream_seconds(uploads["long"], "audio", 3.0) < 5.0  # stops once past the limit
    assert stream_seconds(uploads["long"], "audio", 100) == pytest.approx(10.0, abs=0.05)
    assert stream_seconds(uploads["video"], "video", 100) == pytest.approx(6.0, abs=0.05)
    assert stream_seconds(uploads["wav"], "video", 100) is None  # no such stream
    assert stream_seconds(uploads["noise"], "audio", 100) is None
    with Sandbox() as sandbox:
        assert too_long(uploads["long"], "audio", 8.0, sandbox)
        assert not too_long(uploads["wav"], "audio", 8.0, sandbox)
        assert too_long(uploads["video"], "video", 5.0, sandbox)
        assert not too_long(uploads["png"], "image", 0.1, sandbox)
    assert display_name("../../etc/passwd") == "passwd"
    assert display_name("C:\\x\\y.wav") == "y.wav" and display_name(None) == "upload"


def test_video_ids_and_names():
    paths = ["/data/a/x.mp4", "/data/b/x.mp4", "/data/a/y.mp4"]
    assert display_names(paths) == {p: p[len("/data/") :] for p in paths}
    assert display_names(["/data/a/x.mp4"]) == {"/data/a/x.mp4": "x.mp4"}
    assert re.fullmatch(r"[0-9a-f]{16}", video_id(paths[0]))
    assert video_id(paths[0]) != video_id(paths[1]) and video_id(paths[0]) == video_id(paths[0])


def _with_cfg(state: ServeState, **changes) -> ServeState:
    """The same opened store under other settings (no second model load)."""
    import copy
    import dataclasses

    other = copy.copy(state)
    other.cfg = dataclasses.replace(state.cfg, **changes)
    return other
