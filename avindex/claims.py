"""Per-video claims: many writers (processes on many machines sharing one store folder) never
embed the same video twice, and the claims of a writer that died expire.

Files under `STORE/claims/`:

- `writers/<uid>.alive`: one per running WorkQueue, naming its host, pid and the pid's start
  time; its mtime is the writer's heartbeat, refreshed every `ClaimConfig.heartbeat` seconds by a
  background thread.
- `<sha1 of the video key>.claim`: `{id, state, writer, key}`. It appears complete or not at
  all: written to a tmp file, then hard-linked to its name (link fails when the name exists, also
  on NFS), so exactly one of several writers creates it.

A claim found in place is judged:

- `held` by a live writer: busy, try the video later;
- `held` by a dead writer: stale. Dead means a process of this host (same boot, same pid
  namespace) whose pid is gone or now belongs to a process started at another time, or a writer
  whose heartbeat file is missing or older than `ttl` (ages are measured on the file server's
  clock: against the mtime of our own heartbeat file, so clock skew between machines does not
  matter);
- `done`: its writer wrote the video's shard. For `done_grace` seconds this tells writers whose
  view of the catalog is older that the video is done; after that it is stale and the catalog
  alone decides (a writer re-reads the catalog at least every `done_grace / 2`, and always after
  taking over a stale claim);
- unreadable (damaged): busy while younger than `ttl`, stale after.

A stale claim with id I is taken over by exactly one contender: it creates `<claim>.take-I-<n>`
with O_EXCL (one creator per I and n; a token whose creator died is passed by using n + 1),
checks that the claim still holds I, removes it, drops the token and creates its own claim (link
again: a fresh claimer may win, then it is busy). Any claim a writer obtains is followed by a
check of the catalog, so a video finished meanwhile is released and skipped. A writer changing
its own claim (to done, or releasing it) holds the same token, so a takeover never interleaves
with the change.

A writer that stalls longer than `ttl` while alive can lose a claim to another writer, and then
both may write the video; readers show one copy (Store hides duplicates), so this costs time,
never correctness.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avindex.catalog import Catalog, finished
from avindex.config import ClaimConfig
from avindex.durable import WriterId, tmp_path
from avindex.errors import AvindexError
from avindex.store import CLAIMS_DIR, VideoKey, VideoRecord

WRITERS_DIR = "writers"
CLAIM_SUFFIX = ".claim"
ALIVE_SUFFIX = ".alive"
MAX_TAKEOVER_TOKENS = 8  # takers that died mid-takeover on one claim before we call it busy
_ID = re.compile(r"[0-9a-f]{32}")
_TOKEN = re.compile(r"^([0-9a-f]{40})\.claim\.take-([0-9a-z]{32})-(\d+)$")

log = logging.getLogger("avindex.store")


def claim_name(key: VideoKey) -> str:
    """File name of a video's claim: a digest of its key (path, size, mtime)."""
    return hashlib.sha1(json.dumps(list(key)).encode()).hexdigest() + CLAIM_SUFFIX


@dataclass(frozen=True)
class Verdict:
    """What a claim file in place means: 'free' (none), 'busy', 'done' or 'stale' (id to take)."""

    kind: str
    id: str = ""
    writer: str = ""  # uid of the claim's writer (empty when unknown)


def _identify(raw: bytes) -> tuple[str, dict[str, Any] | None]:
    """Claim id and parsed content; a damaged claim gets an id derived from its bytes."""
    try:
        data = json.loads(raw)
        if isinstance(data, dict) and _ID.fullmatch(str(data.get("id", ""))):
            return str(data["id"]), data
    except (ValueError, RecursionError):
        pass
    return "x" + hashlib.sha1(raw).hexdigest()[:31], None


def _read(path: Path) -> tuple[os.stat_result, bytes] | None:
    """Stat and bytes of one file version (None when it does not exist)."""
    try:
        with open(path, "rb") as fh:
            return os.fstat(fh.fileno()), fh.read(1 << 16)
    except FileNotFoundError:
        return None


