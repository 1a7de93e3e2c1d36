"""The in-flight index: which attempts may still need the sensor, without reading history.

A sensor tick must not read every manifest ever written: after a year of daily partitions
that is thousands of reads per tick, for the handful of attempts actually in flight. So a
submission writes a small marker ``inflight/partition=<p>/attempt=<n>.json`` before it writes
the attempt's first manifest, and the sensor removes a marker once the manifests say the
attempt is collected or replaced. A tick then costs one listing of ``inflight/`` plus a read
of the manifests of the marked partitions only.

The manifests stay the truth; the index is a cache that errs on the side of reading more:

- a marker whose attempt is collected or replaced is removed when a tick sees it;
- a marker whose manifest does not exist yet (a submission between the two writes) is kept
  for ``grace_seconds``, then removed (the submission died before its intent);
- attempts written by a version without the index (an upgrade) are found by a full scan of
  the manifests whenever ``inflight/_index.json`` is missing, and again every
  ``rescan_seconds``; deleting that file forces one. A scan longer than
  ``scan_budget_seconds`` goes on over the next ticks (``inflight/_scan.json`` says where).

Example::

    index = InFlightIndex(storage)
    index.mark("2026-11-24", 1)            # submit: before the attempt's first manifest
    [a.partition_key for a in index.in_flight()]
    # -> ['2026-11-24']
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from upath import UPath

from .manifest import Manifest, now_iso
from .storage import BatchStorage, encode_partition
from .untrusted import printable

__all__ = ["InFlightIndex", "IndexedPartition", "load_active_attempts", "mark_in_flight"]

logger = logging.getLogger(__name__)

INDEX = "inflight"
SENTINEL = "_index.json"  # written when a full scan ends: the index is complete
PROGRESS = "_scan.json"  # where an unfinished full scan resumes
_ENTRY_RE = re.compile(r"^partition=([^/]+)/attempt=(\d+)\.json$")
DEFAULT_RESCAN_SECONDS = 24 * 3600.0
DEFAULT_GRACE_SECONDS = 3600.0
DEFAULT_SCAN_BUDGET_SECONDS = 15.0  # of a tick's 60 s: polling needs the rest
_SCAN_SLICE = 250  # partitions read per slice of a full scan, concurrently


def mark_in_flight(storage: BatchStorage, partition_key: str | None, attempt: int) -> None:
    """Record that ``attempt`` of a partition is about to exist: call before its manifest.

    Example::

        mark_in_flight(storage, "2026-11-24", 2)
    """
    InFlightIndex(storage).mark(partition_key, attempt)


@dataclass
class IndexedPartition:
    """One partition's active attempts (the latest initial and its retries), from manifests."""

    segment: str
    attempts: list[Manifest]

    @property
    def partition_key(self) -> str | None:
        return self.attempts[-1].partition_key

    @property
    def open(self) -> bool:
        """Its latest active attempt is not collected: it may still need the sensor."""
        return bool(self.attempts) and self.attempts[-1].state != "collected"


@dataclass
class _Listing:
    """What one listing of ``inflight/`` shows: markers per segment and the sentinel's age."""

    markers: dict[str, dict[int, float]] = field(default_factory=dict)
    built_at: float | None = None
    scanning: bool = False


