"""CANCEL: the ``<name>_cancel`` job, end to end with the sensor, collection and retry.

The embedded local server runs on a settable clock (its ``time`` module is swapped, as in
test_local_server.py), so a batch is cancelled exactly half-way through: half its requests
finished and are kept, the other half fail as ``batch_cancelled``. Dagster and the client keep
the real clock.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from conftest import BOTH_STYLES, make_local_dir
from harness import Pipeline

from infron_dagster import InfronResource, RequestSpec
from infron_dagster.cancel import BatchCancel, CancelOutcome, cancel_partition
from infron_dagster.cancel_job import cancel_metadata
from infron_dagster.submit import load_manifests

SPEC = RequestSpec(model="gpt-4o-mini", prompt_template="Sentiment of {text}", key_columns="id")
PARTS = dg.StaticPartitionsDefinition(["a", "b"])
ROWS = 20


def make_flow(tmp_path, resource: InfronResource, *, partitions_def=PARTS, key="infron"):
    return Pipeline.build(tmp_path, resource, partitions_def, rows=ROWS, resource_key=key)


def server_status(flow: Pipeline, batch_id: str) -> str:
    with flow.resource.get_client() as client:
        return client.retrieve_batch(batch_id).status.value


def slow_resource(tmp_path, api_style: str, **knobs: Any) -> InfronResource:
    folder = make_local_dir(str(tmp_path / "slow"), in_progress_seconds=60, **knobs)
    return InfronResource(base_url=f"local://{folder}", api_style=api_style, max_retries=2)


def cancel_meta(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    (event,) = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    return {k: v.value for k, v in event.step_output_data.metadata.items()}


def batch_statuses(meta: dict[str, Any]) -> set[str]:
    """The provider status of each batch, from the Markdown table of the cancel's summary."""
    rows = [line.split("|") for line in meta["summary"].splitlines() if line.startswith("| `")]
    return {cells[4].strip() for cells in rows}


def run_logs(instance, result: dg.ExecuteInProcessResult) -> list[str]:
    """What the op logged (context.log), from the run's event log."""
    records = instance.all_logs(result.run_id)
    return [r.user_message for r in records if r.dagster_event is None]


def batch_ids(flow: Pipeline, partition: str | None = "a") -> dict[int, list[str]]:
    return {m.attempt: m.batch_ids for m in load_manifests(flow.storage, partition)}


# --- end to end ---------------------------------------------------------------------------------


