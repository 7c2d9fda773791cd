"""Resolve --device auto|cpu|cuda for torch, DALI and faiss, importing each only when asked."""

from __future__ import annotations

from avindex.errors import AvindexError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def _check_choice(device: str) -> None:
    """A --device value other than auto|cpu|cuda is a one-line error."""
    if device not in DEVICE_CHOICES:
        raise AvindexError(f"--device {device!r}: expected one of {', '.join(DEVICE_CHOICES)}")


def resolve_device(device: str) -> str:
    """Map auto|cpu|cuda to the torch device ('cpu' or 'cuda'); cuda without CUDA is an error."""
    _check_choice(device)
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise AvindexError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return device


def resolve_faiss_device(device: str) -> str:
    """Map auto|cpu|cuda to where faiss runs; auto uses a GPU only when faiss can see one."""
    _check_choice(device)
    gpus = faiss_gpu_count()
    if device == "cuda" and gpus == 0:
        raise AvindexError(
            "--device cuda: faiss sees no GPU (faiss-cpu installed?); use --device cpu or auto"
        )
    return "cuda" if device != "cpu" and gpus > 0 else "cpu"


def faiss_gpu_count() -> int:
    """GPUs faiss can use (0 with faiss-cpu): index_cpu_to_all_gpus fails silently without one."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0
