"""PROGRESS: where each in-flight partition stands, as the sensor reports it.

The sensor polls the batches of every partition in flight (an :class:`InFlight`); this
module turns what the provider answered into a :class:`Progress` per partition, the asset
observations of those whose progress changed since the last tick, and the tick's one-line
skip reason, so the asset pages and the sensor's tick list show progress instead of
"0 runs requested".

Example:
    >>> p = Progress(attempt=1, run_key="rev:a:1:20261124", known=True, requests_total=200,
    ...              completed=90, failed=10, settled=100, batches_total=2,
    ...              batches_finished=1, elapsed=600.0)
    >>> p.percent, p.eta, format_duration(p.eta)
    (50.0, 600.0, '10 min')
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import dagster as dg

from .manifest import Manifest
from .models import Batch
from .status import STATUS
from .untrusted import printable

__all__ = [
    "InFlight",
    "Progress",
    "format_duration",
    "measure_progress",
    "parse_timestamp",
    "progress_observations",
    "skip_reason",
]

logger = logging.getLogger(__name__)


@dataclass
class InFlight:
    """One partition whose latest active attempt is not collected yet: its batches are in
    flight (``settled``), or some of its chunks are still to be created.

    Example::

        partition = InFlight("2026-11-24", active_attempts(load_manifests(storage, "2026-11-24")))
        partition.latest.attempt, partition.settled, partition.batch_ids
        # -> (2, True, ['batch_abc', 'batch_def'])
    """

    partition_key: str | None
    attempts: list[Manifest]

    @property
    def latest(self) -> Manifest:
        return self.attempts[-1]

    @property
    def settled(self) -> bool:
        """No attempt will create more batches: the partition only waits for them to end."""
        return all(m.settled for m in self.attempts)

    @property
    def batch_ids(self) -> list[str]:
        """The batches of its uncollected attempts, and of the in-flight attempts they carry
        answers from (collection waits for those too)."""
        live = [m for m in self.attempts if m.state != "collected"]
        return [bid for m in live for bid in (*m.batch_ids, *m.waiting_batch_ids)]


@dataclass
class Progress:
    """Where one in-flight partition stands this tick, as the provider reports it.

    A batch that is terminal counts all of its requests as settled (what it did not finish
    never will: collection fails those rows); a live batch counts what it completed or failed.
    ``known`` is False when some batch did not answer this tick.

    Example:
        >>> p = Progress(attempt=1, run_key="rev:a:1:20261124", known=True, requests_total=4,
        ...              completed=1, failed=0, settled=1, batches_total=1,
        ...              batches_finished=0, elapsed=None)
        >>> p.percent, p.signature
        (25.0, '1.20261124:1+0=1/4:0/1')
    """

    attempt: int
    run_key: str
    known: bool
    requests_total: int
    completed: int
    failed: int
    settled: int
    batches_total: int
    batches_finished: int
    elapsed: float | None

    @property
    def percent(self) -> float:
        """Settled share of the requests, one decimal, rounded down: 100.0 only when done."""
        return (1000 * self.settled // self.requests_total) / 10 if self.requests_total else 100.0

    @property
    def eta(self) -> float | None:
        """Seconds left by linear extrapolation since submission; None when unknown."""
        if self.batches_finished == self.batches_total:
            return 0.0
        if not self.elapsed or not 0 < self.settled < self.requests_total:
            return None
        return self.elapsed * (self.requests_total - self.settled) / self.settled

    @property
    def signature(self) -> str:
        """What must change for a new observation: not the clock, only the work done."""
        stamp = self.run_key.rsplit(":", 1)[-1]
        return (
            f"{self.attempt}.{stamp}:{self.completed}+{self.failed}={self.settled}"
            f"/{self.requests_total}:{self.batches_finished}/{self.batches_total}"
        )

    @property
    def status(self) -> str:
        """The partition's status line: how far, and how long is left (see ``status.py``).

        Example:
            >>> Progress(attempt=1, run_key="r:a:1:x", known=True, requests_total=20,
            ...          completed=8, failed=1, settled=9, batches_total=3,
            ...          batches_finished=1, elapsed=540.0).status
            'in flight: 45.0 % done (9/20 requests, 1 failed), about 11 min left'
        """
        attempt = f" (attempt {self.attempt})" if self.attempt > 1 else ""
        if self.batches_finished == self.batches_total:
            return (
                f"collecting{attempt}: every batch ended ({self.settled}/"
                f"{self.requests_total} requests), the collection run is requested"
            )
        if not self.settled:
            return (
                f"in flight{attempt}: waiting for the provider to start "
                f"(0/{self.requests_total} requests)"
            )
        failed = f", {self.failed} failed" if self.failed else ""
        text = (
            f"in flight{attempt}: {self.percent} % done "
            f"({self.settled}/{self.requests_total} requests{failed})"
        )
        eta = self.eta
        return text + (f", about {format_duration(eta)} left" if eta else "")

    def metadata(self) -> dict[str, Any]:
        """The status line, a one-line summary, and the numbers for the plots (a counter
        still at zero says nothing and is left out: they only grow within an attempt)."""
        summary = (
            f"{self.settled}/{self.requests_total} requests ({self.percent} %), "
            f"{self.failed} failed, {self.batches_finished}/{self.batches_total} batches finished"
        )
        counters = {
            "requests_completed": self.completed,
            "requests_failed": self.failed,
            "requests_settled": self.settled,
            "batches_finished": self.batches_finished,
        }
        values: dict[str, Any] = {
            "progress_percent": dg.MetadataValue.float(self.percent),
            **{k: v for k, v in counters.items() if v},
            "requests_total": self.requests_total,
            "batches_total": self.batches_total,
        }
        if self.elapsed is not None:
            values["elapsed_seconds"] = round(self.elapsed)
            summary += f", {format_duration(self.elapsed)} since submission"
        eta = self.eta
        if eta is not None:
            values["eta_seconds"] = round(eta)
            summary += ", finished" if eta == 0 else f", about {format_duration(eta)} left"
        return {STATUS: self.status, "progress": summary, **values}


def measure_progress(
    partition: InFlight, polled: dict[str, Batch | Exception], now: float
) -> Progress:
    """The partition's :class:`Progress` from this tick's polls (``polled``: batch id -> the
    batch, or the error its poll raised); ``now`` is the clock's ``time.time()``.

    Example::

        measure_progress(partition, {"batch_abc": client.retrieve_batch("batch_abc")},
                         time.time()).metadata()["progress"]
        # -> '150/200 requests (75.0 %), 3 failed, 0/1 batches finished, 12 min since ...'
    """
    uncollected = [m for m in partition.attempts if m.state != "collected"]
    sizes = {c.batch_id: c.requests for m in uncollected for c in m.chunks if c.batch_id}
    known, completed, failed, settled, finished = True, 0, 0, 0, 0
    for batch_id in partition.batch_ids:
        size = max(0, sizes.get(batch_id, 0))
        batch = polled.get(batch_id)
        if not isinstance(batch, Batch):
            known = False
            continue
        # A provider's counts are input, not truth: bounded by what this batch was sent.
        ok = min(size, max(0, batch.completed_requests or 0))
        bad = min(size - ok, max(0, batch.failed_requests or 0))
        completed, failed = completed + ok, failed + bad
        if batch.is_terminal:
            finished += 1
            settled += size
        else:
            settled += ok + bad
    starts = [parse_timestamp(m.submitted_at or m.created_at) for m in uncollected]
    known_starts = [t for t in starts if t is not None]
    return Progress(
        attempt=partition.latest.attempt,
        run_key=partition.latest.run_key,
        known=known,
        requests_total=sum(max(0, n) for n in sizes.values()),
        completed=completed,
        failed=failed,
        settled=settled,
        batches_total=len(partition.batch_ids),
        batches_finished=finished,
        elapsed=max(0.0, now - min(known_starts)) if known_starts else None,
    )


def parse_timestamp(text: str | None) -> float | None:
    """Seconds since the epoch of an ISO timestamp (UTC when it names no zone), or None.

    Example:
        >>> parse_timestamp("1970-01-01T00:01:00"), parse_timestamp("not a date")
        (60.0, None)
    """
    try:
        when = datetime.fromisoformat(text or "")
    except (TypeError, ValueError):
        return None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def format_duration(seconds: float) -> str:
    """A duration for people: ``42 s``, ``7 min``, ``3 h 05 min``, ``2 d 4 h``.

    Example:
        >>> format_duration(42), format_duration(3 * 3600 + 300), format_duration(52 * 3600)
        ('42 s', '3 h 05 min', '2 d 4 h')
    """
    total = round(seconds)
    if total < 60:
        return f"{total} s"
    minutes = round(total / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    return f"{hours // 24} d {hours % 24} h"


def _slot(partition_key: str | None) -> str:
    """A partition's short, fixed-size key in the cursor (partition keys may be long)."""
    return hashlib.sha256((partition_key or "").encode("utf-8", "surrogatepass")).hexdigest()[:16]


