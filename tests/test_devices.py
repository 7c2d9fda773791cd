"""devices.py: --device choices, and what auto/cpu/cuda resolve to with and without CUDA."""

from __future__ import annotations

import pytest
import torch

from avindex import devices
from avindex.errors import AvindexError


def test_unknown_device_is_a_one_line_error() -> None:
    for resolve in (devices.resolve_device, devices.resolve_faiss_device):
        with pytest.raises(AvindexError, match="expected one of auto, cpu, cuda"):
            resolve("gpu")


def test_resolution_without_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "faiss_gpu_count", lambda: 0)
    assert devices.resolve_device("auto") == "cpu" and devices.resolve_device("cpu") == "cpu"
    with pytest.raises(AvindexError, match="no CUDA device"):
        devices.resolve_device("cuda")
    assert devices.resolve_faiss_device("auto") == "cpu"
    with pytest.raises(AvindexError, match="faiss sees no GPU"):
        devices.resolve_faiss_device("cuda")


def test_resolution_with_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices, "faiss_gpu_count", lambda: 2)
    assert devices.resolve_device("auto") == "cuda" and devices.resolve_device("cpu") == "cpu"
    assert devices.resolve_faiss_device("auto") == "cuda"
    assert devices.resolve_faiss_device("cpu") == "cpu"


def test_faiss_gpu_count_reads_faiss_and_is_zero_without_gpu_support(monkeypatch) -> None:
    import faiss

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 3, raising=False)
    assert devices.faiss_gpu_count() == 3
    monkeypatch.delattr(faiss, "get_num_gpus")  # builds without GPU support lack the function
    assert devices.faiss_gpu_count() == 0
