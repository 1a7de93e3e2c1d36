"""POLL: a sensor that watches in-flight batches and asks for collection when they finish.

It reads the manifests on storage (its cursor is only a cache), polls every in-flight batch
concurrently inside a time budget, and emits one RunRequest per finished attempt with a
run_key that includes the attempt.

While batches run, each tick reports where every in-flight partition stands as an asset
observation on ``<name>_batches`` (only when that changed since the last one) and says it in
one line as the tick's skip reason (``progress.py``), so the asset pages and the sensor's
tick list show progress instead of "0 runs requested". It also requests the runs that resume
attempts not fully submitted (``resume.py``).

Example::

    sensor = build_infron_batch_sensor(name="reviews", storage=storage,
        collect_keys=[dg.AssetKey("reviews_results"), dg.AssetKey("reviews_failed")])
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import dagster as dg

from .admission import AdmissionControl
from .auto_retry import retry_requests
from .budget import SpendLedger
from .client import InfronClient
from .collect import active_attempts
from .inflight import DEFAULT_RESCAN_SECONDS, IndexedPartition, InFlightIndex
from .manifest import load_manifests
from .models import Batch
from .progress import InFlight, Progress, measure_progress, progress_observations, skip_reason
from .resume import submit_requests
from .status import tag_runs
from .storage import UNPARTITIONED, BatchStorage
from .untrusted import printable

__all__ = [
    "build_infron_batch_sensor",
    "find_in_flight",
    "find_in_flight_full_scan",
    "open_partitions",
]

logger = logging.getLogger(__name__)


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
    scanned: list[IndexedPartition] | None = None,
) -> list[InFlight]:
    """Every partition whose latest active attempt is not collected: those in flight, and
    those with an attempt not fully submitted (chunks waiting for admission, or left unsent
    by a run that died), which the sensor requests a submit run for.

    ``scanned`` (a list) receives every partition, collected ones too, that the index's
    full rescan read in this call: empty on the other calls (and without the index)."""
    if not use_index:
        return find_in_flight_full_scan(storage, partitioned, log, settled_only=False)
    index = InFlightIndex(storage, rescan_seconds=rescan_seconds, log=log or logger)
    found = [InFlight(p.partition_key, p.attempts) for p in index.in_flight()]
    if scanned is not None:
        scanned.extend(index.scanned_partitions)
    return found


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
    auto_retry: bool = False,
    max_attempts: int = 3,
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
        auto_retry: request the retry run of each collected partition whose retryable
            failed rows a collection queued (see ``retry_queue``), when it is due; a lost
            queue marker is rebuilt at the index's full rescan (not without the index).
        max_attempts: attempts per partition, the first included (bounds auto_retry).

    Example::

        build_infron_batch_sensor(name="reviews", storage=BatchStorage("/lake", "reviews"),
                                  collect_keys=[dg.AssetKey("reviews_results")])
    """
    t = _Tick(
        name=name,
        storage=storage,
        collect_keys=tuple(collect_keys),
        observed_key=batches_key or dg.AssetKey(f"{name}_batches"),
        resource_key=resource_key,
        partitioned=partitioned,
        time_budget_seconds=time_budget_seconds,
        max_concurrent_polls=max_concurrent_polls,
        max_collect_reruns=max_collect_reruns,
        index_rescan_seconds=index_rescan_seconds,
        use_in_flight_index=use_in_flight_index,
        admission=admission,
        budget_ledger=budget_ledger,
        auto_retry=auto_retry,
        max_attempts=max_attempts,
    )

    @dg.sensor(
        name=f"{name}_sensor",
        asset_selection=[*collect_keys, t.observed_key],
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        required_resource_keys={resource_key},
        description=f"Polls in-flight batches of {name} and collects finished partitions.",
    )
    def _sensor(context: dg.SensorEvaluationContext, **resources: Any) -> dg.SensorResult:
        resource = resources.get(resource_key) or getattr(context.resources, resource_key)
        return t.run(context, resource)

    return _sensor


