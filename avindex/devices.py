"""Resolve --device auto|cpu|cuda for torch, DALI and faiss, importing each only when asked."""

from __future__ import annotations

from avindex.errors import AvindexError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> str:
    """Map auto|cpu|cuda to the torch device ('cpu' or 'cuda'); cuda without CUDA is an error."""
    if device not in DEVICE_CHOICES:
        raise AvindexError(f"--device {device!r}: expected one of {', '.join(DEVICE_CHOICES)}")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise AvindexError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return device


def faiss_gpu_count() -> int:
    """GPUs faiss can use (0 with faiss-cpu): index_cpu_to_all_gpus fails silently without one."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0
