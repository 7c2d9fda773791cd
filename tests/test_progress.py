"""progress.py: the embed summary names failures, totals, stages and decoders."""

from __future__ import annotations

from avindex.embed import EmbedReport
from avindex.progress import EmbedProgress
from avindex.reader import VideoRead
from avindex.store import VideoRecord


def test_summary_lists_failures_totals_and_decoders(capsys) -> None:
    report = EmbedReport(wall_seconds=2.0, videos_skipped=3)
    good = VideoRead(0, VideoRecord("/v/a.mp4", 1, 0.0, 10.0), 10, frames_total=250)
    good.frames_decoded = 125
    report.add(good, 10)
    report.add(VideoRead(1, VideoRecord("/v/b.mp4", 1, 0.0, 0.0), 0, error="no video"), 0)
    EmbedProgress.summary(report, "store")
    out = capsys.readouterr().out
    assert "failed: /v/b.mp4: no video" in out
    assert "1 videos embedded, 1 failed, 3 already done; 10 clips in store" in out
    assert "5.0 s of video per second" in out and "decoders: pyav 1 videos (0 fell back)" in out
    assert "50% of frames decoded" in out


def test_progress_is_silent_when_not_a_terminal(capsys) -> None:
    with EmbedProgress(enabled=True) as progress:  # pytest's stderr is not a tty
        progress.start(todo=2, skipped=1)
        progress.update(EmbedReport())
    err = capsys.readouterr().err
    assert "resuming: 1 videos already in the store" in err
    assert err.count("\n") == 1 and "\r" not in err, "no bar, no redraws: one line"