@dataclass(frozen=True)
class _Tick:
    """What one sensor tick does, with the sensor's settings: poll what is in flight,
    request collections, resume unfinished submissions, report progress."""

    name: str
    storage: BatchStorage
    collect_keys: tuple[dg.AssetKey, ...]
    observed_key: dg.AssetKey
    resource_key: str
    partitioned: bool
    time_budget_seconds: float
    max_concurrent_polls: int
    max_collect_reruns: int
    index_rescan_seconds: float | None
    use_in_flight_index: bool
    admission: AdmissionControl | None
    budget_ledger: bool
    auto_retry: bool = False
    max_attempts: int = 3

    def run(self, context: dg.SensorEvaluationContext, resource: Any) -> dg.SensorResult:
        started = time.monotonic()
        emitted = _load_cursor(context.cursor)
        scanned: list[IndexedPartition] = []  # what a rescan read: lost retry markers too
        found = open_partitions(
            self.storage,
            self.partitioned,
            context.log,
            use_index=self.use_in_flight_index,
            rescan_seconds=self.index_rescan_seconds,
            scanned=scanned,
        )
        in_flight = [p for p in found if p.settled]
        unsettled = [p for p in found if not p.settled]
        pending = [p for p in in_flight if p.latest.run_key not in emitted]
        ids = [bid for p in pending for bid in p.batch_ids]
        # Reading storage (a full scan of the manifests, now and then) used part of the tick.
        budget = max(5.0, self.time_budget_seconds - (time.monotonic() - started))
        with resource.get_client() as client:
            polled = _poll_all(client, ids, budget, self.max_concurrent_polls)
        requests = self._collect_requests(context, in_flight, pending, polled, emitted)
        notes: list[str] = []
        requests += self._submit_requests(context, resource, polled, unsettled, notes)
        if self.auto_retry:
            requests += retry_requests(
                context,
                self.storage,
                self.name,
                self.observed_key,
                self.max_attempts,
                notes,
                scanned=scanned,
            )
        progress = self._progress(in_flight, pending, polled)
        events, cursor = self._cursor(context.cursor, in_flight, progress, emitted)
        runs = {p.partition_key: p.latest.run_id for p in in_flight}  # who submitted each
        tag_runs(context.instance, self.name, events, runs, context.log)
        context.log.info(
            f"{self.name}: {len(pending)} partition(s) in flight, {len(polled)}/{len(ids)} "
            f"batch(es) polled in {time.monotonic() - started:.1f}s, {len(requests)} "
            f"collection(s) requested, {len(events)} progress observation(s)"
        )
        reason = skip_reason(in_flight, progress, self.partitioned, unsettled, notes)
        return dg.SensorResult(
            run_requests=requests,
            cursor=json.dumps(_with_status(cursor, reason, len(requests))),
            asset_events=events,
            skip_reason=None if requests else reason,
        )

    def _collect_requests(
        self,
        context: dg.SensorEvaluationContext,
        in_flight: Sequence[InFlight],
        pending: Sequence[InFlight],
        polled: dict[str, Batch | Exception],
        emitted: dict[str, float],
    ) -> list[dg.RunRequest]:
        """A collection for each partition whose batches all ended, and reruns of failed
        collections; ``emitted`` records the run keys requested."""
        requests = []
        for partition in pending:
            if _partition_done(context, partition, polled):
                requests.append(_run_request(partition, self.collect_keys, self.name))
                emitted[partition.latest.run_key] = time.time()
        for partition in in_flight:
            rerun = _rerun_number(context, partition, emitted, self.max_collect_reruns)
            if rerun:
                requests.append(_run_request(partition, self.collect_keys, self.name, rerun))
        return requests

    def _submit_requests(
        self,
        context: dg.SensorEvaluationContext,
        resource: Any,
        polled: dict[str, Batch | Exception],
        unsettled: Sequence[InFlight],
        notes: list[str],
    ) -> list[dg.RunRequest]:
        """Admission's capacity released, then the runs resuming unfinished submissions;
        the budget reservations of attempts that created nothing are given back."""
        if self.admission is not None:
            with resource.get_client() as client:
                self.admission.release(
                    polled,
                    lambda ids: _poll_all(client, ids, 10.0, self.max_concurrent_polls),
                    context.log,
                )
        requests = submit_requests(
            context,
            unsettled,
            self.storage,
            self.admission,
            self.name,
            self.observed_key,
            self.partitioned,
            notes,
        )
        for note in notes:
            context.log.warning(note)
        if self.budget_ledger:
            _release_unpaid(self.storage, context.log)
        return requests

    def _progress(
        self,
        in_flight: Sequence[InFlight],
        pending: Sequence[InFlight],
        polled: dict[str, Batch | Exception],
    ) -> list[Progress | None]:
        """Each in-flight partition's progress; None for those whose collection was asked."""
        pending_keys = {p.latest.run_key for p in pending}
        now = time.time()
        return [
            measure_progress(p, polled, now) if p.latest.run_key in pending_keys else None
            for p in in_flight
        ]

    def _cursor(
        self,
        raw: str | None,
        in_flight: Sequence[InFlight],
        progress: Sequence[Progress | None],
        emitted: dict[str, float],
    ) -> tuple[list[dg.AssetObservation], dict[str, Any]]:
        """The progress observations to record and the next cursor.

        Keys of attempts no longer in flight (collected since) are dropped: the cursor stays
        as small as what is in flight, and storage can always rebuild it.
        """
        live = {p.latest.run_key for p in in_flight}
        cursor: dict[str, Any] = {"emitted": {k: v for k, v in emitted.items() if k in live}}
        observed = _load_progress(raw)
        events, signatures = progress_observations(in_flight, progress, observed, self.observed_key)
        if signatures:  # only partitions in flight now: the cursor never outgrows them
            cursor["progress"] = signatures
        return events, cursor


def _with_status(cursor: dict[str, Any], reason: str, requested: int) -> dict[str, Any]:
    """The cursor with the tick's one-line reason first: Dagster 1.13 shows a skip reason only
    in a tooltip, but the cursor in full on the sensor's page and at the head of each row of
    its tick list. Never read back: the cursor stays a cache of storage."""
    runs = f"{requested} run(s) requested. " if requested else ""
    return {"status": runs + reason, **cursor}


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


def _release_unpaid(storage: BatchStorage, log: logging.Logger) -> None:
    """Budget reservations of attempts that never created anything are given back."""
    try:
        for line in SpendLedger(storage).release_unpaid():
            log.warning(line)
    except Exception as exc:  # the ledger never fails a tick: collection comes first
        log.warning(f"budget ledger: could not release unpaid reservations: {printable(exc)}")


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
