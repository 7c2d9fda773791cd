"""Rich progress bars and end-of-run summaries for long commands (off for --json output)."""

from __future__ import annotations

import sys

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from avindex.embed import EmbedReport


class EmbedProgress:
    """Progress of `embed` (videos, clips, clips/s), then a summary with stage times."""

    def __init__(self, enabled: bool = True) -> None:
        """A disabled progress prints nothing (for --json and tests)."""
        self.enabled = enabled and sys.stderr.isatty()
        self._progress = None
        self._task = None

    def __enter__(self) -> EmbedProgress:
        if self.enabled:
            self._progress = Progress(
                TextColumn("embed"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} videos"),
                TextColumn("{task.fields[clips]} clips, {task.fields[rate]:.1f} clips/s"),
                TimeElapsedColumn(),
                transient=True,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start(self, todo: int, skipped: int) -> None:
        """Called once the videos still to do are known."""
        if skipped:
            print(f"resuming: {skipped} videos already in the store", file=sys.stderr)
        if self._progress is not None:
            self._task = self._progress.add_task("embed", total=todo, clips=0, rate=0.0)

    def update(self, report: EmbedReport) -> None:
        """Called after each finished (or failed) video."""
        if self._progress is not None and self._task is not None:
            done = report.videos_done + report.videos_failed
            self._progress.update(
                self._task, completed=done, clips=report.clips, rate=report.clips_per_second
            )

    @staticmethod
    def summary(report: EmbedReport, store: str) -> None:
        """Failures (one line each), totals and where the time went."""
        for path, reason in report.failures:
            print(f"failed: {path}: {reason}")
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in report.stage_seconds.items())
        decoders = ", ".join(f"{name} {n}" for name, n in sorted(report.decoders.items()))
        print(
            f"{report.videos_done} videos embedded, {report.videos_failed} failed, "
            f"{report.videos_skipped} already done; {report.clips} clips in {store}\n"
            f"{report.video_seconds:.0f} s of video in {report.wall_seconds:.1f} s "
            f"({report.realtime_factor:.1f} s of video per second, "
            f"{report.clips_per_second:.1f} clips/s); time by stage: {stages}\n"
            f"decoders: {decoders or 'none'} videos ({report.fallbacks} fell back); "
            f"{100 * report.decoded_fraction:.0f}% of frames decoded"
        )
