"""L3-Net: vision and audio towers, the l3 / ave / contrastive heads, and the checkpoint format."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

# torch at module level on purpose: the towers subclass nn.Module. The CLI imports this module
# only inside the commands that need a model, so `avindex --help` stays fast.
import torch
from torch import nn
from torch.nn import functional as F

from avindex import config
from avindex.config import AudioConfig, ModelConfig, TrainConfig, VideoConfig
from avindex.durable import write_durably
from avindex.errors import AvindexError
from avindex.presets import get_preset

if TYPE_CHECKING:
    from collections.abc import Iterator

HEADS = ("l3", "ave", "contrastive")
CHECKPOINT_FORMAT = 1
_BASE_CHANNELS = (64, 128, 256, 512)


def tower_channels(width: float) -> tuple[int, ...]:
    """Channels of the four tower blocks for a width multiplier (paper: 64/128/256/512 at 1.0)."""
    return tuple(max(1, round(c * width)) for c in _BASE_CHANNELS)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (paper-size towers need it for speed); a no-op elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Tower(nn.Module):
    """Four blocks of 2x[conv3x3, BN, ReLU], max-pool between blocks, global max-pool at the end."""

    def __init__(self, in_channels: int, width: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for i, ch in enumerate(tower_channels(width)):
            if i:
                layers.append(nn.MaxPool2d(2))
            for _ in range(2):
                layers += [nn.Conv2d(prev, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch)]
                layers.append(nn.ReLU(inplace=True))
                prev = ch
        self.body = nn.Sequential(*layers)
        self.out_dim = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, out_dim) by a global max-pool over the last feature map."""
        # channels_last roughly doubles conv speed on CPU and enables tensor cores on CUDA.
        y = self.body(x.contiguous(memory_format=torch.channels_last))
        return torch.amax(y, dim=(2, 3))


class VisionTower(Tower):
    """Paper vision subnetwork on normalised RGB frames (B, 3, crop, crop)."""

    def __init__(self, width: float) -> None:
        super().__init__(3, width)


class AudioTower(Tower):
    """Paper audio subnetwork on dB spectrograms (B, 1, F, T), normalised by dataset stats."""

    def __init__(self, width: float, spec_pool: int = 1) -> None:
        super().__init__(1, width)
        self.pool = nn.AvgPool2d(spec_pool) if spec_pool > 1 else nn.Identity()
        # Set from the training set (set_spec_stats); dB values are far from unit scale otherwise.
        self.register_buffer("spec_mean", torch.zeros(()))
        self.register_buffer("spec_std", torch.ones(()))

    def forward(self, specs: torch.Tensor) -> torch.Tensor:
        """Normalise, optionally average-pool, then run the tower."""
        return super().forward(self.pool((specs - self.spec_mean) / self.spec_std))


class HeadOutput(NamedTuple):
    """L3Net.forward result: loss, AVC logits (B, 2; class 1 = corresponds), embeddings."""

    loss: torch.Tensor
    logits: torch.Tensor
    visual: torch.Tensor
    audio: torch.Tensor


def _two_class(z: torch.Tensor) -> torch.Tensor:
    """Binary logit z -> (B, 2) logits whose softmax equals sigmoid(z) for class 1."""
    return torch.stack([torch.zeros_like(z), z], dim=1)


