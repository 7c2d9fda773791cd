"""avindex: train L3-Net on your videos, embed every second, index it with faiss, search it."""

__version__ = "0.1.0"
