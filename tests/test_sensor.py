"""POLL: the sensor, evaluated with a persistent test instance and the real definitions.

Each tick is ``pipeline.sensor(context)`` on a context built by ``dg.build_sensor_context``; the
state it reads is the manifests on disk and the local batch server's folder.
"""

from __future__ import annotations

import json

import dagster as dg
from conftest import BOTH_STYLES, INSTANT, make_local_dir
from harness import Pipeline

from infron_dagster import InfronResource, RequestSpec
from infron_dagster.local import LocalServerConfig, save_config

SPEC = RequestSpec(model="gpt-4o-mini", prompt_template="Sentiment of {text}", key_columns="id")
PARTS = dg.StaticPartitionsDefinition(["a", "b", "c"])


def make_flow(tmp_path, resource, *, partitions_def=PARTS, rows=20) -> Pipeline:
    return Pipeline.build(tmp_path, resource, partitions_def, rows=rows)


def emitted(result: dg.SensorResult) -> set[str]:
    return {k.rsplit(":", 1)[0] for k in json.loads(result.cursor)["emitted"]}


def keys(result: dg.SensorResult) -> list[tuple[str | None, str]]:
    return sorted((r.partition_key, r.run_key.rsplit(":", 1)[0]) for r in result.run_requests)


# --- nothing to do -----------------------------------------------------------------------------


def test_no_manifests_no_run_requests(tmp_path, infron_resource, instance):
    flow = make_flow(tmp_path, infron_resource)
    result = flow.sense(instance)
    assert result.run_requests == []
    assert json.loads(result.cursor) == {"status": "No batches in flight.", "emitted": {}}


def test_batches_in_flight_do_not_request_collection(tmp_path, api_style, instance):
    folder = make_local_dir(str(tmp_path / "slow"), in_progress_seconds=60)
    resource = InfronResource(base_url=f"local://{folder}", api_style=api_style)
    flow = make_flow(tmp_path, resource)
    flow.submit(instance, "a")

    first = flow.sense(instance)
    assert first.run_requests == []
    assert emitted(first) == set()
    second = flow.sense(instance, first.cursor)
    assert second.run_requests == []
    # Nothing was collected behind the sensor's back.
    assert not flow.pipeline.storage.table_path("results", "a").exists()


def test_poll_errors_do_not_crash_the_tick(tmp_path, api_style, instance):
    resource = InfronResource(
        base_url=f"local://{make_local_dir(str(tmp_path / 'server'))}", api_style=api_style
    )
    flow = make_flow(tmp_path, resource)
    flow.submit(instance, "a")
    # The same manifests, seen through a server that has never heard of these batches.
    elsewhere = make_local_dir(str(tmp_path / "other-server"))
    flow.resource = InfronResource(
        base_url=f"local://{elsewhere}", api_style=api_style, max_retries=0
    )
    result = flow.sense(instance)
    assert result.run_requests == []
    assert emitted(result) == set()


# --- finished attempts -------------------------------------------------------------------------


@BOTH_STYLES
def test_finished_attempt_requests_exactly_one_collection(tmp_path, resource, instance):
    flow = make_flow(tmp_path, resource)
    flow.submit(instance, "a")

    first = flow.sense(instance)
    (request,) = first.run_requests
    assert request.partition_key == "a"
    assert request.run_key.rsplit(":", 1)[0] == "rev:a:1"
    assert list(request.asset_selection) == flow.collect_keys
    assert request.tags["infron/attempt"] == "1"
    assert emitted(first) == {"rev:a:1"}

    second = flow.sense(instance, first.cursor)
    assert second.run_requests == []
    assert emitted(second) == {"rev:a:1"}

    run = flow.run(instance, request)
    assert run.success
    materialized = {m.asset_key for m in run.get_asset_materialization_events()}
    assert materialized == set(flow.collect_keys)
    assert flow.pipeline.storage.table_path("results", "a").exists()

    # Once collected, neither the old cursor nor a fresh one brings the request back.
    assert flow.sense(instance, second.cursor).run_requests == []
    assert flow.sense(instance).run_requests == []


def test_retry_attempt_gets_its_own_run_request(tmp_path, api_style, instance):
    folder = make_local_dir(str(tmp_path / "faulty"), failure_rate=0.4)
    resource = InfronResource(base_url=f"local://{folder}", api_style=api_style)
    flow = make_flow(tmp_path, resource)
    flow.submit(instance, "a")
    first = flow.sense(instance)
    (request,) = first.run_requests
    flow.run(instance, request)
    assert flow.sense(instance, first.cursor).run_requests == []

    flow.job("retry", instance, "a")
    after_retry = flow.sense(instance, first.cursor)
    (retry_request,) = after_retry.run_requests
    assert retry_request.run_key.rsplit(":", 1)[0] == "rev:a:2"
    assert retry_request.partition_key == "a"
    assert retry_request.tags["infron/attempt"] == "2"
    assert list(retry_request.asset_selection) == flow.collect_keys
    assert "rev:a:2" in emitted(after_retry)

    assert flow.sense(instance, after_retry.cursor).run_requests == []
    flow.run(instance, retry_request)
    assert flow.sense(instance).run_requests == []


