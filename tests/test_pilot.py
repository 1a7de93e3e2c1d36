"""A pilot batch before the big one (issue 18): ``pilot_rows=N`` sends N rows of a new prompt
first; the sensor collects them, reads a verdict, and requests the run that releases the rest
(calibrated by the pilot's output tokens) or stops it (the rest fail as ``pilot_stopped``).

Real Dagster runs and the real sensor on the embedded local server; what was sent is counted
at the server (its batches and their request files), never from our own files.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow.compute as pc
import pytest
from conftest import dagster_instance, make_local_dir
from harness import Pipeline, failure, metadata

from infron_dagster import InfronResource
from infron_dagster.budget import Budget
from infron_dagster.history import PartitionHistory
from infron_dagster.local.store import Store
from infron_dagster.manifest import load_manifests
from infron_dagster.pilot_book import PilotBook
from infron_dagster.pricing import ModelPrice
from infron_dagster.resume import PILOT_TAG

PARTS = dg.StaticPartitionsDefinition(["a", "b"])
ROWS = 40
PILOT = 8
MAX_TOKENS = 512


def _flow(tmp_path, failure_rate: float = 0.0, **factory) -> Pipeline:
    local = make_local_dir(str(tmp_path / "local"), failure_rate=failure_rate)
    resource = InfronResource(base_url=f"local://{local}", api_style="infron")
    factory = {
        "pilot_rows": PILOT,
        "pilot_scope": "partition",
        "max_requests_per_batch": 16,
        **factory,
    }
    return Pipeline.build(
        tmp_path, resource, PARTS, rows=ROWS, params={"max_tokens": MAX_TOKENS}, **factory
    )


def _sent(flow: Pipeline) -> Counter:
    """custom_id -> how many times it was sent, read from the server's request files."""
    store = Store(flow.local_dir)
    sent: Counter = Counter()
    for batch in store.list_batches():
        path = store.content_path(batch["input_file_id"])
        for line in Path(path).read_text().splitlines():
            sent[json.loads(line)["custom_id"]] += 1
    return sent


def _latest(flow: Pipeline, key: str = "a"):
    active = PartitionHistory.load(flow.storage, key).active
    return active[0] if active else None


def _settled_as(flow: Pipeline, role: str, *keys: str):
    """The latest initial attempt of each partition has this pilot role and is collected."""

    def check() -> bool:
        for key in keys or ("a",):
            latest = _latest(flow, key)
            if latest is None or latest.state != "collected":
                return False
            if (latest.pilot or {}).get("role") != role:
                return False
        return True

    return check


def _ids(flow: Pipeline, key: str = "a") -> set[str]:
    ids: set[str] = set()
    for kind in ("results", "failed"):
        table = flow.table(kind, key)
        if table is not None:
            ids.update(table.column("custom_id").to_pylist())
    return ids


def test_a_bad_prompt_stops_after_the_pilot_alone(tmp_path):
    # Every request fails at the provider; auto_retry must not send the pilot's rows again
    flow = _flow(tmp_path, failure_rate=1.0, auto_retry=True, auto_retry_backoff_seconds=(0,))
    with dagster_instance() as instance:
        submitted = flow.submit(instance, "a")
        assert submitted.success, failure(submitted)
        assert "pilot" in metadata(submitted)["pilot/note"]
        requested = flow.drive(instance, _settled_as(flow, "stopped"), timeout=30)
        log: list[str] = []
        flow.sense(instance, flow.cursor, log=log)  # a later tick asks for nothing more
    sent = _sent(flow)
    assert sum(sent.values()) == PILOT and set(sent.values()) == {1}
    assert flow.accounted() == ROWS and len(_ids(flow)) == ROWS  # every row, once
    failed = flow.frame("failed")
    stopped = failed[failed.error_code == "pilot_stopped"]
    assert len(stopped) == ROWS - PILOT and not stopped.retryable.any()
    message = stopped.error_message.iloc[0]
    assert "8 of 8 requests failed" in message and "server_error x8" in message
    assert "what to fix" in message
    assert set(failed[failed.error_code != "pilot_stopped"].custom_id) == set(sent)
    (stop,) = [r for r in requested if r.run_key.endswith(":stop")]
    assert stop.tags[PILOT_TAG] and not [r for r in requested if "release" in r.run_key]
    assert not PilotBook(flow.storage).queued()  # nothing left for the sensor to do
    assert not any(":stop" in line or ":release" in line for line in log)
    assert not [r for r in requested if "auto-retry" in r.run_key]


