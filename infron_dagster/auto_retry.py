"""The sensor's automatic retries: a collected partition with retryable failed rows is
retried by a run the sensor requests, after a backoff, up to ``max_attempts``.

The collection queued it (``retry_queue``); each tick reads the due markers, checks each
against the partition's manifests (the truth) and requests one ``<name>_batches`` run with
``retry_failed`` per partition, under a run_key that names the attempt it retries, so the
daemon launches it once. Non-retryable failures are never retried (the retry job sends only
retryable rows); a partition whose attempts are used up, whose latest attempt was
cancelled, or whose rows a pilot decides (``pilot.pilot_no_retry``) is left failed. A
retry run that fails (or that a dead worker left failed) is requested again after
``backoff_seconds`` (15 s, then 30 s), up to ``MAX_AUTO_RETRY_RUNS`` runs; then, or when a
person canceled the run, a note asks for one.

A marker that went missing (deleted by hand, lost in a partial sync: the collection writes
it before its commit point, so no crash loses it) is rebuilt by ``restore_missing`` on the
ticks where the in-flight index reads every manifest (its full rescan, ``index_rescan_seconds``):
for each partition the scan read, collected within ``RESTORE_WINDOW_SECONDS`` (two days: an
older one was collected without auto_retry), whose retry is owed by the same checks a due
marker passes (``retry_blocked``, ``gave_up``) and whose failed table holds retryable rows.
Other ticks read nothing more than before. The rebuilt marker is due at once: the backoff
it held (minutes) had almost always passed when a rescan (up to a day later) finds it lost,
the sensor does not know the pipeline's backoff, and a retry run that fails is requested
again after its own backoff anyway.

Example::

    requests = retry_requests(context, storage, "reviews", dg.AssetKey("reviews_batches"),
                              max_attempts=3, notes=[])
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import dagster as dg
import pyarrow.compute as pc

from .history import PartitionHistory
from .inflight import IndexedPartition
from .manifest import Manifest
from .pilot import pilot_no_retry
from .resume import backoff_seconds
from .retry_queue import QueuedRetry, RetryQueue
from .storage import BatchStorage
from .untrusted import printable

__all__ = [
    "AUTO_RETRY_TAG",
    "MAX_AUTO_RETRY_RUNS",
    "gave_up",
    "restore_missing",
    "retry_blocked",
    "retry_requests",
    "retryable_rows",
]

AUTO_RETRY_TAG = "infron/auto_retry"
# A lost marker is rebuilt only for a collection this recent: the rescan that finds it runs
# at least daily, so a marker lost since is found within the window; an older collection
# left without a marker was collected without auto_retry (turning it on for an existing lake
# must not start paying for the failures of every partition it ever collected).
RESTORE_WINDOW_SECONDS = 2 * 24 * 3600.0
# Runs requested for one attempt's retry before the sensor leaves it to a person.
MAX_AUTO_RETRY_RUNS = 3
_UNFINISHED = (
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
)


def retry_requests(
    context: dg.SensorEvaluationContext,
    storage: BatchStorage,
    name: str,
    batches_key: dg.AssetKey,
    max_attempts: int,
    notes: list[str],
    scanned: Sequence[IndexedPartition] = (),
) -> list[dg.RunRequest]:
    """A retry run for each queued partition whose retry is due and still makes sense;
    ``notes`` gets what a person should know (a retry run that failed). ``scanned``: the
    partitions the in-flight index's full rescan read this tick (empty on other ticks),
    whose lost markers are written again first (``restore_missing``)."""
    queue = RetryQueue(storage, log=context.log)
    queued = queue.queued()
    if scanned:
        queued += restore_missing(context, queue, queued, scanned, max_attempts)
    now = time.time()
    requests = []
    for retry in sorted((r for r in queued if r.due_at <= now), key=lambda r: r.due_at):
        request = _Retry(context, queue, retry, name, max_attempts, notes).request(batches_key)
        if request is not None:
            requests.append(request)
    return requests


class _Retry:
    """One due marker, checked against the partition's manifests and its retry runs."""

    def __init__(
        self,
        context: dg.SensorEvaluationContext,
        queue: RetryQueue,
        retry: QueuedRetry,
        name: str,
        max_attempts: int,
        notes: list[str],
    ) -> None:
        self.context, self.queue, self.retry = context, queue, retry
        self.name, self.max_attempts, self.notes = name, max_attempts, notes
        self.where = f"{name} partition {printable(retry.partition_key or '-', 100)}"

    def request(self, batches_key: dg.AssetKey) -> dg.RunRequest | None:
        latest = self._latest()
        if latest is None:
            return None
        runs = self.context.instance.get_run_records(
            filters=dg.RunsFilter(tags={AUTO_RETRY_TAG: latest.run_key})
        )
        if any(r.dagster_run.status in _UNFINISHED for r in runs):
            return None
        if any(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in runs):
            # A run that ended since the manifests were read: its attempt is there now
            latest = self._latest()
            if latest is None:
                return None
        if not self._may_run_again(runs, latest.attempt):
            return None
        rows = self._retryable_rows()
        if rows is None:
            return None
        if rows == 0:
            self.queue.drop(self.retry)
            self.context.log.info(
                f"{self.where}: attempt {latest.attempt} has no retryable failed row left: "
                "nothing to retry"
            )
            return None
        self.context.log.info(
            f"{self.where}: retrying {rows} retryable row(s) as attempt "
            f"{latest.attempt + 1} of {self.max_attempts}"
        )
        number = f":{len(runs)}" if runs else ""  # a run key is launched once, ever
        return dg.RunRequest(
            run_key=f"{latest.run_key}:auto-retry{number}",
            partition_key=self.retry.partition_key,
            asset_selection=[batches_key],
            run_config=_retry_config(batches_key),
            tags={
                "infron/pipeline": self.name,
                "infron/attempt": str(latest.attempt + 1),
                AUTO_RETRY_TAG: latest.run_key,
            },
        )

    def _latest(self) -> Manifest | None:
        """The partition's latest attempt when it is the marker's, collected, not cancelled,
        with attempts left; else None (and the marker dropped when it is stale)."""
        try:
            history = PartitionHistory.load(self.queue.storage, self.retry.partition_key)
        except Exception as exc:  # a damaged manifest: this partition waits for a person
            self._note(
                f"{self.where}: its manifests cannot be read ({type(exc).__name__}: "
                f"{printable(exc)}); its automatic retry waits until they are repaired"
            )
            return None
        active = history.active
        latest = active[-1] if active else None
        if latest is None or latest.attempt != self.retry.attempt:
            self.queue.drop(self.retry)  # retried since (by the sensor or a person), new input
            return None
        if latest.state != "collected":
            return None  # the collection that queued it has not committed yet
        # What the collection checked before queueing it, checked again against the truth
        if why := retry_blocked(history, self.max_attempts):
            self.queue.drop(self.retry)
            self.context.log.info(f"{self.where}: no automatic retry: {why}")
            return None
        return latest

    def _may_run_again(self, runs: Sequence[Any], attempt: int) -> bool:
        """No run yet, or the earlier ones ended without retrying and the backoff passed;
        a canceled run, or too many, leave the partition to a person (a note)."""
        if not runs:
            return True
        if why := gave_up(runs):
            self.queue.drop(self.retry)
            self._note(
                f"{self.where}: the automatic retry of attempt {attempt} {why} (see its "
                "runs); launch the retry job once the cause is fixed"
            )
            return False
        last = runs[0]  # newest first
        ended = last.end_time or last.start_time or last.create_timestamp.timestamp()
        return time.time() - ended >= backoff_seconds(len(runs))

    def _retryable_rows(self) -> int | None:
        """The retryable rows the failed table holds (what a retry would send); None when
        it cannot be read (a note names it)."""
        storage = self.queue.storage
        path = storage.table_path("failed", self.retry.partition_key)
        try:
            return retryable_rows(storage, self.retry.partition_key)
        except Exception as exc:  # the partition's table: its retry waits, the others go on
            self._note(
                f"{self.where}: its failed table {printable(str(path), 300)} cannot be read "
                f"({type(exc).__name__}: {printable(exc)}); its automatic retry waits"
            )
            return None

    def _note(self, note: str) -> None:
        self.context.log.warning(note)
        self.notes.append(note)


