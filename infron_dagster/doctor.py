"""``infron-dagster doctor``: check a lake's control files against its manifests, repair
what can be derived from them, and say what cannot.

The manifests are the truth of what was sent, paid and collected; budget entries and the
results/failed tables are truth too, but a budget entry can be derived again from the
``spend`` record of the manifest that owns it. The in-flight index, the admission ledgers,
the answers files and the locks are caches or coordination files, derived from manifests
(or judged by age). So the doctor

- reports an unreadable manifest or results/failed table (truth it cannot derive), naming
  the file and the remedy;
- writes missing in-flight markers and removes stale ones;
- rebuilds an admission ledger that is unreadable, foreign or disagrees with the manifests;
- rebuilds (else deletes) an unreadable answers file;
- rebuilds a damaged budget entry from its manifest's ``spend`` record (deletes it when no
  manifest records it: nothing was sent under it);
- releases the reservations of attempts that created nothing;
- deletes object-store locks whose holder stopped refreshing them.

Run ``--repair`` when no submission runs: a rebuilt admission ledger forgets the
reservations a running submission made and has not created yet.

Example:
    >>> report = check_lake("/data/lake", repair=True)
    >>> print(report.summary())
    3 finding(s): 3 repaired, 0 remaining
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow.parquet as pq
from upath import UPath

from .admission import LEDGER, AdmissionControl, _entry_key, _valid_entry
from .budget import SpendLedger, _unpaid
from .collect import _ANSWERED, _MARKER_RE, CollectOutcome, _Answers, active_attempts
from .inflight import InFlightIndex
from .manifest import Manifest
from .reuse import ANSWERS, answers_path, write_answers
from .reuse import _parse as _parse_answers
from .storage import BatchStorage, decode_partition, encode_partition
from .untrusted import printable

__all__ = ["DoctorReport", "Finding", "check_lake", "main"]

_MANIFEST_RE = re.compile(r"^partition=([^/]+)/attempt=(\d+)\.json$")
_MARKER_NAME_RE = re.compile(r"^partition=([^/]+)/attempt=(\d+)\.json$")
_SPEND_RE = re.compile(r"^partition=([^/]+)/([^/]+)\.json$")
_ANSWERS_RE = re.compile(r"^partition=([^/]+)/answers\.parquet$")
_TABLE_RE = re.compile(r"^partition=([^/]+)/part-\d+\.parquet$")
_LOCK_RE = re.compile(r"^partition=([^/]+)/lock\.json$")
_BUDGET_ENTRY_RE = re.compile(r"^a(\d+)-[0-9a-f]{20}$")
DEFAULT_GRACE_SECONDS = 600.0
DEFAULT_LOCK_STALE_SECONDS = 300.0  # BatchStorage.lock's default


# --- the report ----------------------------------------------------------------------------


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


@dataclass
class DoctorReport:
    """What :func:`check_lake` found and did.

    Example:
        >>> report = check_lake("/data/lake")
        >>> report.healthy, [f.file for f in report.remaining]
        (False, ['/data/lake/rev/manifests/partition=a/attempt=1.json'])
    """

    root: str
    repair: bool
    pipelines: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def remaining(self) -> list[Finding]:
        """The findings not repaired."""
        return [f for f in self.findings if not f.repaired]

    @property
    def healthy(self) -> bool:
        """True when nothing is left to repair (or nothing was wrong)."""
        return not self.remaining

    def summary(self) -> str:
        """One line: how many findings, repaired and remaining."""
        fixed = sum(f.repaired for f in self.findings)
        manual = sum(not f.repaired and not f.repairable for f in self.remaining)
        return (
            f"{self.root}: {len(self.pipelines)} pipeline(s), {len(self.findings)} finding(s): "
            f"{fixed} repaired, {len(self.remaining)} remaining ({manual} need a person)"
        )


# --- the lake as the doctor reads it -------------------------------------------------------


@dataclass
class _Pipeline:
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
class _Lake:
    root: str
    options: dict[str, Any]
    repair: bool
    grace_seconds: float
    lock_stale_seconds: float
    pipelines: list[_Pipeline] = field(default_factory=list)
    manifest_findings: list[Finding] = field(default_factory=list)

    def store(self, name: str) -> BatchStorage:
        return BatchStorage(self.root, name, self.options)

    @property
    def is_local(self) -> bool:
        return self.store("_").is_local


def _pipeline_names(root: UPath, local: bool) -> list[str]:
    """The folders of ``root`` that hold a pipeline (a manifests or inflight folder)."""
    if not local:
        root.fs.invalidate_cache(root.path)
    try:
        names = [p.name for p in root.iterdir()]
    except FileNotFoundError:
        return []
    return sorted(
        n
        for n in names
        if not n.startswith("_")
        and ((root / n / "manifests").exists() or (root / n / "inflight").exists())
    )


def _load_pipeline(storage: BatchStorage) -> tuple[_Pipeline, list[Finding]]:
    """Every manifest of a pipeline, read concurrently; a finding per unreadable one."""
    pipeline = _Pipeline(storage)
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


def _load_lake(lake: _Lake) -> None:
    root = lake.store("_").root
    for name in _pipeline_names(root, lake.is_local):
        pipeline, findings = _load_pipeline(lake.store(name))
        lake.pipelines.append(pipeline)
        lake.manifest_findings.extend(findings)


# --- the checks ------------------------------------------------------------------------------


def check_manifests(lake: _Lake) -> list[Finding]:
    """Unreadable, foreign or misplaced manifests (truth: reported, never repaired).

    Example:
        >>> [f.remedy is not None for f in check_manifests(lake)]
        [True]
    """
    return list(lake.manifest_findings)


def check_tables(lake: _Lake) -> list[Finding]:
    """Results and failed Parquet files whose footer cannot be read (reported: collecting
    the partition again writes them from the downloaded raw files).

    Example:
        >>> check_tables(lake)
        []
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


