"""STATUS: one line per partition saying where it stands, where Dagster users look first.

Every transition records the partition's ``status`` on ``<name>_batches``: the submit run in
its materialization (``submitted``, ``waiting for admission``, ...), the sensor in the
progress observations it records when the work done changed (``in flight: 45.0 % done, about
12 min left``, ``collecting``), the collection run (``collected: ...`` or ``failed: why``) and
the cancel job (``cancelled``) in an observation. The asset's Partitions tab shows, for the
selected partition, its latest materialization's metadata with every later observation's
entries over it, newest first: the one ``status`` row is always the latest word.

A status never fails a run or a tick: recording one that cannot be recorded is a warning.

Example:
    >>> collected_status(input_rows=20, succeeded=18, failed=2, retryable=2, attempts=[1])
    'collected: 18 of 20 rows succeeded, 2 failed (2 retryable)'
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

import dagster as dg

from .cancel import CancelOutcome
from .collect import CollectOutcome
from .history import active_attempts
from .manifest import load_manifests
from .storage import BatchStorage
from .submission import SubmissionReport
from .untrusted import printable

__all__ = [
    "STATUS",
    "cancel_status",
    "collected_status",
    "collection_status",
    "failed_status",
    "latest_status",
    "record_status",
    "status_tag",
    "submission_status",
    "submit_run_id",
    "tag_run",
    "tag_runs",
]

STATUS = "status"  # the one metadata key every transition writes, on <name>_batches
# The same news, short, on the run that submitted the partition: the Runs list and a
# backfill's runs show run tags, so a morning's backfill reads partition by partition.
_TAG_LENGTH = 60

logger = logging.getLogger(__name__)


def submission_status(report: SubmissionReport) -> str:
    """What a submit run left: ``submitted``, or what the attempt waits for.

    Example::

        submission_status(report)
        # -> 'waiting for admission: 2 of 5 batches created, 3 wait for capacity ...'
    """
    m, outcome = report.manifest, report.outcome
    attempt = f" (attempt {m.attempt})" if m.attempt > 1 else ""
    chunks = len(m.chunks)
    created = len(m.batch_ids)
    if outcome is not None and (outcome.cancelled or m.cancelled):
        return f"cancelled{attempt}: nothing more of this attempt is sent"
    if m.state == "collected":
        return f"collected{attempt}: these requests are answered already, nothing sent"
    # A pilot's part, when the pipeline has one (see pilot.py): its mode and its own note
    pilot = getattr(report, "pilot", None) or {}
    mode, note = pilot.get("pilot/mode"), printable(pilot.get("pilot/note") or "", 300)
    if mode == "hold":
        return f"waiting for a pilot{attempt}: {note or 'another partition pilots this prompt'}"
    if mode == "stop":
        return f"stopped by the pilot{attempt}: {note or 'nothing more is sent'}"
    if outcome is not None and outcome.pending_chunks:
        why = f" ({printable(outcome.pending_reason, 200)})" if outcome.pending_reason else ""
        return (
            f"waiting for admission{attempt}: {created} of {chunks} batches created, "
            f"{outcome.pending_chunks} wait for capacity{why}; the sensor submits them "
            "when batches in flight finish"
        )
    if outcome is not None and outcome.waiting_for:
        return f"waiting{attempt}: {printable(outcome.waiting_for, 200)}"
    if not chunks:
        return f"submitted{attempt}: nothing to send, every row is answered or carried"
    requests = sum(c.requests for c in m.chunks)
    reused = " (the batches already in flight, reused)" if outcome and outcome.reused else ""
    text = f"submitted{attempt}: {requests} requests in {_n(created, 'batch', 'batches')}{reused}"
    return f"{text}; {note}" if mode in ("pilot", "release") and note else text


def collected_status(
    *,
    input_rows: int,
    succeeded: int,
    failed: int,
    retryable: int,
    attempts: Sequence[int],
    cancelled: bool = False,
    note: str = "",
) -> str:
    """A collected partition in one line: how many rows succeeded, failed, may be retried.

    Example:
        >>> collected_status(input_rows=10, succeeded=4, failed=6, retryable=6, attempts=[1],
        ...                  cancelled=True)
        'cancelled: 4 of 10 rows answered and kept, 6 failed (6 retryable)'
    """
    where = f" (attempts {', '.join(map(str, attempts))})" if len(attempts) > 1 else ""
    if attempts and len(attempts) == 1 and attempts[0] > 1:
        where = f" (attempt {attempts[0]})"
    word, done = ("cancelled", "answered and kept") if cancelled else ("collected", "succeeded")
    text = f"{word}{where}: {succeeded} of {input_rows} rows {done}"
    if failed:
        text += f", {failed} failed" + (f" ({retryable} retryable)" if retryable else "")
    return f"{text}; {printable(note, 300)}" if note else text


def collection_status(outcome: CollectOutcome) -> str:
    """:func:`collected_status` of a collection's outcome.

    Example::

        collection_status(outcome)
        # -> 'collected: 118 of 120 rows succeeded, 2 failed (2 retryable)'
    """
    results, failed = outcome.results_summary, outcome.failed_summary
    return collected_status(
        input_rows=outcome.input_rows,
        succeeded=results.rows if results else 0,
        failed=failed.rows if failed else 0,
        retryable=outcome.retryable_rows,
        attempts=outcome.attempts,
        cancelled=bool(outcome.cancelled),
        note=str(outcome.settled.get("auto_retry", "")),
    )


def cancel_status(outcome: CancelOutcome) -> str:
    """What a cancel did to the partition, or that there was nothing to cancel.

    Example:
        >>> cancel_status(CancelOutcome(partition_key="a", submitted=False))
        'nothing in flight: never submitted'
    """
    if not outcome.submitted:
        return "nothing in flight: never submitted"
    if outcome.nothing_in_flight:
        return "nothing in flight: nothing to cancel"
    stopped = len(outcome.ids("cancelled", "already_cancelling"))
    text = f"cancelled: {_n(stopped, 'batch', 'batches')} stopped"
    if outcome.unsent_chunks:
        text += f", {_n(sum(outcome.unsent_chunks.values()), 'chunk', 'chunks')} never sent"
    if outcome.failed:
        text += f", {len(outcome.failed)} could not be cancelled (see the run)"
    return text + "; the sensor collects the finished rows, the rest fail as batch_cancelled"


def failed_status(what: str, exc: BaseException) -> str:
    """A transition that failed, and why, in one bounded line.

    Example:
        >>> failed_status("collection", OSError("disk full"))
        'failed: collection: OSError: disk full'
    """
    return f"failed: {what}: {type(exc).__name__}: {printable(exc, 300)}"


def latest_status(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition_key: str | None
) -> str | None:
    """The status the partition shows now: that of its newest event that has one.

    Example::

        latest_status(context.instance, dg.AssetKey("reviews_batches"), "2026-11-24")
        # -> 'in flight: 45.0 % done (9/20 requests), about 12 min left'
    """
    records = []
    partitions = [partition_key] if partition_key is not None else None
    found = dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=partitions)
    for fetch in (instance.fetch_observations, instance.fetch_materializations):
        records += fetch(found, limit=20, ascending=False).records
    for record in sorted(records, key=lambda r: r.storage_id, reverse=True):
        event = record.asset_materialization or record.asset_observation
        value = event.metadata.get(STATUS) if event is not None else None
        if value is not None:
            return str(value.value)
    return None


def record_status(
    context: Any,
    asset_key: dg.AssetKey,
    partition_key: str | None,
    status: str,
    metadata: dict[str, Any] | None = None,
    storage: BatchStorage | None = None,
) -> bool:
    """Record ``status`` as an observation of ``asset_key``'s partition from a run, unless
    it already says so, and (given ``storage``) tag the run that submitted the partition;
    never raises (a status is news, not the work). True when recorded.

    Example::

        record_status(context, dg.AssetKey("reviews_batches"), "2026-11-24",
                      "collected: 20 of 20 rows succeeded")
    """
    if storage is not None:
        run_id = submit_run_id(storage, partition_key)
        log = getattr(context, "log", None)
        tag_run(context.instance, run_id, storage.name, partition_key, status, log)
    try:
        if latest_status(context.instance, asset_key, partition_key) == status:
            return False
        context.log_event(
            dg.AssetObservation(
                asset_key=asset_key,
                partition=partition_key,
                metadata={STATUS: status, **(metadata or {})},
                description="Where this partition stands.",
            )
        )
        return True
    except Exception as exc:  # the run's work is done or failed on its own: never mask it
        where = f"partition {printable(partition_key or '-', 100)!r}"
        (getattr(context, "log", None) or logger).warning(
            f"could not record the status of {where} ({status!r}): "
            f"{type(exc).__name__}: {printable(exc)}"
        )
        return False


def headline(status: str) -> str:
    """A status as short as a run tag shows it: no parenthesised detail, no second clause.

    Example:
        >>> headline("in flight: 33.8 % done (80/236 requests, 1 failed), about 3 min left")
        'in flight: 33.8 % done, about 3 min left'
    """
    text = re.sub(r" \([^)]*\)", "", status).split("; ")[0]
    if len(text) <= _TAG_LENGTH:
        return text
    cut = text.rfind(", ", 0, _TAG_LENGTH)
    return text[:cut] if cut > 0 else text[: _TAG_LENGTH - 1] + "…"


def status_tag(name: str) -> str:
    """The run tag of a pipeline's status: one per pipeline, since one run may submit the
    partition of several pipelines (``reviews`` and two ``_batches`` assets, say).

    Example:
        >>> status_tag("review_sentiment")
        'review_sentiment/status'
    """
    return f"{name}/status"


def submit_run_id(storage: BatchStorage, partition_key: str | None) -> str | None:
    """The run that created the partition's latest attempt (None when unknown)."""
    try:
        attempts = active_attempts(load_manifests(storage, partition_key))
    except Exception:  # a damaged manifest is reported where it is read for real
        return None
    return attempts[-1].run_id if attempts else None