def test_resubmission_with_changed_input_is_collected_as_a_new_attempt(
    tmp_path, infron_resource, instance
):
    flow = make_flow(tmp_path, infron_resource)
    flow.submit(instance, "a")
    (request,) = flow.sense(instance).run_requests
    flow.run(instance, request)

    flow.submit(instance, "a", force_resubmit=True)
    assert keys(flow.sense(instance)) == [("a", "rev:a:2")]


def test_corrupt_cursor_is_rebuilt_from_storage(tmp_path, infron_resource, instance):
    flow = make_flow(tmp_path, infron_resource)
    flow.submit(instance, "a")
    first = flow.sense(instance)
    assert keys(first) == [("a", "rev:a:1")]

    # The cursor is only a cache: a corrupt one makes the sensor ask again for the
    # uncollected attempt, under the same run_key, which Dagster deduplicates.
    for cursor in ("not json", "[]", '{"emitted": {"rev:a:1": "soon"}}', '{"emitted": 3}', ""):
        again = flow.sense(instance, cursor)
        assert keys(again) == [("a", "rev:a:1")], cursor
        assert emitted(again) == {"rev:a:1"}


def test_several_partitions_in_flight_at_once(tmp_path, infron_resource, instance):
    folder = infron_resource.base_url.removeprefix("local://")
    flow = make_flow(tmp_path, infron_resource)
    flow.submit(instance, "a")
    flow.submit(instance, "b")
    # The server snapshots its timing per batch: partition c's batches stay in progress.
    save_config(folder, LocalServerConfig(**{**INSTANT, "in_progress_seconds": 60}))
    flow.submit(instance, "c")

    first = flow.sense(instance)
    assert keys(first) == [("a", "rev:a:1"), ("b", "rev:b:1")]
    assert all(list(r.asset_selection) == flow.collect_keys for r in first.run_requests)
    second = flow.sense(instance, first.cursor)
    assert second.run_requests == []

    by_partition = {r.partition_key: r for r in first.run_requests}
    flow.run(instance, by_partition["a"])
    third = flow.sense(instance, second.cursor)
    assert third.run_requests == []
    assert emitted(third) >= {"rev:b:1"}
    # Without a cursor, only the finished but uncollected partition is asked for again.
    assert keys(flow.sense(instance)) == [("b", "rev:b:1")]


def test_empty_partition_is_collected_at_once(tmp_path, infron_resource, instance):
    flow = make_flow(tmp_path, infron_resource, rows=0)
    flow.submit(instance, "b")
    (request,) = flow.sense(instance).run_requests
    assert (request.partition_key, request.run_key.rsplit(":", 1)[0]) == ("b", "rev:b:1")
    assert flow.run(instance, request).success


def test_unpartitioned_pipeline_sensor(tmp_path, infron_resource, instance):
    flow = make_flow(tmp_path, infron_resource, partitions_def=None)
    flow.submit(instance, None)
    first = flow.sense(instance)
    (request,) = first.run_requests
    assert request.partition_key is None
    assert request.run_key.rsplit(":", 1)[0] == "rev::1"
    assert flow.run(instance, request).success
    assert flow.pipeline.storage.table_path("results", None).exists()
    assert flow.sense(instance).run_requests == []


class _PollExplodes(InfronResource):
    """The real client, whose status calls fail with a non-API error (a bug, a decoder crash):
    no real server can make the client raise anything but its own errors any more."""

    def get_client(self):
        client = super().get_client()

        def explode(batch_id: str):
            raise RuntimeError("decoder crashed\nFORGED log line")

        client.retrieve_batch = explode  # type: ignore[method-assign]
        return client


def test_any_poll_failure_is_logged_with_partition_and_batch_then_retried(
    tmp_path, local_dir, instance
):
    flow = make_flow(tmp_path, InfronResource(base_url=f"local://{local_dir}"))
    flow.submit(instance, "a")
    store = flow.pipeline.storage
    batch_id = store.read_json(store.manifest_path("a", 1))["chunks"][0]["batch_id"]
    good = flow.resource
    flow.resource = _PollExplodes(base_url=f"local://{local_dir}")
    log: list[str] = []
    first = flow.sense(instance, log=log)
    assert first.run_requests == []
    warnings = [line for line in log if "polling batch" in line]
    assert len(warnings) == 3  # one per batch of the partition (20 rows, 7 per batch)
    assert any(batch_id in line for line in warnings)
    for line in warnings:
        assert line.startswith("WARNING partition a attempt 1: polling batch")
        assert "RuntimeError" in line and "\nFORGED" not in line  # one line, escaped
    flow.resource = good
    assert keys(flow.sense(instance, first.cursor)) == [("a", "rev:a:1")]


def test_an_unreadable_manifest_stalls_only_its_own_partition(tmp_path, infron_resource, instance):
    flow = make_flow(tmp_path, infron_resource)
    flow.submit(instance, "a")
    flow.submit(instance, "b")
    store = flow.pipeline.storage
    store.write_bytes(store.manifest_path("a", 1), b'{"truncated": ')
    log: list[str] = []
    result = flow.sense(instance, log=log)
    assert keys(result) == [("b", "rev:b:1")]
    assert any(line.startswith("ERROR partition 'a'") for line in log)
