"""Run index parts as Ray tasks (`avindex index --ray`; optional extra `dist`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import ray

from avindex.index_parts import PartResult, PartTask


class RayRunner:
    """Part tasks on a Ray cluster (the one `RAY_ADDRESS` names, or a local one), one CPU each.

    Every node must see the store at the same path (a shared filesystem): parts write their
    index files into its index folder. Ray retries a task whose worker died; the retry rewrites
    the same part file and the driver takes one result per part, so no row is added twice.
    """

    def __init__(self, cpus_per_task: int = 1) -> None:
        """Connect to Ray (ray.init) unless this process already has."""
        if not ray.is_initialized():
            ray.init()
        self.threads = cpus_per_task

    def map(
        self, fn: Callable[[PartTask], PartResult], tasks: Sequence[PartTask]
    ) -> Iterator[PartResult]:
        """Submit every task, then yield results as they finish; tasks still pending when the
        caller stops (a failed part, an interrupt) are cancelled, as LocalRunner's are."""
        remote = ray.remote(num_cpus=self.threads)(fn)
        pending = [remote.remote(t) for t in tasks]
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                yield ray.get(done[0])
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
