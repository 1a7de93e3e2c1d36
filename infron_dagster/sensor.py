"""POLL: a sensor that watches in-flight batches and asks for collection when they finish.

It reads the manifests on storage (its cursor is only a cache), polls every in-flight batch
concurrently inside a time budget, and emits one RunRequest per finished attempt with a
run_key that includes the attempt.

While batches run, each tick reports where every in-flight partition stands as an asset
observation on ``<name>_batches`` (only when that changed since the last one) and says it in
one line as the tick's skip reason, so the asset pages and the sensor's tick list show
progress instead of "0 runs requested".

Example::

    sensor = build_infron_batch_sensor(name="reviews", storage=storage,
        collect_keys=[dg.AssetKey("reviews_results"), dg.AssetKey("reviews_failed")])
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import dagster as dg

from . import submit as submit_module
from .admission import AdmissionControl
from .budget import SpendLedger
from .client import InfronClient
from .collect import active_attempts
from .inflight import DEFAULT_RESCAN_SECONDS, InFlightIndex
from .manifest import Manifest, load_manifests
from .models import Batch
from .storage import UNPARTITIONED, BatchStorage, LockTimeout
from .untrusted import printable

__all__ = [
    "build_infron_batch_sensor",
    "find_in_flight",
    "find_in_flight_full_scan",
    "open_partitions",
    "submit_requests",
]

logger = logging.getLogger(__name__)


@dataclass
class InFlight:
    """One partition whose latest attempts are submitted but not yet collected."""

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


def find_in_flight(
    storage: BatchStorage,
    partitioned: bool,
    log: logging.Logger | None = None,
    *,
    use_index: bool = True,
    rescan_seconds: float | None = DEFAULT_RESCAN_SECONDS,
) -> list[InFlight]:
    """Every partition with a fully submitted, uncollected attempt, from storage alone.

    With ``use_index`` (the default) only the partitions in the in-flight index are read,
    so the cost follows what is in flight, not the lake's history; the index is rebuilt
    from every manifest when missing and every ``rescan_seconds`` (see ``inflight``).
    A partition whose manifests cannot be read is logged and skipped: one bad file must not
    stall every other partition's collection.
    """
    found = open_partitions(
        storage, partitioned, log, use_index=use_index, rescan_seconds=rescan_seconds
    )
    return [p for p in found if p.settled]


def open_partitions(
    storage: BatchStorage,
    partitioned: bool,
    log: logging.Logger | None = None,
    *,
    use_index: bool = True,
    rescan_seconds: float | None = DEFAULT_RESCAN_SECONDS,
) -> list[InFlight]:
    """Every partition whose latest active attempt is not collected: those in flight, and
    those with an attempt not fully submitted (chunks waiting for admission, or left unsent
    by a run that died), which the sensor requests a submit run for."""
    if not use_index:
        return find_in_flight_full_scan(storage, partitioned, log, settled_only=False)
    index = InFlightIndex(storage, rescan_seconds=rescan_seconds, log=log or logger)
    return [InFlight(p.partition_key, p.attempts) for p in index.in_flight()]


def find_in_flight_full_scan(
    storage: BatchStorage,
    partitioned: bool,
    log: logging.Logger | None = None,
    *,
    settled_only: bool = True,
) -> list[InFlight]:
    """The same answer by reading every manifest of every partition, one at a time.

    The behaviour before the in-flight index, kept as the baseline of
    ``benchmarks/sensor_scale.py``: its cost grows with every partition ever submitted.
    """
    found = []
    for key in storage.partitions_with_manifests():
        partition_key = key if partitioned or key != UNPARTITIONED else None
        try:
            attempts = active_attempts(load_manifests(storage, partition_key))
        except Exception as exc:  # a corrupt or half-synced manifest: this partition only
            (log or logger).error(
                f"partition {printable(partition_key, 100)!r}: cannot read its manifests "
                f"({type(exc).__name__}: {printable(exc)}); skipped this tick"
            )
            continue
        if not attempts or attempts[-1].state == "collected":
            continue
        if settled_only and not all(m.settled for m in attempts):
            continue
        found.append(InFlight(partition_key, attempts))
    return found


def _poll_all(
    client: InfronClient, batch_ids: Sequence[str], budget: float, workers: int
) -> dict[str, Batch | Exception]:
    results: dict[str, Batch | Exception] = {}

    def poll(batch_id: str) -> None:
        try:
            results[batch_id] = client.retrieve_batch(batch_id)
        except Exception as exc:  # any failure is this batch's, reported, retried next tick
            results[batch_id] = exc

    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    futures = [pool.submit(poll, bid) for bid in batch_ids]
    wait(futures, timeout=budget)
    pool.shutdown(wait=False, cancel_futures=True)  # what did not finish waits for next tick
    return results


def _load_cursor(raw: str | None) -> dict[str, float]:
    try:
        data = json.loads(raw or "{}")
        return {str(k): float(v) for k, v in data.get("emitted", {}).items()}
    except (ValueError, AttributeError, TypeError):
        return {}  # a corrupt cursor is only a cache: start over from storage


def _load_progress(raw: str | None) -> dict[str, str]:
    """The progress signature last observed per partition slot; {} when unreadable."""
    try:
        data = json.loads(raw or "{}").get("progress", {})
        if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
            return {str(k): v for k, v in data.items()}
    except (ValueError, AttributeError, TypeError):
        pass
    return {}  # at worst every in-flight partition is observed once more


def build_infron_batch_sensor(
    *,
    name: str,
    storage: BatchStorage,
    collect_keys: Sequence[dg.AssetKey],
    resource_key: str = "infron",
    partitioned: bool = True,
    minimum_interval_seconds: int = 30,
    time_budget_seconds: float = 40.0,
    max_concurrent_polls: int = 16,
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.RUNNING,
    max_collect_reruns: int = 3,
    batches_key: dg.AssetKey | None = None,
    index_rescan_seconds: float | None = DEFAULT_RESCAN_SECONDS,
    use_in_flight_index: bool = True,
    admission: AdmissionControl | None = None,
    budget_ledger: bool = False,
) -> dg.SensorDefinition:
    """The ``<name>_sensor`` that polls batches and requests collection runs.

    ``batches_key`` (default ``<name>_batches``) is the submit asset that receives an
    observation with each in-flight partition's progress whenever it changes.
    ``index_rescan_seconds`` is how often a tick checks the in-flight index against every
    manifest (None: only when the index is missing); other ticks read only what is in flight.
    ``use_in_flight_index=False`` reads every manifest on every tick (the behaviour before
    the index; kept as the benchmark's baseline).
    ``admission`` (the pipeline's enqueued-token limit): each tick releases the capacity of
    batches seen terminal and requests a ``batches_key`` run for each partition whose
    pending chunks now fit, so the paid create call happens inside a run.
    ``budget_ledger`` (the pipeline has a price): each tick releases the budget reservations
    of attempts that never created anything (see ``SpendLedger.release_unpaid``).

    Args:
        name: the pipeline's name; the sensor is ``<name>_sensor``.
        storage: the pipeline's :class:`BatchStorage` (its manifests say what is in flight).
        collect_keys: the collect assets a finished partition's run materializes.
        resource_key: the key of the :class:`InfronResource` the sensor polls with.
        partitioned: whether the pipeline is partitioned (run requests carry the key).
        minimum_interval_seconds: seconds between ticks.
        time_budget_seconds: a tick stops polling after this long (ticks die at 60 s).
        max_concurrent_polls: batches polled at once in a tick.
        default_status: RUNNING (default) or STOPPED when the code location loads.
        max_collect_reruns: collect runs requested again for one attempt before giving up.
        batches_key: the submit asset that gets the progress observations.
        index_rescan_seconds: how often a tick checks the in-flight index against every
            manifest (None: only when the index is missing).
        use_in_flight_index: False reads every manifest on every tick.
        admission: the pipeline's :class:`AdmissionControl` (enqueued-token limit), if any.
        budget_ledger: release the budget reservations of attempts that created nothing.

    Example::

        build_infron_batch_sensor(name="reviews", storage=BatchStorage("/lake", "reviews"),
                                  collect_keys=[dg.AssetKey("reviews_results")])
    """
    observed_key = batches_key or dg.AssetKey(f"{name}_batches")

    @dg.sensor(
        name=f"{name}_sensor",
        asset_selection=[*collect_keys, observed_key],
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        required_resource_keys={resource_key},
        description=f"Polls in-flight batches of {name} and collects finished partitions.",
    )
    def _sensor(context: dg.SensorEvaluationContext, **resources: Any) -> dg.SensorResult:
        started = time.monotonic()
        emitted = _load_cursor(context.cursor)
        observed = _load_progress(context.cursor)
        found = open_partitions(
            storage,
            partitioned,
            context.log,
            use_index=use_in_flight_index,
            rescan_seconds=index_rescan_seconds,
        )
        in_flight = [p for p in found if p.settled]
        unsettled = [p for p in found if not p.settled]
        pending = [p for p in in_flight if p.latest.run_key not in emitted]
        resource = resources.get(resource_key) or getattr(context.resources, resource_key)
        ids = [bid for p in pending for bid in p.batch_ids]
        # Reading storage (a full scan of the manifests, now and then) used part of the tick.
        budget = max(5.0, time_budget_seconds - (time.monotonic() - started))
        with resource.get_client() as client:
            polled = _poll_all(client, ids, budget, max_concurrent_polls)
        requests = []
        for partition in pending:
            if _partition_done(context, partition, polled):
                requests.append(_run_request(partition, collect_keys, name))
                emitted[partition.latest.run_key] = time.time()
        for partition in in_flight:
            rerun = _rerun_number(context, partition, emitted, max_collect_reruns)
            if rerun:
                requests.append(_run_request(partition, collect_keys, name, rerun))
        notes: list[str] = []
        if admission is not None:
            with resource.get_client() as client:
                admission.release(
                    polled,
                    lambda ids: _poll_all(client, ids, 10.0, max_concurrent_polls),
                    context.log,
                )
        requests += submit_requests(
            context, unsettled, storage, admission, name, observed_key, partitioned, notes
        )
        for note in notes:
            context.log.warning(note)
        if budget_ledger:
            _release_unpaid(storage, context.log)
        # Keys of attempts no longer in flight (collected since) are dropped: the cursor stays
        # as small as what is in flight, and storage can always rebuild it.
        live = {p.latest.run_key for p in in_flight}
        cursor: dict[str, Any] = {"emitted": {k: v for k, v in emitted.items() if k in live}}
        pending_keys = {p.latest.run_key for p in pending}
        now = time.time()
        progress = [
            _progress(p, polled, now) if p.latest.run_key in pending_keys else None
            for p in in_flight
        ]
        events, signatures = _observations(in_flight, progress, observed, observed_key)
        if signatures:  # only partitions in flight now: the cursor never outgrows them
            cursor["progress"] = signatures
        context.log.info(
            f"{name}: {len(pending)} partition(s) in flight, {len(polled)}/{len(ids)} batch(es) "
            f"polled in {time.monotonic() - started:.1f}s, {len(requests)} collection(s) "
            f"requested, {len(events)} progress observation(s)"
        )
        return dg.SensorResult(
            run_requests=requests,
            cursor=json.dumps(cursor),
            asset_events=events,
            skip_reason=None
            if requests
            else _skip_reason(in_flight, progress, partitioned, unsettled, notes),
        )

    return _sensor


def _partition_done(
    context: dg.SensorEvaluationContext, partition: InFlight, polled: dict[str, Batch | Exception]
) -> bool:
    states = [polled.get(bid) for bid in partition.batch_ids]
    batches = [s for s in states if isinstance(s, Batch)]
    done = sum((b.completed_requests or 0) + (b.failed_requests or 0) for b in batches)
    total = sum(b.total_requests or 0 for b in batches)
    terminal = sum(1 for b in batches if b.is_terminal)
    polled_states = zip(partition.batch_ids, states, strict=True)
    errors = {bid: s for bid, s in polled_states if isinstance(s, Exception)}
    where = f"partition {printable(partition.partition_key or '-', 100)} attempt "
    where += str(partition.latest.attempt)
    context.log.info(f"{where}: {done}/{total} requests, {terminal}/{len(states)} batches finished")
    for batch_id, exc in errors.items():
        context.log.warning(
            f"{where}: polling batch {printable(batch_id, 80)} failed "
            f"({type(exc).__name__}: {printable(exc)}); it is polled again next tick"
        )
    return len(batches) == len(states) and terminal == len(states)


# A submit run the sensor requested for an attempt not fully submitted is tagged with the
# attempt's run_key: how many ran, and when the last one did, set the next one's run_key and
# the wait before it (15 s, 30 s, 1 min, ... 10 min at most).
SUBMIT_TAG = "infron/submit_key"
RESUME_BACKOFF_SECONDS = 15.0
MAX_RESUME_BACKOFF_SECONDS = 600.0
MAX_SUBMIT_FAILURES = 3
_NOT_YET_RUNNING = (
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
)


def _release_unpaid(storage: BatchStorage, log: logging.Logger) -> None:
    """Budget reservations of attempts that never created anything are given back."""
    try:
        for line in SpendLedger(storage).release_unpaid():
            log.warning(line)
    except Exception as exc:  # the ledger never fails a tick: collection comes first
        log.warning(f"budget ledger: could not release unpaid reservations: {printable(exc)}")


def _backoff(runs: int) -> float:
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
    """
    now = time.time()
    candidates = []
    for partition in unsettled:
        manifest = next(m for m in partition.attempts if not m.settled)
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
        if _locked(storage, manifest.partition_key):
            continue  # a submission runs now
        requests.append(_submit_request(manifest, runs, name, batches_key))
        context.log.info(
            f"{name}: partition {printable(manifest.partition_key or '-', 100)} attempt "
            f"{manifest.attempt} is not fully submitted: requesting the run that resumes it"
        )
    return requests


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
    where = printable(manifest.partition_key or "-", 100) if partitioned else "-"
    label = f"partition {where} attempt {manifest.attempt}"
    uncertain = [c.index for c in manifest.chunks if c.uncertain and not c.batch_id]
    if uncertain and manifest.api_style != "openai":
        notes.append(
            f"{label}: chunk(s) {uncertain} may have been created (a create call ended "
            "ambiguously, and this API cannot list batches): check the provider's dashboard, "
            "then materialize the partition with resubmit_uncertain: true if they do not exist"
        )
        return False
    grace = submit_module.REATTACH_GRACE_SECONDS
    if uncertain and _past(manifest, uncertain, 2 * grace):
        notes.append(
            f"{label}: chunk(s) {uncertain} are still not listed by the provider "
            f"{2 * grace // 60} minutes after their create call, and its list "
            "cannot prove they do not exist (it shows no batch with our metadata): check the "
            "provider's dashboard, then materialize the partition with resubmit_uncertain: "
            "true if they do not exist"
        )
        return False
    if any(r.dagster_run.status in _NOT_YET_RUNNING for r in runs):
        return False
    failures = 0
    for record in runs:  # newest first
        if record.dagster_run.status != dg.DagsterRunStatus.FAILURE:
            break
        failures += 1
    if failures >= MAX_SUBMIT_FAILURES:
        notes.append(
            f"{label}: the last {failures} runs resuming its submission failed; see them, "
            "fix the cause and materialize the partition again"
        )
        return False
    if runs:
        last = runs[0]
        when = last.end_time or last.start_time or last.create_timestamp.timestamp()
        if now - when < _backoff(len(runs)):
            return False
    return True


def _past(manifest: Manifest, chunks: Sequence[int], seconds: float) -> bool:
    """Whether every create call of ``chunks`` started more than ``seconds`` ago."""
    wanted = set(chunks)
    starts = [_timestamp(c.create_started_at) for c in manifest.chunks if c.index in wanted]
    return all(t is not None and time.time() - t > seconds for t in starts)


def _locked(storage: BatchStorage, partition_key: str | None) -> bool:
    """Whether a run holds the partition's lock now (it is submitting or collecting)."""
    try:
        with storage.lock(partition_key, wait_seconds=0):
            return False
    except LockTimeout:
        return True


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


_COLLECT_TAG = "infron/collect_key"
_GAVE_UP = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)


def _rerun_number(
    context: dg.SensorEvaluationContext,
    partition: InFlight,
    emitted: dict[str, float],
    max_reruns: int,
) -> int | None:
    """The rerun to request when every collection run of an emitted attempt failed.

    A failed run keeps its run_key forever, so a transient failure (an object store hiccup)
    would otherwise leave the partition uncollected until someone notices.
    """
    key = partition.latest.run_key
    if key not in emitted:
        return None
    runs = context.instance.get_runs(filters=dg.RunsFilter(tags={_COLLECT_TAG: key}))
    if not runs or any(run.status not in _GAVE_UP for run in runs) or len(runs) > max_reruns:
        return None
    context.log.warning(f"collection of {key} failed {len(runs)} time(s); requesting it again")
    return len(runs)


def _run_request(
    partition: InFlight, collect_keys: Sequence[dg.AssetKey], name: str, rerun: int = 0
) -> dg.RunRequest:
    key = partition.latest.run_key
    return dg.RunRequest(
        run_key=f"{key}:rerun{rerun}" if rerun else key,
        partition_key=partition.partition_key,
        asset_selection=list(collect_keys),
        tags={
            "infron/pipeline": name,
            "infron/attempt": str(partition.latest.attempt),
            _COLLECT_TAG: key,
        },
    )


@dataclass
class Progress:
    """Where one in-flight partition stands this tick, as the provider reports it.

    A batch that is terminal counts all of its requests as settled (what it did not finish
    never will: collection fails those rows); a live batch counts what it completed or failed.
    ``known`` is False when some batch did not answer this tick.
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

    def metadata(self) -> dict[str, Any]:
        """Numbers for people: ints, a one-decimal percent, and a one-line summary."""
        summary = (
            f"{self.settled}/{self.requests_total} requests ({self.percent} %), "
            f"{self.failed} failed, {self.batches_finished}/{self.batches_total} batches finished"
        )
        values: dict[str, Any] = {
            "attempt": self.attempt,
            "requests_completed": self.completed,
            "requests_failed": self.failed,
            "requests_settled": self.settled,
            "requests_total": self.requests_total,
            "progress_percent": dg.MetadataValue.float(self.percent),
            "batches_finished": self.batches_finished,
            "batches_total": self.batches_total,
        }
        if self.elapsed is not None:
            values["elapsed_seconds"] = round(self.elapsed)
            summary += f", {_duration(self.elapsed)} since submission"
        eta = self.eta
        if eta is not None:
            values["eta_seconds"] = round(eta)
            summary += ", finished" if eta == 0 else f", about {_duration(eta)} left"
        return {"progress": summary, **values}


def _progress(partition: InFlight, polled: dict[str, Batch | Exception], now: float) -> Progress:
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
    starts = [_timestamp(m.submitted_at or m.created_at) for m in uncollected]
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


def _timestamp(text: str | None) -> float | None:
    try:
        when = datetime.fromisoformat(text or "")
    except (TypeError, ValueError):
        return None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def _duration(seconds: float) -> str:
    """``42 s``, ``7 min``, ``3 h 05 min``, ``2 d 4 h``."""
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


def _observations(
    in_flight: Sequence[InFlight],
    progress: Sequence[Progress | None],
    observed: dict[str, str],
    asset_key: dg.AssetKey,
) -> tuple[list[dg.AssetObservation], dict[str, str]]:
    """Observations of the partitions whose progress changed, and the signatures to keep.

    A partition not polled this tick (collection already requested) or not fully answered
    keeps its last signature, so a flaky poll does not make the UI flicker.
    """
    events, signatures = [], {}
    for partition, state in zip(in_flight, progress, strict=True):
        slot = _slot(partition.partition_key)
        if state is None or not state.known:
            if slot in observed:
                signatures[slot] = observed[slot]
            continue
        signatures[slot] = state.signature
        if observed.get(slot) != state.signature:
            events.append(
                dg.AssetObservation(
                    asset_key=asset_key,
                    partition=partition.partition_key,
                    metadata=state.metadata(),
                    description="Progress of the in-flight batches, reported by the sensor.",
                )
            )
    return events, signatures


_SHOWN = 5


def _skip_reason(
    in_flight: Sequence[InFlight],
    progress: Sequence[Progress | None],
    partitioned: bool,
    unsettled: Sequence[InFlight] = (),
    notes: Sequence[str] = (),
) -> str:
    """One bounded line: how many partitions are in flight and how far the first few are,
    then how many wait to be submitted and what needs a person."""
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
