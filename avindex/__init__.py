"""avindex: train L3-Net on your videos, embed every second, index with faiss, search across modalities."""

__version__ = "0.1.0"
