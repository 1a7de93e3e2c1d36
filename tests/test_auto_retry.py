"""auto_retry (issue 18): the sensor retries a collected partition's retryable failed rows
by itself, after a backoff, up to max_attempts; nobody launches the retry job.

Real Dagster runs and the real sensor on the embedded local server, whose failure_rate
knob fails a fresh draw of requests in every batch (as a real service's transient errors).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import dagster as dg
import pyarrow.compute as pc
from conftest import dagster_instance, make_local_dir
from harness import Pipeline

from infron_dagster import InfronResource
from infron_dagster.history import PartitionHistory
from infron_dagster.retry_queue import RetryQueue

PARTS = dg.StaticPartitionsDefinition(["a", "b", "c"])
ROWS = 20


def _flow(tmp_path, **factory) -> Pipeline:
    local = make_local_dir(str(tmp_path / "local"), failure_rate=0.3)
    resource = InfronResource(base_url=f"local://{local}", api_style="infron")
    return Pipeline.build(tmp_path, resource, PARTS, rows=ROWS, **factory)


def _settled(flow: Pipeline, keys) -> Callable[[], bool]:
    storage = flow.storage

    def check() -> bool:
        done = all(
            (a := PartitionHistory.load(storage, k).active) and a[-1].state == "collected"
            for k in keys
        )
        return done and not RetryQueue(storage).queued()

    return check


def _ticks_request_no_retry(flow: Pipeline, instance: dg.DagsterInstance) -> None:
    """Three ticks (running what they request: the collection first): no automatic retry."""
    for _ in range(3):
        ran = flow.tick(instance)
        assert not [r for r in ran if "auto-retry" in (r.run_key or "")]


def test_the_sensor_retries_retryable_failures_until_none_remain_or_attempts_run_out(tmp_path):
    flow = _flow(tmp_path, auto_retry=True, auto_retry_backoff_seconds=(0.0,), max_attempts=3)
    storage = flow.pipeline.storage
    with dagster_instance() as instance:
        for key in PARTS.get_partition_keys():  # the only runs a person launches
            assert flow.submit(instance, key).success
        keys = PARTS.get_partition_keys()
        requested = flow.drive(instance, _settled(flow, keys), timeout=90.0)
    retries = [r for r in requested if "auto-retry" in (r.run_key or "")]
    assert retries, "30% of 60 rows failing: some partition needs a retry"
    assert all(
        r.run_config == {"ops": {"rev_batches": {"config": {"retry_failed": True}}}}
        for r in retries
    )
    for key in PARTS.get_partition_keys():
        active = PartitionHistory.load(storage, key).active
        assert [m.kind for m in active][1:] == ["retry"] * (len(active) - 1)
        results = storage.read_table(storage.table_path("results", key))
        failed = storage.read_table(storage.table_path("failed", key))
        assert results.num_rows + failed.num_rows == ROWS
        retryable = pc.sum(failed.column("retryable")).as_py() or 0
        # Converged: nothing retryable is left, or the attempts are used up
        assert retryable == 0 or len(active) == 3, (key, retryable, len(active))
    # Each retry was asked once per attempt: no attempt retried twice
    assert len({r.run_key for r in retries}) == len(retries)


def test_the_retry_waits_for_its_backoff(tmp_path):
    flow = _flow(tmp_path, auto_retry=True, auto_retry_backoff_seconds=(3600.0,))
    storage = flow.pipeline.storage
    with dagster_instance() as instance:
        assert flow.submit(instance, "a").success
        _ticks_request_no_retry(flow, instance)  # collect, then ticks within the hour
        (queued,) = RetryQueue(storage).queued()
    assert queued.attempt == 1 and queued.rows > 0
    assert 3500 < queued.due_at - time.time() <= 3600
    assert len(PartitionHistory.load(storage, "a").manifests) == 1


def test_without_auto_retry_the_sensor_never_retries(tmp_path):
    flow = _flow(tmp_path)
    storage = flow.pipeline.storage
    with dagster_instance() as instance:
        assert flow.submit(instance, "a").success
        _ticks_request_no_retry(flow, instance)
    failed = storage.read_table(storage.table_path("failed", "a"))
    assert failed.num_rows and not RetryQueue(storage).queued()
    assert len(PartitionHistory.load(storage, "a").manifests) == 1


def test_a_partition_out_of_attempts_says_so_and_is_not_retried(tmp_path):
    # max_attempts=1: the first collection already used every attempt (failure_rate 0.3 of
    # 20 rows leaves a retryable failure but for a 0.08 % draw; the test then says so).
    flow = _flow(tmp_path, auto_retry=True, auto_retry_backoff_seconds=(0.0,), max_attempts=1)
    storage = flow.pipeline.storage
    with dagster_instance() as instance:
        assert flow.submit(instance, "a").success
        _ticks_request_no_retry(flow, instance)
    failed = storage.read_table(storage.table_path("failed", "a"))
    retryable = pc.sum(failed.column("retryable")).as_py() or 0
    assert retryable, "no request failed: a 0.7**20 draw, run again"
    meta = flow.runs[-1].asset_materializations_for_node("rev_collect")
    notes = [m.metadata["auto_retry"].value for m in meta if "auto_retry" in m.metadata]
    assert notes == [
        f"{retryable} retryable row(s) stay failed: 1 of max_attempts=1 attempts are used, "
        "no automatic retry"
    ]
    assert not RetryQueue(storage).queued()
    assert len(PartitionHistory.load(storage, "a").manifests) == 1
