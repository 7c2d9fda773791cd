"""A store writer process for multi-writer tests: embeds fake videos through WorkQueue.

usage: store_worker.py STORE N_VIDEOS MODE [SECONDS_PER_VIDEO]
MODE: run (embed until nothing is left), hold (claim 3 videos, print 'held', sleep),
crash-after-entry (die by SIGKILL once a shard's catalog entry is written, before its rename),
crash-after-flush (die once a shard is in place, before its claims say done).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]

from storefactory import clips_of, corpus, fake_video, make_meta, video_index  # noqa: E402

from avindex import store as store_module  # noqa: E402
from avindex.claims import WorkQueue  # noqa: E402
from avindex.config import ClaimConfig  # noqa: E402
from avindex.store import StoreWriter  # noqa: E402

CFG = ClaimConfig(ttl=5.0, heartbeat=0.2, done_grace=30.0)


def _die(*_: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    store, n, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    pause = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    if mode == "crash-after-entry":
        real = store_module.write_entry
        store_module.write_entry = lambda *a: (real(*a), _die())
    with WorkQueue(store, corpus(n), cfg=CFG) as work:
        if mode == "hold":
            held = [work.next() for _ in range(3)]
            print("held", *(video_index(r) for r in held), flush=True)
            time.sleep(600)
        on_flush = _die if mode == "crash-after-flush" else work.written
        with StoreWriter(store, make_meta(), shard_clips=10, on_flush=on_flush) as writer:
            while (record := work.next(wait=True, before_wait=writer.flush)) is not None:
                i = video_index(record)
                time.sleep(pause)
                writer.add_video(*fake_video(i, clips_of(i)))
                print(i, flush=True)


if __name__ == "__main__":
    main()