def test_pipeline_scope_a_stopped_pilot_stops_the_partitions_waiting_for_it(tmp_path):
    flow = _flow(tmp_path, failure_rate=1.0, pilot_scope="pipeline")
    with dagster_instance() as instance:
        assert flow.submit(instance, "a").success
        assert flow.submit(instance, "b").success  # held: a's pilot runs
        flow.drive(instance, _settled_as(flow, "stopped", "a", "b"), timeout=30)
    assert sum(_sent(flow).values()) == PILOT  # b sent nothing at all
    failed_b = flow.frame("failed", "b")
    assert len(failed_b) == ROWS and set(failed_b.error_code) == {"pilot_stopped"}
    assert "the pilot of partition 'a' (attempt 1) stopped" in failed_b.error_message[0]


def test_a_changed_prompt_pilots_again_after_a_stop(tmp_path):
    flow = _flow(tmp_path, failure_rate=1.0)
    with dagster_instance() as instance:
        assert flow.submit(instance, "a").success
        flow.drive(instance, _settled_as(flow, "stopped"), timeout=30)
        again = flow.submit(instance, "a")  # the same prompt: still stopped, nothing sent
        assert again.success and metadata(again)["pilot/mode"] == "stop"
        assert sum(_sent(flow).values()) == PILOT
        # The provider is fine again and the prompt changed: a new pilot, then the rest
        make_local_dir(flow.local_dir, failure_rate=0.0)
        fixed = Pipeline.build(
            tmp_path,
            flow.resource,
            PARTS,
            rows=ROWS,
            params={"max_tokens": MAX_TOKENS, "temperature": 0},
            pilot_rows=PILOT,
            pilot_scope="partition",
            max_requests_per_batch=16,
        )
        assert fixed.submit(instance, "a").success
        assert sum(_sent(fixed).values()) == 2 * PILOT  # the new prompt's pilot only
        fixed.drive(instance, _settled_as(fixed, "release"), timeout=30)
    assert sum(_sent(fixed).values()) == PILOT + ROWS
    assert len(fixed.frame("results")) == ROWS


def test_a_good_pilot_releases_the_rest_with_a_calibrated_estimate_and_budget(tmp_path):
    # A budget the uncalibrated worst case of the rest (max_tokens every row) would cross
    price = ModelPrice(input_per_million=1.0, output_per_million=1.0, batch_discount=0.0)
    rest_worst = price.cost(0, (ROWS - PILOT) * MAX_TOKENS)
    budget = Budget(max_cost_per_partition=rest_worst / 2)
    # Answers of varying length (the mock echoes up to 60 characters of the prompt)
    texts = [f"review {i}: " + "so good " * (i % 7) for i in range(ROWS)]
    flow = _flow(
        tmp_path,
        price=price,
        budget=budget,
        frame=lambda _key: pd.DataFrame({"id": range(ROWS), "text": texts}),
    )
    with dagster_instance() as instance:
        piloted = flow.submit(instance, "a")
        assert piloted.success, failure(piloted)
        assert sum(_sent(flow).values()) == PILOT  # only the pilot went out first
        requested = flow.drive(instance, _settled_as(flow, "release"), timeout=30)
    # Released by the sensor alone, once; nothing sent twice; every row answered
    assert [r.run_key.rsplit(":", 1)[-1] for r in requested if PILOT_TAG in r.tags] == ["release"]
    sent = _sent(flow)
    assert sum(sent.values()) == ROWS and set(sent.values()) == {1}
    results = flow.frame("results")
    assert len(results) == ROWS and flow.table("failed").num_rows == 0
    release = _latest(flow)
    (run,) = [r for r in flow.runs if r.dagster_run.tags.get(PILOT_TAG)]
    meta = metadata(run)
    assert meta["estimate/output_basis"].startswith(f"pilot of {PILOT} rows, mean output tokens")
    # The pilot's rows are carried from a collected attempt, not waiting for one in flight
    assert meta["carried_rows"] == PILOT and "carried_from_in_flight" not in meta
    assert "still in flight" not in meta["carried_why"]
    actual = int(results[results.attempt == release.attempt].completion_tokens.sum())
    expected = meta["estimate/output_tokens_expected"]
    assert abs(expected - actual) <= 0.2 * actual, (expected, actual)
    assert results.completion_tokens.nunique() > 3  # not a constant the pilot could not miss
    # Before any output was seen (the pilot's own estimate) max_tokens is assumed per row
    before = metadata(piloted)
    assert before["estimate/output_basis"].startswith(f"max_tokens {MAX_TOKENS}")
    assert before["estimate/output_tokens_worst_case"] == PILOT * MAX_TOKENS
    assert 5 * actual < MAX_TOKENS * (ROWS - PILOT)
    # The budget reserved the calibrated bound: the worst case would have been refused
    assert release.spend["worst_cost"] < budget.max_cost_per_partition < rest_worst


