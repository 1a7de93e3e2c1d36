"""RESUME: the sensor's submit runs for attempts that are not fully submitted.

An attempt whose chunks wait for admission control (when they now fit), or that a run left
half-submitted (it died, or a create call ended ambiguously), is resumed by a ``<name>_batches``
run that creates only what is missing and pays for nothing twice. Each such run is tagged
``SUBMIT_TAG`` with the attempt's run_key: how many ran, and when the last one did, set the
next one's run_key and the wait before it (``RESUME_BACKOFF_SECONDS`` doubling, at most
``MAX_RESUME_BACKOFF_SECONDS``); after ``MAX_SUBMIT_FAILURES`` failed runs in a row, or a
chunk that may exist but cannot be proven absent, a note asks a person instead.

It also requests what follows a pilot batch (``pilot_rows``, see :mod:`~infron_dagster.pilot`):
once a pilot is collected, the run that releases the rest (``<attempt key>:release``) or
stops it (``<attempt key>:stop``, with a note saying what failed and what to fix); attempts
held for a pilot that is still running are not resumed until it passes.

Example:
    >>> [backoff_seconds(runs) for runs in range(4)]
    [0.0, 15.0, 30.0, 60.0]
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import dagster as dg

from . import submit as submit_module
from .admission import AdmissionControl
from .history import PartitionHistory
from .manifest import Manifest
from .pilot import pilot_hold
from .pilot_book import PilotBook, QueuedPilot
from .pilot_verdict import pilot_verdict
from .progress import InFlight, parse_timestamp
from .storage import BatchStorage, LockTimeout
from .untrusted import printable

__all__ = [
    "MAX_RESUME_BACKOFF_SECONDS",
    "MAX_SUBMIT_FAILURES",
    "PILOT_TAG",
    "RESUME_BACKOFF_SECONDS",
    "SUBMIT_TAG",
    "backoff_seconds",
    "pilot_requests",
    "submit_requests",
]

# A submit run the sensor requested for an attempt not fully submitted is tagged with the
# attempt's run_key: how many ran, and when the last one did, set the next one's run_key and
# the wait before it (15 s, 30 s, 1 min, ... 10 min at most).
SUBMIT_TAG = "infron/submit_key"
RESUME_BACKOFF_SECONDS = 15.0
MAX_RESUME_BACKOFF_SECONDS = 600.0
MAX_SUBMIT_FAILURES = 3
# The run that follows a pilot is tagged with the pilot attempt's run_key.
PILOT_TAG = "infron/pilot_key"
_NOT_YET_RUNNING = (
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
)


def backoff_seconds(runs: int) -> float:
    """The wait after the last of ``runs`` resume runs before the next one is requested.

    Example:
        >>> backoff_seconds(0), backoff_seconds(1), backoff_seconds(10)
        (0.0, 15.0, 600.0)
    """
    if runs == 0:
        return 0.0
    return min(RESUME_BACKOFF_SECONDS * 2 ** (runs - 1), MAX_RESUME_BACKOFF_SECONDS)


def submit_requests(
    context: dg.SensorEvaluationContext,
    unsettled: Sequence[InFlight],
    storage: BatchStorage,
    admission: AdmissionControl | None,
    name: str,
    batches_key: dg.AssetKey,
    partitioned: bool,
    notes: list[str],
) -> list[dg.RunRequest]:
    """A ``batches_key`` run for each attempt that is not fully submitted and can go on.

    An attempt whose chunks wait for admission (when they now fit), or that a run left
    half-submitted (it died, or a create call ended ambiguously), is resumed by a run that
    creates only what is missing and pays for nothing twice. None is requested while a run
    holds the partition's lock (a submission is running) or a requested run has not started,
    nor before the backoff after the last one; ``notes`` says what needs a person instead.

    Example::

        notes: list[str] = []
        requests = submit_requests(context, [p for p in found if not p.settled], storage,
                                   None, "reviews", dg.AssetKey("reviews_batches"), True, notes)
        [r.run_key for r in requests]
        # -> ['reviews:2026-11-24:1:20261124T101500:submit:0']
    """
    now = time.time()
    candidates = []
    held: dict[str, bool] = {}
    for partition in unsettled:
        manifest = next(m for m in partition.attempts if not m.settled)
        why = pilot_hold(storage, manifest, held)
        if why is not None:  # sent by a run once the pilot passes (or stopped if it fails)
            where = printable(manifest.partition_key or "-", 100)
            context.log.info(f"{name}: partition {where} attempt {manifest.attempt} {why}")
            continue
        runs = context.instance.get_run_records(
            filters=dg.RunsFilter(tags={SUBMIT_TAG: manifest.run_key})
        )
        if _resumable(manifest, runs, now, partitioned, notes):
            candidates.append((manifest, len(runs)))
    candidates.sort(key=lambda c: c[0].created_at)
    fitting = None
    if admission is not None:
        needs_room = [m for m, _ in candidates if _unsent(m)]
        fitting = {id(m) for m in admission.ready(needs_room)}
    requests = []
    for manifest, runs in candidates:
        if fitting is not None and _unsent(manifest) and id(manifest) not in fitting:
            continue  # waits for capacity: the release of a finished batch makes room
        if not _stalled(storage, manifest):
            continue  # a submission runs now, or finished since the manifests were read
        requests.append(_submit_request(manifest, runs, name, batches_key))
        context.log.info(
            f"{name}: partition {printable(manifest.partition_key or '-', 100)} attempt "
            f"{manifest.attempt} is not fully submitted: requesting the run that resumes it"
        )
    return requests + pilot_requests(context, storage, name, batches_key, notes)


def pilot_requests(
    context: dg.SensorEvaluationContext,
    storage: BatchStorage,
    name: str,
    batches_key: dg.AssetKey,
    notes: list[str],
) -> list[dg.RunRequest]:
    """For each collected pilot batch, the ``batches_key`` run that releases the rest
    (its verdict passed) or stops it (it failed: ``notes`` says what failed and what to
    fix). One listing of the pilot queue per tick; each queued pilot is checked against its
    partition's manifests (the truth) and dropped once released, stopped, replaced or
    cancelled. A run that failed is requested again after the resume backoff, up to
    ``MAX_SUBMIT_FAILURES`` times.

    Example::

        [r.run_key for r in pilot_requests(context, storage, "reviews",
                                           dg.AssetKey("reviews_batches"), [])]
        # -> ['reviews:2026-11-24:1:1f0c22ab:release']
    """
    book = PilotBook(storage)
    requests = []
    for queued in book.queued():
        where = f"{name}: partition {printable(queued.partition_key or '-', 100)}"
        try:
            request = _pilot_request(context, book, queued, name, batches_key, notes, where)
        except Exception as exc:  # this pilot only: the next tick reads it again
            context.log.warning(f"{where}: cannot read its pilot now: {printable(exc)}")
            continue
        if request is not None:
            requests.append(request)
    return requests


def _pilot_request(
    context: dg.SensorEvaluationContext,
    book: PilotBook,
    queued: QueuedPilot,
    name: str,
    batches_key: dg.AssetKey,
    notes: list[str],
    where: str,
) -> dg.RunRequest | None:
    storage, key = book.storage, queued.partition_key
    history = PartitionHistory.load(storage, key)
    pilot = history.by_attempt.get(queued.attempt)
    if pilot is None:  # the run writing it died before its manifest (or still writes it)
        if _stalled_pilot(storage, key):
            book.drop(queued)
            book.forget(queued.prompt, key, queued.attempt)
        return None
    active = history.active
    if not active or active[0].attempt != pilot.attempt:
        book.drop(queued)  # released, stopped or replaced since
        book.forget(queued.prompt, key, queued.attempt)
        return None
    if pilot.state != "collected":
        return None  # collected like any attempt first
    if pilot.cancelled and book.forget(queued.prompt, key, queued.attempt):
        # A cancel never releases; the partitions held for it decide again (a pilot of
        # their own), and a stop records the rest of this one as never sent.
        context.log.info(f"{where}: its pilot was cancelled: the rest is not sent")
    runs = context.instance.get_run_records(filters=dg.RunsFilter(tags={PILOT_TAG: pilot.run_key}))
    statuses = [r.dagster_run.status for r in runs]
    if any(s in _NOT_YET_RUNNING or s == dg.DagsterRunStatus.STARTED for s in statuses):
        return None
    if dg.DagsterRunStatus.SUCCESS in statuses:
        return None  # it ran: the attempt it wrote is read next tick
    label = f"partition {printable(key or '-', 100)} attempt {pilot.attempt}"
    note = _failures_note(runs, label)
    if note is not None:
        notes.append(note)
        return None
    if runs:
        last = runs[0]
        when = last.end_time or last.start_time or last.create_timestamp.timestamp()
        if time.time() - when < backoff_seconds(len(runs)):
            return None
    if pilot.cancelled:
        return _pilot_run(pilot, "stop", runs, name, batches_key)
    verdict = pilot_verdict(storage, key, (pilot.pilot or {}).get("limits") or {})
    action = "release" if verdict.passed else "stop"
    if verdict.passed:
        context.log.info(f"{where}: the pilot passed ({verdict.summary()}): releasing the rest")
    else:
        notes.append(f"{where}: " + verdict.message(f"attempt {pilot.attempt}"))  # logged
    return _pilot_run(pilot, action, runs, name, batches_key)


def _pilot_run(
    pilot: Manifest, action: str, runs: Sequence[Any], name: str, batches_key: dg.AssetKey
) -> dg.RunRequest:
    suffix = f":{len(runs)}" if runs else ""
    return dg.RunRequest(
        run_key=f"{pilot.run_key}:{action}{suffix}",
        partition_key=pilot.partition_key,
        asset_selection=[batches_key],
        tags={
            "infron/pipeline": name,
            "infron/attempt": str(pilot.attempt + 1),
            PILOT_TAG: pilot.run_key,
        },
    )


def _stalled_pilot(storage: BatchStorage, key: str | None) -> bool:
    """Whether no run holds the partition's lock (nor the pilot lock) now."""
    try:
        with storage.lock(key, wait_seconds=0), PilotBook(storage).lock(wait_seconds=0):
            return True
    except LockTimeout:
        return False