def _check_table(pipeline: _Pipeline, kind: str, path: UPath, segment: str) -> Finding | None:
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


def check_locks(lake: _Lake) -> list[Finding]:
    """Object-store locks that are unreadable or whose holder stopped refreshing them
    (repair: delete when stale). Local locks are ``flock`` files, released by the kernel
    when their holder dies: nothing to check.

    Example:
        >>> check_locks(lake)  # a lock.json last refreshed an hour ago
        [Finding(file='s3://.../locks/partition=a/lock.json', problem='stale lock ...')]
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
    lake: _Lake, store: BatchStorage, path: UPath, data: bytes | Exception, mtime: float
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


def check_inflight(lake: _Lake) -> list[Finding]:
    """In-flight markers against the manifests: an open attempt without a marker (the
    sensor misses it until its next full rescan, up to a day) is marked; a marker of an
    attempt collected, replaced or never written (older than the grace) is removed.

    Example:
        >>> [f.problem for f in check_inflight(lake)]
        ["partition 'c' attempt 1 is not collected but has no in-flight marker ..."]
    """
    findings = []
    for pipeline in lake.pipelines:
        findings += _missing_markers(lake, pipeline) + _stale_markers(lake, pipeline)
    return findings


def _markers(storage: BatchStorage) -> dict[tuple[str, int], float]:
    listed = storage.list_files(storage.base / "inflight")
    return {
        (m.group(1), int(m.group(2))): mtime
        for name, mtime in listed.items()
        if (m := _MARKER_NAME_RE.match(name))
    }


def _missing_markers(lake: _Lake, pipeline: _Pipeline) -> list[Finding]:
    index = InFlightIndex(pipeline.storage)
    markers = _markers(pipeline.storage)
    findings = []
    for segment in sorted(pipeline.manifests):
        if segment in pipeline.damaged:
            continue
        for manifest in pipeline.open_attempts(segment):
            if (segment, manifest.attempt) in markers:
                continue
            finding = Finding(
                str(index.marker(segment, manifest.attempt)),
                f"partition {printable(manifest.partition_key, 80)!r} attempt "
                f"{manifest.attempt} is not collected but has no in-flight marker: the sensor "
                "does not see it until its next full rescan",
                repair="marker written",
            )
            if lake.repair:
                index.mark(manifest.partition_key, manifest.attempt)
                finding.repaired = True
            findings.append(finding)
    return findings


def _stale_markers(lake: _Lake, pipeline: _Pipeline) -> list[Finding]:
    """Markers the sensor should have removed by now: their attempt was collected, replaced
    or never written more than ``grace_seconds`` ago (a younger one is the index's usual
    lag: the sensor's next tick removes it)."""
    index = InFlightIndex(pipeline.storage)
    now, findings, stale = time.time(), [], []
    for (segment, attempt), mtime in sorted(_markers(pipeline.storage).items()):
        if segment in pipeline.damaged:
            continue
        if attempt in {m.attempt for m in pipeline.open_attempts(segment)}:
            continue
        why, since = _why_stale(pipeline.attempts(segment), attempt, mtime)
        if now - since < lake.grace_seconds:
            continue
        path = index.marker(segment, attempt)
        findings.append(
            Finding(
                str(path),
                f"stale in-flight marker ({why}): the sensor removes these on its ticks; "
                "is it running?",
                repair="removed",
            )
        )
        stale.append(path)
    if lake.repair and stale:
        pipeline.storage.delete_many(stale)
        for finding in findings:
            finding.repaired = True
    return findings


def _why_stale(attempts: list[Manifest], attempt: int, mtime: float) -> tuple[str, float]:
    """Why a marker of a closed attempt is stale, and since when (a UNIX time).

    Example:
        >>> _why_stale([], 1, 1700000000.0)
        ('no manifest was ever written for it', 1700000000.0)
    """
    known = {m.attempt: m for m in attempts}
    if attempt not in known:
        return "no manifest was ever written for it", mtime
    manifest = known[attempt]
    if manifest.state == "collected":
        return "the attempt is collected", _timestamp(manifest.collected_at, mtime)
    newer = [m for m in attempts if m.attempt > attempt]
    if manifest.state != "abandoned" and newer:
        return "a newer attempt replaced it", _timestamp(newer[0].created_at, mtime)
    return f"the attempt is {manifest.state}", mtime


def _timestamp(iso: str | None, default: float) -> float:
    """An ISO-8601 time as a UNIX time (``default`` when absent or not a time)."""
    try:
        when = datetime.fromisoformat(str(iso))
    except ValueError:
        return default
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


# --- admission ledgers -----------------------------------------------------------------------


def _expected_admission(lake: _Lake, scope: str) -> dict[str, dict[str, Any]]:
    """The entries a rebuild from the manifests gives ``scope`` (key -> batch id, chunk):
    every chunk created (or maybe created) by an open attempt counted against it."""
    expected: dict[str, dict[str, Any]] = {}
    for pipeline in lake.pipelines:
        for segment in pipeline.manifests:
            for manifest in pipeline.open_attempts(segment):
                if manifest.admission_scope != scope or manifest.state == "collected":
                    continue
                for chunk in manifest.chunks:
                    if chunk.batch_id or (chunk.uncertain and not manifest.cancelled):
                        key = _entry_key(
                            pipeline.name, manifest.partition_key, manifest.attempt, chunk.index
                        )
                        expected[key] = {"batch_id": chunk.batch_id, "manifest": manifest}
    return expected


def _read_admission(data: bytes | Exception) -> dict[str, dict[str, Any]] | Exception:
    """A ledger's entries, or why it is not a ledger this version wrote.

    Example:
        >>> _read_admission(b'{"version": 2, "entries": {}}')
        {}
    """
    if isinstance(data, Exception):
        return data
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        return exc
    entries = parsed.get("entries") if isinstance(parsed, dict) else None
    if not isinstance(entries, dict):
        return ValueError("no 'entries' object: not an admission ledger")
    bad = [k for k, e in entries.items() if not _valid_entry(e)]
    if bad:
        return ValueError(f"{len(bad)} entr(y/ies) this version does not understand")
    return entries


def _stale_admission(lake: _Lake, entry: dict[str, Any]) -> str | None:
    """Why a ledger entry that a rebuild would not keep is wrong; None when it is the
    reservation of a submission that may still create its chunk."""
    pipeline = next((p for p in lake.pipelines if p.name == entry["pipeline"]), None)
    where = (
        f"{entry['pipeline']} {printable(entry['partition_key'], 60)!r} attempt {entry['attempt']}"
    )
    manifest = pipeline.manifest(entry["partition_key"], entry["attempt"]) if pipeline else None
    if manifest is None:
        damaged = (
            pipeline is not None and encode_partition(entry["partition_key"]) in pipeline.damaged
        )
        return None if damaged else f"{where}: no manifest"
    if manifest.state in ("collected", "abandoned"):
        return f"{where}: {manifest.state}"
    chunk = next((c for c in manifest.chunks if c.index == entry["chunk"]), None)
    if chunk is None:
        return f"{where}: no chunk {entry['chunk']}"
    if manifest.cancelled and not chunk.batch_id:
        return f"{where}: cancelled"
    if chunk.batch_id:
        return f"{where}: not in flight (replaced, or another admission scope)"
    return None  # reserved, not created yet: its run settles it (the sensor, if it died)


def _admission_problems(
    lake: _Lake, entries: dict[str, dict[str, Any]], expected: dict[str, dict[str, Any]]
) -> list[str]:
    """What disagrees between a readable ledger and the manifests, as short phrases."""
    stale = [
        why
        for key, entry in sorted(entries.items())
        if key not in expected and (why := _stale_admission(lake, entry))
    ]
    missing = [
        f"{e['manifest'].name} {printable(e['manifest'].partition_key, 60)!r} attempt "
        f"{e['manifest'].attempt} batch {e['batch_id']}"
        for key, e in sorted(expected.items())
        if key not in entries
    ]
    differ = [
        f"{key}: {entries[key]['batch_id']} vs {e['batch_id']}"
        for key, e in sorted(expected.items())
        if key in entries and entries[key]["batch_id"] and entries[key]["batch_id"] != e["batch_id"]
    ]
    out = []
    if stale:
        out.append(f"{len(stale)} entr(y/ies) for attempts gone or done ({_few(stale)})")
    if missing:
        out.append(
            f"{len(missing)} chunk(s) in flight missing, their tokens not counted ({_few(missing)})"
        )
    if differ:
        out.append(
            f"{len(differ)} entr(y/ies) with another batch than the manifest ({_few(differ)})"
        )
    return out


def _few(items: Sequence[str], shown: int = 3) -> str:
    more = f", +{len(items) - shown} more" if len(items) > shown else ""
    return "; ".join(items[:shown]) + more


def check_admission(lake: _Lake) -> list[Finding]:
    """Admission ledgers (``<root>/_admission/<scope>.json``) against the manifests:
    unreadable or foreign, entries of attempts gone, collected or cancelled, chunks in flight
    missing. Repair: rebuild from the manifests (run the in-flight check first: the rebuild
    reads the in-flight index).

    Example:
        >>> [f.repair for f in check_admission(lake)]
        ['rebuilt from the manifests']
    """
    store = lake.store(LEDGER)
    scopes = {
        m.admission_scope
        for p in lake.pipelines
        for ms in p.manifests.values()
        for m in ms.values()
        if m.admission_scope
    }
    by_file = {f"{encode_partition(s)}.json": s for s in scopes}
    listed = [n for n in store.list_files(store.base) if "/" not in n and n.endswith(".json")]
    raw = store.read_many(store.base / n for n in listed)
    findings = []
    for name in sorted(set(listed) | set(by_file)):
        scope = by_file.get(name) or decode_partition(name[: -len(".json")])
        path = store.base / name
        data = raw.get(str(path), FileNotFoundError(str(path)))
        finding = _check_ledger(lake, path, scope, data)
        if finding is not None:
            findings.append(finding)
    return findings


def _check_ledger(
    lake: _Lake, path: UPath, scope: str | None, data: bytes | Exception
) -> Finding | None:
    expected = _expected_admission(lake, scope) if scope is not None else {}
    entries = _read_admission(data)
    if isinstance(entries, FileNotFoundError):
        if not expected:
            return None
        problem = f"missing while {len(expected)} chunk(s) are in flight"
    elif isinstance(entries, Exception):
        problem = f"unreadable ({type(entries).__name__}: {printable(entries, 120)})"
    else:
        problems = _admission_problems(lake, entries, expected)
        if not problems:
            return None
        problem = "; ".join(problems)
    finding = Finding(str(path), f"admission ledger {problem}", repair="rebuilt from the manifests")
    if scope is None:
        finding.repair = "deleted (a cache; its scope is unknown, rebuilt when next used)"
    if lake.repair:
        _repair_ledger(lake, path, scope)
        after = _read_admission(lake.store(LEDGER).read_many([path])[str(path)])
        if scope is None:
            finding.repaired = isinstance(after, FileNotFoundError)
        else:
            finding.repaired = isinstance(after, dict) and not _admission_problems(
                lake, after, expected
            )
        if not finding.repaired:
            finding.remedy = "still disagrees after the rebuild: a submission may run now; retry"
    return finding


def _repair_ledger(lake: _Lake, path: UPath, scope: str | None) -> None:
    if scope is None:
        lake.store(LEDGER).delete(path)
        return
    # The limit and output tokens matter only to admit: a rebuild counts what manifests hold.
    control = AdmissionControl(
        lake.store("_doctor"), max_enqueued_tokens=1, output_tokens=0, scope=scope
    )
    control.rebuild()


# --- budget entries --------------------------------------------------------------------------


def _is_amount(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _entry_problem(record: Any) -> str | None:
    """Why a budget entry's record cannot be counted as written; None when it can.

    Example:
        >>> _entry_problem({"partition_key": "a", "attempt": 1, "worst_cost": -2.0})
        'worst_cost -2.0 is not a finite amount >= 0'
    """
    if isinstance(record, Exception):
        return f"unreadable ({type(record).__name__}: {printable(record, 120)})"
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a budget entry"
    attempt, key = record.get("attempt"), record.get("partition_key")
    if isinstance(attempt, bool) or not isinstance(attempt, int):
        return "no attempt: not a budget entry"
    if not (key is None or isinstance(key, str)):
        return "no partition_key: not a budget entry"
    if not _is_amount(record.get("worst_cost")):
        return f"worst_cost {record.get('worst_cost')!r} is not a finite amount >= 0"
    actual = record.get("actual_cost")
    if actual is not None and not _is_amount(actual):
        return f"actual_cost {actual!r} is not a finite amount >= 0"
    return None


def _parse_entry(data: bytes | Exception) -> Any:
    if isinstance(data, Exception):
        return data
    try:
        return json.loads(data)  # Python reads NaN and Infinity: checked as amounts after
    except (ValueError, UnicodeDecodeError) as exc:
        return exc


def _budget_entries(pipeline: _Pipeline) -> list[tuple[str, str, UPath, Any, float]]:
    """Every budget entry: (day, entry name, path, record or exception, mtime)."""
    ledger = BatchStorage(str(pipeline.storage.base), "_ledger", _options(pipeline.storage))
    folder = ledger.base / "spend"
    listed = {n: t for n, t in ledger.list_files(folder).items() if _SPEND_RE.match(n)}
    raw = ledger.read_many(folder / n for n in listed)
    out = []
    for name in sorted(listed):
        match = _SPEND_RE.match(name)
        assert match is not None
        data = raw[str(folder / name)]
        if isinstance(data, FileNotFoundError):
            continue
        out.append(
            (match.group(1), match.group(2), folder / name, _parse_entry(data), listed[name])
        )
    return out


def _options(storage: BatchStorage) -> dict[str, Any]:
    return dict(getattr(storage.root, "storage_options", {}) or {})


def _owner(pipeline: _Pipeline, day: str, entry: str) -> Manifest | None:
    """The manifest whose ``spend`` record names this entry."""
    for attempts in pipeline.manifests.values():
        for manifest in attempts.values():
            spend = manifest.spend or {}
            if spend.get("entry") == entry and spend.get("day") == day:
                return manifest
    return None


def check_budget_entries(lake: _Lake) -> list[Finding]:
    """Budget entries that cannot be counted as written (unreadable, foreign, a cost that
    is negative or not finite). Repair: rebuilt from the ``spend`` record of the manifest
    that owns it; deleted when no manifest records it and it is older than the grace
    (nothing was sent under it); reported when the owner may be a damaged manifest.

    Example:
        >>> [f.repair for f in check_budget_entries(lake)]
        ["rebuilt from the manifest of 'a' attempt 1 (worst case 0.0012, not settled)"]
    """
    findings = []
    for pipeline in lake.pipelines:
        for day, entry, path, record, mtime in _budget_entries(pipeline):
            problem = _entry_problem(record)
            if problem is not None:
                findings.append(_repair_entry(lake, pipeline, day, entry, path, problem, mtime))
    return findings


def _repair_entry(
    lake: _Lake, pipeline: _Pipeline, day: str, entry: str, path: UPath, problem: str, mtime: float
) -> Finding:
    finding = Finding(str(path), f"budget entry {problem}")
    owner = _owner(pipeline, day, entry)
    worst = (owner.spend or {}).get("worst_cost") if owner else None
    if owner is not None and _is_amount(worst):
        finding.repair = (
            f"rebuilt from the manifest of {printable(owner.partition_key, 60)!r} attempt "
            f"{owner.attempt} (worst case {worst:.6g}; the actual cost is settled again when "
            "the partition is collected)"
        )
        action: Callable[[], None] = lambda: _write_entry(pipeline, day, path, owner)  # noqa: E731
    elif owner is None and _entry_owner_damaged(pipeline, entry):
        finding.remedy = (
            "the manifest that may own it is unreadable: restore that manifest (then run the "
            "doctor again), or delete this entry if its attempt created no batch"
        )
        return finding
    elif owner is None and time.time() - mtime >= lake.grace_seconds:
        finding.repair = "deleted: no manifest records it, so nothing was sent under it"
        action = lambda: _ledger_store(pipeline).delete(path)  # noqa: E731
    else:
        finding.remedy = (
            "its manifest records no usable worst case (or it was written moments ago): "
            "restore the entry, or delete it if its attempt created no batch"
        )
        return finding
    if lake.repair:
        with _ledger_store(pipeline).lock(day):
            action()
        finding.repaired = True
    return finding


def _ledger_store(pipeline: _Pipeline) -> BatchStorage:
    return BatchStorage(str(pipeline.storage.base), "_ledger", _options(pipeline.storage))


def _entry_owner_damaged(pipeline: _Pipeline, entry: str) -> bool:
    """Whether an unreadable manifest could be the one that owns ``entry``."""
    return bool(pipeline.damaged) and _BUDGET_ENTRY_RE.match(entry) is not None


def _write_entry(pipeline: _Pipeline, day: str, path: UPath, owner: Manifest) -> None:
    """An entry as its manifest's ``spend`` record says it was reserved (not settled: it
    counts the worst case until the partition's next collection settles it)."""
    record = {
        "partition_key": owner.partition_key,
        "attempt": owner.attempt,
        "worst_cost": float((owner.spend or {})["worst_cost"]),
        "actual_cost": None,
        "over_budget_allowed": None,
        "reserved_at": owner.created_at,
        "rebuilt_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rebuilt_from": "manifest (infron-dagster doctor)",
    }
    _ledger_store(pipeline).write_json(path, record)


def check_unpaid(lake: _Lake) -> list[Finding]:
    """Reservations of attempts that created nothing and never will (no manifest after the
    grace, cancelled, abandoned, nothing to send, replaced): they count against the day's
    budget for nothing. Repair: :meth:`SpendLedger.release_unpaid` for their days.

    Example:
        >>> [f.repair for f in check_unpaid(lake)]
        ['released (SpendLedger.release_unpaid)']
    """
    findings = []
    for pipeline in lake.pipelines:
        unpaid = _unpaid_entries(lake, pipeline)
        after: dict[str, Any] = {}
        if lake.repair and unpaid:
            SpendLedger(pipeline.storage).release_unpaid(
                grace_seconds=lake.grace_seconds, days=sorted({day for day, *_ in unpaid})
            )
            after = {str(p): r for _, _, p, r, _ in _budget_entries(pipeline)}
        for _, path, record, why in unpaid:
            finding = Finding(
                str(path),
                f"reservation of {printable(record.get('partition_key'), 60)!r} attempt "
                f"{record.get('attempt')} ({record.get('worst_cost')}) holds budget although "
                f"{why}",
                repair="released (SpendLedger.release_unpaid)",
            )
            if lake.repair:
                now = after.get(str(path))
                finding.repaired = not (isinstance(now, dict) and now.get("actual_cost") is None)
                if not finding.repaired:
                    finding.remedy = (
                        "a run holds the partition now: run the doctor again when it ends"
                    )
            findings.append(finding)
    return findings


def _unpaid_entries(
    lake: _Lake, pipeline: _Pipeline
) -> list[tuple[str, UPath, dict[str, Any], str]]:
    out = []
    for day, _, path, record, _ in _budget_entries(pipeline):
        if _entry_problem(record) is not None:
            continue
        if record.get("actual_cost") is not None or record.get("released"):
            continue
        key, attempt = record["partition_key"], record["attempt"]
        if encode_partition(key) in pipeline.damaged:
            continue
        manifest = pipeline.manifest(key, attempt)
        data = manifest.to_dict() if manifest else FileNotFoundError(str(path))
        why = _unpaid(day, path, record, data, lake.grace_seconds)
        if why is not None:
            out.append((day, path, record, why))
    return out


# --- answers files ---------------------------------------------------------------------------


def check_answers(lake: _Lake) -> list[Finding]:
    """Answers files (``reuse_answers="pipeline"``) that cannot be read: their answers are
    sent, and paid, again. Repair: rebuilt from the partition's result files, else deleted
    (a cache: the partition's next collection writes it again).

    Example:
        >>> [f.repair for f in check_answers(lake)]
        ['rebuilt from the result files (10 answer(s))']
    """
    findings = []
    for pipeline in lake.pipelines:
        storage = pipeline.storage
        folder = storage.base / ANSWERS
        names = sorted(n for n in storage.list_files(folder) if _ANSWERS_RE.match(n))
        raw = storage.read_many(folder / n for n in names)
        for name in names:
            error = _answers_error(raw[str(folder / name)])
            if error is None:
                continue
            segment = name.split("/", 1)[0][len("partition=") :]
            findings.append(_repair_answers(lake, pipeline, segment, folder / name, error))
    return findings


def _answers_error(data: bytes | Exception) -> Exception | None:
    if isinstance(data, FileNotFoundError):
        return None
    if isinstance(data, Exception):
        return data
    try:
        _parse_answers(data)
    except Exception as exc:
        return exc
    return None


def _repair_answers(
    lake: _Lake, pipeline: _Pipeline, segment: str, path: UPath, error: Exception
) -> Finding:
    finding = Finding(
        str(path),
        f"answers file unreadable ({type(error).__name__}: {printable(error, 120)}): its "
        "answers are not reused",
        repair="rebuilt from the result files (else deleted: a cache)",
    )
    if not lake.repair:
        return finding
    rows = None
    if pipeline.attempts(segment) and segment not in pipeline.damaged:
        try:
            rows = _rebuild_answers(pipeline, pipeline.key_of(segment))
        except Exception as exc:
            finding.problem += f"; rebuild failed ({type(exc).__name__}: {printable(exc, 120)})"
    if rows is None:
        pipeline.storage.delete(path)
        finding.repair = "deleted (a cache: the partition's next collection writes it again)"
    else:
        finding.repair = f"rebuilt from the result files ({rows} answer(s))"
    finding.repaired = True
    return finding


def _rebuild_answers(pipeline: _Pipeline, partition_key: str | None) -> int:
    """Write a partition's answers file again from its attempts' result files; the rows.

    Example:
        >>> _rebuild_answers(pipeline, "a")
        20
    """
    storage = pipeline.storage
    answers = _Answers(storage, partition_key, CollectOutcome(ready=True))
    raw = storage.list_files(storage.partition_dir("raw", partition_key))
    downloaded = {int(m.group(1)) for n in raw if (m := _MARKER_RE.match(n))}
    attempts = sorted(downloaded & {m.attempt for m in answers.manifests})
    write_answers(
        storage,
        partition_key,
        _ANSWERED.empty_table(),
        complete=(),  # nothing is listed yet: every attempt is read from its result files
        attempts=attempts,
        rebuild=answers._rebuild,
    )
    path = storage.fresh(answers_path(storage, partition_key))
    reader, _ = _parse_answers(path.read_bytes())
    return int(reader.metadata.num_rows)


# --- the whole check ---------------------------------------------------------------------------

# In repair order: locks before what takes them, markers before the ledger rebuilt from them.
CHECKS: tuple[Callable[[_Lake], list[Finding]], ...] = (
    check_manifests,
    check_tables,
    check_locks,
    check_inflight,
    check_admission,
    check_budget_entries,
    check_unpaid,
    check_answers,
)


def check_lake(
    root: str,
    storage_options: dict[str, Any] | None = None,
    repair: bool = False,
    *,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    lock_stale_seconds: float = DEFAULT_LOCK_STALE_SECONDS,
) -> DoctorReport:
    """Check every pipeline under ``root`` against its manifests; with ``repair``, derive
    again what can be derived (see the module docstring). ``grace_seconds``: how old a file
    without its manifest must be before it is judged left over (a submission may be between
    the two writes). ``lock_stale_seconds``: the pipelines' lock staleness (300 s default).

    Example:
        >>> report = check_lake("s3://lake/llm", {"anon": False}, repair=True)
        >>> report.healthy
        True
    """
    lake = _Lake(str(root), dict(storage_options or {}), repair, grace_seconds, lock_stale_seconds)
    _load_lake(lake)
    report = DoctorReport(str(root), repair, [p.name for p in lake.pipelines])
    for check in CHECKS:
        report.findings.extend(check(lake))
    return report


# --- the command ---------------------------------------------------------------------------------


def _option(text: str) -> tuple[str, Any]:
    """``key=value`` of ``--storage-option``: the value as JSON when it parses, else text.

    Example:
        >>> _option('client_kwargs={"endpoint_url": "http://127.0.0.1:9000"}')
        ('client_kwargs', {'endpoint_url': 'http://127.0.0.1:9000'})
    """
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, not {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infron-dagster", description="Tools for an infron-dagster lake."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser(
        "doctor",
        help="check a lake (manifests vs index vs ledgers vs files); --repair what derives",
        description=__doc__.split("Example:")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    doctor.add_argument("storage_root", help="the pipelines' storage_root (a path or s3://...)")
    doctor.add_argument("--repair", action="store_true", help="repair what can be derived")
    doctor.add_argument(
        "--storage-option",
        action="append",
        type=_option,
        default=[],
        metavar="KEY=VALUE",
        help="an fsspec storage option (value parsed as JSON when it can be); repeatable",
    )
    doctor.add_argument("--grace-seconds", type=float, default=DEFAULT_GRACE_SECONDS)
    doctor.add_argument("--lock-stale-seconds", type=float, default=DEFAULT_LOCK_STALE_SECONDS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``infron-dagster doctor <storage_root> [--repair] [--storage-option key=value ...]``:
    one line per finding and a summary; exit code 0 when healthy (or all repaired), else 1.

    Example:
        $ infron-dagster doctor s3://lake/llm --repair --storage-option anon=false
    """
    args = _parser().parse_args(argv)
    report = check_lake(
        args.storage_root,
        dict(args.storage_option),
        repair=args.repair,
        grace_seconds=args.grace_seconds,
        lock_stale_seconds=args.lock_stale_seconds,
    )
    _print(report.findings, report)
    return 0 if report.healthy else 1


def _print(findings: Iterable[Finding], report: DoctorReport) -> None:
    for finding in findings:
        print(finding.line())
    print(report.summary())
    if not report.repair and any(f.repairable for f in report.remaining):
        print("run again with --repair to repair what can be derived")


if __name__ == "__main__":
    sys.exit(main())
