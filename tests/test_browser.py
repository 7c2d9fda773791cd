"""The search page in real headless Chromium (Debian's chromium + chromium-driver via Selenium):
`avindex serve` runs as a subprocess over a small synthetic store embedded with a briefly trained
model; a held-out sound finds frames of its class, clicking (or Enter/Space on) a result plays
its video from the result's start with sound, a picture query lists playable sounds, and "more
like this" runs; a screenshot is kept in the test's temporary folder."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from avindex.config import DemoConfig, EmbedConfig, IndexConfig, SynthConfig, replace
from avindex.demo import write_queries
from avindex.embed import embed_paths
from avindex.index import build_index
from avindex.labels import clip_labels, load_labels
from avindex.model import load_checkpoint
from avindex.presets import SMALL
from avindex.scan import find_media
from avindex.serve.catalog import video_id
from avindex.synth import make_corpus
from avindex.train import train

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Few, distinct classes and a minute of training: the small model then ranks by class (about
# 90 s for the whole store on 2 cores).
CORPUS = SynthConfig(videos=16, seconds=12, classes=4, seed=11, width=96, height=72)
TRAIN_SECONDS = 60.0
K = 12
SEEK_TOL = 0.1  # seconds between a result's t0 and where the player landed
WAIT = 60.0  # seconds any page state may take to appear on a loaded machine


def _browser_missing() -> str | None:
    """Why no browser test can run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing: apt-get install chromium chromium-driver (make test does)"
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    """Trained store, held-out queries and labels; the server is started by `server`."""
    missing = _browser_missing()
    if missing:
        pytest.skip(missing)
    root = tmp_path_factory.mktemp("browser")
    corpus, held, run, store = (root / n for n in ("corpus", "held", "run", "store"))
    labels_file = make_corpus(corpus, CORPUS, workers=2)
    held_labels = make_corpus(held, replace(CORPUS, videos=1, seed=CORPUS.seed + 1000), workers=1)
    preset = SMALL.configure(time_limit=TRAIN_SECONDS, seed=0, device="cpu")
    train([corpus], run, preset, labels_file, progress=False)
    best = run / "best.pt"
    embed_cfg = EmbedConfig(device="cpu")
    embed_paths(find_media([corpus]), store, load_checkpoint(best), embed_cfg, model_path=best)
    build_index(store, IndexConfig(device="cpu"))
    queries = write_queries(sorted(held.glob("*.mp4"))[0], held_labels, held, DemoConfig())
    labels = {
        video_id(str((corpus / name).resolve())): per_second
        for name, per_second in load_labels(labels_file).items()
    }
    return {"root": root, "store": store, "queries": queries, "labels": labels}


@pytest.fixture(scope="module")
def server(site: dict):
    """`avindex serve` on a free loopback port; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    log = site["root"] / "serve.log"
    cmd = [sys.executable, "-c", "from avindex.cli import main; main()", "serve"]
    cmd += [str(site["store"]), "--port", str(port), "--device", "cpu", "-k", str(K)]
    with open(log, "w") as out:  # the server keeps its own copy of the file
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + WAIT
    while True:
        try:
            with urllib.request.urlopen(url + "/api/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("avindex serve did not start:\n" + log.read_text())
        time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def driver(site: dict):
    """Headless Chromium; flags keep it from reaching for a network it does not have."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={site['root'] / 'chromium-profile'}",
        "--window-size=1280,860",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield browser
    browser.quit()


def hit_class(site: dict, element) -> int:
    """Ground-truth class of a result element (its video's label at its clip's centre)."""
    per_second = site["labels"][element.get_attribute("data-video")]
    return int(clip_labels(per_second, np.array([float(element.get_attribute("data-t0"))]))[0])


def wait_for(driver, condition, what: str):
    """Wait for `condition(driver)` to be truthy; fail with `what` and the page's status line."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.1).until(condition)
    except TimeoutException:
        status = driver.execute_script("return document.getElementById('status').textContent")
        pytest.fail(f"timed out waiting for {what}; page status: {status!r}")


def query(driver, path: Path, selector: str) -> list:
    """Choose `path` in the page's file input and wait for a full page of results."""
    from selenium.webdriver.common.by import By

    driver.execute_script("document.getElementById('hits').replaceChildren()")
    driver.find_element(By.ID, "file").send_keys(str(path))
    return wait_for(
        driver,
        lambda d: (
            (found := d.find_elements(By.CSS_SELECTOR, selector)) and len(found) == K and found
        ),
        f"{K} results for {path.name}",
    )