def test_pipeline_scope_a_second_partition_waits_then_goes_without_a_pilot(tmp_path):
    flow = _flow(tmp_path, pilot_scope="pipeline")
    with dagster_instance() as instance:
        assert flow.submit(instance, "a").success
        held = flow.submit(instance, "b")
        assert held.success, failure(held)
        assert "held" in metadata(held)["pilot/note"]
        assert sum(_sent(flow).values()) == PILOT  # b sent nothing yet
        (b,) = flow.manifests("b")
        assert b.pilot["role"] == "held" and not b.batch_ids
        flow.drive(instance, _settled_as(flow, "release", "a"), timeout=30)
        flow.drive(instance, flow.collected("a", "b"), timeout=30)
    sent = _sent(flow)
    assert sum(sent.values()) == 2 * ROWS and set(sent.values()) == {1}
    manifests_b = flow.manifests("b")
    # No pilot of its own: the held placeholder (which created nothing), then its rows
    assert [m.pilot["role"] for m in manifests_b] == ["held", "direct"]
    assert not manifests_b[0].batch_ids
    assert flow.accounted("b") == ROWS and len(flow.frame("results", "b")) == ROWS
    (resumed,) = [r for r in flow.runs if r.dagster_run.tags.get("infron/submit_key")]
    assert metadata(resumed)["estimate/output_basis"].startswith(f"pilot of {PILOT} rows")
    record = PilotBook(flow.storage).record(manifests_b[0].pilot["prompt"])
    assert record["state"] == "passed" and record["partition_key"] == "a"


def test_the_pilots_failed_rows_are_carried_not_sent_again(tmp_path):
    flow = _flow(tmp_path, failure_rate=0.3, max_failure_rate=0.9)
    with dagster_instance() as instance:
        assert flow.submit(instance, "a").success
        # The pilot queue is a cache: lost while the pilot runs, its collection rebuilds it
        shutil.rmtree((flow.storage.base / "_pilots").path)
        flow.drive(instance, _settled_as(flow, "release"), timeout=30)
    pilot = flow.manifests("a")[0]
    failed = flow.frame("failed")
    from_pilot = failed[failed.attempt == pilot.attempt]
    assert len(from_pilot) >= 1, "the test needs a pilot row that failed"
    sent = _sent(flow)
    assert sum(sent.values()) == ROWS and set(sent.values()) == {1}
    assert flow.accounted() == ROWS and len(_ids(flow)) == ROWS
    assert set(from_pilot.error_code) == {"server_error"} and from_pilot.retryable.all()
    (release_run,) = [r for r in flow.runs if r.dagster_run.tags.get(PILOT_TAG)]
    why = metadata(release_run)["carried_why"]
    assert "in the pilot (attempt 1)" in why and "still in flight" not in why, why


def test_a_dry_run_says_what_the_pilot_would_send(tmp_path):
    flow = _flow(tmp_path)
    with dagster_instance() as instance:
        result = flow.submit(instance, "a", dry_run=True)
    assert result.success
    (observation,) = [
        e.asset_observation_data.asset_observation
        for e in result.all_events
        if e.event_type_value == "ASSET_OBSERVATION"
    ]
    meta = {k: v.value for k, v in observation.metadata.items()}
    assert meta["estimate/requests"] == PILOT
    assert meta["pilot/note"].startswith(f"pilot: {PILOT} of {ROWS} rows first")
    assert not _sent(flow) and not flow.manifests("a") and not PilotBook(flow.storage).queued()


