"""STATUS: one line per partition on ``<name>_batches``, where the UI's partition view shows it.

Everything is real: Dagster runs, sensor ticks whose asset events are stored as the daemon
stores them (``report_runless_asset_event``), the embedded local server on a settable clock
(in_progress_seconds=60: +30 s is half-way), and the statuses read back from the instance in
the order Dagster recorded them. Also the metadata clean-up (no zero counter, no duplicate,
no one-item JSON list, money in dollars beside its estimate) and the checks of a partition
that has nothing collected (skipped, never red).
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace
from typing import Any

import dagster as dg
import pytest
from conftest import dagster_instance, make_local_dir
from harness import Pipeline

from infron_dagster import InfronResource, ModelPrice
from infron_dagster.progress import Progress
from infron_dagster.status import record_status

PARTS = dg.StaticPartitionsDefinition(["a", "b"])
ROWS = 20
PRICE = ModelPrice(input_per_million=0.15, output_per_million=0.60)


@pytest.fixture
def instance():
    """An instance of the test's own: the statuses read back are this test's only."""
    with dagster_instance() as fresh:
        yield fresh


def slow(tmp_path, **knobs: Any) -> InfronResource:
    folder = make_local_dir(str(tmp_path / "slow"), in_progress_seconds=60, **knobs)
    return InfronResource(base_url=f"local://{folder}", api_style="infron", max_retries=2)


def build(tmp_path, resource: InfronResource, **factory: Any) -> Pipeline:
    return Pipeline.build(tmp_path, resource, PARTS, rows=ROWS, **factory)


def tick(flow: Pipeline, instance) -> dg.SensorResult:
    """One tick as the daemon runs it: its asset events stored, its new runs executed."""
    result = flow.evaluate(instance)
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    for request in result.run_requests or []:
        if request.run_key not in flow.seen:
            flow.seen.add(request.run_key)
            flow.requested.append(request)
            flow.run(instance, request)
    return result


def events(instance, asset: dg.AssetKey, key: str | None = None) -> list[Any]:
    """Every materialization and observation of ``asset`` (one partition), oldest first."""
    found = dg.AssetRecordsFilter(asset_key=asset, asset_partitions=[key] if key else None)
    records = [
        *instance.fetch_materializations(found, limit=1000).records,
        *instance.fetch_observations(found, limit=1000).records,
    ]
    return [
        r.asset_materialization or r.asset_observation
        for r in sorted(records, key=lambda r: r.storage_id)
    ]


def statuses(flow: Pipeline, instance, key: str = "a") -> list[str]:
    """The partition's status lines, in the order they were recorded."""
    found = [e.metadata.get("status") for e in events(instance, flow.batches_key, key)]
    return [s.value for s in found if s is not None]


def run_tag(flow: Pipeline, instance, key: str = "a") -> str | None:
    """The status tag of the run that submitted the partition's latest attempt."""
    run = instance.get_run_by_id(flow.manifests(key)[-1].run_id)
    return run.tags.get("rev/status")  # one tag per pipeline: a run may submit several


def words(lines: list[str]) -> list[str]:
    """Each status's first word(s), repeats collapsed: the transitions."""
    out: list[str] = []
    for line in lines:
        word = line.split(":")[0].split(" (")[0]
        if not out or out[-1] != word:
            out.append(word)
    return out


# --- the transitions --------------------------------------------------------------------------