class L3Head(nn.Module):
    """Paper head: concatenate both tower outputs, FC 128, ReLU, FC 2; cross-entropy on AVC."""

    def __init__(self, in_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)  # no parameters: checkpoints keep their keys
        self.fc = nn.Sequential(
            nn.Linear(2 * in_dim, 128), nn.ReLU(inplace=True), nn.Linear(128, 2)
        )

    def forward(self, v: torch.Tensor, a: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        """AVC logits and cross-entropy; embeddings are the raw tower outputs."""
        logits = self.fc(self.dropout(torch.cat([v, a], dim=1))).float()
        return HeadOutput(F.cross_entropy(logits, labels), logits, v, a)


class Projection(nn.Module):
    """Tower output -> embed_dim, L2-normalised (the aligned heads' shared space)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(Dropout while training,) project and L2-normalise in float32."""
        return F.normalize(self.fc(self.dropout(x)).float(), dim=1)


class AveHead(nn.Module):
    """'Objects that Sound' head: the AVC classifier sees only the projections' distance."""

    def __init__(self, in_dim: int, embed_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.visual = Projection(in_dim, embed_dim, dropout)
        self.audio = Projection(in_dim, embed_dim, dropout)
        # logit = slope * (threshold - distance). A default linear init leaves the slope near
        # zero and training stuck at chance (measured): start steep, with the threshold at the
        # first batch's median distance.
        self.slope = nn.Parameter(torch.tensor(10.0))
        self.threshold = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("calibrated", torch.tensor(False))

    def forward(self, v: torch.Tensor, a: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        """Distance classifier and cross-entropy on AVC labels."""
        pv, pa = self.visual(v), self.audio(a)
        dist = (pv - pa).norm(dim=1)
        if self.training and not bool(self.calibrated):
            self._calibrate(dist.detach())
        logits = _two_class(self.slope * (self.threshold - dist))
        return HeadOutput(F.cross_entropy(logits, labels), logits, pv, pa)

    @torch.no_grad()
    def _calibrate(self, dist: torch.Tensor) -> None:
        """Threshold := median distance of the first batch (averaged over ranks under DDP)."""
        median = dist.median().reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(median)
            median /= torch.distributed.get_world_size()
        self.threshold.copy_(median[0])
        self.calibrated.fill_(True)


class ContrastiveHead(nn.Module):
    """InfoNCE over the batch's positive pairs with a learned temperature, plus an AVC read-out."""

    def __init__(
        self, in_dim: int, embed_dim: int, dropout: float = 0.0, init_temperature: float = 0.07
    ) -> None:
        super().__init__()
        self.visual = Projection(in_dim, embed_dim, dropout)
        self.audio = Projection(in_dim, embed_dim, dropout)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        # AVC threshold on the cosine similarity: a running average of each training batch's
        # most accurate threshold. A learned bias would need thousands of Adam steps to follow
        # the similarities as they spread, and would push gradients into the embeddings.
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("calibrated", torch.tensor(False))
        self.momentum = 0.9

    def scale(self) -> torch.Tensor:
        """Inverse temperature, capped at 100 as in CLIP so the logits cannot blow up."""
        return self.log_scale.exp().clamp(max=100.0)

    def forward(self, v: torch.Tensor, a: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        """Symmetric InfoNCE: each positive pair against every other frame / audio in the batch."""
        pv, pa = self.visual(v), self.audio(a)
        scale = self.scale()
        pos = labels.bool()
        loss = self._info_nce(pv, pa, pos, scale)
        sim = (pv * pa).sum(dim=1)
        if self.training:
            self._track_threshold(sim.detach(), pos)
        logits = _two_class(scale * (sim - self.threshold))
        return HeadOutput(loss, logits, pv, pa)

    @staticmethod
    def _info_nce(
        pv: torch.Tensor, pa: torch.Tensor, pos: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        """Cross-entropy both ways: rows are positive pairs, columns every item of the batch
        (the mismatched pairs' frames and audio are extra negatives)."""
        rows = torch.nonzero(pos).flatten()
        if rows.numel() == 0:
            # Nothing to contrast; keep the graph connected so DDP sees every parameter used.
            return (pv.sum() + pa.sum() + scale) * 0.0
        v2a = scale * pv[rows] @ pa.t()
        a2v = scale * pa[rows] @ pv.t()
        return 0.5 * (F.cross_entropy(v2a, rows) + F.cross_entropy(a2v, rows))

    @torch.no_grad()
    def _track_threshold(self, sim: torch.Tensor, pos: torch.Tensor) -> None:
        """Move the threshold towards the one that classifies this batch best."""
        if not (pos.any() and (~pos).any()):
            return
        best = best_threshold(sim, pos)
        if not bool(self.calibrated):
            self.threshold.copy_(best)
            self.calibrated.fill_(True)
        else:
            self.threshold.mul_(self.momentum).add_((1 - self.momentum) * best)


def best_threshold(scores: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Threshold t maximising the accuracy of 'positive iff score > t' (midway between the two
    scores at the best split; O(B log B))."""
    order = torch.argsort(scores)
    s, p = scores[order].float(), pos[order].float()
    # Split before index i: items [0, i) called negative, [i, B) positive.
    neg_below = torch.cat([p.new_zeros(1), torch.cumsum(1 - p, 0)])
    pos_above = torch.cat([p.new_zeros(1), torch.cumsum(p.flip(0), 0)]).flip(0)
    i = int(torch.argmax(neg_below + pos_above))
    lo = s[i - 1] if i > 0 else s[0] - 1e-3
    hi = s[i] if i < len(s) else s[-1] + 1e-3
    return 0.5 * (lo + hi)


class L3Net(nn.Module):
    """Look, Listen and Learn network: two towers and one head chosen by ModelConfig.head."""

    def __init__(
        self,
        model_cfg: ModelConfig | None = None,
        audio_cfg: AudioConfig | None = None,
        video_cfg: VideoConfig | None = None,
        preset: str | None = None,
    ) -> None:
        super().__init__()
        self.preset = preset  # the preset the configs came from, recorded in checkpoints
        self.model_cfg = model_cfg or ModelConfig()
        self.audio_cfg = audio_cfg or AudioConfig()
        self.video_cfg = video_cfg or VideoConfig()
        cfg = self.model_cfg
        if cfg.head not in HEADS:
            raise AvindexError(f"head {cfg.head!r}: expected one of {', '.join(HEADS)}")
        if cfg.width <= 0:
            raise AvindexError(f"width {cfg.width}: must be positive")
        self.vision = VisionTower(cfg.width)
        self.audio = AudioTower(cfg.width, cfg.spec_pool)
        dim = self.vision.out_dim
        if cfg.head == "l3":
            self.head: nn.Module = L3Head(dim, cfg.dropout)
        elif cfg.head == "ave":
            self.head = AveHead(dim, cfg.embed_dim, cfg.dropout)
        else:
            self.head = ContrastiveHead(dim, cfg.embed_dim, cfg.dropout)
        # channels_last weights to match the towers' channels_last activations: measured 1.5x
        # faster on CPU than converting the activations alone (and tensor cores want it on CUDA).
        self.to(memory_format=torch.channels_last)

    @property
    def aligned(self) -> bool:
        """Whether visual and audio embeddings share one space (cross-modal search works)."""
        return self.model_cfg.head != "l3"

    @property
    def embed_dim(self) -> int:
        """Size of the stored embeddings (projection size, or the tower output for l3)."""
        return self.model_cfg.embed_dim if self.aligned else self.vision.out_dim

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return next(self.parameters()).device

    def set_spec_stats(self, mean: float, std: float) -> None:
        """Store the training set's spectrogram mean/std (dB) used to normalise audio input."""
        self.audio.spec_mean.fill_(float(mean))
        self.audio.spec_std.fill_(max(float(std), 1e-6))

    def forward(
        self, frames: torch.Tensor, specs: torch.Tensor, labels: torch.Tensor
    ) -> HeadOutput:
        """AVC forward: frames (B,3,H,W), specs (B,1,F,T), labels (B,) 1 = corresponding pair."""
        with autocast(frames.device):
            v, a = self.vision(frames), self.audio(specs)
            return self.head(v, a, labels)

    @torch.no_grad()
    def encode_visual(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames (B,3,crop,crop) normalised -> (B, embed_dim) float32 stored embeddings."""
        with autocast(frames.device):
            v = self.vision(frames)
            return (self.head.visual(v) if self.aligned else v).float()

    @torch.no_grad()
    def encode_audio(self, specs: torch.Tensor) -> torch.Tensor:
        """dB spectrograms (B,1,n_freq,n_frames) -> (B, embed_dim) float32 stored embeddings."""
        with autocast(specs.device):
            a = self.audio(specs)
            return (self.head.audio(a) if self.aligned else a).float()


@dataclass
class Checkpoint:
    """A loaded (or generated) model, the configs that preprocess its input, its provenance."""

    model: L3Net
    model_cfg: ModelConfig
    audio_cfg: AudioConfig
    video_cfg: VideoConfig
    sha256: str
    preset: str | None = None  # None: a checkpoint written before presets were recorded
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    train_cfg: TrainConfig | None = None
    optimizer_state: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None

    @property
    def untrained(self) -> bool:
        """True for random_checkpoint models (their embeddings mean nothing)."""
        return bool(self.extra.get("untrained", False))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _unwrap(model: nn.Module) -> L3Net:
    """The L3Net inside a DDP (or similar .module) wrapper."""
    return getattr(model, "module", model)


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    step: int = 0,
    rng: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    train_cfg: TrainConfig | None = None,
) -> str:
    """Write a checkpoint atomically and durably (tmp file, fsync, rename); returns its sha256."""
    net = _unwrap(model)
    state = {
        "format": CHECKPOINT_FORMAT,
        "preset": net.preset,
        "model_cfg": config.to_dict(net.model_cfg),
        "audio_cfg": config.to_dict(net.audio_cfg),
        "video_cfg": config.to_dict(net.video_cfg),
        "train_cfg": config.to_dict(train_cfg) if train_cfg is not None else None,
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": int(step),
        "rng": rng,
        "extra": extra or {},
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # File and folder are fsynced: a power loss after a save never leaves a torn best.pt.
        write_durably(path, lambda tmp: tmp.write_bytes(data))
    except OSError as exc:
        raise AvindexError(
            f"{path}: cannot write checkpoint ({exc.strerror or exc}); free space or check access"
        ) from exc
    return _sha256(data)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model (eval mode, on `device`) and its configs from a checkpoint file alone."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AvindexError(
            f"{path}: cannot read checkpoint ({exc.strerror}); check the path"
        ) from exc
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        model_cfg = config.from_dict(ModelConfig, state["model_cfg"])
        audio_cfg = config.from_dict(AudioConfig, state["audio_cfg"])
        video_cfg = config.from_dict(VideoConfig, state["video_cfg"])
        preset = state.get("preset")
        model = L3Net(model_cfg, audio_cfg, video_cfg, preset=preset)
        model.load_state_dict(state["model"])
    except AvindexError:
        raise
    except Exception as exc:
        raise AvindexError(
            f"{path}: not an avindex checkpoint ({type(exc).__name__}); pass a file written by "
            "`avindex train` or use --model random"
        ) from exc
    train_cfg = state.get("train_cfg")
    return Checkpoint(
        model=model.to(device).eval(),
        model_cfg=model_cfg,
        audio_cfg=audio_cfg,
        video_cfg=video_cfg,
        sha256=_sha256(data),
        preset=preset,
        step=int(state.get("step", 0)),
        extra=dict(state.get("extra") or {}),
        train_cfg=config.from_dict(TrainConfig, train_cfg) if train_cfg else None,
        optimizer_state=state.get("optimizer"),
        rng=state.get("rng"),
    )


def random_checkpoint(
    width: float | None = None,
    seed: int = 0,
    head: str | None = None,
    preset: str = "small",
    device: str | torch.device = "cpu",
) -> Checkpoint:
    """Untrained seeded model of a preset (for timing the pipeline); `width` overrides the
    preset's."""
    chosen = get_preset(preset).configure(head=head, width=width)
    model_cfg, audio_cfg, video_cfg = chosen.model, chosen.audio, chosen.video
    with _seeded(seed):
        model = L3Net(model_cfg, audio_cfg, video_cfg, preset=chosen.name)
    ident = {
        "random": True,
        "seed": seed,
        "model_cfg": config.to_dict(model_cfg),
        "audio_cfg": config.to_dict(audio_cfg),
        "video_cfg": config.to_dict(video_cfg),
    }
    extra = {
        "untrained": True,
        "label": f"random untrained weights ({chosen.name} preset, width {model_cfg.width}, "
        f"seed {seed}, head {model_cfg.head})",
        "seed": seed,
    }
    return Checkpoint(
        model=model.to(device).eval(),
        model_cfg=model_cfg,
        audio_cfg=audio_cfg,
        video_cfg=video_cfg,
        sha256=_sha256(json.dumps(ident, sort_keys=True).encode()),
        preset=chosen.name,
        extra=extra,
    )


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block under a fixed torch seed without disturbing the caller's RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
