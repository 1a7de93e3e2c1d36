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

Example::

    requests = retry_requests(context, storage, "reviews", dg.AssetKey("reviews_batches"),
                              max_attempts=3, notes=[])
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import dagster as dg
import pyarrow.compute as pc

from .history import PartitionHistory
from .manifest import Manifest
from .pilot import pilot_no_retry
from .resume import backoff_seconds
from .retry_queue import QueuedRetry, RetryQueue
from .storage import BatchStorage
from .untrusted import printable

__all__ = ["AUTO_RETRY_TAG", "MAX_AUTO_RETRY_RUNS", "retry_requests"]

AUTO_RETRY_TAG = "infron/auto_retry"
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
) -> list[dg.RunRequest]:
    """A retry run for each queued partition whose retry is due and still makes sense;
    ``notes`` gets what a person should know (a retry run that failed)."""
    queue = RetryQueue(storage, log=context.log)
    requests = []
    for retry in queue.due(time.time()):
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
        why = pilot_no_retry(history)
        if latest.cancelled:
            why = f"attempt {latest.attempt} was cancelled"
        elif len(active) >= self.max_attempts:
            why = f"{len(active)} of max_attempts={self.max_attempts} attempts are used"
        if why:
            self.queue.drop(self.retry)
            self.context.log.info(f"{self.where}: no automatic retry: {why}")
            return None
        return latest

    def _may_run_again(self, runs: Sequence[Any], attempt: int) -> bool:
        """No run yet, or the earlier ones ended without retrying and the backoff passed;
        a canceled run, or too many, leave the partition to a person (a note)."""
        if not runs:
            return True
        canceled = any(r.dagster_run.status == dg.DagsterRunStatus.CANCELED for r in runs)
        if canceled or len(runs) >= MAX_AUTO_RETRY_RUNS:
            self.queue.drop(self.retry)
            why = "was canceled" if canceled else f"ran {len(runs)} time(s) without retrying"
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
            if not storage.exists(path):
                return 0
            table = storage.read_table(path, columns=["retryable"])
            return int(pc.sum(table.column("retryable")).as_py() or 0)
        except Exception as exc:  # the partition's table: its retry waits, the others go on
            self._note(
                f"{self.where}: its failed table {printable(str(path), 300)} cannot be read "
                f"({type(exc).__name__}: {printable(exc)}); its automatic retry waits"
            )
            return None

    def _note(self, note: str) -> None:
        self.context.log.warning(note)
        self.notes.append(note)


def _retry_config(batches_key: dg.AssetKey) -> dict[str, Any]:
    return {"ops": {batches_key.path[-1]: {"config": {"retry_failed": True}}}}