def test_waiting_in_flight_collected_in_order(tmp_path, instance, clock):
    # One batch per partition; the enqueued-token limit holds one of them at a time, so b
    # waits for admission until a's batch ends.
    flow = build(
        tmp_path,
        slow(tmp_path),
        max_requests_per_batch=ROWS,
        params={"max_tokens": 16},
        max_enqueued_tokens=500,
        price=PRICE,
    )
    assert flow.submit(instance, "a").success and flow.submit(instance, "b").success
    assert statuses(flow, instance, "a") == ["submitted: 20 requests in 1 batch"]
    (waiting,) = statuses(flow, instance, "b")
    assert waiting.startswith("waiting for admission: 0 of 1 batches created, 1 wait for")

    clock.now += 30  # a is half-way
    tick(flow, instance)
    assert statuses(flow, instance, "a")[-1].startswith("in flight: 50.0 % done (10/20 requests)")
    # The run that submitted it says it too, short, where the Runs list and a backfill show it
    assert run_tag(flow, instance, "a").startswith("in flight: 50.0 % done")
    assert run_tag(flow, instance, "b").startswith("waiting for admission: 0 of 1 batches")

    clock.now += 31  # a ends: collected; its capacity frees b, which the sensor submits
    for _ in range(3):
        tick(flow, instance)
    assert statuses(flow, instance, "a")[-1] == "collected: 20 of 20 rows succeeded"
    assert "submitted: 20 requests in 1 batch" in statuses(flow, instance, "b")

    clock.now += 30
    tick(flow, instance)
    clock.now += 31
    for _ in range(2):
        tick(flow, instance)
    assert flow.collected("a", "b")()
    assert words(statuses(flow, instance, "a")) == [
        "submitted",
        "in flight",
        "collecting",
        "collected",
    ]
    assert words(statuses(flow, instance, "b")) == [
        "waiting for admission",
        "submitted",
        "in flight",
        "collecting",
        "collected",
    ]
    # The collected tables say it too, on their own page.
    (results,) = events(instance, flow.pipeline.results_key, "b")
    assert results.metadata["status"].value == "collected: 20 of 20 rows succeeded"
    assert (
        run_tag(flow, instance, "a")
        == run_tag(flow, instance, "b")
        == ("collected: 20 of 20 rows succeeded")
    )


def test_cancelled_partition_says_so_until_it_is_retried(tmp_path, instance, clock):
    flow = build(tmp_path, slow(tmp_path))
    flow.submit(instance, "a")
    clock.now += 30
    tick(flow, instance)
    assert flow.job("cancel", instance, "a").success
    assert statuses(flow, instance, "a")[-1] == (
        "cancelled: 3 batches stopped; the sensor collects the finished rows, the rest fail "
        "as batch_cancelled"
    )
    for _ in range(2):
        tick(flow, instance)
    assert flow.collected("a")()
    lines = statuses(flow, instance, "a")
    assert words(lines) == ["submitted", "in flight", "cancelled", "collecting", "cancelled"]
    assert lines[-1].startswith("cancelled: ") and "rows answered and kept" in lines[-1]
    assert "(" in lines[-1] and "retryable)" in lines[-1]

    # Cancelling again finds nothing in flight: nothing new is said on the partition.
    again = flow.job("cancel", instance, "a")
    assert again.success and statuses(flow, instance, "a") == lines

    assert run_tag(flow, instance, "a").startswith("cancelled: ")
    flow.job("retry", instance, "a")
    assert statuses(flow, instance, "a")[-1].startswith("submitted (attempt 2): ")
    assert run_tag(flow, instance, "a").startswith("submitted: ")  # the retry run's own


def test_a_partition_held_for_a_pilot_says_so_then_goes(tmp_path, instance):
    instant = make_local_dir(str(tmp_path / "instant"))
    resource = InfronResource(base_url=f"local://{instant}", api_style="infron")
    flow = build(tmp_path, resource, pilot_rows=4, price=PRICE)
    flow.submit(instance, "a")  # the pilot: 4 rows first
    flow.submit(instance, "b")  # the same prompt: held until a's pilot is judged
    assert statuses(flow, instance, "a")[-1].startswith("submitted: 4 requests in 1 batch; ")
    (held,) = statuses(flow, instance, "b")
    assert held.startswith("waiting for a pilot: ")
    flow.drive(instance, lambda: tick(flow, instance) and flow.collected("a", "b")(), timeout=30)
    assert words(statuses(flow, instance, "b"))[0] == "waiting for a pilot"
    # attempt 1 was the held placeholder (it created nothing): the rows went as attempt 2
    assert statuses(flow, instance, "b")[-1] == "collected (attempt 2): 20 of 20 rows succeeded"
    # The rest was estimated from the pilot: the results say so beside the actual cost
    (results,) = events(instance, flow.pipeline.results_key, "b")
    assert results.metadata["cost_estimate_basis"].value.startswith("pilot of 4 rows")


def test_a_failed_collection_says_why_on_the_partition(tmp_path, instance):
    flow = build(tmp_path, slow(tmp_path))
    flow.submit(instance, "a")
    # The provider does not know these batches any more (another server, an empty folder).
    empty = make_local_dir(str(tmp_path / "empty"))
    flow.resource = InfronResource(base_url=f"local://{empty}", api_style="infron", max_retries=0)
    failed = flow.collect(instance, "a", raise_on_error=False)
    assert not failed.success
    last = statuses(flow, instance, "a")[-1]
    assert last.startswith("failed: collection: ") and "404" in last, last
    assert len(last) < 420  # one bounded line

    again = flow.collect(instance, "a", raise_on_error=False)  # the same failure: said once
    assert not again.success and statuses(flow, instance, "a").count(last) == 1