@BOTH_STYLES
def test_cancel_keeps_finished_rows_and_fails_the_rest_retryable(
    tmp_path, api_style, instance, clock
):
    flow = make_flow(tmp_path, slow_resource(tmp_path, api_style))
    flow.submit(instance, "a")
    first_ids = batch_ids(flow)[1]
    assert len(first_ids) == 3
    assert flow.tick_runs(instance) == []  # in flight: nothing to collect

    clock.now += 30  # half-way through in_progress_seconds=60
    result = flow.job("cancel", instance, "a")
    assert result.success
    meta = cancel_meta(result)
    assert len(meta["cancelled_batch_ids"]) == 3 and "failed_batch_ids" not in meta
    assert sorted(meta["cancelled_batch_ids"]) == sorted(first_ids)
    assert meta["attempts"] == "1" and meta["status"].startswith("cancelled: 3 batches stopped")
    assert batch_statuses(meta) == {"cancelling"}
    logs = run_logs(instance, result)
    for batch_id in first_ids:
        assert any(f"cancelled batch {batch_id}" in line for line in logs), logs
    assert any("cancelled 3 batch(es)" in line for line in logs)
    assert {server_status(flow, b) for b in first_ids} == {"cancelled"}

    # Again: harmless, every batch is skipped as already finished, nothing is sent.
    again = flow.job("cancel", instance, "a")
    assert again.success
    meta = cancel_meta(again)
    assert "cancelled_batch_ids" not in meta and meta["already_finished"] == 3
    assert meta["status"] == "nothing in flight: nothing to cancel"
    assert any("has nothing in flight" in line for line in run_logs(instance, again))

    # The sensor collects: what finished is kept, the rest fails as batch_cancelled.
    (collected,) = flow.tick_runs(instance)
    assert collected.success
    results, failed = flow.frame("results"), flow.frame("failed")
    assert 0 < len(results) < ROWS and len(failed) > 0
    assert sorted([*results["id"], *failed["id"]]) == list(range(ROWS))
    assert set(failed["error_code"]) == {"batch_cancelled"}
    assert failed["retryable"].all()
    assert set(results["attempt"]) == {1}

    # Collected: nothing in flight any more, and the run says why.
    after = flow.job("cancel", instance, "a")
    assert after.success and "attempts" not in cancel_meta(after)
    assert any("already collected" in line for line in run_logs(instance, after))

    # The retry resubmits the cancelled rows; cancelling again touches only the new attempt.
    cancelled_rows = set(failed["id"])
    flow.job("retry", instance, "a")
    retry_ids = batch_ids(flow)[2]
    clock.now += 30
    meta = cancel_meta(flow.job("cancel", instance, "a"))
    assert meta["attempts"] == "2"
    assert sorted(meta["cancelled_batch_ids"]) == sorted(retry_ids)
    assert not set(retry_ids) & set(first_ids)
    (collected,) = flow.tick_runs(instance)
    results, failed = flow.frame("results"), flow.frame("failed")
    assert sorted([*results["id"], *failed["id"]]) == list(range(ROWS))
    assert set(results.loc[results["attempt"] == 2, "id"]) <= cancelled_rows
    assert (results["attempt"] == 2).any()  # half of the retry finished before its cancel
    assert set(failed["error_code"]) == {"batch_cancelled"} and failed["retryable"].all()


