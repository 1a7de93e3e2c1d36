"""POLL, seen from the UI: the sensor reports in-flight progress as asset observations on
``<name>_batches`` (only when it changed) and says it in one line as the tick's skip reason.

Real machinery throughout: the asset factory's sensor, ``dg.build_sensor_context`` on a
persistent instance, manifests on disk and the embedded local server, made slow
(``in_progress_seconds=3600``) so that batches stay in flight and their counts stay put.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import dagster as dg
from conftest import dagster_instance, make_local_dir
from harness import Pipeline

from infron_dagster import InfronResource, RequestSpec

SPEC = RequestSpec(model="gpt-4o-mini", prompt_template="Sentiment of {text}", key_columns="id")
KEYS = ["2026-11-23", "2026-11-24", "2026-11-25"]
BATCHES = dg.AssetKey("rev_batches")
SLOW = 3600  # seconds in progress: nothing finishes, nothing moves, while a test runs


def batch_ids(flow: Pipeline, partition: str | None) -> list[str]:
    store = flow.pipeline.storage
    manifest = store.read_json(store.manifest_path(partition, 1))
    return [chunk["batch_id"] for chunk in manifest["chunks"]]


def make_flow(
    tmp_path,
    instance,
    *,
    keys=KEYS,
    rows=20,
    seconds=SLOW,
    dynamic=False,
    api_style="infron",
    **knobs: Any,
) -> Pipeline:
    folder = make_local_dir(str(tmp_path / "server"), in_progress_seconds=seconds, **knobs)
    resource = InfronResource(base_url=f"local://{folder}", api_style=api_style, max_retries=0)
    if dynamic:
        partitions_def: dg.PartitionsDefinition | None = dg.DynamicPartitionsDefinition(name="days")
        instance.add_dynamic_partitions("days", keys)
    else:
        partitions_def = dg.StaticPartitionsDefinition(keys) if keys else None

    return Pipeline.build(tmp_path, resource, partitions_def, rows=rows)


def meta(event: dg.AssetObservation) -> dict[str, Any]:
    return {k: v.value for k, v in event.metadata.items()}


def by_partition(result: dg.SensorResult) -> dict[str | None, dict[str, Any]]:
    events = result.asset_events
    assert all(isinstance(e, dg.AssetObservation) and e.asset_key == BATCHES for e in events)
    found = {e.partition: meta(e) for e in events}
    assert len(found) == len(events), "one observation per partition"
    return found


def skip(result: dg.SensorResult) -> str | None:
    return result.skip_reason.skip_message if result.skip_reason else None


def progress_cursor(result: dg.SensorResult) -> dict[str, str]:
    return json.loads(result.cursor).get("progress", {})


# --- what an observation says ------------------------------------------------------------------


def test_each_in_flight_partition_is_observed_with_its_progress(tmp_path, instance):
    flow = make_flow(tmp_path, instance)
    flow.submit(instance, KEYS[0])
    flow.submit(instance, KEYS[1])

    result = flow.sense(instance)
    assert result.run_requests == []
    seen = by_partition(result)
    assert set(seen) == {KEYS[0], KEYS[1]}
    for values in seen.values():
        # 20 rows in batches of 7: three batches, none finished, nothing done yet.
        assert values["requests_total"] == 20
        # counters still at zero say nothing: left out (they only grow within an attempt)
        assert not {"requests_completed", "requests_failed", "batches_finished"} & set(values)
        assert values["batches_total"] == 3
        assert "attempt" not in values  # the submission's materialization says it
        assert values["progress_percent"] == 0.0
        assert values["status"] == "in flight: waiting for the provider to start (0/20 requests)"
        assert isinstance(values["elapsed_seconds"], int) and 0 <= values["elapsed_seconds"] < 60
        assert "eta_seconds" not in values  # no progress yet: no honest estimate
        assert values["progress"].startswith("0/20 requests (0.0 %), 0 failed, 0/3 batches")
    # The cursor holds one short entry per partition in flight, beside the emitted map.
    cursor = json.loads(result.cursor)
    assert cursor["emitted"] == {}
    assert len(cursor["progress"]) == 2
    assert all(len(k) <= 16 and len(v) < 80 for k, v in cursor["progress"].items())


def test_unchanged_progress_is_not_observed_again(tmp_path, instance):
    flow = make_flow(tmp_path, instance)
    flow.submit(instance, KEYS[0])
    first = flow.sense(instance)
    assert set(by_partition(first)) == {KEYS[0]}

    second = flow.sense(instance, first.cursor)
    assert second.asset_events == []
    assert second.run_requests == []
    assert progress_cursor(second) == progress_cursor(first)
    third = flow.sense(instance, second.cursor)
    assert third.asset_events == []

    # The cursor is only a cache: without it, or with a corrupt one, the sensor starts over
    # and observes the partition once more, then is quiet again.
    for cursor in (None, "not json", "[]", '{"progress": 3}', '{"progress": {"x": 1}}'):
        again = flow.sense(instance, cursor)
        assert set(by_partition(again)) == {KEYS[0]}, cursor
        assert flow.sense(instance, again.cursor).asset_events == [], cursor


def test_a_finished_batch_and_a_new_partition_are_observed(tmp_path, instance):
    flow = make_flow(tmp_path, instance, rows=21)  # three batches of 7
    flow.submit(instance, KEYS[0])
    flow.submit(instance, KEYS[1])
    first = flow.sense(instance)
    assert set(by_partition(first)) == {KEYS[0], KEYS[1]}

    # The attempt was submitted 100 s ago, and one batch of 7 requests ends (cancelled: what
    # it did not finish never will, so its 7 requests are settled).
    store = flow.pipeline.storage
    path = store.manifest_path(KEYS[0], 1)
    manifest = store.read_json(path)
    earlier = datetime.now(timezone.utc) - timedelta(seconds=100)
    manifest["submitted_at"] = earlier.isoformat(timespec="seconds")
    store.write_json(path, manifest)
    with flow.resource.get_client() as client:
        client.cancel_batch(batch_ids(flow, KEYS[0])[0])

    second = flow.sense(instance, first.cursor)
    assert second.run_requests == []
    seen = by_partition(second)
    assert list(seen) == [KEYS[0]]  # only the partition that moved
    values = seen[KEYS[0]]
    assert values["batches_finished"] == 1 and values["batches_total"] == 3
    assert values["requests_settled"] == 7 and values["requests_total"] == 21
    assert values["progress_percent"] == 33.3
    assert 99 <= values["elapsed_seconds"] <= 103
    # Linear extrapolation: 7 of 21 in ~100 s leaves 14 for ~200 s.
    assert isinstance(values["eta_seconds"], int) and 196 <= values["eta_seconds"] <= 208
    assert values["progress"].startswith("7/21 requests (33.3 %)")
    assert "about 3 min left" in values["progress"]
    assert values["status"] == "in flight: 33.3 % done (7/21 requests, 7 failed), about 3 min left"
    assert all(not isinstance(v, float) or v == round(v, 1) for v in values.values()), (
        "numbers are rounded for people"
    )

    flow.submit(instance, KEYS[2])
    third = flow.sense(instance, second.cursor)
    assert list(by_partition(third)) == [KEYS[2]]
    assert flow.sense(instance, third.cursor).asset_events == []


def test_a_partition_whose_batches_do_not_answer_keeps_its_last_observation(tmp_path, instance):
    flow = make_flow(tmp_path, instance)
    flow.submit(instance, KEYS[0])
    with flow.resource.get_client() as client:
        client.cancel_batch(batch_ids(flow, KEYS[0])[0])
    first = flow.sense(instance)
    assert by_partition(first)[KEYS[0]]["batches_finished"] == 1

    good = flow.resource
    elsewhere = make_local_dir(str(tmp_path / "other-server"))
    flow.resource = InfronResource(base_url=f"local://{elsewhere}", max_retries=0)
    blind = flow.sense(instance, first.cursor)
    assert blind.asset_events == []  # unknown is not "0 done": no observation
    assert progress_cursor(blind) == progress_cursor(first)
    assert skip(blind) == f"1 partition in flight: {KEYS[0]} ?/20 (not every batch answered)"

    flow.resource = good
    assert flow.sense(instance, blind.cursor).asset_events == []


# --- the tick's one line -----------------------------------------------------------------------


def test_skip_reason_lists_partitions_and_progress_bounded(tmp_path, instance):
    keys = [f"day-{i}" for i in range(6)]
    flow = make_flow(tmp_path, instance, keys=keys, rows=3)
    for key in keys:
        flow.submit(instance, key)
    result = flow.sense(instance)
    assert result.run_requests == []
    assert len(result.asset_events) == 6
    shown = ", ".join(f"day-{i} 0/3" for i in range(5))
    assert skip(result) == f"6 partitions in flight: {shown}, +1 more"
    # Quiet ticks still say where things stand.
    assert skip(flow.sense(instance, result.cursor)) == skip(result)


def test_partition_keys_in_the_skip_reason_are_printable(tmp_path, instance):
    key = "evil\nFORGED line \x1b[31m" + "x" * 100
    flow = make_flow(tmp_path, instance, keys=[key], rows=3, dynamic=True)
    flow.submit(instance, key)
    result = flow.sense(instance)
    assert by_partition(result)[key]["requests_total"] == 3  # the real key on the event
    reason = skip(result)
    assert reason is not None and "\n" not in reason and "\x1b" not in reason
    assert reason.startswith("1 partition in flight: evil\\nFORGED line \\x1b[31m")
    assert len(reason) < 120


def test_unpartitioned_pipeline_is_observed_without_a_partition(tmp_path, instance):
    flow = make_flow(tmp_path, instance, keys=None)
    assert skip(flow.sense(instance)) == "No batches in flight."
    flow.submit(instance, None)
    result = flow.sense(instance)
    assert list(by_partition(result)) == [None]
    assert skip(result) == "1 attempt in flight: attempt 1 0/20"


def test_finished_partition_is_observed_then_forgotten_once_collected(tmp_path, instance):
    # Instant: batches end at once, and lose some rows (neither completed nor failed).
    flow = make_flow(tmp_path, instance, seconds=0, lost_rate=0.2)
    flow.submit(instance, KEYS[0])
    first = flow.sense(instance)
    (request,) = first.run_requests
    assert first.skip_reason is None  # a tick that requests a run needs no excuse
    values = by_partition(first)[KEYS[0]]
    assert values["batches_finished"] == values["batches_total"] == 3
    done = values.get("requests_completed", 0) + values.get("requests_failed", 0)
    assert done < 20  # the lost rows
    assert values["requests_settled"] == values["requests_total"] == 20  # but nothing to wait for
    assert values["progress_percent"] == 100.0 and values["eta_seconds"] == 0
    assert values["progress"].startswith("20/20 requests (100.0 %)")
    assert values["status"].startswith("collecting: every batch ended (20/20 requests)")

    # Collection requested: not polled again, nothing new to say, still in flight.
    second = flow.sense(instance, first.cursor)
    assert second.asset_events == [] and second.run_requests == []
    assert skip(second) == f"1 partition in flight: {KEYS[0]} finished, collection requested"
    assert progress_cursor(second) == progress_cursor(first)

    assert flow.run(instance, request).success
    third = flow.sense(instance, second.cursor)
    assert "progress" not in json.loads(third.cursor)  # no entry outlives its partition
    assert third.asset_events == [] and skip(third) == "No batches in flight."


# --- as the daemon records them ----------------------------------------------------------------


def test_observations_are_recorded_as_the_daemon_records_them(tmp_path):
    with dagster_instance() as instance:
        # The other tests speak infron; this one openai, so both wire styles are observed.
        flow = make_flow(tmp_path, instance, api_style="openai")
        flow.submit(instance, KEYS[1])
        # What the sensor daemon does with a tick: evaluate, then store its asset events.
        data = flow.pipeline.sensor.evaluate_tick(flow.context(instance))
        assert data.run_requests == []
        assert data.skip_message == f"1 partition in flight: {KEYS[1]} 0/20"
        for event in data.asset_events:
            instance.report_runless_asset_event(event)

        records = instance.fetch_observations(
            dg.AssetRecordsFilter(asset_key=BATCHES, asset_partitions=[KEYS[1]]), limit=10
        ).records
        assert len(records) == 1
        observation = records[0].asset_observation
        assert observation is not None and observation.partition == KEYS[1]
        assert observation.metadata["requests_total"].value == 20
        assert observation.metadata["batches_total"].value == 3
        assert observation.metadata["status"].value.startswith("in flight")
        # The submit materialization is untouched: observations sit beside it.
        assert instance.get_latest_materialization_event(BATCHES) is not None
