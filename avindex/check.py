"""`avindex check`: verify every shard completely, the catalog, leftover tmp files and claims;
with repair, move bad shards aside into `quarantine/` (never deleted) and clear what dead writers
left behind."""

from __future__ import annotations

import collections
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from avindex import isolated
from avindex.catalog import (
    CATALOG_DIR,
    Catalog,
    drop_entry,
    entry_path,
    entry_videos,
    shard_names,
    write_entry,
)
from avindex.claims import ClaimDir
from avindex.config import ClaimConfig
from avindex.durable import TMP_SUFFIX, fsync_path, stale_tmp, write_text_durably
from avindex.errors import AvindexError
from avindex.shard import ShardError, ShardSummary, verify_reading
from avindex.store import CLAIMS_DIR, tmp_files

QUARANTINE_DIR = "quarantine"
REASON_SUFFIX = ".reason.txt"


@dataclass
class Finding:
    """One thing `check` found: a line naming the file, whether it is a problem, what repair did."""

    what: str
    problem: bool = True  # False: information only (live writers, duplicates shown once)
    repaired: str = ""  # what --repair did about it ('' when nothing)

    @property
    def remaining(self) -> bool:
        """A problem that is still there."""
        return self.problem and not self.repaired

    def line(self) -> str:
        """The finding as one line of output."""
        if self.repaired:
            return f"repaired: {self.what} -> {self.repaired}"
        return f"{'problem' if self.problem else 'note'}: {self.what}"


@dataclass
class CheckReport:
    """What `check_store` found in a store."""

    store: str
    shards: int = 0
    good: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """No problem remains (after repair, when repairing)."""
        return not any(f.remaining for f in self.findings)

    def add(self, what: str, problem: bool = True, repaired: str = "") -> Finding:
        """Record a finding and return it (repair fills in `repaired`)."""
        finding = Finding(what, problem, repaired)
        self.findings.append(finding)
        return finding

    def summary(self) -> str:
        """One closing line."""
        remaining = sum(f.remaining for f in self.findings)
        state = "clean" if not remaining else f"{remaining} problems remain"
        return f"{self.store}: {self.shards} shards, {self.good} good; {state}"

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {**asdict(self), "clean": self.clean}


def check_store(
    store_dir: str | os.PathLike[str], repair: bool = False, cfg: ClaimConfig | None = None
) -> CheckReport:
    """Verify a store; with `repair`, quarantine bad shards, rewrite wrong catalog entries and
    remove what dead writers left (tmp files, claims). Live writers' files are never touched."""
    root = Path(store_dir)
    if not root.is_dir():
        raise AvindexError(f"{root}: no such store directory")
    cfg = cfg or ClaimConfig()
    report = CheckReport(str(root))
    good = _check_shards(root, repair, cfg, report)
    _check_models(root, good, repair, cfg, report)
    report.good = len(good)
    _check_orphan_entries(root, repair, report)
    _check_tmp(root, repair, report)
    _check_claims(root, repair, cfg, report)
    _note_duplicates(good, report)
    earlier = [p for p in (root / QUARANTINE_DIR).glob("shard-*") if p.suffix != ".txt"]
    if earlier:
        report.add(f"{QUARANTINE_DIR}/ holds {len(earlier)} shards moved aside", problem=False)
    return report


def _check_shards(
    root: Path, repair: bool, cfg: ClaimConfig, report: CheckReport
) -> dict[str, ShardSummary]:
    """Read every shard completely and compare it with its catalog entry; returns good ones."""
    catalog = Catalog(root, rewrite=False)
    good = {}
    for name in shard_names(root):
        summary = _check_shard(root, name, catalog, repair, cfg, report)
        if summary is not None:
            good[name] = summary
    return good


def _check_shard(
    root: Path,
    name: str,
    catalog: Catalog,
    repair: bool,
    cfg: ClaimConfig,
    report: CheckReport,
) -> ShardSummary | None:
    """Verify one shard (in the isolated reader) and its entry; None when it is bad."""
    report.shards += 1
    path = root / name
    try:
        stat = path.stat()
        # Step by step: the reader's stall limit is then per block, not per shard, so a big
        # shard on a slow disk is not taken for one that hangs HDF5 (and quarantined).
        summary = isolated.call(verify_reading, path)
    except (ShardError, OSError) as exc:
        finding = report.add(f"{name}: unreadable ({exc})")
        if repair:
            _quarantine(root, name, finding, cfg)
        return None
    except AvindexError as exc:  # a newer schema: not damaged, this avindex cannot tell
        report.add(str(exc))
        return None
    entry = catalog.entry(name, stat)
    if entry != summary:
        why = "missing or stale" if entry is None else "different from the shard"
        finding = report.add(f"{CATALOG_DIR}/{name}.json: catalog entry {why}")
        if repair:
            try:
                write_entry(root, name, summary, stat)
                finding.repaired = "rewritten"
            except OSError as exc:
                finding.what += f" (cannot rewrite: {exc.strerror or exc})"
    return summary