def retry_blocked(history: PartitionHistory, max_attempts: int) -> str:
    """Why the retryable failed rows of a partition whose latest active attempt is collected
    are not retried automatically: it was cancelled, its attempts are used up, or a pilot
    decides (``pilot_no_retry``); "" when they may be.

    Example::

        retry_blocked(PartitionHistory.load(storage, "a"), max_attempts=3)   # -> ""
    """
    active = history.active
    why = pilot_no_retry(history)
    if active and active[-1].cancelled:
        why = f"attempt {active[-1].attempt} was cancelled"
    elif len(active) >= max_attempts:
        why = f"{len(active)} of max_attempts={max_attempts} attempts are used"
    return why


def gave_up(runs: Sequence[Any]) -> str:
    """Why the sensor stopped retrying an attempt, from its automatic retry runs (records,
    newest first): a person canceled one, or too many ran; "" when it goes on.

    Example::

        gave_up(instance.get_run_records(filters=dg.RunsFilter(tags={AUTO_RETRY_TAG: key})))
    """
    if any(r.dagster_run.status == dg.DagsterRunStatus.CANCELED for r in runs):
        return "was canceled"
    if len(runs) >= MAX_AUTO_RETRY_RUNS:
        return f"ran {len(runs)} time(s) without retrying"
    return ""