def _unsent(manifest: Manifest) -> bool:
    """Chunks that need room: neither created nor reserved by an uncertain create."""
    return any(not c.batch_id and not c.uncertain for c in manifest.chunks)


def _resumable(
    manifest: Manifest,
    runs: Sequence[Any],
    now: float,
    partitioned: bool,
    notes: list[str],
) -> bool:
    """Whether a run may resume the attempt now; what needs a person goes to ``notes``."""
    where = printable(manifest.partition_key or "-", 100) if partitioned else "-"
    label = f"partition {where} attempt {manifest.attempt}"
    note = _uncertain_note(manifest, label)
    if note is None and any(r.dagster_run.status in _NOT_YET_RUNNING for r in runs):
        return False  # a requested run has not started: it does the work
    note = note or _failures_note(runs, label)
    if note is not None:
        notes.append(note)
        return False
    if runs:
        last = runs[0]
        when = last.end_time or last.start_time or last.create_timestamp.timestamp()
        if now - when < backoff_seconds(len(runs)):
            return False
    return True


def _uncertain_note(manifest: Manifest, label: str) -> str | None:
    """Why chunks whose create call ended ambiguously need a person, if they do."""
    uncertain = [c.index for c in manifest.chunks if c.uncertain and not c.batch_id]
    if uncertain and manifest.api_style != "openai":
        return (
            f"{label}: chunk(s) {uncertain} may have been created (a create call ended "
            "ambiguously, and this API cannot list batches): check the provider's dashboard, "
            "then materialize the partition with resubmit_uncertain: true if they do not exist"
        )
    grace = submit_module.REATTACH_GRACE_SECONDS
    if uncertain and _past(manifest, uncertain, 2 * grace):
        return (
            f"{label}: chunk(s) {uncertain} are still not listed by the provider "
            f"{2 * grace // 60} minutes after their create call, and its list "
            "cannot prove they do not exist (it shows no batch with our metadata): check the "
            "provider's dashboard, then materialize the partition with resubmit_uncertain: "
            "true if they do not exist"
        )
    return None