def _check_models(
    root: Path, good: dict[str, ShardSummary], repair: bool, cfg: ClaimConfig, report: CheckReport
) -> None:
    """Shards whose model or settings differ from the store's majority (by rows)."""
    rows: collections.Counter[tuple] = collections.Counter()
    for summary in good.values():
        rows[summary.meta.compat_key] += summary.rows + 1
    if len(rows) < 2:
        return
    reference_key = rows.most_common(1)[0][0]
    reference = next(s.meta for s in good.values() if s.meta.compat_key == reference_key)
    for name, summary in list(good.items()):
        why = reference.mismatch(summary.meta)
        if why:
            del good[name]
            finding = report.add(f"{name}: embedded with another model than the rest ({why})")
            if repair:
                _quarantine(root, name, finding, cfg)


def _quarantine(root: Path, name: str, finding: Finding, cfg: ClaimConfig) -> None:
    """Move a shard into quarantine/ with a note of why (the finding), drop its catalog entry and
    its videos' done claims, so the next embed takes its videos again."""
    folder = root / QUARANTINE_DIR
    target = folder / name
    n = 0
    while target.exists() or _note_path(target).exists():
        n += 1
        target = folder / f"{name}.{n}"
    try:
        folder.mkdir(exist_ok=True)
        os.rename(root / name, target)
        fsync_path(root)
        write_text_durably(_note_path(target), finding.what + "\n")
    except OSError as exc:
        finding.what += f" (cannot move it aside: {exc.strerror or exc})"
        return
    table = entry_videos(root, name)
    drop_entry(root, name)
    if table is not None and (root / CLAIMS_DIR).is_dir():
        ClaimDir(root, cfg).forget_done(table.keys())
    finding.repaired = f"moved to {QUARANTINE_DIR}/{target.name}; `embed` embeds its videos again"


def _note_path(target: Path) -> Path:
    return target.with_name(target.name + REASON_SUFFIX)


def _check_orphan_entries(root: Path, repair: bool, report: CheckReport) -> None:
    """Catalog entries whose shard is not there (a writer died between the two): ignored by
    readers, removed by repair unless the shard is being renamed into place right now."""
    folder = root / CATALOG_DIR
    if not folder.is_dir():
        return
    present = set(shard_names(root))
    for entry in sorted(folder.glob("shard-*.json")):
        shard = entry.name[: -len(".json")]
        if shard in present or any(root.glob(f"{shard}.*{TMP_SUFFIX}")):
            continue
        finding = report.add(f"{CATALOG_DIR}/{entry.name}: entry of a missing shard", False)
        if repair:
            entry_path(root, shard).unlink(missing_ok=True)
            finding.repaired = "removed"


def _check_tmp(root: Path, repair: bool, report: CheckReport) -> None:
    """Tmp files: those of dead writers are problems (repair removes them), others in progress."""
    for tmp in tmp_files(root):
        name = str(tmp.relative_to(root))
        if not stale_tmp(tmp):
            report.add(f"{name}: being written by a live writer", problem=False)
            continue
        finding = report.add(f"{name}: tmp file left by a dead writer")
        if repair:
            tmp.unlink(missing_ok=True)
            finding.repaired = "removed"


def _check_claims(root: Path, repair: bool, cfg: ClaimConfig, report: CheckReport) -> None:
    """Claims: those of dead writers are problems (repair removes them), live ones are noted."""
    if not (root / CLAIMS_DIR).is_dir():
        return
    found = ClaimDir(root, cfg).sweep(remove=repair)
    for kind, what in (
        ("stale claims", "claims of dead writers (or expired)"),
        ("stale tokens", "takeover tokens of dead writers"),
        ("dead writers", "heartbeat files of dead writers"),
    ):
        if found.get(kind):
            report.add(f"{CLAIMS_DIR}/: {len(found[kind])} {what}", True, "removed" * repair)
    if found.get("held"):
        report.add(f"{CLAIMS_DIR}/: {len(found['held'])} videos claimed by live writers", False)


def _note_duplicates(good: dict[str, ShardSummary], report: CheckReport) -> None:
    """Videos held by more than one shard (readers show the first copy only)."""
    copies: collections.Counter[tuple] = collections.Counter()
    clips = 0
    for summary in good.values():
        for key, n in zip(summary.videos.keys(), summary.videos.n_clips, strict=True):
            if n:
                copies[key] += 1
                clips += n if copies[key] > 1 else 0
    twice = sum(1 for c in copies.values() if c > 1)
    if twice:
        report.add(
            f"{twice} videos are stored more than once ({clips} extra clips); "
            "readers show each video's first copy",
            problem=False,
        )