class ClaimDir:
    """The claims folder of a store as seen by one writer (or by an observer such as `check`)."""

    def __init__(self, store_dir: Path, cfg: ClaimConfig, uid: str | None = None) -> None:
        """Claims of `store_dir`; `uid` names this writer (None: an observer claiming nothing)."""
        self.dir = store_dir / CLAIMS_DIR
        self.cfg = cfg
        self.uid = uid
        self.me = WriterId.current()
        if uid is not None:
            (self.dir / WRITERS_DIR).mkdir(parents=True, exist_ok=True)
        self._clock: tuple[float, float] | None = None  # (file server time, monotonic) pair

    # --- time and liveness -------------------------------------------------------------------

    def alive_path(self, uid: str) -> Path:
        """Heartbeat file of writer `uid`."""
        return self.dir / WRITERS_DIR / f"{uid}{ALIVE_SUFFIX}"

    def beat(self) -> None:
        """Refresh this writer's heartbeat (creating its file if needed) and the server clock."""
        assert self.uid is not None
        path = self.alive_path(self.uid)
        try:
            os.utime(path)
        except FileNotFoundError:  # first beat, or removed by a sweep while we were stalled
            tmp = tmp_path(path)
            tmp.write_text(json.dumps(self._writer()))
            os.replace(tmp, path)
        self._clock = (path.stat().st_mtime, time.monotonic())

    def now(self) -> float:
        """The file server's clock now: our last heartbeat's mtime plus the time since (observers
        without a heartbeat probe it once with a tmp file)."""
        if self._clock is None:
            probe = tmp_path(self.dir / "clock")
            try:
                probe.write_bytes(b"")
                self._clock = (probe.stat().st_mtime, time.monotonic())
            except OSError:  # a read-only store: this host's clock is the best left
                self._clock = (time.time(), time.monotonic())
            finally:
                probe.unlink(missing_ok=True)
        server, mono = self._clock
        return server + time.monotonic() - mono

    def _writer(self) -> dict[str, Any]:
        return {"uid": self.uid, "host": self.me.host, "pid": self.me.pid, "start": self.me.start}

    def writer_dead(self, writer: Any) -> bool:
        """Whether the writer described in a claim or token no longer runs (see module doc)."""
        try:
            uid = str(writer["uid"])
            wid = WriterId(str(writer["host"]), int(writer["pid"]), int(writer["start"]))
        except (KeyError, TypeError, ValueError):
            return True
        if not _ID.fullmatch(uid) or wid.dead_here():
            return True
        try:
            mtime = self.alive_path(uid).stat().st_mtime
        except FileNotFoundError:
            return True
        return self.now() - mtime > self.cfg.ttl

    # --- claims ------------------------------------------------------------------------------

    def path(self, key: VideoKey) -> Path:
        """Claim file of a video."""
        return self.dir / claim_name(key)

    def judge(self, path: Path) -> Verdict:
        """What the claim at `path` means now."""
        found = _read(path)
        if found is None:
            return Verdict("free")
        stat, raw = found
        cid, data = _identify(raw)
        age = self.now() - stat.st_mtime
        if data is None:
            return Verdict("busy" if age <= self.cfg.ttl else "stale", cid)
        writer = data.get("writer")
        uid = str(writer.get("uid", "")) if isinstance(writer, dict) else ""
        if data.get("state") == "done":
            return Verdict("done" if age <= self.cfg.done_grace else "stale", cid, uid)
        if uid and uid == self.uid:
            return Verdict("busy", cid, uid)  # our own (held elsewhere in this process)
        return Verdict("stale" if self.writer_dead(writer) else "busy", cid, uid)

    def create(self, path: Path, state: str, key: VideoKey) -> str | None:
        """Create the claim if no claim exists; returns its id, or None when one exists."""
        cid = uuid.uuid4().hex
        body = json.dumps({"id": cid, "state": state, "writer": self._writer(), "key": list(key)})
        tmp = tmp_path(path)
        tmp.write_text(body)
        try:
            os.link(tmp, path)
        except FileExistsError:
            # NFS may report EEXIST for a link whose first reply was lost: then it is ours.
            return cid if os.stat(tmp).st_nlink == 2 else None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            return self._create_excl(path, body, cid)  # a filesystem without hard links
        finally:
            tmp.unlink(missing_ok=True)
        return cid

    @staticmethod
    def _create_excl(path: Path, body: str, cid: str) -> str | None:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w") as fh:  # readers judge it busy while it is empty and young
            fh.write(body)
        return cid

    def current_id(self, path: Path) -> str | None:
        """Id of the claim at `path` now (None: no claim)."""
        found = _read(path)
        return None if found is None else _identify(found[1])[0]

    def remove(self, path: Path, judged: str) -> str:
        """Remove the claim judged (stale, or done) with id `judged`, as the only one doing so.

        Returns 'removed', 'changed' (it is no longer that claim: judge again) or 'busy'
        (another writer is taking it over right now).
        """
        with self._acting_on(path, judged) as outcome:
            if outcome == "held":
                path.unlink(missing_ok=True)
                return "removed"
            return outcome

    @contextlib.contextmanager
    def _acting_on(self, path: Path, cid: str) -> Iterator[str]:
        """Hold the takeover token of claim version `cid` while the block runs, so no other
        writer acts on that version meanwhile. Yields 'held' (the claim is still `cid`),
        'changed' (it is not) or 'busy' (another live writer holds the token)."""
        for n in range(MAX_TAKEOVER_TOKENS):
            token = path.with_name(f"{path.name}.take-{cid}-{n}")
            try:
                fd = os.open(token, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._token_dead(token):
                    continue  # its taker died mid-takeover: the next number is free
                break
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(json.dumps(self._writer()))
                yield "held" if self.current_id(path) == cid else "changed"
            finally:
                token.unlink(missing_ok=True)
            return
        yield "busy"

    def _token_dead(self, token: Path) -> bool:
        found = _read(token)
        if found is None:
            return False  # just finished: judge the claim again
        stat, raw = found
        try:
            writer = json.loads(raw)
        except (ValueError, RecursionError):
            return self.now() - stat.st_mtime > self.cfg.ttl
        return self.writer_dead(writer)

    def replace_if_ours(self, path: Path, cid: str, state: str | None, key: VideoKey) -> bool:
        """Replace our claim `cid` by a new one in `state` (None: remove it); False when the claim
        is no longer ours (taken over while this writer stalled). Holding the claim's takeover
        token, so a writer that judges it stale cannot take it between the check and the write."""
        with self._acting_on(path, cid) as outcome:
            if outcome != "held":
                return False
            if state is None:
                path.unlink(missing_ok=True)
                return True
            tmp = tmp_path(path)
            body = {
                "id": uuid.uuid4().hex,
                "state": state,
                "writer": self._writer(),
                "key": list(key),
            }
            tmp.write_text(json.dumps(body))
            os.replace(tmp, path)
            return True

    def forget_done(self, keys: Iterable[VideoKey]) -> int:
        """Remove the done claims of these videos (their shard was moved aside), so the next
        embed takes them again at once; returns how many were removed."""
        removed = 0
        for key in keys:
            path = self.path(key)
            verdict = self.judge(path)
            if verdict.kind in ("done", "stale") and self.remove(path, verdict.id) == "removed":
                removed += 1
        return removed

    # --- sweeping ----------------------------------------------------------------------------

    def sweep(self, remove: bool, min_age: float = 0.0) -> dict[str, list[str]]:
        """Find (and with `remove`, delete) what dead writers left: stale claims, expired done
        claims, takeover tokens of finished takeovers, heartbeat files. Returns file names by
        kind, plus the live claims ('held', 'done') for reports. Claims younger than `min_age`
        seconds are not read (a writer opening sweeps only expired done claims and old leftovers:
        a dead writer's young claim is taken over when someone wants its video)."""
        found: dict[str, list[str]] = collections.defaultdict(list)
        now = self.now()
        for path in sorted(self.dir.glob("*" + CLAIM_SUFFIX)):
            with contextlib.suppress(FileNotFoundError):
                if min_age and now - path.stat().st_mtime < min_age:
                    continue
            verdict = self.judge(path)
            if verdict.kind == "stale":
                found["stale claims"].append(path.name)
                if remove:
                    self.remove(path, verdict.id)
            elif verdict.kind in ("busy", "done"):
                found["held" if verdict.kind == "busy" else "done"].append(path.name)
        for token in sorted(self.dir.glob("*.take-*")):
            match = _TOKEN.match(token.name)
            claim = self.dir / f"{match[1]}{CLAIM_SUFFIX}" if match else None
            # Only tokens of a claim version that is gone: a token of a live version may still
            # serialise its takers.
            if claim is None or (self.current_id(claim) != match[2] and self._token_dead(token)):
                found["stale tokens"].append(token.name)
                if remove:
                    token.unlink(missing_ok=True)
        for alive in sorted((self.dir / WRITERS_DIR).glob("*" + ALIVE_SUFFIX)):
            uid = alive.name[: -len(ALIVE_SUFFIX)]
            found_alive = _read(alive)
            if uid != self.uid and found_alive and self._heartbeat_dead(uid, found_alive[1]):
                found["dead writers"].append(alive.name)
                if remove:
                    alive.unlink(missing_ok=True)
        return dict(found)

    def _heartbeat_dead(self, uid: str, raw: bytes) -> bool:
        """Whether a heartbeat file's writer is dead (its content names host, pid and start)."""
        try:
            writer = {**json.loads(raw), "uid": uid}
        except (ValueError, TypeError, RecursionError):
            writer = {}
        return self.writer_dead(writer)


def _unwritable(store_dir: Path, exc: OSError) -> AvindexError:
    return AvindexError(
        f"{store_dir / CLAIMS_DIR}: cannot claim videos ({exc.strerror or exc}); the store "
        "folder must be writable by every writer"
    )


class WorkQueue:
    """Hands out videos to embed, each to one writer of all those sharing the store.

    Use as a context manager around the StoreWriter whose `on_flush` is `written`, so the writer
    is closed (its last shard flushed and its videos released as written) before the claims of
    anything unwritten are released::

        with WorkQueue(store, records, retry_failed) as work:
            with StoreWriter(store, meta, on_flush=work.written) as writer:
                while (record := work.next(wait=True, before_wait=writer.flush)):
                    writer.add_video(record, *embed(record))

    Thread safe: `next` may run in a reader thread while `written` runs in the writer's.
    """

    def __init__(
        self,
        store_dir: str | os.PathLike[str],
        records: Sequence[VideoRecord],
        retry_failed: bool = False,
        cfg: ClaimConfig | None = None,
    ) -> None:
        """Queue the `records` that are neither done nor (unless `retry_failed`) failed in the
        store; starts this writer's heartbeat and sweeps what dead writers left behind."""
        self.dir = Path(store_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg or ClaimConfig()
        if not 0 < self.cfg.heartbeat < self.cfg.ttl:
            raise AvindexError(
                f"claim heartbeat {self.cfg.heartbeat} s must be positive and below the ttl "
                f"{self.cfg.ttl} s"
            )
        self.retry_failed = retry_failed
        self._lock = threading.RLock()
        self._records = {r.key: r for r in records}
        self._catalog = Catalog(self.dir)
        self._done: set[VideoKey] = set()
        self._refreshed_at = -float("inf")
        self._refresh()
        self._todo = collections.deque(k for k in self._records if k not in self._done)
        self.skipped = len(self._records) - len(self._todo)  # done before this queue started
        self.claimed = 0  # videos this queue handed out
        self._busy: dict[VideoKey, None] = {}  # held by live writers elsewhere (ordered set)
        self._held: dict[VideoKey, str] = {}  # ours: key -> claim id
        self._tombstones: collections.deque[tuple[float, VideoKey]] = collections.deque()
        try:
            self.claims = ClaimDir(self.dir, self.cfg, uuid.uuid4().hex)
            self.claims.beat()
            self.claims.sweep(remove=True, min_age=self.cfg.done_grace)
        except OSError as exc:
            raise _unwritable(self.dir, exc) from exc
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name="avindex-claims", daemon=True)
        self._thread.start()

    @property
    def remaining(self) -> int:
        """Videos this queue may still hand out (not yet tried, or held by writers elsewhere)."""
        return len(self._todo) + len(self._busy)

    def next(
        self, wait: bool = False, before_wait: Callable[[], object] | None = None
    ) -> VideoRecord | None:
        """Claim and return the next video neither done nor claimed by a live writer.

        Returns None when nothing can be taken now. With `wait`, it waits instead while videos
        are held by live writers elsewhere (they may die), returning None once none is. Before
        waiting it calls `before_wait`, which must write what this writer still buffers (e.g.
        `StoreWriter.flush`): two writers waiting for each other's unwritten videos would
        otherwise wait forever.
        """
        flushed = False
        while True:
            with self._lock:
                record = self._take()
            if record is not None or not wait:
                return record
            if before_wait is not None and not flushed:
                before_wait()
                flushed = True
            held = self.held_elsewhere()
            if self._todo:
                continue  # some were freed: their writers died
            if not held:
                return None
            self._stop.wait(self.cfg.heartbeat)

    def _take(self) -> VideoRecord | None:
        try:
            return self._take_next()
        except OSError as exc:
            raise _unwritable(self.dir, exc) from exc

    def _take_next(self) -> VideoRecord | None:
        while self._todo:
            key = self._todo.popleft()
            if key in self._done:
                continue
            path = self.claims.path(key)
            outcome, took_over = self._claim(path, key)
            if outcome == "done":
                self._done.add(key)
            elif outcome == "busy":
                self._busy[key] = None
            else:
                self._refresh(force=took_over)
                if key in self._done:  # finished by another writer since we last looked
                    self.claims.replace_if_ours(path, outcome, None, key)
                    continue
                self._held[key] = outcome
                self.claimed += 1
                return self._records[key]
        return None

    def _claim(self, path: Path, key: VideoKey) -> tuple[str, bool]:
        """('done' | 'busy' | our claim id, whether a stale claim was taken over)."""
        took_over = False
        for _ in range(4):  # the claim may change under us a few times; then call it busy
            cid = self.claims.create(path, "held", key)
            if cid is not None:
                return cid, took_over
            verdict = self.claims.judge(path)
            if verdict.kind in ("busy", "done"):
                return verdict.kind, False
            if verdict.kind == "stale":
                if self.claims.remove(path, verdict.id) == "busy":
                    return "busy", False
                took_over = True
        return "busy", False

    def _refresh(self, force: bool = True) -> None:
        """Read shards written since the last look, when forced or when the last look is older
        than half the done grace (done claims cover videos finished since)."""
        now = time.monotonic()
        if not force and now - self._refreshed_at < self.cfg.done_grace / 2:
            return
        self._refreshed_at = now
        summaries = self._catalog.summaries
        new = [summaries[n] for n in self._catalog.refresh() if n in summaries]  # not unreadable
        self._done |= finished(new, self.retry_failed)

    def held_elsewhere(self) -> list[VideoRecord]:
        """Re-examine videos found claimed by other writers: returns those still held by live
        writers; finished ones are dropped, those whose writer died are offered by `next` again."""
        with self._lock:
            self._refresh()
            still = []
            for key in list(self._busy):
                verdict = (
                    Verdict("done")
                    if key in self._done
                    else self.claims.judge(self.claims.path(key))
                )
                if verdict.kind == "busy":
                    still.append(self._records[key])
                    continue
                del self._busy[key]
                if verdict.kind == "done":
                    self._done.add(key)
                else:
                    self._todo.append(key)
            return still

    def written(self, keys: Iterable[VideoKey]) -> None:
        """Mark videos as durably written (call after their shard is in place): their claims say
        'done' for `done_grace` seconds, then go."""
        with self._lock:
            for key in keys:
                cid = self._held.pop(key, None)
                if cid is None:
                    continue
                self._done.add(key)
                if self.claims.replace_if_ours(self.claims.path(key), cid, "done", key):
                    self._tombstones.append((self.claims.now(), key))
                else:
                    log.warning(
                        "%s: its claim was taken over while this writer stalled; readers show "
                        "one copy if it is written twice",
                        key[0],
                    )

    def release(self, keys: Iterable[VideoKey]) -> None:
        """Give up claims of videos that will not be written by this writer."""
        with self._lock:
            for key in keys:
                cid = self._held.pop(key, None)
                if cid is not None:
                    self.claims.replace_if_ours(self.claims.path(key), cid, None, key)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.cfg.heartbeat):
            try:
                self.claims.beat()
                self._drop_old_tombstones()
            except OSError as exc:  # keep beating: the filesystem may come back
                log.warning("%s: cannot refresh the claims heartbeat (%s)", self.dir, exc)

    def _drop_old_tombstones(self) -> None:
        with self._lock:
            while self._tombstones and (
                self.claims.now() - self._tombstones[0][0] > self.cfg.done_grace
            ):
                _, key = self._tombstones.popleft()
                path = self.claims.path(key)
                verdict = self.claims.judge(path)
                if verdict.kind == "stale" and verdict.writer == self.claims.uid:
                    self.claims.remove(path, verdict.id)

    def close(self) -> None:
        """Stop the heartbeat and release every claim not marked written; safe to call twice."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            self.release(list(self._held))
        with contextlib.suppress(OSError):
            self.claims.alive_path(self.claims.uid).unlink(missing_ok=True)

    def __enter__(self) -> WorkQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
