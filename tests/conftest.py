"""Shared fixtures: the media zoo (good and broken files of known properties) and a small corpus."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from mediafactory import build_zoo

from avindex.config import SynthConfig
from avindex.synth import make_corpus


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests skip by themselves where CUDA is absent (one reason, one place)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu marker: needs CUDA (run benchmarks/gpu_check.sh on a GPU)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not keywords: a folder may be named gpu
            item.add_marker(skip)


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
