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