class InFlightIndex:
    """Markers of uncollected attempts under ``<base>/inflight/``, checked against manifests.

    Example::

        partitions = InFlightIndex(storage, rescan_seconds=3600).in_flight()
    """

    def __init__(
        self,
        storage: BatchStorage,
        *,
        rescan_seconds: float | None = DEFAULT_RESCAN_SECONDS,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
        scan_budget_seconds: float = DEFAULT_SCAN_BUDGET_SECONDS,
        log: logging.Logger | None = None,
    ) -> None:
        self.storage = storage
        self.rescan_seconds = rescan_seconds
        self.grace_seconds = grace_seconds
        self.scan_budget_seconds = scan_budget_seconds
        self.log = log or logger
        self.scanned = 0  # partitions the last in_flight() call read by the full scan
        # Those partitions, open or not: what else the scan's reads can check (retry markers)
        self.scanned_partitions: list[IndexedPartition] = []

    @property
    def folder(self) -> UPath:
        return self.storage.base / INDEX

    def marker(self, segment: str, attempt: int) -> UPath:
        """``inflight/partition=<segment>/attempt=<n>.json``."""
        return self.storage.segment_dir(INDEX, segment) / f"attempt={attempt}.json"

    def mark(self, partition_key: str | None, attempt: int) -> None:
        """Write the marker of one attempt (idempotent: a rewrite changes nothing)."""
        self._write_marker(encode_partition(partition_key), partition_key, attempt)

    def in_flight(self) -> list[IndexedPartition]:
        """Every partition whose latest active attempt is not collected, from the index.

        Includes attempts still being submitted (the caller checks ``fully_submitted``).
        Removes the markers the manifests show are done. While a full scan is due (no index
        yet, or the last one older than ``rescan_seconds``) it also scans the manifests, for
        at most ``scan_budget_seconds`` per call, resuming where the last call stopped.
        """
        listing = self._list()
        scanned = self._scan_slice(listing) if self._scan_due(listing) else {}
        self.scanned = len(scanned)
        self.scanned_partitions = [p for p in scanned.values() if isinstance(p, IndexedPartition)]
        wanted = {seg: max(marks) for seg, marks in listing.markers.items() if seg not in scanned}
        loaded = {**load_active_attempts(self.storage, wanted, self.log), **scanned}
        self._prune(listing, loaded)
        return sorted(
            (p for p in loaded.values() if isinstance(p, IndexedPartition) and p.open),
            key=lambda p: p.segment,
        )

    # --- the listing ---------------------------------------------------------------------

    def _list(self) -> _Listing:
        listing = _Listing()
        for name, mtime in self.storage.list_files(self.folder).items():
            if name == SENTINEL:
                listing.built_at = mtime
            elif name == PROGRESS:
                listing.scanning = True
            elif match := _ENTRY_RE.match(name):  # anything else is not ours
                listing.markers.setdefault(match.group(1), {})[int(match.group(2))] = mtime
        return listing

    def _scan_due(self, listing: _Listing) -> bool:
        if listing.built_at is None or listing.scanning:
            return True
        if self.rescan_seconds is None:
            return False
        return time.time() - listing.built_at > self.rescan_seconds

    # --- the full scan: first use, upgrades, and the periodic check ----------------------

    def _scan_slice(self, listing: _Listing) -> dict[str, IndexedPartition | Exception | None]:
        """Scan the manifests from where the last slice stopped, within the time budget.

        Every open partition found gets its markers. Progress is saved after each slice, so
        a lake too big for one tick is scanned over several (a tick killed at 60 s would
        otherwise start over forever); the sentinel is written when the scan ends.
        """
        started = time.monotonic()
        progress = self.folder / PROGRESS
        after = self._resume_point(progress) if listing.scanning else ""
        latest: dict[str, int] = {}
        for name in self.storage.list_files(self.storage.base / "manifests"):
            if (match := _ENTRY_RE.match(name)) and match.group(1) > after:
                segment, attempt = match.group(1), int(match.group(2))
                latest[segment] = max(latest.get(segment, 0), attempt)
        todo = sorted(latest)
        scanned: dict[str, IndexedPartition | Exception | None] = {}
        while todo and (not scanned or time.monotonic() - started < self.scan_budget_seconds):
            batch, todo = todo[:_SCAN_SLICE], todo[_SCAN_SLICE:]
            loaded = load_active_attempts(self.storage, {s: latest[s] for s in batch}, self.log)
            self._mark_open(listing, loaded)
            scanned.update(loaded)
            if todo:
                self.storage.write_json(progress, {"after": batch[-1], "at": now_iso()})
        if not todo:
            opened = sum(isinstance(p, IndexedPartition) and p.open for p in scanned.values())
            self.storage.write_json(self.folder / SENTINEL, {"built_at": now_iso()})
            if listing.scanning or len(scanned) > _SCAN_SLICE:  # a progress file was written
                self.storage.delete(progress)
            self.log.info(
                f"{self.storage.name}: in-flight index checked against every manifest "
                f"({len(scanned)} partition(s) in this last part, {opened} open)"
            )
        else:
            self.log.info(
                f"{self.storage.name}: scanning manifests for the in-flight index: "
                f"{len(scanned)} partition(s) in {time.monotonic() - started:.1f}s, "
                f"{len(todo)} left for the next tick(s)"
            )
        return scanned

    def _resume_point(self, progress: UPath) -> str:
        try:
            after = self.storage.read_json(progress).get("after", "")
            return after if isinstance(after, str) else ""
        except (FileNotFoundError, ValueError, AttributeError):
            return ""  # at worst the scan starts over

    def _mark_open(
        self, listing: _Listing, loaded: dict[str, IndexedPartition | Exception | None]
    ) -> None:
        for partition in loaded.values():
            if not isinstance(partition, IndexedPartition) or not partition.open:
                continue
            for manifest in partition.attempts:
                if manifest.attempt not in listing.markers.get(partition.segment, {}):
                    self._write_marker(partition.segment, manifest.partition_key, manifest.attempt)

    def _write_marker(self, segment: str, partition_key: str | None, attempt: int) -> None:
        body = {"partition_key": partition_key, "attempt": attempt, "marked_at": now_iso()}
        self.storage.write_json(self.marker(segment, attempt), body)

    # --- removing what is done -----------------------------------------------------------

    def _prune(
        self, listing: _Listing, loaded: dict[str, IndexedPartition | Exception | None]
    ) -> None:
        """Delete the markers of attempts the manifests show collected or replaced."""
        now = time.time()
        stale: list[UPath] = []
        for segment, marks in listing.markers.items():
            partition = loaded.get(segment)
            if isinstance(partition, Exception):
                continue  # unreadable this tick: keep everything, decide when it reads
            keep = {m.attempt for m in partition.attempts} if partition and partition.open else ()
            newest = max((m.attempt for m in partition.attempts), default=0) if partition else 0
            for attempt, mtime in marks.items():
                pending = attempt > newest and now - mtime < self.grace_seconds
                if attempt not in keep and not pending:
                    stale.append(self.marker(segment, attempt))
        self.storage.delete_many(stale)


