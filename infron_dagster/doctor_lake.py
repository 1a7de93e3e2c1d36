"""The lake as ``infron-dagster doctor`` reads it, and the checks of what only a person repairs.

A :class:`Lake` holds every pipeline folder under a storage root with each readable manifest
(:class:`Pipeline`, by partition segment and attempt); :func:`load_lake` reads them all, a
:class:`Finding` per unreadable one. The checks here report truth the doctor cannot derive
(manifests, results and failed tables) and the object-store locks a dead run left. The
caches are checked in :mod:`infron_dagster.doctor_caches`, the money in
:mod:`infron_dagster.doctor_money`; :func:`infron_dagster.doctor.check_lake` runs them all.

Example::

    lake = Lake("/data/lake", {}, repair=False, grace_seconds=600, lock_stale_seconds=300)
    load_lake(lake)
    [p.name for p in lake.pipelines]
    # -> ['rev']
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq
from upath import UPath

from .admission import LEDGER
from .collect import active_attempts
from .manifest import Manifest
from .storage import BatchStorage, decode_partition, encode_partition, pipeline_names
from .untrusted import printable

__all__ = [
    "Finding",
    "Lake",
    "Pipeline",
    "check_locks",
    "check_manifests",
    "check_tables",
    "load_lake",
]

_MANIFEST_RE = re.compile(r"^partition=([^/]+)/attempt=(\d+)\.json$")
_TABLE_RE = re.compile(r"^partition=([^/]+)/part-\d+\.parquet$")
_LOCK_RE = re.compile(r"^partition=([^/]+)/lock\.json$")


@dataclass
class Finding:
    """One inconsistency: the file, what is wrong, and what repairs it.

    ``repair`` says what ``--repair`` does (derivable); ``remedy`` what a user must do when
    the doctor cannot (or could not) repair it.

    Example:
        >>> Finding("lake/rev/_ledger/spend/partition=2026-01-02/a1-0f.json",
        ...         "unreadable budget entry", repair="rebuilt from its manifest").line()
        'REPAIRABLE lake/rev/_ledger/...: unreadable budget entry (--repair: rebuilt ...)'
    """

    file: str
    problem: str
    repair: str | None = None
    remedy: str | None = None
    repaired: bool = False

    @property
    def repairable(self) -> bool:
        """Whether the doctor can derive the file again (``--repair``)."""
        return self.repair is not None

    def line(self) -> str:
        """One line for a terminal."""
        if self.repaired:
            return f"REPAIRED   {self.file}: {self.problem} -> {self.repair}"
        if self.repairable and self.remedy is None:
            return f"REPAIRABLE {self.file}: {self.problem} (--repair: {self.repair})"
        return f"MANUAL     {self.file}: {self.problem}. Remedy: {self.remedy}"


# --- the lake as the doctor reads it -------------------------------------------------------


@dataclass
class Pipeline:
    """One pipeline folder: its storage and every readable manifest, by segment."""

    storage: BatchStorage
    manifests: dict[str, dict[int, Manifest]] = field(default_factory=dict)
    damaged: set[str] = field(default_factory=set)  # segments with an unreadable manifest

    @property
    def name(self) -> str:
        return self.storage.name

    def attempts(self, segment: str) -> list[Manifest]:
        """A segment's manifests, by attempt ascending."""
        found = self.manifests.get(segment, {})
        return [found[n] for n in sorted(found)]

    def open_attempts(self, segment: str) -> list[Manifest]:
        """The active attempts of a partition not collected yet (what the sensor tracks)."""
        active = active_attempts(self.attempts(segment))
        return active if active and active[-1].state != "collected" else []

    def manifest(self, partition_key: str | None, attempt: int) -> Manifest | None:
        return self.manifests.get(encode_partition(partition_key), {}).get(attempt)

    def key_of(self, segment: str) -> str | None:
        """The partition key of a segment (from its manifests when it is hashed)."""
        attempts = self.attempts(segment)
        return attempts[-1].partition_key if attempts else decode_partition(segment)


@dataclass
class Lake:
    root: str
    options: dict[str, Any]
    repair: bool
    grace_seconds: float
    lock_stale_seconds: float
    pipelines: list[Pipeline] = field(default_factory=list)
    manifest_findings: list[Finding] = field(default_factory=list)

    def store(self, name: str) -> BatchStorage:
        return BatchStorage(self.root, name, self.options)

    @property
    def is_local(self) -> bool:
        return self.store("_").is_local


def _load_pipeline(storage: BatchStorage) -> tuple[Pipeline, list[Finding]]:
    """Every manifest of a pipeline, read concurrently; a finding per unreadable one."""
    pipeline = Pipeline(storage)
    folder = storage.base / "manifests"
    names = [n for n in storage.list_files(folder) if _MANIFEST_RE.match(n)]
    raw = storage.read_many(folder / n for n in names)
    findings = []
    for name in sorted(names):
        match = _MANIFEST_RE.match(name)
        assert match is not None
        segment, attempt = match.group(1), int(match.group(2))
        path = folder / name
        manifest = _parse_manifest(raw[str(path)], segment, attempt)
        if isinstance(manifest, Manifest):
            pipeline.manifests.setdefault(segment, {})[attempt] = manifest
        elif not isinstance(manifest, FileNotFoundError):
            pipeline.damaged.add(segment)
            findings.append(_manifest_finding(storage, path, segment, manifest))
    return pipeline, findings