def test_the_tick_says_why_where_the_sensor_page_shows_it(tmp_path, instance, clock):
    # Dagster shows a skip reason only in a tooltip, the cursor in full on the sensor's page
    # and at the head of each tick row: the reason leads the cursor.
    flow = build(tmp_path, slow(tmp_path))
    flow.submit(instance, "a")
    waiting = flow.evaluate(instance)
    assert waiting.cursor.startswith('{"status": "1 partition in flight: a 0/20"')
    assert json.loads(waiting.cursor)["status"] == waiting.skip_reason.skip_message
    clock.now += 61
    done = flow.evaluate(instance)
    assert done.skip_reason is None and len(done.run_requests) == 1
    assert json.loads(done.cursor)["status"].startswith("1 run(s) requested. 1 partition in")


# --- said only when it changed, never failing the work ----------------------------------------


def test_nothing_changed_nothing_observed(tmp_path, instance, clock):
    flow = build(tmp_path, slow(tmp_path))
    flow.submit(instance, "a")
    first = tick(flow, instance)
    assert [e.metadata["status"].value for e in first.asset_events] == [
        "in flight: waiting for the provider to start (0/20 requests)"
    ]
    assert tick(flow, instance).asset_events == []  # nothing moved at the provider
    clock.now += 30
    assert len(tick(flow, instance).asset_events) == 1
    assert tick(flow, instance).asset_events == []

    clock.now += 31
    for _ in range(2):
        tick(flow, instance)
    recorded = statuses(flow, instance, "a")
    flow.collect(instance, "a")  # collecting a collected partition again: no news
    assert statuses(flow, instance, "a") == recorded
    assert len(recorded) == len(set(recorded)), recorded


def test_a_status_never_fails_a_run_or_a_tick(tmp_path, instance, monkeypatch, caplog):
    broken = SimpleNamespace(instance=None, log=logging.getLogger("status-test"))
    with caplog.at_level(logging.WARNING):
        assert record_status(broken, dg.AssetKey("rev_batches"), "a", "collected: 1 of 1") is False
    assert "could not record the status of partition 'a'" in caplog.text

    instant = make_local_dir(str(tmp_path / "instant"))
    flow = build(tmp_path, InfronResource(base_url=f"local://{instant}"))
    flow.submit(instance, "a")

    def boom(self) -> str:
        raise RuntimeError("a status bug")

    monkeypatch.setattr(Progress, "status", property(boom))
    result = flow.evaluate(instance)  # the batches ended: the collection is still requested
    assert [r.partition_key for r in result.run_requests] == ["a"]
    assert result.asset_events == []  # no observation this tick, and its signature not kept
    assert "progress" not in json.loads(result.cursor)


# --- metadata: news only, money in dollars beside its estimate --------------------------------


def _metadata_dicts(instance) -> list[tuple[str, dict[str, Any]]]:
    """(where, metadata) of every event the pipeline recorded: materializations,
    observations, check evaluations and step outputs (the cancel job's)."""
    found = []
    for asset in ("rev_batches", "rev_results", "rev_failed"):
        for event in events(instance, dg.AssetKey(asset)):
            kind = type(event).__name__.removeprefix("Asset").lower()
            found.append((f"{kind} {asset}", event.metadata))
    for record in instance.get_event_records(
        dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION), limit=1000
    ):
        evaluation = record.event_log_entry.dagster_event.event_specific_data
        found.append((f"check {evaluation.check_name}", evaluation.metadata))
    for record in instance.get_event_records(
        dg.EventRecordsFilter(event_type=dg.DagsterEventType.STEP_OUTPUT), limit=1000
    ):
        data = record.event_log_entry.dagster_event.event_specific_data
        if data.metadata:
            found.append((f"output {data.step_output_handle.step_key}", data.metadata))
    return found


