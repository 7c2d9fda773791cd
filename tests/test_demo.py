"""The demo's wiring, end to end on a tiny corpus (quality is the training tests' business)."""

from __future__ import annotations

import json

import pytest

from avindex.config import DemoConfig, SynthConfig
from avindex.demo import run_demo

TINY = DemoConfig(
    corpus=SynthConfig(videos=10, seconds=5, classes=3, seed=5, width=64, height=48),
    train_seconds=4.0,
    queries_per_kind=1,
    k=3,
    device="cpu",
)


def test_demo_runs_every_stage_and_can_run_again(tmp_path):
    cfg = DemoConfig(**{**TINY.__dict__, "out": str(tmp_path / "demo")})
    for _ in range(2):  # a second run starts from a clean folder instead of failing on the first
        report = run_demo(cfg, say=lambda _: None)
    out = tmp_path / "demo"
    assert set(report.seconds) >= {"synth", "train", "embed", "index", "eval"}
    assert (out / "run" / "best.pt").exists() and (out / "store" / "index" / "index.json").exists()
    assert [p for p in report.sheets if p.endswith(".png")] and all(
        (out / p).exists() for p in report.sheets
    )
    kinds = {q["searched"] for q in report.queries}
    assert kinds == {"visual", "audio"}  # a sound searched pictures, a picture searched sounds
    assert all(len(q["result_classes"]) == TINY.k for q in report.queries)
    saved = json.loads((out / "demo.json").read_text())
    assert set(saved["eval"]["directions"]) == {
        "audio->visual",
        "visual->audio",
        "audio->audio",
        "visual->visual",
    }


def test_demo_trains_on_the_device_it_was_given(tmp_path, monkeypatch):
    """`avindex demo --device cpu` trains on the CPU too, not only embeds and searches there."""
    import dataclasses

    from avindex import train

    class Stop(Exception):
        """Ends the demo once training was asked for."""

    seen = {}

    def fake_train(videos, run, preset, labels):
        seen["device"] = preset.train.device
        raise Stop

    monkeypatch.setattr(train, "train", fake_train)
    corpus = SynthConfig(videos=2, seconds=2, classes=2, seed=5, width=32, height=24)
    cfg = dataclasses.replace(TINY, corpus=corpus, out=str(tmp_path / "demo"), device="cpu")
    with pytest.raises(Stop):
        run_demo(cfg, say=lambda _: None)
    assert seen == {"device": "cpu"}