def _parse_manifest(data: bytes | Exception, segment: str, attempt: int) -> Manifest | Exception:
    """A manifest, or why the bytes are not the manifest of ``segment`` ``attempt``.

    Example:
        >>> _parse_manifest(b"", "a", 1)
        JSONDecodeError('Expecting value: line 1 column 1 (char 0)')
    """
    if isinstance(data, Exception):
        return data
    try:
        manifest = Manifest.from_dict(json.loads(data))
    except Exception as exc:
        return exc
    if manifest.attempt != attempt or encode_partition(manifest.partition_key) != segment:
        return ValueError(
            f"it says partition {printable(manifest.partition_key, 80)!r} attempt "
            f"{manifest.attempt}, not the one its path names"
        )
    return manifest


def _manifest_finding(storage: BatchStorage, path: UPath, segment: str, exc: Exception) -> Finding:
    """A damaged manifest: truth, so only a person can repair it."""
    dirs = ", ".join(f"{k}/partition={segment}" for k in ("manifests", "requests", "inputs", "raw"))
    return Finding(
        str(path),
        f"manifest unreadable ({type(exc).__name__}: {printable(exc, 160)}); the sensor and "
        "collection skip this partition",
        remedy=(
            "a manifest is the record of what was sent and paid and cannot be derived: "
            "restore this file (backup, bucket versioning); if it cannot be restored, move "
            f"the partition's folders aside ({dirs} under {storage.base}) and materialize the "
            "partition again (its rows are sent, and paid, again)"
        ),
    )


def load_lake(lake: Lake) -> None:
    root = lake.store("_").root
    for name in pipeline_names(root):
        pipeline, findings = _load_pipeline(lake.store(name))
        lake.pipelines.append(pipeline)
        lake.manifest_findings.extend(findings)


# --- the checks ------------------------------------------------------------------------------


def check_manifests(lake: Lake) -> list[Finding]:
    """Unreadable, foreign or misplaced manifests (truth: reported, never repaired).

    Example::

        [f.remedy is not None for f in check_manifests(lake)]
        # -> [True]
    """
    return list(lake.manifest_findings)


def check_tables(lake: Lake) -> list[Finding]:
    """Results and failed Parquet files whose footer cannot be read (reported: collecting
    the partition again writes them from the downloaded raw files).

    Example::

        check_tables(lake)
        # -> []
    """
    findings = []
    for pipeline in lake.pipelines:
        storage = pipeline.storage
        for kind in ("results", "failed"):
            folder = storage.table_root(kind)
            for name in sorted(storage.list_files(folder)):
                if match := _TABLE_RE.match(name):
                    finding = _check_table(pipeline, kind, folder / name, match.group(1))
                    findings += [finding] if finding else []
    return findings


def _check_table(pipeline: Pipeline, kind: str, path: UPath, segment: str) -> Finding | None:
    """A finding when the Parquet footer of ``path`` cannot be read."""
    try:
        with path.open("rb") as fh:
            pq.read_metadata(fh)
        return None
    except Exception as exc:
        why = f"{type(exc).__name__}: {printable(exc, 120)}"
    name, key = pipeline.name, printable(pipeline.key_of(segment), 80)
    return Finding(
        str(path),
        f"{kind} table unreadable ({why})",
        remedy=(
            f"materialize {name}_results and {name}_failed for partition {key!r} again: "
            "collection rewrites both tables from the downloaded raw files"
        ),
    )


def check_locks(lake: Lake) -> list[Finding]:
    """Object-store locks that are unreadable or whose holder stopped refreshing them
    (repair: delete when stale). Local locks are ``flock`` files, released by the kernel
    when their holder dies: nothing to check.

    Example::

        check_locks(lake)  # a lock.json last refreshed an hour ago
        # -> [Finding(file='s3://.../locks/partition=a/lock.json', problem='stale lock ...')]
    """
    if lake.is_local:
        return []
    folders = [p.storage.base / "locks" for p in lake.pipelines]
    folders += [p.storage.base / "_ledger" / "locks" for p in lake.pipelines]
    folders.append(lake.store(LEDGER).base / "locks")
    store = lake.store("_")
    findings = []
    for folder in folders:
        listed = store.list_files(folder)
        names = sorted(n for n in listed if _LOCK_RE.match(n))
        raw = store.read_many(folder / n for n in names)
        for name in names:
            finding = _check_lock(lake, store, folder / name, raw[str(folder / name)], listed[name])
            if finding is not None:
                findings.append(finding)
    return findings


def _lock_created(data: bytes | Exception) -> float | None:
    """When a lock's holder last proved alive, from its body; None when unreadable.

    Example:
        >>> _lock_created(b'{"token": "ab", "created": 1700000000.0}')
        1700000000.0
    """
    if isinstance(data, Exception):
        return None
    try:
        created = float(json.loads(data)["created"])
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, UnicodeDecodeError):
        return None
    return created if math.isfinite(created) else None


def _check_lock(
    lake: Lake, store: BatchStorage, path: UPath, data: bytes | Exception, mtime: float
) -> Finding | None:
    if isinstance(data, FileNotFoundError):
        return None  # released since the listing
    created = _lock_created(data)
    age = time.time() - (created if created is not None else (mtime or time.time()))
    limit = lake.lock_stale_seconds
    if created is not None and age <= limit:
        return None  # held by a live run
    what = "unreadable lock" if created is None else "stale lock"
    finding = Finding(
        str(path),
        f"{what}, last written {age:.0f} s ago (a live holder refreshes it every "
        f"{limit / 3:.0f} s)",
        repair="deleted (its holder is gone)",
    )
    if age <= limit:
        finding.repair = None
        finding.remedy = (
            f"no live holder writes an unreadable body, but it is younger than {limit:.0f} s: "
            "the next run breaks it once it is that old (or run doctor --repair again then, "
            "or delete it when no run is active)"
        )
    elif lake.repair:
        store.delete(path)
        finding.repaired = True
    return finding