def test_one_refused_cancel_fails_the_run_after_trying_the_others(tmp_path, instance, clock):
    flow = make_flow(tmp_path, slow_resource(tmp_path, "openai"))
    flow.submit(instance, "a")
    ids = batch_ids(flow)[1]
    # The server does not know the first batch any more: its cancel (and lookups) are 404.
    path = flow.storage.manifest_path("a", 1)
    manifest = flow.storage.read_json(path)
    manifest["chunks"][0]["batch_id"] = "batch_gone"
    flow.storage.write_json(path, manifest)

    result = flow.job("cancel", instance, "a", raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    text = failure.step_failure_data.error.to_string()
    assert "could not cancel 1 batch(es)" in text and "batch_gone" in text
    assert ids[1] not in text and ids[2] not in text
    meta = {k: v.value for k, v in failure.step_failure_data.user_failure_data.metadata.items()}
    assert meta["failed_batch_id"] == "batch_gone"  # one id: text, not a one-item list
    assert sorted(meta["cancelled_batch_ids"]) == sorted(ids[1:])
    assert any("could not cancel batch batch_gone" in line for line in run_logs(instance, result))
    assert {server_status(flow, b) for b in ids[1:]} == {"cancelled"}

    # Running it again still names the unknown batch and does not touch the others.
    meta_again = cancel_partition_outcome(flow, "a")
    assert [b.batch_id for b in meta_again.failed] == ["batch_gone"]
    assert meta_again.ids("already_finished") == ids[1:]


def cancel_partition_outcome(flow: Pipeline, partition: str | None) -> CancelOutcome:
    with flow.resource.get_client() as client:
        return cancel_partition(client, flow.storage, partition)


def test_a_batch_being_cancelled_is_left_alone(tmp_path, instance, clock):
    resource = slow_resource(tmp_path, "openai", finalizing_seconds=10)
    flow = make_flow(tmp_path, resource)
    flow.submit(instance, "a")
    clock.now += 30
    first = cancel_partition_outcome(flow, "a")
    assert [b.action for b in first.batches] == ["cancelled"] * 3
    second = cancel_partition_outcome(flow, "a")
    assert [b.action for b in second.batches] == ["already_cancelling"] * 3
    assert not second.nothing_in_flight and not second.failed
    assert "3 already being cancelled" in second.message
    clock.now += 10
    third = cancel_partition_outcome(flow, "a")
    assert [b.status for b in third.batches] == ["cancelled"] * 3
    assert third.nothing_in_flight


def test_a_batch_that_finishes_before_its_cancel_is_skipped(tmp_path, instance, clock, monkeypatch):
    flow = make_flow(tmp_path, slow_resource(tmp_path, "infron"))
    flow.submit(instance, "a")
    clock.now += 59.5
    with flow.resource.get_client() as client:
        cancel = client.cancel_batch

        def late_cancel(batch_id: str):
            clock.now += 1  # the batch completes between the lookup and the cancel
            return cancel(batch_id)

        monkeypatch.setattr(client, "cancel_batch", late_cancel)
        outcome = cancel_partition(client, flow.storage, "a")
    assert [b.action for b in outcome.batches] == ["already_finished"] * 3
    assert {b.status for b in outcome.batches} == {"completed"}
    assert not outcome.failed and outcome.nothing_in_flight


# --- nothing in flight --------------------------------------------------------------------------


def test_nothing_in_flight_succeeds_and_says_so(tmp_path, infron_resource, instance):
    flow = make_flow(tmp_path, infron_resource)  # instant server: batches end at once

    never = flow.job("cancel", instance, "b")
    assert never.success
    assert cancel_meta(never)["status"] == "nothing in flight: never submitted"
    logs = run_logs(instance, never)
    assert any("was never submitted: nothing to cancel" in line for line in logs)

    flow.submit(instance, "a")
    finished = flow.job("cancel", instance, "a")
    assert finished.success
    meta = cancel_meta(finished)
    assert "cancelled_batch_ids" not in meta and meta["already_finished"] == 3
    assert batch_statuses(meta) == {"completed"}
    assert any(
        "has nothing in flight (3 already finished (skipped))" in line
        for line in run_logs(instance, finished)
    )

    assert not flow.storage.table_path("results", "a").exists()  # collecting is the sensor's job


def test_unpartitioned_pipeline_and_custom_resource_key(tmp_path, instance, clock):
    flow = make_flow(tmp_path, slow_resource(tmp_path, "infron"), partitions_def=None, key="llm")
    assert flow.pipeline.cancel_job.partitions_def is None
    flow.submit(instance, None)
    clock.now += 30
    meta = cancel_meta(flow.job("cancel", instance, None))
    assert len(meta["cancelled_batch_ids"]) == 3 and "partition" not in meta
    (collected,) = flow.tick_runs(instance)
    assert collected.success
    ok, bad = flow.frame("results", None), flow.frame("failed", None)
    assert len(ok) + len(bad) == ROWS and set(bad["error_code"]) == {"batch_cancelled"}


def test_the_job_is_an_op_job_partitioned_like_the_pipeline(tmp_path, infron_resource, instance):
    flow = make_flow(tmp_path, infron_resource)
    job = flow.defs.resolve_job_def("rev_cancel")
    assert job.partitions_def == PARTS
    assert job.asset_layer.executable_asset_keys == set()  # it materializes nothing
    assert job.tags["infron/pipeline"] == "rev"
    assert [node.name for node in job.nodes] == ["rev_cancel_batches"]


def test_outcome_message_and_markdown_escape_provider_text():
    outcome = CancelOutcome(partition_key="a", attempts=[1])
    outcome.batches = [
        BatchCancel("batch|1", 1, "failed", None, "InfronError: no\nway | here"),
        BatchCancel("batch_2", 1, "cancelled", "cancelling", None, 3, 7),
    ]
    outcome.unsent_chunks = {1: 2}
    assert outcome.message.startswith("partition 'a': cancelled 1 batch(es), 1 could not be")
    assert "chunks not sent yet (attempt 1: 2)" in outcome.message
    assert "dashboard" not in outcome.message
    outcome.uncertain_chunks = {2: 1}
    assert "failed ambiguously (attempt 2: 1)" in outcome.message
    table = cancel_metadata(outcome)["summary"].value
    assert "`batch\\|1`" in table and "no way \\| here" in table
    assert "| `batch_2` | 1 | cancelled | cancelling | 3/7 |" in table
