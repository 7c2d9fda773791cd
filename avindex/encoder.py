"""The one way avindex turns media into embeddings: a model, its DALI preprocessing and batching.

Bulk embedding, search queries, the server and the benchmarks all encode through `Encoder`, so a
query is embedded exactly as the stored clips were.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from avindex.model import Checkpoint
from avindex.pipelines import Preprocessor

STAGES = ("preprocess", "model")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with `n` torch intra-op threads, then restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Encoder:
    """A checkpoint's model on `device` with its preprocessing; inputs of any length are cut into
    batches of `batch_size`. Outputs are float32 (n, D) numpy arrays.

    On a CPU, `clips` runs the two towers side by side, the visual one in a helper thread: run it
    under `torch_threads(1)` (as embed does), because OpenMP's multi-threaded kernels wait at a
    barrier after every layer, and while a decoder holds one of the cores each barrier stalls
    (measured on 2 busy cores: 9-60 clips/s with 2 torch threads vs ~190-250 with 1). On CUDA the
    towers run one after the other (the GPU queues the work).
    """

    def __init__(self, checkpoint: Checkpoint, device: str, batch_size: int = 64) -> None:
        self.checkpoint = checkpoint
        self.model = checkpoint.model.to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.preprocess = Preprocessor(
            checkpoint.audio_cfg, checkpoint.video_cfg, batch_size, device=device
        )
        self._helper = ThreadPoolExecutor(1, "avindex-tower") if device == "cpu" else None
        self.seconds = dict.fromkeys(STAGES, 0.0)  # time spent per stage, summed over calls

    @property
    def dim(self) -> int:
        """Size of each embedding."""
        return self.model.embed_dim

    def clips(
        self, frames: Sequence[np.ndarray | torch.Tensor], audio: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(visual, audio) embeddings of clips: frames (HxWx3 uint8 at the preset's scale, or
        (3, crop, crop) tensors already preprocessed on the device) and (n, n_samples) audio."""
        visual, sound = [], []
        for start in range(0, len(audio), self.batch_size):
            stop = start + self.batch_size
            v, a = self._clip_batch(frames[start:stop], audio[start:stop])
            visual.append(v)
            sound.append(a)
        return _join(visual, self.dim), _join(sound, self.dim)

    def frames(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """Visual embeddings of pictures (HxWx3 uint8, any size: scaled like video frames)."""
        return self._batched(frames, self.preprocess.frames, self._encode_visual)

    def sounds(self, windows: np.ndarray) -> np.ndarray:
        """Audio embeddings of (n, n_samples) windows at the model's sample rate."""
        return self._batched(windows, self.preprocess.spectrograms, self._encode_audio)

    def _clip_batch(
        self, frames: Sequence[np.ndarray | torch.Tensor], audio: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        started = time.perf_counter()
        raw = [f for f in frames if isinstance(f, np.ndarray)]
        if len(raw) == len(frames):
            pictures, specs = self.preprocess(raw, audio)
        else:  # frames that came preprocessed (NVDEC) join the ones DALI prepares now
            specs = self.preprocess.spectrograms(audio)
            prepared = iter(self.preprocess.frames(raw) if raw else ())
            pictures = torch.stack(
                [next(prepared) if isinstance(f, np.ndarray) else f for f in frames]
            )
        self.seconds["preprocess"] += time.perf_counter() - started
        started = time.perf_counter()
        visual, sound = self.towers(pictures, specs)
        self.seconds["model"] += time.perf_counter() - started
        return visual, sound

    def towers(self, frames: torch.Tensor, specs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Both towers on one preprocessed batch (side by side on a CPU)."""
        if self._helper is None:
            return self._encode_visual(frames), self._encode_audio(specs)
        pending = self._helper.submit(self._encode_visual, frames)
        sound = self._encode_audio(specs)
        return pending.result(), sound

    def _batched(
        self, items: Sequence, prepare: Callable[..., torch.Tensor], encode: Callable
    ) -> np.ndarray:
        out = []
        for start in range(0, len(items), self.batch_size):
            began = time.perf_counter()
            x = prepare(items[start : start + self.batch_size])
            self.seconds["preprocess"] += time.perf_counter() - began
            began = time.perf_counter()
            out.append(encode(x))
            self.seconds["model"] += time.perf_counter() - began
        return _join(out, self.dim)

    def _encode_visual(self, frames: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            x = frames.to(self.device, non_blocking=True)
            return self.model.encode_visual(x).float().cpu().numpy()

    def _encode_audio(self, specs: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            x = specs.to(self.device, non_blocking=True)
            return self.model.encode_audio(x).float().cpu().numpy()

    def close(self) -> None:
        """Stop the helper thread."""
        if self._helper is not None:
            self._helper.shutdown()

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _join(parts: list[np.ndarray], dim: int) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


__all__ = ["STAGES", "Encoder", "torch_threads"]