def progress_observations(
    in_flight: Sequence[InFlight],
    progress: Sequence[Progress | None],
    observed: dict[str, str],
    asset_key: dg.AssetKey,
) -> tuple[list[dg.AssetObservation], dict[str, str]]:
    """Observations of the partitions whose progress changed, and the signatures to keep.

    A partition not polled this tick (collection already requested) or not fully answered
    keeps its last signature, so a flaky poll does not make the UI flicker.

    Example::

        events, signatures = progress_observations(in_flight, progress, observed={},
                                                   asset_key=dg.AssetKey("reviews_batches"))
        # -> one AssetObservation per partition polled, its signature kept in the cursor
    """
    events, signatures = [], {}
    for partition, state in zip(in_flight, progress, strict=True):
        slot = _slot(partition.partition_key)
        if state is None or not state.known:
            if slot in observed:
                signatures[slot] = observed[slot]
            continue
        if observed.get(slot) == state.signature:
            signatures[slot] = state.signature
            continue
        try:
            events.append(
                dg.AssetObservation(
                    asset_key=asset_key,
                    partition=partition.partition_key,
                    metadata=state.metadata(),
                    description="Where this partition stands, reported by the sensor.",
                )
            )
        except Exception as exc:  # a status is news: it never fails the tick's real work
            logger.warning(
                f"partition {printable(partition.partition_key or '-', 100)!r}: no progress "
                f"observation this tick ({type(exc).__name__}: {printable(exc)})"
            )
            if slot in observed:
                signatures[slot] = observed[slot]
            continue
        signatures[slot] = state.signature
    return events, signatures


