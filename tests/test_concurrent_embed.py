"""Many `embed` processes on one store and one input set, killed and restarted at random: every
clip ends up on disk exactly once (claims, not read-time de-duplication), and `--part K/N` in N
processes fills the same store a single run does."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from chaos import kill_and_restart
from storefactory import clip_rows, copies_on_disk

from avindex.config import EmbedConfig, SynthConfig
from avindex.embed import embed_paths
from avindex.model import random_checkpoint
from avindex.scan import find_media
from avindex.synth import make_corpus

pytestmark = pytest.mark.slow
CFG = EmbedConfig(device="cpu", batch_size=8, decode_workers=1, shard_clips=12)
EMBED = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from avindex.config import EmbedConfig
    from avindex.embed import embed_paths
    from avindex.model import random_checkpoint
    from avindex.scan import find_media, select_part

    part = sys.argv[3] if len(sys.argv) > 3 else None
    paths = select_part(find_media([sys.argv[1]]), part)
    cfg = EmbedConfig(device="cpu", batch_size=8, decode_workers=1, shard_clips=12)
    embed_paths(paths, Path(sys.argv[2]), random_checkpoint(seed=0), cfg)
    """
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """24 short videos: enough that writers meet on the same ones."""
    out = tmp_path_factory.mktemp("many")
    make_corpus(out, SynthConfig(videos=24, seconds=3, classes=3, seed=77, width=48, height=32))
    return out


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory) -> Counter:
    """(video, t0) rows of one uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "store"
    embed_paths(find_media([corpus]), out, random_checkpoint(seed=0), CFG)
    return clip_rows(out)


def _embed(corpus: Path, store: Path, part: str | None = None) -> subprocess.Popen:
    args = [sys.executable, "-c", EMBED, str(corpus), str(store), *([part] if part else [])]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("writers", [2, 4])
def test_embed_processes_killed_and_restarted_store_every_clip_once(
    corpus: Path, reference: Counter, tmp_path: Path, writers: int
) -> None:
    rng = random.Random(writers)
    store = tmp_path / "store"
    procs = [_embed(corpus, store) for _ in range(writers)]
    kills = kill_and_restart(procs, lambda: _embed(corpus, store), 2 * writers, rng, (0.5, 3.0))
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]
    final = _embed(corpus, store)
    assert final.wait(timeout=600) == 0, final.stderr.read()[-2000:]
    assert kills >= 1, "no writer was running when it was meant to be killed"
    copies = copies_on_disk(store)
    assert len(copies) == 24 and max(copies.values()) == 1, "a video written twice"
    assert clip_rows(store) == reference


def test_parts_in_separate_processes_fill_the_store_of_one_run(
    corpus: Path, reference: Counter, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    procs = [_embed(corpus, store, f"{k}/2") for k in range(2)]
    for proc in procs:
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]
    assert clip_rows(store) == reference
    assert max(copies_on_disk(store).values()) == 1