def retryable_rows(storage: BatchStorage, partition_key: str | None) -> int:
    """The retryable rows of a partition's failed table (what a retry would send): only
    its ``retryable`` column is read; 0 without a failed table.

    Example::

        retryable_rows(storage, "2026-11-24")   # -> 12
    """
    try:
        table = storage.read_table(
            storage.table_path("failed", partition_key), columns=["retryable"]
        )
    except FileNotFoundError:
        return 0
    return int(pc.sum(table.column("retryable")).as_py() or 0)


def restore_missing(
    context: dg.SensorEvaluationContext,
    queue: RetryQueue,
    queued: Sequence[QueuedRetry],
    scanned: Sequence[IndexedPartition],
    max_attempts: int,
) -> list[QueuedRetry]:
    """The markers ``queued`` lacks that the manifests say are owed, written again (due at
    once, a warning naming each partition): a collected partition of ``scanned`` whose
    retry ``retry_blocked`` allows, whose automatic retry was not given up (``gave_up``:
    a person was told then) and whose failed table holds retryable rows. Only these few
    candidates cost a read (their ``retryable`` column) and a query of their runs.

    Example::

        restore_missing(context, queue, queue.queued(), index.scanned_partitions, 3)
    """
    have = {(r.segment, r.attempt) for r in queued}
    owed = []
    for partition in scanned:
        latest = partition.attempts[-1] if partition.attempts else None
        if latest is None or partition.open or (partition.segment, latest.attempt) in have:
            continue
        if not _recent(latest.collected_at):
            continue
        history = PartitionHistory(queue.storage, latest.partition_key, list(partition.attempts))
        if not retry_blocked(history, max_attempts):
            owed.append(latest)
    restored = []
    counts = _count_retryable(queue.storage, [m.partition_key for m in owed], context.log)
    for latest, rows in zip(owed, counts, strict=True):
        if not rows:
            continue
        runs = context.instance.get_run_records(
            filters=dg.RunsFilter(tags={AUTO_RETRY_TAG: latest.run_key})
        )
        if not gave_up(runs):
            restored.append(queue.restore(latest.partition_key, latest.attempt, rows))
    return restored


def _recent(collected_at: str | None) -> bool:
    """Whether a collection is within ``RESTORE_WINDOW_SECONDS`` (unknown or unreadable: no)."""
    try:
        when = datetime.fromisoformat(str(collected_at)).timestamp()
    except (TypeError, ValueError, OverflowError):
        return False
    return time.time() - when <= RESTORE_WINDOW_SECONDS


def _count_retryable(
    storage: BatchStorage, keys: Sequence[str | None], log: logging.Logger
) -> list[int]:
    """``retryable_rows`` of each partition, read concurrently; 0 (and a warning) for a
    table that cannot be read: the next rescan tries it again."""

    def count(key: str | None) -> int:
        try:
            return retryable_rows(storage, key)
        except Exception as exc:  # this partition's table only
            log.warning(
                f"{storage.name} partition {printable(key or '-', 100)}: its failed table "
                f"cannot be read ({type(exc).__name__}: {printable(exc)}); whether it owes "
                "an automatic retry is checked again at the next full rescan"
            )
            return 0

    if not keys:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(keys))) as pool:
        return list(pool.map(count, keys))


def _retry_config(batches_key: dg.AssetKey) -> dict[str, Any]:
    return {"ops": {batches_key.path[-1]: {"config": {"retry_failed": True}}}}