def play_and_check(driver, element, t0: float, press: str | None = None) -> None:
    """Click the result (or press a key on it): the player seeks to t0 and plays with sound."""
    driver.execute_script(
        "const v = document.getElementById('video'); window.seekedAt = [];"
        "v.onseeked = () => window.seekedAt.push(v.currentTime);"
    )
    if press is None:
        element.find_element("css selector", "img").click()
    else:
        driver.execute_script("arguments[0].focus()", element)
        element.send_keys(press)
    state = wait_for(
        driver,
        lambda d: d.execute_script(
            "const v = document.getElementById('video');"
            "const s = window.seekedAt;"
            "return s.length && !v.paused && v.currentTime > s[s.length - 1] + 0.05"
            "  ? {seeked: s[s.length - 1], muted: v.muted, src: v.currentSrc} : null;"
        ),
        f"the video to play from {t0:g} s",
    )
    assert abs(state["seeked"] - t0) <= SEEK_TOL, (state, t0)
    assert not state["muted"] and state["src"].endswith(element.get_attribute("data-video"))


def test_sound_and_picture_queries_in_chromium(site: dict, server: str, driver) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(server + "/")
    wait_for(driver, lambda d: "clips of 16 videos" in d.find_element(By.ID, "facts").text, "facts")
    sound = next(q for q in site["queries"] if q.kind == "audio")
    picture = next(q for q in site["queries"] if q.kind == "image")

    # A held-out sound: a grid of frames, most of them of the sound's class.
    hits = query(driver, sound.path, "#hits .grid .hit")
    classes = [hit_class(site, h) for h in hits]
    assert sum(c == sound.label for c in classes) >= 0.75 * K, classes
    assert wait_for(
        driver,
        lambda d: d.execute_script(
            "return [...document.querySelectorAll('#hits img, #query-picture img')]"
            ".every(i => i.complete && i.naturalWidth > 0)"
        ),
        "every frame and the query's spectrogram to load",
    )
    later = [h for h in hits if float(h.get_attribute("data-t0")) >= 2.0]
    play_and_check(driver, later[0], float(later[0].get_attribute("data-t0")))
    shot = site["root"] / "serve-page.png"
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    play_and_check(driver, later[1], float(later[1].get_attribute("data-t0")), press=Keys.ENTER)
    play_and_check(driver, later[2], float(later[2].get_attribute("data-t0")), press=Keys.SPACE)

    # A held-out picture: a list of playable sounds with spectrograms, most of its class.
    rows = query(driver, picture.path, "#hits .list .hit")
    classes = [hit_class(site, r) for r in rows]
    assert sum(c == picture.label for c in classes) >= 0.75 * K, classes
    assert wait_for(
        driver,
        lambda d: d.execute_script(
            "const rows = [...document.querySelectorAll('#hits .list .hit')];"
            "return rows.every(r => r.querySelector('audio').src &&"
            "  r.querySelector('img.spectrogram').complete &&"
            "  r.querySelector('img.spectrogram').naturalWidth > 0);"
        ),
        "every sound and spectrogram",
    )
    first = rows[0].find_element(By.CSS_SELECTOR, "audio")
    assert driver.execute_script("return arguments[0].play().then(() => true)", first)

    # "More like this" on a sound: same-modality results for that clip.
    clip = rows[0].get_attribute("data-clip")
    rows[0].find_element(By.CSS_SELECTOR, "button.similar").click()
    wait_for(
        driver,
        lambda d: (
            f"clip {clip}" in d.find_element(By.ID, "results-title").text
            and len(d.find_elements(By.CSS_SELECTOR, "#hits .list .hit")) == K
        ),
        "more like this",
    )
    assert driver.find_elements(By.CSS_SELECTOR, "#hits .hit")[0].get_attribute("data-clip") == clip
    assert shot.stat().st_size > 10_000
