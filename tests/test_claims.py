"""Claims: one writer per video across threads and processes, dead writers' claims taken over by
exactly one contender, pid reuse, heartbeats and TTL, and writers killed and restarted at random."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from chaos import kill_and_restart
from storefactory import clips_of, copies_on_disk, corpus, fake_video, make_meta, video_index

from avindex import claims as claims_module
from avindex.claims import ClaimDir, WorkQueue
from avindex.config import ClaimConfig
from avindex.durable import WriterId
from avindex.errors import AvindexError
from avindex.store import Store, StoreWriter, VideoRecord

WORKER = Path(__file__).parent / "store_worker.py"
CFG = ClaimConfig(ttl=5.0, heartbeat=0.1, done_grace=30.0)
ELSEWHERE = WriterId("otherhost_0123abcd", 4242, 17)  # a writer on another machine


def embed(work: WorkQueue, store: Path) -> list[int]:
    """Embed everything `work` hands out (fake embeddings); returns the video indices."""
    done = []
    with StoreWriter(store, make_meta(), shard_clips=7, on_flush=work.written) as writer:
        while (record := work.next()) is not None:
            i = video_index(record)
            writer.add_video(*fake_video(i, clips_of(i)))
            done.append(i)
    return done


def forge_claim(
    store: Path, record: VideoRecord, writer: WriterId, heartbeat_age: float | None = 0.0
) -> Path:
    """A claim held by `writer`, whose heartbeat is `heartbeat_age` seconds old (None: none)."""
    claims = ClaimDir(store, CFG, uid=uuid.uuid4().hex)
    claims.me = writer
    claims.beat()
    alive = claims.alive_path(claims.uid)
    if heartbeat_age is None:
        alive.unlink()
    else:
        then = time.time() - heartbeat_age
        os.utime(alive, (then, then))
    path = claims.path(record.key)
    assert claims.create(path, "held", record.key) is not None
    return path


def test_one_writer_takes_every_video_once_and_a_rerun_skips_them(tmp_path: Path) -> None:
    records = corpus(20)
    with WorkQueue(tmp_path, records + records[:3], cfg=CFG) as work:
        assert work.remaining == 20
        assert sorted(embed(work, tmp_path)) == list(range(20))
    assert all(n == 1 for n in copies_on_disk(tmp_path).values())
    assert len(copies_on_disk(tmp_path)) == 20
    with WorkQueue(tmp_path, records, cfg=CFG) as work:
        assert (work.skipped, work.next()) == (20, None)


def test_two_queues_never_hand_out_one_video_twice(tmp_path: Path) -> None:
    records = corpus(10)
    with WorkQueue(tmp_path, records, cfg=CFG) as a, WorkQueue(tmp_path, records, cfg=CFG) as b:
        got_a, got_b = [], []
        while True:
            ra, rb = a.next(), b.next()
            got_a += [ra] if ra else []
            got_b += [rb] if rb else []
            if ra is None and rb is None:
                break
        assert not set(got_a) & set(got_b)
        assert set(got_a) | set(got_b) == set(records)
        assert set(b.held_elsewhere()) == set(got_a)
        a.close()  # gives up its claims without writing anything
        assert b.held_elsewhere() == []
        retaken = [b.next() for _ in got_a]
        assert set(retaken) == set(got_a) and b.next() is None


def test_a_filesystem_without_hard_links_still_gives_one_claim(tmp_path, monkeypatch) -> None:
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(claims_module.os, "link", no_links)
    (record,) = corpus(1)
    with WorkQueue(tmp_path, [record], cfg=CFG) as a, WorkQueue(tmp_path, [record], cfg=CFG) as b:
        assert a.next() == record and b.next() is None and b.held_elsewhere() == [record]
    assert not list((tmp_path / "claims").glob("*.tmp"))


def test_a_done_claim_covers_a_writer_with_an_older_catalog_view(tmp_path: Path) -> None:
    records = corpus(4)
    with WorkQueue(tmp_path, records, cfg=CFG) as late:  # reads the catalog now, not again soon
        with WorkQueue(tmp_path, records, cfg=CFG) as early:
            assert sorted(embed(early, tmp_path)) == [0, 1, 2, 3]
        claims = [json.loads(p.read_text()) for p in (tmp_path / "claims").glob("*.claim")]
        assert [c["state"] for c in claims] == ["done"] * 4
        assert late.next() is None and late.held_elsewhere() == []


def test_the_catalog_is_read_again_once_done_claims_may_have_expired(tmp_path: Path) -> None:
    records = corpus(3)
    cfg = ClaimConfig(ttl=5.0, heartbeat=0.1, done_grace=0.4)
    with WorkQueue(tmp_path, records, cfg=cfg) as late:
        with WorkQueue(tmp_path, records, cfg=cfg) as early:
            embed(early, tmp_path)
        for claim in (tmp_path / "claims").glob("*.claim"):
            claim.unlink()  # expired and swept
        time.sleep(0.3)  # longer than done_grace / 2 since `late` read the catalog
        assert late.next() is None
        assert not list((tmp_path / "claims").glob("*.claim"))  # its claim was given back


def test_claims_of_a_killed_process_are_taken_at_once(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, str(WORKER), str(tmp_path), "3", "hold"], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().split() == ["held", "0", "1", "2"]
    with WorkQueue(tmp_path, corpus(3), cfg=CFG) as work:
        assert work.next() is None and len(work.held_elsewhere()) == 3
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert work.held_elsewhere() == []  # same host, pid gone: no TTL to wait for
        assert {work.next(), work.next(), work.next()} == set(corpus(3))


def test_next_waits_for_videos_held_by_a_writer_that_dies(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, str(WORKER), str(tmp_path), "3", "hold"], stdout=subprocess.PIPE, text=True
    )
    holder.stdout.readline()
    killer = threading.Timer(0.5, holder.send_signal, [signal.SIGKILL])
    with WorkQueue(tmp_path, corpus(4), cfg=CFG) as work:
        assert work.next() == corpus(4)[3]
        assert work.next() is None
        killer.start()
        taken = {work.next(wait=True) for _ in range(3)}
        assert taken == set(corpus(3)) and work.next(wait=True) is None
    holder.wait()


def test_pid_reuse_is_a_dead_writer(tmp_path: Path) -> None:
    me = WriterId.current()
    reused, live = corpus(2)
    # Our pid with another start time: the writer that had this pid is gone, heartbeat or not.
    forge_claim(tmp_path, reused, WriterId(me.host, me.pid, me.start + 7))
    forge_claim(tmp_path, live, me)
    with WorkQueue(tmp_path, [reused, live], cfg=CFG) as work:
        assert work.next() == reused
        assert work.next() is None and work.held_elsewhere() == [live]


def test_a_writer_elsewhere_is_dead_once_its_heartbeat_is_older_than_the_ttl(tmp_path):
    fresh, old, missing = corpus(3)
    forge_claim(tmp_path, fresh, ELSEWHERE, heartbeat_age=1.0)
    forge_claim(tmp_path, old, ELSEWHERE, heartbeat_age=CFG.ttl + 5)
    forge_claim(tmp_path, missing, ELSEWHERE, heartbeat_age=None)
    with WorkQueue(tmp_path, corpus(3), cfg=CFG) as work:
        assert {work.next(), work.next()} == {old, missing}
        assert work.next() is None and work.held_elsewhere() == [fresh]


def test_the_heartbeat_keeps_a_live_writer_s_claims(tmp_path: Path) -> None:
    cfg = ClaimConfig(ttl=0.6, heartbeat=0.1, done_grace=30.0)
    (record,) = corpus(1)
    with WorkQueue(tmp_path, [record], cfg=cfg) as holder:
        assert holder.next() == record
        time.sleep(1.5)  # many TTLs: only the heartbeat keeps the claim
        with WorkQueue(tmp_path, [record], cfg=cfg) as other:
            assert other.next() is None and other.held_elsewhere() == [record]
    with WorkQueue(tmp_path, [record], cfg=cfg) as other:
        assert other.next() == record


def test_a_damaged_claim_is_busy_while_young_then_taken(tmp_path: Path) -> None:
    (record,) = corpus(1)
    claims = ClaimDir(tmp_path, CFG)
    claims.dir.mkdir(parents=True)
    claims.path(record.key).write_bytes(b"\x00garbage")
    with WorkQueue(tmp_path, [record], cfg=CFG) as work:
        assert work.next() is None and work.held_elsewhere() == [record]
        old = time.time() - CFG.ttl - 5
        os.utime(claims.path(record.key), (old, old))
        assert work.held_elsewhere() == [] and work.next() == record


def test_an_old_stale_verdict_never_removes_the_claim_that_replaced_it(tmp_path: Path) -> None:
    (record,) = corpus(1)
    path = forge_claim(tmp_path, record, ELSEWHERE, heartbeat_age=None)
    slow = ClaimDir(tmp_path, CFG, uid=uuid.uuid4().hex)
    slow.beat()
    verdict = slow.judge(path)
    assert verdict.kind == "stale"
    with WorkQueue(tmp_path, [record], cfg=CFG) as fast:
        assert fast.next() == record  # took the stale claim over: a new claim version
        assert slow.remove(path, verdict.id) == "changed"
        assert slow.judge(path).kind == "busy"


def test_takeover_tokens_let_one_taker_in_and_pass_dead_ones(tmp_path: Path) -> None:
    (record,) = corpus(1)
    path = forge_claim(tmp_path, record, ELSEWHERE, heartbeat_age=None)
    taker = ClaimDir(tmp_path, CFG, uid=uuid.uuid4().hex)
    taker.beat()
    verdict = taker.judge(path)
    token = path.with_name(f"{path.name}.take-{verdict.id}-0")
    other = ClaimDir(tmp_path, CFG, uid=uuid.uuid4().hex)
    other.beat()
    token.write_text(json.dumps(other._writer()))  # a live writer is taking it over right now
    assert taker.remove(path, verdict.id) == "busy" and path.exists()
    dead = {"uid": "b" * 32, "host": ELSEWHERE.host, "pid": 1, "start": 1}
    token.write_text(json.dumps(dead))  # ...a taker that died half way: the next number is free
    assert taker.remove(path, verdict.id) == "removed" and not path.exists()
    assert token.exists() and not token.with_name(token.name[:-1] + "1").exists()
    assert ClaimDir(tmp_path, CFG).sweep(remove=True)["stale tokens"] == [token.name]
    assert not token.exists()


def test_a_takeover_never_interleaves_with_the_owner_marking_its_claim_done(tmp_path) -> None:
    """The owner checks that the claim is still its own and then writes 'done'; a writer that
    judged the claim stale (its owner stalled) tries to take it over right between the two. One
    of them acts, never both (else the taker's claim is overwritten, or ours removed unseen)."""
    (record,) = corpus(1)
    owner = ClaimDir(tmp_path, CFG, uid=uuid.uuid4().hex)
    owner.beat()
    path = owner.path(record.key)
    cid = owner.create(path, "held", record.key)
    taker = ClaimDir(tmp_path, CFG, uid=uuid.uuid4().hex)
    taker.beat()
    taken: list[str] = []
    check = owner.current_id

    def check_then_taken_over(claim: Path) -> str | None:
        found = check(claim)
        taken.append(taker.remove(claim, cid))  # the taker acts right after the owner's check
        return found

    owner.current_id = check_then_taken_over
    marked = owner.replace_if_ours(path, cid, "done", record.key)
    assert [marked, taken] == [True, ["busy"]]
    assert taker.judge(path).kind == "done"
    owner.current_id = check
    assert owner.replace_if_ours(path, cid, None, record.key) is False  # no longer version cid


def test_failed_videos_are_taken_again_only_with_retry_failed(tmp_path: Path) -> None:
    bad, good = corpus(2)
    with StoreWriter(tmp_path, make_meta()) as writer:
        writer.add_failure(bad, "not a video")
        writer.add_video(*fake_video(1, clips_of(1)))
    with WorkQueue(tmp_path, [bad, good], cfg=CFG) as work:
        assert (work.skipped, work.next()) == (2, None)
    with WorkQueue(tmp_path, [bad, good], retry_failed=True, cfg=CFG) as work:
        assert (work.skipped, work.next(), work.next()) == (1, bad, None)


def test_opening_a_queue_sweeps_expired_done_claims_only(tmp_path: Path) -> None:
    records = corpus(2)
    with WorkQueue(tmp_path, records, cfg=CFG) as work:
        work.written([work.next().key, work.next().key])
    expired, young = (ClaimDir(tmp_path, CFG).path(r.key) for r in records)
    old = time.time() - CFG.done_grace - 5
    os.utime(expired, (old, old))
    with WorkQueue(tmp_path, [], cfg=CFG):
        assert not expired.exists() and young.exists()


def test_a_claims_folder_that_cannot_be_written_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "claims").write_text("a file where the claims folder belongs")
    with pytest.raises(AvindexError, match="cannot claim videos"):
        WorkQueue(tmp_path, corpus(1), cfg=CFG)