def test_metadata_has_news_only_and_money_says_dollars(tmp_path, instance, clock):
    flow = build(tmp_path, slow(tmp_path, failure_rate=0.2), price=PRICE)
    flow.submit(instance, "a")
    clock.now += 30
    tick(flow, instance)
    flow.job("cancel", instance, "a")
    clock.now += 1
    for _ in range(2):
        tick(flow, instance)
    assert flow.collected("a")()
    found = _metadata_dicts(instance)

    kinds = {where.split()[0] for where, _ in found}
    assert kinds == {"materialization", "observation", "check", "output"}, kinds
    for where, metadata in found:
        for key, value in metadata.items():
            raw = value.value
            # durations are measurements, not counters (an eta of 0 says it ended, and one
            # left out would leave an older one showing beside the newer status)
            if not key.startswith("dagster/") and not key.endswith("_seconds"):
                assert not (type(raw) is int and raw == 0), f"{where}: zero counter {key}"
                assert raw is not False and raw != "", f"{where}: no news in {key}"
            assert not (isinstance(raw, list) and len(raw) == 1), f"{where}: one-item list {key}"
            if "cost" in key and key not in ("cost_estimate_basis", "cost_reported_untrusted"):
                assert key.endswith("_usd"), f"{where}: money without its unit: {key}"
        assert not {"estimated_input_tokens", "failure_rate_pct", "valid_rows", "state"} & set(
            metadata
        ), where

    (results,) = [m for w, m in found if w == "materialization rev_results"]
    assert results["cost_usd"].value > 0 and results["cost_estimated_usd"].value > 0
    assert results["cost_estimate_basis"].value  # what the expected output was taken from
    summary = results["summary"].value
    assert "| cost |" in summary and "| estimated (" in summary
    assert "succeeded" not in results and results["failed"].value > 0  # row_count says it
    (submitted,) = [m for w, m in found if w == "materialization rev_batches"]
    assert submitted["status"].value == "submitted: 20 requests in 3 batches"
    assert len(submitted["batch_ids"].value) == 3 and "batch_id" not in submitted
    assert "estimate/cost_worst_case_usd" in submitted
    assert "estimate/cost_expected_usd" not in submitted  # nothing observed: it is the worst case


# --- checks of a partition with nothing collected -----------------------------------------------


def _check_records(instance, flow: Pipeline) -> list[Any]:
    keys = [
        dg.AssetCheckKey(flow.pipeline.results_key, "completeness"),
        dg.AssetCheckKey(flow.pipeline.failed_key, "failure_rate"),
    ]
    return [
        r
        for key in keys
        for r in instance.event_log_storage.get_asset_check_execution_history(key, limit=10)
    ]


def test_a_manual_collect_of_a_never_submitted_partition_leaves_its_checks_not_failed(
    tmp_path, instance
):
    flow = build(tmp_path, slow(tmp_path))
    run = flow.collect(instance, "b", raise_on_error=False)
    # The run ends without collecting, and does not fail: Dagster marks the checks it
    # planned as skipped (a failed run would mark them as failed executions: red).
    assert run.success
    assert run.asset_materializations_for_node("rev_collect") == []
    planned = [r for r in _check_records(instance, flow) if r.run_id == run.run_id]
    assert len(planned) == 2
    assert {r.status.value for r in planned} == {"PLANNED"}  # no evaluation, no failure
    assert run.get_asset_check_evaluations() == []

    # The checks launched on their own for it are skipped too (no result, no failure).
    alone = checks_alone(flow, instance, "b")
    assert alone.success and alone.get_asset_check_evaluations() == []
    assert {r.status.value for r in _check_records(instance, flow)} == {"PLANNED"}


def checks_alone(flow: Pipeline, instance, key: str) -> dg.ExecuteInProcessResult:
    """The partition's checks launched on their own (no collection in the run)."""
    checks = dg.AssetSelection.checks_for_assets(
        flow.pipeline.results_key, flow.pipeline.failed_key
    )
    job = dg.define_asset_job("rev_checks_only", selection=checks, partitions_def=PARTS)
    defs = dg.Definitions.merge(flow.defs, dg.Definitions(jobs=[job]))
    return defs.resolve_job_def("rev_checks_only").execute_in_process(
        tags={"dagster/partition": key}, instance=instance, raise_on_error=False
    )


def test_checks_of_a_partition_still_in_flight_are_skipped(tmp_path, instance):
    flow = build(tmp_path, slow(tmp_path))
    flow.submit(instance, "a")
    run = flow.collect(instance, "a")  # still running: nothing collected, nothing failed
    assert run.success and run.get_asset_check_evaluations() == []
    alone = checks_alone(flow, instance, "a")  # nothing collected to check: skipped
    assert alone.success and alone.get_asset_check_evaluations() == []