def _failures_note(runs: Sequence[Any], label: str) -> str | None:
    """Why resuming stops after MAX_SUBMIT_FAILURES failed runs in a row (newest first)."""
    failures = 0
    for record in runs:
        if record.dagster_run.status != dg.DagsterRunStatus.FAILURE:
            break
        failures += 1
    if failures >= MAX_SUBMIT_FAILURES:
        return (
            f"{label}: the last {failures} runs resuming its submission failed; see them, "
            "fix the cause and materialize the partition again"
        )
    return None


def _past(manifest: Manifest, chunks: Sequence[int], seconds: float) -> bool:
    """Whether every create call of ``chunks`` started more than ``seconds`` ago."""
    wanted = set(chunks)
    starts = [parse_timestamp(c.create_started_at) for c in manifest.chunks if c.index in wanted]
    return all(t is not None and time.time() - t > seconds for t in starts)


def _stalled(storage: BatchStorage, manifest: Manifest) -> bool:
    """Whether no run holds the partition's lock and the attempt, read again under it, is
    still not fully submitted (a submission that ended since the tick read the manifests
    must not get a second run)."""
    key = manifest.partition_key
    try:
        with storage.lock(key, wait_seconds=0):
            now = storage.read_json(storage.manifest_path(key, manifest.attempt))
            return not Manifest.from_dict(now).settled
    except LockTimeout:
        return False
    except (FileNotFoundError, ValueError):
        return False  # gone or unreadable: the next tick reads it again


def _submit_request(
    manifest: Manifest, runs: int, name: str, batches_key: dg.AssetKey
) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=f"{manifest.run_key}:submit:{runs}",
        partition_key=manifest.partition_key,
        asset_selection=[batches_key],
        # A retry resumes as the retry it is: without retry_failed the run would prepare
        # the initial rows and start a new initial attempt instead.
        run_config=_retry_config(batches_key) if manifest.kind == "retry" else {},
        tags={
            "infron/pipeline": name,
            "infron/attempt": str(manifest.attempt),
            SUBMIT_TAG: manifest.run_key,
        },
    )


def _retry_config(batches_key: dg.AssetKey) -> dict[str, Any]:
    return {"ops": {batches_key.path[-1]: {"config": {"retry_failed": True}}}}