def tag_run(
    instance: dg.DagsterInstance,
    run_id: str | None,
    name: str,
    partition_key: str | None,
    status: str,
    log: logging.Logger | Any = None,
) -> bool:
    """Tag the run that submitted pipeline ``name``'s ``partition_key`` with the status's
    :func:`headline` (under :func:`status_tag`), when that run was for this partition alone
    (a range run's one tag could not say each partition); never raises. True when the tag
    changed.

    Example::

        tag_run(context.instance, manifest.run_id, "reviews", "2026-11-24",
                "collected: 20 of 20 rows succeeded")
    """
    if not status:
        return False
    try:
        run = instance.get_run_by_id(run_id) if run_id else None
        if run is None or run.tags.get("dagster/partition") != partition_key:
            return False
        short = headline(status)
        if run.tags.get(status_tag(name)) == short:
            return False
        instance.add_run_tags(run.run_id, {status_tag(name): short})
        return True
    except Exception as exc:  # a tag is news, never the work
        (log or logger).warning(
            f"could not tag run {printable(run_id or '-', 60)} with the status of partition "
            f"{printable(partition_key or '-', 100)!r}: {type(exc).__name__}: {printable(exc)}"
        )
        return False


def tag_runs(
    instance: dg.DagsterInstance,
    name: str,
    observations: Iterable[dg.AssetObservation],
    run_ids: dict[str | None, str | None],
    log: logging.Logger | Any = None,
    seconds: float = 5.0,
) -> int:
    """Tag the submit run of each observed partition with its new status (the sensor's
    part), within ``seconds``: what is left is tagged at the partition's next change.

    Example::

        tag_runs(context.instance, "reviews", events,
                 {p.partition_key: p.latest.run_id for p in found})
    """
    deadline, tagged = time.monotonic() + seconds, 0
    for event in observations:
        value = event.metadata.get(STATUS)
        if value is None or time.monotonic() > deadline:
            continue
        key = event.partition
        tagged += tag_run(instance, run_ids.get(key), name, key, str(value.value), log)
    return tagged


def _n(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"
