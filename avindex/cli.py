"""Typer CLI: one thin command per stage; heavy imports happen inside the commands."""

from __future__ import annotations

import sys

import typer

from avindex.errors import AvindexError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train L3-Net on your videos, embed every second, index with faiss, search across modalities.",
)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except AvindexError as exc:
        print(f"avindex: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("avindex: interrupted", file=sys.stderr)
        sys.exit(130)


@app.command()
def probe(
    paths: list[str] = typer.Argument(..., help="Media files or folders (searched recursively)."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list of dicts instead."),
) -> None:
    """Describe media files, or say in one line why each cannot be used.

    Example: avindex probe videos/ clip.mp4 --json
    """
    import json

    from avindex.media import probe as probe_file
    from avindex.scan import find_media

    infos = [probe_file(p) for p in find_media(paths)]
    if json_out:
        print(json.dumps([i.to_dict() for i in infos], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table("file", "container", "duration", "video", "fps", "audio")
    for i in (i for i in infos if i.usable):
        rotation = f" rot {i.rotation}" if i.rotation else ""
        fps = f"{i.avg_fps:g}" + (" VFR" if i.variable_fps else "")
        audio = f"{i.audio_codec} {i.sample_rate} Hz {i.channels} ch" if i.audio_codec else "none"
        video = f"{i.video_codec} {i.width}x{i.height}{rotation}"
        table.add_row(_short(i.path), i.container, f"{i.duration:.2f} s", video, fps, audio)
    console.print(table)
    bad = [i for i in infos if not i.usable]
    for i in bad:
        console.print(f"[red]unusable[/red] {_short(i.path)}: {i.error}", highlight=False)
    console.print(f"{len(infos)} files, {len(infos) - len(bad)} usable, {len(bad)} unusable")


def _short(path: str) -> str:
    """Path relative to the working directory when that is shorter (for tables)."""
    import os

    rel = os.path.relpath(path)
    return rel if len(rel) < len(path) else path


@app.command()
def synth(
    out: str = typer.Argument(..., help="Folder to write the corpus into."),
    videos: int = typer.Option(None, help="Number of videos."),
    seconds: int = typer.Option(None, help="Length of each video in whole seconds."),
    classes: int = typer.Option(None, help="Number of audio-visual event classes."),
    seed: int = typer.Option(None, help="Random seed (same seed, same corpus)."),
    fmt: str = typer.Option(None, "--format", help="mp4 (H.264+AAC) or webm (VP9+Opus)."),
    size: str = typer.Option(None, help="Frame size WxH, e.g. 128x96."),
    fps: float = typer.Option(None, help="Frames per second."),
) -> None:
    """Write a synthetic audio-visual corpus with per-second class labels (labels.csv).

    Example: avindex synth corpus/ --videos 40 --seconds 20 --classes 10 --seed 0
    """
    import time

    from avindex.config import SynthConfig, replace
    from avindex.synth import make_corpus

    width = height = None
    if size is not None:
        try:
            width, height = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise AvindexError(f"--size {size!r}: expected WxH, e.g. 128x96") from None
    cfg = replace(
        SynthConfig(),
        videos=videos,
        seconds=seconds,
        classes=classes,
        seed=seed,
        format=fmt,
        width=width,
        height=height,
        fps=fps,
    )
    start = time.perf_counter()
    labels = make_corpus(out, cfg)
    print(
        f"wrote {cfg.videos} videos ({cfg.seconds} s, {cfg.classes} classes, {cfg.format}) and "
        f"{labels} in {time.perf_counter() - start:.1f} s"
    )