def test_close_releases_only_what_was_not_written(tmp_path: Path) -> None:
    records = corpus(2)
    with WorkQueue(tmp_path, records, cfg=CFG) as work:
        first, second = work.next(), work.next()
        work.written([first.key])
    claims = ClaimDir(tmp_path, CFG)
    assert claims.judge(claims.path(first.key)).kind == "done"
    assert claims.judge(claims.path(second.key)).kind == "free"
    assert not list((tmp_path / "claims" / "writers").iterdir())


def _contend(store: Path, record: VideoRecord, start: threading.Barrier, wins: list) -> None:
    start.wait()
    work = WorkQueue(store, [record], cfg=CFG)
    wins.append(work.next() is not None)
    start.wait()  # hold the claim until every contender has tried
    work.close()


def test_exactly_one_of_several_threads_takes_a_stale_claim(tmp_path: Path) -> None:
    for record in corpus(25):
        forge_claim(tmp_path, record, ELSEWHERE, heartbeat_age=None)
        start, wins = threading.Barrier(6), []
        threads = [
            threading.Thread(target=_contend, args=(tmp_path, record, start, wins))
            for _ in range(6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(wins) == [False] * 5 + [True], record
    assert not list((tmp_path / "claims").glob("*.take-*"))


def contend_in_process(store: Path, rounds: int, start, results) -> None:
    """Spawned contender: try each round's stale claim once, report, hold it until all tried."""
    for record in corpus(rounds):
        start.wait()
        work = WorkQueue(store, [record], cfg=CFG)
        results.put((record.path, os.getpid(), work.next() is not None))
        start.wait()
        work.close()


def test_exactly_one_of_several_processes_takes_a_stale_claim(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    n, rounds = 4, 3
    start, results = ctx.Barrier(n + 1), ctx.Queue()
    procs = [
        ctx.Process(target=contend_in_process, args=(tmp_path, rounds, start, results))
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    for record in corpus(rounds):
        forge_claim(tmp_path, record, ELSEWHERE, heartbeat_age=CFG.ttl * 2)
        start.wait()  # go
        outcomes = [results.get(timeout=60) for _ in range(n)]
        start.wait()  # all tried: release
        assert {o[0] for o in outcomes} == {record.path}
        assert sum(o[2] for o in outcomes) == 1, outcomes
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0


def _writer(store: Path, videos: int) -> subprocess.Popen:
    args = [sys.executable, str(WORKER), str(store), str(videos), "run", "0.02"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("writers", [2, 4])
def test_writers_killed_and_restarted_at_random_store_every_video_once(tmp_path, writers):
    """SIGKILL writers at random (seeded) moments and restart them; after a final run every
    video's rows are on disk exactly once (claims, not read-time de-duplication, did that)."""
    rng = random.Random(writers)
    videos = 60 * writers
    procs = [_writer(tmp_path, videos) for _ in range(writers)]
    # Each writer has ~1.2 s of work (60 videos at 20 ms): the kills come well inside it.
    kills = kill_and_restart(
        procs, lambda: _writer(tmp_path, videos), 3 * writers, rng, (0.05, 0.4)
    )
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    final = _writer(tmp_path, videos)
    assert final.wait(timeout=300) == 0, final.stderr.read()
    assert kills >= writers
    copies = copies_on_disk(tmp_path)
    assert set(copies) == {r.key for r in corpus(videos)}
    assert max(copies.values()) == 1
    store = Store(tmp_path)
    assert store.hidden_clips == 0
    assert store.num_clips == sum(clips_of(i) for i in range(videos))
    rows = [(c.path, c.t0) for c in store.clips(range(store.num_clips))]
    assert len(set(rows)) == len(rows)
