"""A job module that takes 1.2 s to import (workers: an import is not the job's silence)."""

from __future__ import annotations

import time
from collections.abc import Iterator

time.sleep(1.2)


def first_item_after(seconds: float) -> Iterator[int]:
    """Yields one item after `seconds`, then returns 2."""
    time.sleep(seconds)
    yield 1
    return 2
