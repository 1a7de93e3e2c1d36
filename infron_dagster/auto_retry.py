"""The sensor's automatic retries: a collected partition with retryable failed rows is
retried by a run the sensor requests, after a backoff, up to ``max_attempts``.

The collection queued it (``retry_queue``); each tick reads the due markers, checks each
against the partition's manifests (the truth) and requests one ``<name>_batches`` run with
``retry_failed`` per partition, under a run_key that names the attempt it retries, so the
daemon launches it once. Non-retryable failures are never retried (the retry job sends only
retryable rows); a partition whose attempts are used up is left failed, and the collection's
metadata says so.

Example::

    requests = retry_requests(context, storage, "reviews", dg.AssetKey("reviews_batches"),
                              max_attempts=3, notes=[])
"""

from __future__ import annotations

import time
from typing import Any

import dagster as dg

from .history import PartitionHistory
from .retry_queue import QueuedRetry, RetryQueue
from .storage import BatchStorage
from .untrusted import printable

__all__ = ["AUTO_RETRY_TAG", "retry_requests"]

AUTO_RETRY_TAG = "infron/auto_retry"
_UNFINISHED = (
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
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
    queue = RetryQueue(storage)
    requests = []
    for retry in queue.due(time.time()):
        request = _request(context, queue, retry, name, batches_key, max_attempts, notes)
        if request is not None:
            requests.append(request)
    return requests


def _request(
    context: dg.SensorEvaluationContext,
    queue: RetryQueue,
    retry: QueuedRetry,
    name: str,
    batches_key: dg.AssetKey,
    max_attempts: int,
    notes: list[str],
) -> dg.RunRequest | None:
    active = PartitionHistory.load(queue.storage, retry.partition_key).active
    latest = active[-1] if active else None
    if latest is None or latest.attempt != retry.attempt or len(active) >= max_attempts:
        queue.drop(retry)  # retried since (by the sensor or a person), or new input
        return None
    if latest.state != "collected":
        return None  # the collection that queued it has not committed yet
    runs = context.instance.get_run_records(
        filters=dg.RunsFilter(tags={AUTO_RETRY_TAG: latest.run_key})
    )
    if any(r.dagster_run.status in _UNFINISHED for r in runs):
        return None
    where = f"partition {printable(retry.partition_key or '-', 100)}"
    if any(r.dagster_run.status == dg.DagsterRunStatus.FAILURE for r in runs):
        queue.drop(retry)
        note = (
            f"{name} {where}: the automatic retry of attempt {latest.attempt} failed (see its "
            "run); launch the retry job once the cause is fixed"
        )
        context.log.warning(note)
        notes.append(note)
        return None
    context.log.info(
        f"{name} {where}: retrying {retry.rows} retryable row(s) as attempt "
        f"{latest.attempt + 1} of {max_attempts}"
    )
    return dg.RunRequest(
        run_key=f"{latest.run_key}:auto-retry",
        partition_key=retry.partition_key,
        asset_selection=[batches_key],
        run_config=_retry_config(batches_key),
        tags={
            "infron/pipeline": name,
            "infron/attempt": str(latest.attempt + 1),
            AUTO_RETRY_TAG: latest.run_key,
        },
    )


def _retry_config(batches_key: dg.AssetKey) -> dict[str, Any]:
    return {"ops": {batches_key.path[-1]: {"config": {"retry_failed": True}}}}
