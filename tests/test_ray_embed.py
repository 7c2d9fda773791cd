"""`avindex embed --ray`: a pool of Ray actors gives the clip set of one process, and an actor
killed mid-run is replaced, its batch run again, and every clip still stored once."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import pytest
from storefactory import clip_rows, copies_on_disk

from avindex.config import EmbedConfig, SynthConfig
from avindex.embed import embed_paths
from avindex.model import random_checkpoint
from avindex.scan import find_media
from avindex.synth import make_corpus

pytestmark = pytest.mark.slow
CFG = EmbedConfig(
    device="cpu", batch_size=8, decode_workers=1, ray_actors=2, ray_batch_videos=2, shard_clips=8
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ray_corpus")
    make_corpus(out, SynthConfig(videos=12, seconds=3, classes=3, seed=31, width=48, height=32))
    return out


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory) -> Counter:
    out = tmp_path_factory.mktemp("ray_reference") / "store"
    embed_paths(find_media([corpus]), out, random_checkpoint(seed=0), CFG)
    return clip_rows(out)


def _actor_pids() -> list[int]:
    """Processes Ray titles as the embed actors (their process title names the UDF)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if b"EmbedActor" in fh.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def test_ray_embed_gives_the_clips_of_one_process(ray_local, corpus, reference, tmp_path):
    from avindex.ray_embed import embed_on_ray

    store = tmp_path / "store"
    report = embed_on_ray(find_media([corpus]), store, random_checkpoint(seed=0), CFG)
    assert report.videos_done == 12 and report.videos_failed == 0
    assert report.clips == sum(reference.values())
    assert clip_rows(store) == reference
    again = embed_on_ray(find_media([corpus]), store, random_checkpoint(seed=0), CFG)
    assert again.videos_skipped == 12 and again.videos_done == 0


def test_a_killed_actor_is_retried_and_every_clip_is_stored_once(
    ray_local, corpus, reference, tmp_path
):
    from avindex.ray_embed import embed_on_ray

    killed = []
    earlier = set(_actor_pids())  # an earlier run's actor may linger: killing it tests nothing

    def kill_an_actor(report) -> None:
        pids = [pid for pid in _actor_pids() if pid not in earlier]
        if not killed and pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    store = tmp_path / "store"
    embed_on_ray(
        find_media([corpus]), store, random_checkpoint(seed=0), CFG, on_progress=kill_an_actor
    )
    assert killed, "no actor process was found to kill"
    assert clip_rows(store) == reference
    assert max(copies_on_disk(store).values()) == 1