def test_a_cancelled_pilot_never_releases_and_the_partitions_it_held_pilot_themselves(tmp_path):
    flow = _flow(tmp_path, pilot_scope="pipeline")
    with dagster_instance() as instance:
        assert flow.submit(instance, "a").success
        assert flow.submit(instance, "b").success  # held for a's pilot
        assert flow.job("cancel", instance, "a").success
        requested = flow.drive(
            instance,
            lambda: _settled_as(flow, "stopped", "a")() and _settled_as(flow, "release", "b")(),
            timeout=30,
        )
    assert not [r for r in requested if r.run_key.startswith("rev:a:") and "release" in r.run_key]
    sent = _sent(flow)
    assert sum(sent.values()) == PILOT + ROWS and set(sent.values()) == {1}
    assert [m.pilot["role"] for m in flow.manifests("b")] == ["held", "pilot", "release"]
    stopped = flow.frame("failed", "a")
    stopped = stopped[stopped.error_code == "pilot_stopped"]
    assert flow.accounted("a") == ROWS and len(stopped) == ROWS - PILOT
    assert "cancelled during its pilot" in stopped.error_message.iloc[0]
    assert not PilotBook(flow.storage).queued()


@pytest.mark.parametrize("kill", ["before_the_release_manifest", "before_its_batches"])
def test_a_kill_between_the_pilots_collection_and_the_release_converges(
    tmp_path, monkeypatch, kill
):
    import infron_dagster.resume as resume
    import infron_dagster.submit as submit

    monkeypatch.setattr(resume, "RESUME_BACKOFF_SECONDS", 0.0)  # no waiting in a test
    target = "_stage" if kill == "before_the_release_manifest" else "_create_one"
    real = getattr(submit, target)
    killed: list[str] = []

    def dies_once(*args, **kwargs):
        manifest = args[2]
        if (manifest.pilot or {}).get("role") == "release" and not killed:
            killed.append(kill)
            raise RuntimeError("killed")  # as a kill -9: nothing after this point ran
        return real(*args, **kwargs)

    monkeypatch.setattr(submit, target, dies_once)
    flow = _flow(tmp_path)
    job = flow.defs.resolve_implicit_global_asset_job_def()
    with dagster_instance() as instance:
        assert flow.submit(instance, "a").success
        done = _settled_as(flow, "release")
        for _ in range(20):
            if done():
                break
            for request in flow.tick(instance, run=False):
                job.execute_in_process(
                    partition_key=request.partition_key,
                    asset_selection=request.asset_selection,
                    tags=request.tags,
                    run_config=request.run_config,
                    instance=instance,
                    raise_on_error=False,
                )
        assert done(), flow.states()
    assert killed == [kill]
    sent = _sent(flow)
    assert sum(sent.values()) == ROWS and set(sent.values()) == {1}
    assert len(flow.frame("results")) == ROWS
    assert pc.sum(flow.table("results").column("completion_tokens")).as_py() > 0


def test_the_yaml_component_takes_the_pilot_options(tmp_path, local_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from infron_dagster import InfronBatchInferenceComponent, ParquetSource

    texts = [f"review {i}" for i in range(ROWS)]
    pq.write_table(pa.table({"id": range(ROWS), "text": texts}), tmp_path / "a.parquet")
    component = InfronBatchInferenceComponent(
        name="yaml",
        model="gpt-4o-mini",
        prompt_template="Sentiment of {text}",
        key_columns=["id"],
        source=ParquetSource(str(tmp_path / "{partition_key}.parquet")),
        partitions=dg.StaticPartitionsDefinition(["a"]),
        storage_root=str(tmp_path / "lake"),
        pilot_rows=PILOT,
        pilot_scope="partition",
    )
    pipeline = component.build_pipeline()
    resource = InfronResource(base_url=f"local://{local_dir}", api_style="infron")
    with dagster_instance() as instance:
        result = dg.materialize(
            [pipeline.batches_asset],
            partition_key="a",
            instance=instance,
            resources={"infron": resource},
        )
    assert result.success
    assert metadata(result, "yaml_batches")["pilot/note"].startswith(f"pilot: {PILOT} of {ROWS}")
    (pilot,) = load_manifests(pipeline.storage, "a")
    assert pilot.pilot["role"] == "pilot" and sum(c.requests for c in pilot.chunks) == PILOT


@pytest.mark.parametrize(
    "options",
    [
        {"pilot_rows": 0},
        {"pilot_rows": 5, "pilot_scope": "day"},
        {"pilot_rows": 5, "pilot_max_output_tokens": -1},
    ],
)
def test_pilot_options_are_checked_at_definition_time(tmp_path, options):
    with pytest.raises(ValueError, match="pilot_"):
        Pipeline.build(tmp_path, InfronResource(), PARTS, **options)
