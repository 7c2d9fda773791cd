"""L3Net towers, heads and the checkpoint format (CPU, narrow models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from avindex.config import AudioConfig
from avindex.errors import AvindexError
from avindex.model import (
    HEADS,
    L3Net,
    best_threshold,
    load_checkpoint,
    random_checkpoint,
    save_checkpoint,
    tower_channels,
)
from avindex.presets import PAPER, SMALL


def _batch(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ac = AudioConfig()
    frames = torch.randn(n, 3, SMALL.video.crop, SMALL.video.crop, generator=g)
    specs = torch.randn(n, 1, ac.n_freq, ac.n_frames, generator=g) * 20 - 60
    labels = torch.arange(n) % 2
    return frames, specs, labels


def _net(preset, head: str) -> L3Net:
    chosen = preset.configure(head=head)
    return L3Net(chosen.model, chosen.audio, chosen.video, preset=chosen.name)


def _model(head: str, seed: int = 0) -> L3Net:
    torch.manual_seed(seed)
    return _net(SMALL, head)


def test_tower_channels_follow_paper() -> None:
    assert tower_channels(1.0) == (64, 128, 256, 512)
    assert tower_channels(0.125) == (8, 16, 32, 64)


def test_full_width_tower_matches_paper_layout() -> None:
    net = L3Net()
    convs = [m for m in net.vision.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.audio.modules()) == 3
    assert net.embed_dim == 128


@pytest.mark.parametrize("head", HEADS)
def test_heads_forward_backward_and_encode(head: str) -> None:
    model = _model(head)
    frames, specs, labels = _batch()
    out = model(frames, specs, labels)
    assert out.logits.shape == (6, 2)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    v, a = model.encode_visual(frames), model.encode_audio(specs)
    assert v.shape == a.shape == (6, model.embed_dim)
    if head == "l3":
        assert model.embed_dim == SMALL.model.width * 512
    else:
        torch.testing.assert_close(v.norm(dim=1), torch.ones(6), atol=1e-5, rtol=0)
        torch.testing.assert_close(a.norm(dim=1), torch.ones(6), atol=1e-5, rtol=0)


def test_ave_threshold_starts_at_first_batch_median_distance() -> None:
    model = _model("ave")
    frames, specs, labels = _batch(8)
    out = model(frames, specs, labels)
    dist = (out.visual - out.audio).norm(dim=1)
    assert model.head.threshold.item() == pytest.approx(dist.median().item(), abs=1e-5)
    assert model.head.slope.item() == pytest.approx(10.0)


def test_contrastive_loss_matches_plain_info_nce() -> None:
    model = _model("contrastive")
    frames, specs, labels = _batch(8)
    out = model(frames, specs, labels)
    rows = torch.nonzero(labels).flatten()
    v2a = (out.visual[rows] @ out.audio.t()) / 0.07
    a2v = (out.audio[rows] @ out.visual.t()) / 0.07
    expected = 0.5 * (
        nn.functional.cross_entropy(v2a, rows) + nn.functional.cross_entropy(a2v, rows)
    )
    torch.testing.assert_close(out.loss, expected, atol=1e-4, rtol=1e-4)


def test_spectrogram_normalisation_uses_buffers() -> None:
    model = _model("contrastive").eval()
    _, specs, _ = _batch()
    model.set_spec_stats(-60.0, 20.0)
    shifted = model.encode_audio(specs)
    model.set_spec_stats(0.0, 1.0)
    # Feeding pre-normalised input to an identity-normalised tower gives the same embedding.
    torch.testing.assert_close(
        model.encode_audio((specs + 60.0) / 20.0), shifted, atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("head", HEADS)
def test_checkpoint_round_trip_rebuilds_identical_model(tmp_path, head: str) -> None:
    model = _model(head)
    model.set_spec_stats(-55.0, 17.0)
    frames, specs, labels = _batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(frames, specs, labels).loss.backward()
    opt.step()
    model.eval()
    path = tmp_path / "ck" / "model.pt"
    sha = save_checkpoint(path, model, opt, step=7, rng={"seed": 3}, extra={"note": "x"})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left behind
    ck = load_checkpoint(path)
    assert ck.sha256 == sha and ck.step == 7 and ck.extra == {"note": "x"} and ck.rng == {"seed": 3}
    assert ck.model_cfg == model.model_cfg and ck.video_cfg == SMALL.video
    assert ck.preset == ck.model.preset == "small", "the preset name is recorded, not guessed"
    assert not ck.model.training
    assert torch.equal(ck.model.encode_visual(frames), model.encode_visual(frames))
    assert torch.equal(ck.model.encode_audio(specs), model.encode_audio(specs))
    opt2 = torch.optim.Adam(ck.model.parameters(), lr=1e-3)
    opt2.load_state_dict(ck.optimizer_state)
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def test_load_checkpoint_rejects_bad_files(tmp_path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(AvindexError, match=r"bad\.pt"):
        load_checkpoint(bad)
    with pytest.raises(AvindexError, match=r"missing\.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_random_checkpoint_is_seeded_and_labelled() -> None:
    a, b, c = random_checkpoint(0.125, 1), random_checkpoint(0.125, 1), random_checkpoint(0.125, 2)
    frames, _, _ = _batch()
    assert a.untrained and "untrained" in a.extra["label"]
    assert a.sha256 == b.sha256 != c.sha256
    assert torch.equal(a.model.encode_visual(frames), b.model.encode_visual(frames))
    assert not torch.equal(a.model.encode_visual(frames), c.model.encode_visual(frames))
    assert a.video_cfg == SMALL.video and a.preset == "small"
    paper = random_checkpoint(seed=0, preset="paper")
    assert paper.video_cfg.crop == 224 and paper.model_cfg.width == 1.0


def test_best_threshold_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 40))
        scores = torch.tensor(rng.normal(size=n))
        pos = torch.tensor(rng.random(n) < 0.5)
        acc = ((scores > best_threshold(scores, pos)) == pos).float().mean()
        candidates = [*scores.tolist(), scores.min().item() - 1]
        brute = max(((scores > c) == pos).float().mean() for c in candidates)
        assert acc == pytest.approx(brute.item(), abs=1e-9)


@pytest.mark.gpu
@pytest.mark.parametrize("head", HEADS)
def test_cuda_bf16_channels_last_matches_fp32(head: str) -> None:
    torch.manual_seed(0)
    model = _net(PAPER, head).eval()
    frames = torch.randn(4, 3, 224, 224)
    specs = torch.randn(4, 1, 257, 199) * 20 - 60
    want_v, want_a = model.encode_visual(frames), model.encode_audio(specs)
    model.cuda()
    got_v = model.encode_visual(frames.cuda()).cpu()
    got_a = model.encode_audio(specs.cuda()).cpu()
    assert got_v.dtype == torch.float32 and got_a.dtype == torch.float32
    # bf16 keeps ~3 significant digits: embeddings agree in direction, not bit for bit.
    cos = torch.nn.functional.cosine_similarity
    assert cos(got_v, want_v).min() > 0.99 and cos(got_a, want_a).min() > 0.99


@pytest.mark.gpu
def test_cuda_training_steps_and_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    model = _net(PAPER, "contrastive").cuda().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    frames = torch.randn(16, 3, 224, 224, device="cuda")
    specs = torch.randn(16, 1, 257, 199, device="cuda") * 20 - 60
    labels = (torch.arange(16, device="cuda") % 2).long()
    losses = []
    for _ in range(5):
        out = model(frames, specs, labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    save_checkpoint(tmp_path / "gpu.pt", model, opt, step=5)
    ck = load_checkpoint(tmp_path / "gpu.pt", device="cuda")
    assert torch.equal(ck.model.encode_visual(frames), model.encode_visual(frames))


def test_presets_are_named_and_unknown_names_are_user_errors() -> None:
    from avindex.presets import PRESETS, default_preset, get_preset

    assert set(PRESETS) >= {"small", "paper"} and get_preset("paper") is PAPER
    assert default_preset("cuda") is PAPER and default_preset("cpu") is SMALL
    with pytest.raises(AvindexError, match="--preset 'tiny'"):
        get_preset("tiny")
    wide = SMALL.configure(width=0.5, lr=0.01)
    assert wide.name == "small" and wide.model.width == 0.5 and wide.train.optim.lr == 0.01
    assert wide.video == SMALL.video and SMALL.model.width == 0.125