def load_active_attempts(
    storage: BatchStorage, latest: dict[str, int], log: logging.Logger | None = None
) -> dict[str, IndexedPartition | Exception | None]:
    """For each segment, its active attempts, reading as few manifests as possible.

    ``latest`` maps a segment to its newest known attempt. That manifest names its
    ``base_attempt``; only attempts ``base..latest`` can be active, so only they are read
    (concurrently). When the newest one is missing or abandoned, or one in between is
    missing, the segment's whole manifest folder is read instead. The result per segment is
    the partition, None when it has no manifest or no active attempt, or the exception that
    made its manifests unreadable (logged, and that partition only is skipped).
    """
    from .collect import active_attempts  # collect imports storage; keep this module light

    log = log or logger
    first = _read_manifests(storage, {(seg, n) for seg, n in latest.items()})
    extra = set()
    for segment, attempt in latest.items():
        newest = first.get((segment, attempt))
        if isinstance(newest, Manifest) and newest.state != "abandoned":
            extra.update((segment, a) for a in range(newest.base_attempt, attempt))
    read = {**first, **_read_manifests(storage, extra)}
    out: dict[str, IndexedPartition | Exception | None] = {}
    for segment, attempt in latest.items():
        try:
            manifests = _attempts_of(storage, segment, attempt, read)
            active = active_attempts(manifests)
        except Exception as exc:  # a corrupt or half-synced manifest: this partition only
            log.error(
                f"partition {printable(segment, 100)!r}: cannot read its manifests "
                f"({type(exc).__name__}: {printable(exc)}); skipped this tick"
            )
            out[segment] = exc
            continue
        out[segment] = IndexedPartition(segment, active) if active else None
    return out


def _attempts_of(
    storage: BatchStorage,
    segment: str,
    attempt: int,
    read: dict[tuple[str, int], Manifest | Exception | None],
) -> list[Manifest]:
    """Attempts ``base..attempt`` of a segment from what was read, or its whole folder."""
    newest = read.get((segment, attempt))
    if isinstance(newest, Exception):
        raise newest
    if isinstance(newest, Manifest) and newest.state != "abandoned":
        span = [read.get((segment, a)) for a in range(newest.base_attempt, attempt + 1)]
        if all(isinstance(m, Manifest) for m in span):
            return span  # type: ignore[return-value]
    return _whole_segment(storage, segment)


def _whole_segment(storage: BatchStorage, segment: str) -> list[Manifest]:
    """Every manifest of one segment, ascending: the slow, always-right path."""
    folder = storage.segment_dir("manifests", segment)
    numbers = sorted(
        int(m.group(1))
        for name in storage.list_files(folder)
        if (m := re.fullmatch(r"attempt=(\d+)\.json", name))
    )
    found = _read_manifests(storage, {(segment, n) for n in numbers})
    manifests = []
    for number in numbers:
        manifest = found[(segment, number)]
        if isinstance(manifest, Exception):
            raise manifest
        if manifest is not None:
            manifests.append(manifest)
    return manifests


def _read_manifests(
    storage: BatchStorage, wanted: Iterable[tuple[str, int]]
) -> dict[tuple[str, int], Manifest | Exception | None]:
    """Manifests by (segment, attempt), read concurrently: None when absent."""
    wanted = sorted(wanted)
    paths = {
        key: storage.segment_dir("manifests", key[0]) / f"attempt={key[1]}.json" for key in wanted
    }
    raw = storage.read_many(paths.values())
    out: dict[tuple[str, int], Manifest | Exception | None] = {}
    for key, path in paths.items():
        data = raw[str(path)]
        if isinstance(data, FileNotFoundError):
            out[key] = None
            continue
        try:
            if isinstance(data, Exception):
                raise data
            out[key] = Manifest.from_dict(json.loads(data))
        except Exception as exc:  # reported by the caller for this partition only
            out[key] = exc
    return out
