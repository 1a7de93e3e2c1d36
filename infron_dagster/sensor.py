"""POLL: a sensor that watches in-flight batches and asks for collection when they finish.

It reads the manifests on storage (its cursor is only a cache), polls every in-flight batch
concurrently inside a time budget, and emits one RunRequest per finished attempt with a
run_key that includes the attempt.

Example:
    >>> sensor = build_infron_batch_sensor(name="reviews", storage=storage,
    ...     collect_keys=[dg.AssetKey("reviews_results"), dg.AssetKey("reviews_failed")])
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

from .client import InfronClient
from .collect import active_attempts
from .manifest import Manifest
from .models import Batch
from .storage import UNPARTITIONED, BatchStorage
from .submit import load_manifests
from .untrusted import printable

__all__ = ["build_infron_batch_sensor", "find_in_flight"]

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
    def batch_ids(self) -> list[str]:
        return [bid for m in self.attempts if m.state != "collected" for bid in m.batch_ids]


def find_in_flight(
    storage: BatchStorage, partitioned: bool, log: logging.Logger | None = None
) -> list[InFlight]:
    """Every partition with a submitted, uncollected attempt, from storage alone.

    A partition whose manifests cannot be read is logged and skipped: one bad file must not
    stall every other partition's collection.
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
        if not all(m.fully_submitted for m in attempts):
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
) -> dg.SensorDefinition:
    """The ``<name>_sensor`` that polls batches and requests collection runs.

    Example:
        >>> build_infron_batch_sensor(name="reviews", storage=BatchStorage("/lake", "reviews"),
        ...                           collect_keys=[dg.AssetKey("reviews_results")])
    """

    @dg.sensor(
        name=f"{name}_sensor",
        asset_selection=list(collect_keys),
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        required_resource_keys={resource_key},
        description=f"Polls in-flight batches of {name} and collects finished partitions.",
    )
    def _sensor(context: dg.SensorEvaluationContext, **resources: Any) -> dg.SensorResult:
        started = time.monotonic()
        emitted = _load_cursor(context.cursor)
        in_flight = find_in_flight(storage, partitioned, context.log)
        pending = [p for p in in_flight if p.latest.run_key not in emitted]
        resource = resources.get(resource_key) or getattr(context.resources, resource_key)
        ids = [bid for p in pending for bid in p.batch_ids]
        with resource.get_client() as client:
            polled = _poll_all(client, ids, time_budget_seconds, max_concurrent_polls)
        requests = []
        for partition in pending:
            if _partition_done(context, partition, polled):
                requests.append(_run_request(partition, collect_keys, name))
                emitted[partition.latest.run_key] = time.time()
        for partition in in_flight:
            rerun = _rerun_number(context, partition, emitted, max_collect_reruns)
            if rerun:
                requests.append(_run_request(partition, collect_keys, name, rerun))
        live = (
            {p.latest.run_key for p in find_in_flight(storage, partitioned)} if requests else None
        )
        cursor = {k: v for k, v in emitted.items() if live is None or k in live}
        context.log.info(
            f"{name}: {len(pending)} partition(s) in flight, {len(polled)}/{len(ids)} batch(es) "
            f"polled in {time.monotonic() - started:.1f}s, {len(requests)} collection(s) requested"
        )
        return dg.SensorResult(run_requests=requests, cursor=json.dumps({"emitted": cursor}))

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
