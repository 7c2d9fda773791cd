"""Shared fixtures: the media zoo (good and broken files of known properties) and a small corpus."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from mediafactory import build_zoo

from avindex.cli import main
from avindex.config import EmbedConfig, SynthConfig
from avindex.embed import embed_paths
from avindex.index import build_index
from avindex.model import random_checkpoint
from avindex.scan import find_media
from avindex.synth import make_corpus


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests skip by themselves where CUDA is absent (one reason, one place)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu marker: needs CUDA (run benchmarks/gpu_check.sh on a GPU)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not keywords: a folder may be named gpu
            item.add_marker(skip)


def run_cli(args: list, capsys, monkeypatch) -> tuple[int, str, str]:
    """Run `avindex ARGS` in-process through main(); returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["avindex", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


# Small synthetic corpus for tests that need labelled audio-visual data.
SMALL_CORPUS = SynthConfig(videos=4, seconds=6, classes=4, seed=123, width=64, height=48)


@pytest.fixture(scope="session")
def media_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int | None]]:
    """name -> (path, expected clips at hop 1 s, or None for files that must be rejected)."""
    return build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with a small synthetic corpus (SMALL_CORPUS) and its labels.csv."""
    out = tmp_path_factory.mktemp("corpus")
    make_corpus(out, SMALL_CORPUS, workers=1)
    return out


@pytest.fixture(scope="session")
def ray_local() -> Iterator[Any]:
    """Ray on this machine with 2 CPUs, started once per test session (the optional `dist` extra;
    `make test` installs it)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'avindex[dist]'")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def media_store(small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """small_corpus embedded with `--model random` and indexed, once (tests only read it)."""
    out = tmp_path_factory.mktemp("media") / "store"
    cfg = EmbedConfig(device="cpu", batch_size=16, decode_workers=1)
    embed_paths(find_media([small_corpus]), out, random_checkpoint(0.125, seed=0), cfg)
    build_index(out)
    return out
