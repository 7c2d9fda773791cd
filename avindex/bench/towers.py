"""Model bound: clips/s of each tower on random tensors of the right shape, over batch sizes."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from avindex.bench.measure import sustained_rate
from avindex.encoder import Encoder, torch_threads
from avindex.model import Checkpoint


def random_inputs(
    checkpoint: Checkpoint, batch: int, device: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames (B,3,crop,crop) and dB spectrograms (B,1,F,T) shaped as the towers expect."""
    gen = torch.Generator().manual_seed(seed)
    c, acfg = checkpoint.video_cfg.crop, checkpoint.audio_cfg
    frames = torch.randn((batch, 3, c, c), generator=gen)
    # Spread like real dB spectrograms (about -100..0 dB), not unit noise.
    specs = -50.0 + 20.0 * torch.randn((batch, 1, acfg.n_freq, acfg.n_frames), generator=gen)
    return frames.to(device), specs.to(device)


def tower_bench(
    checkpoint: Checkpoint,
    device: str,
    batch_sizes: Sequence[int],
    min_seconds: float,
    repeats: int,
    seed: int,
) -> dict[str, Any]:
    """Per-tower clips/s for each batch size (torch's default threads, one tower after the
    other), and both towers the way `embed` runs them; the bound is the faster of the two."""
    encoder = Encoder(checkpoint, device, max(batch_sizes))
    model = encoder.model
    sweep = []
    for batch in sorted(set(batch_sizes)):
        frames, specs = random_inputs(checkpoint, batch, device, seed)
        with torch.inference_mode():
            visual = sustained_rate(
                lambda f=frames: len(model.encode_visual(f)), min_seconds, repeats, device
            )
            audio = sustained_rate(
                lambda s=specs: len(model.encode_audio(s)), min_seconds, repeats, device
            )
        threads = torch_threads(1) if device == "cpu" else contextlib.nullcontext()
        with threads:  # both towers side by side, as embed runs them
            as_embed = sustained_rate(
                lambda f=frames, s=specs: len(encoder.towers(f, s)[0]), min_seconds, repeats, device
            )
        one_after_other = 1.0 / (1.0 / visual + 1.0 / audio)
        sweep.append(
            {
                "batch": batch,
                "visual_clips_per_s": visual,
                "audio_clips_per_s": audio,
                "sequential_clips_per_s": one_after_other,
                "embed_way_clips_per_s": as_embed,
                "clips_per_s": max(one_after_other, as_embed),
            }
        )
    encoder.close()
    return {
        "width": checkpoint.model_cfg.width,
        "precision": "bf16 autocast, channels_last" if device == "cuda" else "fp32, channels_last",
        "torch_threads": torch.get_num_threads(),
        "crop": checkpoint.video_cfg.crop,
        "spec_pool": checkpoint.model_cfg.spec_pool,
        "sweep": sweep,
    }


def at_batch(model_result: dict[str, Any], batch: int) -> dict[str, Any]:
    """The sweep entry for `batch` (the nearest measured one when it was not measured)."""
    return min(model_result["sweep"], key=lambda e: abs(e["batch"] - batch))