_SHOWN = 5


def skip_reason(
    in_flight: Sequence[InFlight],
    progress: Sequence[Progress | None],
    partitioned: bool,
    unsettled: Sequence[InFlight] = (),
    notes: Sequence[str] = (),
) -> str:
    """One bounded line: how many partitions are in flight and how far the first few are,
    then how many wait to be submitted and what needs a person.

    Example:
        >>> skip_reason([], [], partitioned=True, notes=["partition a: check the dashboard"])
        'No batches in flight. Needs attention: partition a: check the dashboard'
    """
    waiting = f" {len(unsettled)} waiting to be submitted." if unsettled else ""
    attention = f" Needs attention: {printable(notes[0], 300)}" if notes else ""
    if len(notes) > 1:
        attention += f" (+{len(notes) - 1} more in the log)"
    if not in_flight:
        return f"No batches in flight.{waiting}{attention}"
    parts = []
    for partition, state in list(zip(in_flight, progress, strict=True))[:_SHOWN]:
        if state is None:
            where = "finished, collection requested"
        elif not state.known:
            where = f"?/{state.requests_total} (not every batch answered)"
        else:
            where = f"{state.settled}/{state.requests_total}"
        key = partition.partition_key
        label = printable(key, 40) if partitioned else f"attempt {partition.latest.attempt}"
        parts.append(f"{label} {where}")
    more = f", +{len(in_flight) - _SHOWN} more" if len(in_flight) > _SHOWN else ""
    what = "partition" if partitioned else "attempt"
    plural = "" if len(in_flight) == 1 else "s"
    line = f"{len(in_flight)} {what}{plural} in flight: {', '.join(parts)}{more}"
    return f"{line}.{waiting}{attention}" if waiting or attention else line
