"""The Dagster side end to end: submit, collect, faults, retry, partitions and sources.

Everything is real: Dagster runs in a test instance, the embedded local batch server keeps its
state in a folder, and the pipeline writes real Parquet files. The `resource` fixture runs each
test once per wire style (infron, openai).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from conftest import BOTH_STYLES, INSTANT, make_local_dir
from harness import Pipeline

from infron_dagster import (
    InfronResource,
    ParquetSource,
    RequestSpec,
    build_infron_batch_assets,
    make_custom_id,
)
from infron_dagster.local import LocalServerConfig, save_config

SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["pos", "neg"]},
        "score": {"type": "number"},
    },
    "required": ["sentiment", "score"],
}
SPEC = RequestSpec(
    model="gpt-4o-mini",
    prompt_template="Sentiment of {text}",
    key_columns=("id",),
    response_schema=SCHEMA,
)
PARTS = dg.StaticPartitionsDefinition(["a", "b", "c"])


def reviews_frame(n: int = 20, tag: str = "") -> pd.DataFrame:
    return pd.DataFrame(
        {"id": range(n), "text": [f"review {i} is good{tag}" for i in range(n)], "stars": 4}
    )


@dataclass
class Flow(Pipeline):
    """The shared pipeline whose upstream returns ``rows[partition]`` (default 20 reviews)."""

    rows: dict[str | None, Any] = field(default_factory=dict)


@pytest.fixture
def openai_resource(local_dir) -> InfronResource:
    return InfronResource(base_url=f"local://{local_dir}", api_style="openai", max_retries=3)


def make_flow(
    tmp_path,
    resource: InfronResource,
    *,
    partitions_def: dg.PartitionsDefinition | None = PARTS,
    spec: RequestSpec = SPEC,
    source: Any = None,
    **kwargs: Any,
) -> Flow:
    """Build the pipeline; the upstream asset returns ``flow.rows[partition]`` (default 20)."""
    data: dict[str | None, Any] = {}
    if source is not None:
        kwargs["source"] = source
    flow = Flow.build(
        tmp_path,
        resource,
        partitions_def,
        spec=spec,
        frame=lambda key: data[key] if key in data else reviews_frame(),
        **kwargs,
    )
    flow.rows = data
    return flow


def faulty_resource(tmp_path, api_style: str, **knobs: Any) -> InfronResource:
    folder = make_local_dir(str(tmp_path / "faulty"), **knobs)
    return InfronResource(base_url=f"local://{folder}", api_style=api_style, max_retries=3)


def server_batches(resource: InfronResource) -> list[str]:
    """Ids of every batch the local server holds, from its state folder."""
    folder = resource.base_url.removeprefix("local://")
    return sorted(name for name in os.listdir(os.path.join(folder, "batches")))


def submit_meta(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    (materialization,) = result.asset_materializations_for_node("rev_batches")
    return {k: v.value for k, v in materialization.metadata.items()}


def step_error(result: dg.ExecuteInProcessResult) -> str:
    """The full text (with causes) of the run's one step failure."""
    (event,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return event.step_failure_data.error.to_string()


def checks(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    return {c.check_name: c for c in result.get_asset_check_evaluations()}


def ids(table: pa.Table) -> set[int]:
    return set(table.column("id").to_pylist())


def assert_partitioned_exactly(flow: Flow, expected: set[int], partition: str | None = "a"):
    ok, bad = ids(flow.table("results", partition)), ids(flow.table("failed", partition))
    assert not ok & bad, f"rows in both results and failed: {ok & bad}"
    assert ok | bad == expected
    rows = flow.table("results", partition).num_rows + flow.table("failed", partition).num_rows
    assert rows == len(expected)


# --- submit ------------------------------------------------------------------------------------


@BOTH_STYLES
def test_submit_chunks_reuses_and_resubmits_only_when_asked(tmp_path, resource, instance):
    flow = make_flow(tmp_path, resource)

    first = submit_meta(flow.submit(instance))
    assert first["dagster/row_count"] == 20
    assert first.get("chunks", 0) == 3
    assert first.get("batches_created", 0) == 3
    assert first.get("reused_existing_batches", False) is False
    assert first["attempt"] == 1 and first["attempt_kind"] == "initial"
    assert first["api_style"] == resource.api_style
    assert len(first["batch_ids"]) == 3
    assert [b + ".json" for b in sorted(first["batch_ids"])] == server_batches(resource)

    again = submit_meta(flow.submit(instance, upstream=False))
    assert again.get("batches_created", 0) == 0
    assert again.get("reused_existing_batches", False) is True
    assert again["batch_ids"] == first["batch_ids"]
    assert again["attempt"] == 1
    assert len(server_batches(resource)) == 3

    forced = submit_meta(flow.submit(instance, upstream=False, force_resubmit=True))
    assert forced.get("batches_created", 0) == 3
    assert forced.get("reused_existing_batches", False) is False
    assert forced["attempt"] == 2
    assert not set(forced["batch_ids"]) & set(first["batch_ids"])
    assert len(server_batches(resource)) == 6


def test_changed_input_creates_new_batches(tmp_path, infron_resource, instance):
    flow = make_flow(tmp_path, infron_resource)
    first = submit_meta(flow.submit(instance))

    flow.rows["a"] = reviews_frame(tag=" (edited)")
    changed = submit_meta(flow.submit(instance))
    assert changed.get("batches_created", 0) == 3
    assert changed.get("reused_existing_batches", False) is False
    assert changed["attempt"] == 2
    assert changed["fingerprint"] != first["fingerprint"]
    assert len(server_batches(infron_resource)) == 6

    # Another partition is independent: its first submission is its attempt 1.
    other = submit_meta(flow.submit(instance, "b"))
    assert other["attempt"] == 1 and other.get("batches_created", 0) == 3
    assert len(server_batches(infron_resource)) == 9


def test_empty_partition_submits_nothing_and_collects_empty_tables(
    tmp_path, infron_resource, instance
):
    flow = make_flow(tmp_path, infron_resource)
    flow.rows["a"] = pa.table({"id": pa.array([], pa.int64()), "text": pa.array([], pa.string())})

    meta = submit_meta(flow.submit(instance))
    assert meta["dagster/row_count"] == 0
    assert meta.get("chunks", 0) == 0
    assert meta.get("batches_created", 0) == 0
    assert "batch_ids" not in meta and "batch_id" not in meta
    assert server_batches(infron_resource) == []

    result = flow.collect(instance)
    assert flow.table("results").num_rows == 0
    assert flow.table("failed").num_rows == 0
    assert "sentiment" in flow.table("results").column_names
    assert "error_code" in flow.table("failed").column_names
    assert checks(result)["completeness"].passed is True
    assert checks(result)["failure_rate"].passed is True


# --- collect -----------------------------------------------------------------------------------


@BOTH_STYLES
def test_collect_writes_typed_hive_partitioned_parquet(tmp_path, resource, instance):
    flow = make_flow(tmp_path, resource)
    flow.rows["b"] = reviews_frame(8)
    for partition in ("a", "b"):
        flow.submit(instance, partition)
        result = flow.collect(instance, partition)
        assert checks(result)["completeness"].passed is True
        assert checks(result)["failure_rate"].passed is True

    results = flow.table("results", "a")
    assert results.schema.field("sentiment").type == pa.string()
    assert results.schema.field("score").type == pa.float64()
    assert results.schema.field("prompt_tokens").type == pa.int64()
    assert set(results.column("sentiment").to_pylist()) <= {"pos", "neg"}
    assert None not in results.column("score").to_pylist()
    assert set(results.column("attempt").to_pylist()) == {1}
    assert results.column("stars").to_pylist() == [4] * 20  # input columns are kept
    by_id = dict(
        zip(results.column("id").to_pylist(), results.column("custom_id").to_pylist(), strict=True)
    )
    assert by_id == {i: make_custom_id("rev", "a", str(i)) for i in range(20)}
    assert flow.table("failed", "a").num_rows == 0

    root = str(flow.storage.table_root("results"))
    assert sorted(os.listdir(root)) == ["partition=a", "partition=b"]
    table = ds.dataset(root, partitioning="hive").to_table()
    counts = pd.Series(table.column("partition").to_pylist()).value_counts().to_dict()
    assert counts == {"a": 20, "b": 8}

    (results_mat, _) = result.asset_materializations_for_node("rev_collect")  # partition b
    assert results_mat.metadata["dagster/row_count"].value == 8
    prompt_tokens = sum(flow.table("results", "b").column("prompt_tokens").to_pylist())
    assert results_mat.metadata["prompt_tokens"].value == prompt_tokens > 0
    # The UI's schema tab lists the structured-output fields with their types.
    schema = results_mat.metadata["dagster/column_schema"].value
    types = {column.name: column.type for column in schema.columns}
    assert types["sentiment"] == "string" and types["score"] == "double"
    assert types["id"] == "int64" and "partition" not in types
    spec = flow.pipeline.collect_assets.specs_by_key[flow.pipeline.results_key]
    assert spec.metadata["dagster/table_name"] == root  # the hive root DuckDB reads below

    rows = duckdb.sql(
        f"select partition, count(*), count(distinct custom_id), min(typeof(score)) "
        f"from read_parquet('{root}/*/*.parquet', hive_partitioning=true) "
        f"group by partition order by partition"
    ).fetchall()
    assert rows == [("a", 20, 20, "DOUBLE"), ("b", 8, 8, "DOUBLE")]


def test_invalid_rows_go_to_failed_and_are_not_retryable(tmp_path, infron_resource, instance):
    flow = make_flow(tmp_path, infron_resource)
    data = reviews_frame()
    data.loc[[3, 11], "text"] = None
    flow.rows["a"] = data

    meta = submit_meta(flow.submit(instance))
    assert meta["dagster/row_count"] == 20
    assert meta.get("invalid_rows", 0) == 2
    assert meta["valid_rows"] == 18

    result = flow.collect(instance)
    failed = flow.table("failed").to_pandas().set_index("id")
    assert sorted(failed.index) == [3, 11]
    assert set(failed["error_code"]) == {"invalid_input"}
    assert failed["retryable"].tolist() == [False, False]
    assert all("'text'" in m for m in failed["error_message"])
    assert_partitioned_exactly(flow, set(range(20)))
    assert checks(result)["completeness"].passed is True
    assert checks(result)["failure_rate"].passed is False  # 2/20 > 5%
    (failed_mat,) = result.asset_materializations_for_node("rev_collect")[1:]
    assert failed_mat.asset_key == flow.pipeline.failed_key
    assert failed_mat.metadata["error_codes"].value == {"invalid_input": 2}
    assert "retryable" not in failed_mat.metadata  # none: a zero counter is left out

    run = flow.job("retry", instance, raise_on_error=False)
    assert run.success is False
    assert "has no retryable failed rows" in step_error(run)


def test_collect_waits_in_the_run_for_batches_still_running(tmp_path, instance):
    resource = faulty_resource(tmp_path, "infron", in_progress_seconds=0.4)
    flow = make_flow(tmp_path, resource)

    # Never submitted: nothing to collect and nothing failed (the checks are skipped, not
    # failed executions); the run's log says what to do.
    early = flow.collect(instance, raise_on_error=False)
    assert early.success and early.asset_materializations_for_node("rev_collect") == []
    logs = [r.user_message for r in instance.all_logs(early.run_id) if r.dagster_event is None]
    assert any("was never submitted: nothing to collect" in line for line in logs), logs

    flow.submit(instance)
    config = {
        "ops": {"rev_collect": {"config": {"wait_seconds": 20, "poll_interval_seconds": 0.1}}}
    }
    result = flow.collect(instance, run_config=config)
    assert [e.event_type_value for e in result.all_events].count("STEP_UP_FOR_RETRY") == 0
    assert flow.table("results").num_rows == 20
    assert checks(result)["completeness"].passed is True


def test_a_manual_collect_of_a_partition_in_flight_ends_at_once_and_fails_nothing(
    tmp_path, instance
):
    resource = faulty_resource(tmp_path, "infron", in_progress_seconds=600)
    flow = make_flow(tmp_path, resource)
    flow.submit(instance)
    started = time.monotonic()
    result = flow.collect(instance)
    assert time.monotonic() - started < 10
    assert result.success  # the run ends well: the partition is not marked failed
    events = [e.event_type_value for e in result.all_events]
    assert "ASSET_MATERIALIZATION" not in events and "STEP_UP_FOR_RETRY" not in events
    assert result.get_asset_check_evaluations() == []  # no check result claims anything
    logs = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any("rev_sensor collects it when its batches end" in m for m in logs)
    assert not flow.storage.table_path("results", "a").exists()
    assert result.asset_materializations_for_node("rev_collect") == []


def test_failure_rate_is_a_check_per_partition_and_can_block(tmp_path, instance):
    folder = make_local_dir(str(tmp_path / "srv"))
    resource = InfronResource(base_url=f"local://{folder}", max_retries=0)
    flow = make_flow(tmp_path, resource, block_on_failure_rate=True)
    flow.rows["a"] = reviews_frame()
    bad = reviews_frame()
    bad.loc[:9, "text"] = None  # half the rows invalid: 50 % failed
    flow.rows["b"] = bad
    for partition in ("b", "a"):
        flow.submit(instance, partition)
    failing = flow.collect(instance, "b", raise_on_error=False)
    passing = flow.collect(instance, "a")
    # Blocking: the run fails at the check, after the tables are written and recorded.
    assert failing.success is False and flow.table("failed", "b").num_rows == 10
    assert checks(failing)["failure_rate"].passed is False
    assert checks(failing)["failure_rate"].severity == dg.AssetCheckSeverity.ERROR
    assert checks(passing)["failure_rate"].passed is True
    # On the instance, each partition keeps its own result: b stays failed after a passed.
    key = dg.AssetCheckKey(dg.AssetKey("rev_failed"), "failure_rate")
    history = instance.event_log_storage.get_asset_check_execution_history(key, limit=10)
    latest = {}
    for record in sorted(history, key=lambda r: r.id):
        latest[record.partition] = record.status.value
    assert latest == {"a": "SUCCEEDED", "b": "FAILED"}


# --- faults ------------------------------------------------------------------------------------


@BOTH_STYLES
def test_failed_and_lost_rows_each_land_in_exactly_one_table(tmp_path, api_style, instance):
    resource = faulty_resource(tmp_path, api_style, failure_rate=0.3, lost_rate=0.2)
    flow = make_flow(tmp_path, resource)
    flow.submit(instance)
    result = flow.collect(instance)

    assert_partitioned_exactly(flow, set(range(20)))
    failed = flow.table("failed").to_pandas()
    codes = failed["error_code"].value_counts().to_dict()
    assert set(codes) == {"server_error", "missing_result"}
    assert failed["retryable"].all()
    assert (failed.loc[failed.error_code == "server_error", "http_status"] == 500).all()

    # What the server says happened matches what collection recorded.
    with InfronResource(base_url=resource.base_url, api_style="openai").get_client() as client:
        batches = list(client.list_batches())
    assert len(batches) == 3
    assert sum(b.completed_requests for b in batches) == flow.table("results").num_rows
    assert sum(b.failed_requests for b in batches) == codes["server_error"]
    lost = sum(b.total_requests - b.completed_requests - b.failed_requests for b in batches)
    assert lost == codes["missing_result"]

    assert checks(result)["completeness"].passed is True
    assert checks(result)["failure_rate"].passed is False


def test_missing_result_rows_record_their_attempt(tmp_path, instance):
    resource = faulty_resource(tmp_path, "openai", lost_rate=0.3)
    flow = make_flow(tmp_path, resource)
    flow.submit(instance)
    flow.collect(instance)
    failed = flow.table("failed").to_pandas()
    assert len(failed) > 0
    assert set(failed["error_code"]) == {"missing_result"}
    assert failed["attempt"].tolist() == [1] * len(failed)


@BOTH_STYLES
def test_expired_batch_keeps_finished_rows_and_fails_the_rest(tmp_path, api_style, instance):
    resource = faulty_resource(tmp_path, api_style, expire=True, expire_fraction=0.5)
    flow = make_flow(tmp_path, resource)
    flow.submit(instance)
    flow.collect(instance)

    assert_partitioned_exactly(flow, set(range(20)))
    results, failed = flow.table("results").to_pandas(), flow.table("failed").to_pandas()
    assert 0 < len(results) < 20
    assert results["sentiment"].notna().all()
    assert set(failed["error_code"]) == {"batch_expired"}
    assert failed["retryable"].all()
    assert failed["attempt"].tolist() == [1] * len(failed)


@BOTH_STYLES
def test_failed_validation_fails_every_row_retryably(tmp_path, api_style, instance):
    resource = faulty_resource(tmp_path, api_style, validation_failure=True)
    flow = make_flow(tmp_path, resource)
    flow.submit(instance)
    result = flow.collect(instance)

    assert flow.table("results").num_rows == 0
    failed = flow.table("failed").to_pandas()
    assert sorted(failed["id"]) == list(range(20))
    assert set(failed["error_code"]) == {"batch_failed"}
    assert failed["retryable"].all()
    assert all("validation" in m for m in failed["error_message"])
    assert failed["batch_id"].nunique() == 3
    assert checks(result)["completeness"].passed is True


# --- retry -------------------------------------------------------------------------------------


def test_retry_job_moves_rows_from_failed_to_results_bounded_by_max_attempts(
    tmp_path, api_style, instance
):
    resource = faulty_resource(tmp_path, api_style, failure_rate=0.3)
    flow = make_flow(tmp_path, resource, max_attempts=2)
    flow.submit(instance)

    early = flow.job("retry", instance, raise_on_error=False)
    assert early.success is False
    assert "is not collected yet" in step_error(early)

    flow.collect(instance)
    failed_before = ids(flow.table("failed"))
    assert failed_before, "failure_rate=0.3 should fail some of 20 rows"
    batches_before = len(server_batches(resource))

    meta = submit_meta(flow.job("retry", instance))
    assert meta["attempt"] == 2
    assert meta["attempt_kind"] == "retry"
    assert meta["dagster/row_count"] == len(failed_before)  # only the failed rows are resent
    assert len(server_batches(resource)) == batches_before + meta.get("batches_created", 0)
    assert meta.get("batches_created", 0) == -(-len(failed_before) // 7)

    result = flow.collect(instance)
    assert checks(result)["completeness"].passed is True
    assert_partitioned_exactly(flow, set(range(20)))
    failed_after = ids(flow.table("failed"))
    moved = failed_before - failed_after
    assert failed_after <= failed_before
    assert moved, f"the retry recovered none of {sorted(failed_before)}"
    results = flow.table("results").to_pandas().set_index("id")
    assert set(results.loc[sorted(moved), "attempt"]) == {2}
    assert set(results.loc[sorted(set(range(20)) - failed_before), "attempt"]) == {1}
    if failed_after:
        assert set(flow.table("failed").column("attempt").to_pylist()) == {2}

    beyond = flow.job("retry", instance, raise_on_error=False)
    assert beyond.success is False
    assert "already had 2 of max_attempts=2" in step_error(beyond)
    assert len(server_batches(resource)) == batches_before + meta.get("batches_created", 0)


# --- partitioning and sources ------------------------------------------------------------------


def test_unpartitioned_pipeline_end_to_end(tmp_path, infron_resource, instance):
    flow = make_flow(tmp_path, infron_resource, partitions_def=None)
    assert submit_meta(flow.submit(instance, None))["batches_created"] == 3
    again = flow.submit(instance, None, upstream=False)
    assert submit_meta(again)["reused_existing_batches"] is True
    result = flow.collect(instance, None)
    assert checks(result)["completeness"].passed is True
    assert flow.table("results", None).num_rows == 20
    assert str(flow.storage.table_path("results", None)).endswith(
        "rev/results/partition=__all__/part-0.parquet"
    )
    assert set(flow.table("results", None).column("custom_id").to_pylist()) == {
        make_custom_id("rev", None, str(i)) for i in range(20)
    }

    # Collecting again is idempotent: same rows, nothing new on the server.
    before = flow.table("results", None)
    again = flow.collect(instance, None)
    assert checks(again)["completeness"].passed is True
    assert flow.table("results", None).equals(before)
    assert len(server_batches(infron_resource)) == 3


def test_daily_partitioned_pipeline(tmp_path, openai_resource, instance):
    daily = dg.DailyPartitionsDefinition(start_date="2026-11-01", end_date="2026-11-10")
    flow = make_flow(tmp_path, openai_resource, partitions_def=daily)
    for day, n in (("2026-11-03", 20), ("2026-11-04", 5)):
        flow.rows[day] = reviews_frame(n)
        assert submit_meta(flow.submit(instance, day))["dagster/row_count"] == n
        flow.collect(instance, day)
    assert flow.table("results", "2026-11-03").num_rows == 20
    root = str(flow.storage.table_root("results"))
    assert sorted(os.listdir(root)) == ["partition=2026-11-03", "partition=2026-11-04"]
    rows = duckdb.sql(
        f"select cast(partition as varchar), count(*) from "
        f"read_parquet('{root}/*/*.parquet', hive_partitioning=true) group by 1 order by 1"
    ).fetchall()
    assert rows == [("2026-11-03", 20), ("2026-11-04", 5)]


def test_parquet_source_reads_the_files_of_a_partition(tmp_path, infron_resource, instance):
    folder = tmp_path / "src" / "a"
    folder.mkdir(parents=True)
    for start in (0, 10):
        table = pa.Table.from_pandas(reviews_frame(10).assign(id=range(start, start + 10)))
        pq.write_table(table, folder / f"part-{start}.parquet")
    source = ParquetSource(str(tmp_path / "src" / "{partition_key}" / "*.parquet"))
    flow = make_flow(tmp_path, infron_resource, source=source)
    assert flow.upstream is None

    assert submit_meta(flow.submit(instance, "a"))["dagster/row_count"] == 20
    flow.collect(instance, "a")
    assert ids(flow.table("results", "a")) == set(range(20))

    missing = flow.submit(instance, "c", raise_on_error=False)
    assert missing.success is False
    assert f"no Parquet input at '{tmp_path}/src/c/*.parquet'" in step_error(missing)

    never = flow.job("retry", instance, "b", raise_on_error=False)
    assert never.success is False
    assert "partition 'b' of rev has never been submitted" in step_error(never)


def test_embeddings_pipeline_with_keep_columns(tmp_path, openai_resource, instance):
    spec = RequestSpec(
        model="text-embedding-3-small", endpoint="/v1/embeddings", prompt_template="{text}"
    )
    flow = make_flow(tmp_path, openai_resource, spec=spec, keep_columns=["id"])
    flow.submit(instance)
    flow.collect(instance)
    results = flow.table("results")
    assert results.num_rows == 20
    assert "text" not in results.column_names and "stars" not in results.column_names
    assert results.schema.field("embedding").type == pa.list_(pa.float32())
    lengths = {len(v) for v in results.column("embedding").to_pylist()}
    assert len(lengths) == 1 and lengths.pop() > 0


# --- concurrency -------------------------------------------------------------------------------


class _GatedRows(dg.IOManager):
    """Hands the upstream rows to both racing runs only once both are ready to submit."""

    def __init__(self) -> None:
        self.arrived = threading.Event()
        self.barrier = threading.Barrier(2, timeout=30)

    def handle_output(self, context, obj) -> None:  # pragma: no cover - never materialized
        raise AssertionError("the upstream is not materialized in this test")

    def load_input(self, context) -> pd.DataFrame:
        self.arrived.set()
        self.barrier.wait()
        return reviews_frame()


def test_two_runs_racing_on_one_partition_create_one_set_of_batches(tmp_path, resource, instance):
    @dg.asset(name="reviews", partitions_def=PARTS, io_manager_key="gate")
    def reviews():  # pragma: no cover - never materialized, only loaded
        raise AssertionError

    gate = _GatedRows()
    pipeline = build_infron_batch_assets(
        name="rev",
        spec=SPEC,
        source="reviews",
        partitions_def=PARTS,
        storage_root=str(tmp_path / "lake"),
        max_requests_per_batch=7,
    )
    results: list[dg.ExecuteInProcessResult] = []

    def run() -> None:
        results.append(
            dg.materialize(
                [reviews, pipeline.batches_asset],
                selection=[pipeline.batches_asset],
                partition_key="a",
                instance=instance,
                resources={"infron": resource, "gate": gate},
            )
        )

    # The second run starts once the first waits at the gate (Dagster's in-process run setup
    # is not thread-safe); both then go on to submit at the same moment. The instance captures
    # no compute logs (conftest.dagster_instance): on an instance that does, each step swaps the
    # process's stdout/stderr and mirrors them with a `tail` child, and two runs in threads of
    # one process swapped them under each other: a step then waited 60 s on a `tail` that did
    # not stop (seen in full suite runs; a deployment runs each run in a process of its own).
    first = threading.Thread(target=run, daemon=True)
    first.start()
    assert gate.arrived.wait(30)
    second = threading.Thread(target=run, daemon=True)
    second.start()
    first.join(60)
    second.join(60)

    # If a run hangs again, say where it was.
    stuck = [t for t in (first, second) if t.is_alive()]
    where = {t.name: "".join(traceback.format_stack(sys._current_frames()[t.ident])) for t in stuck}
    assert not stuck, f"a racing run hung; its stack: {where}"
    assert len(results) == 2 and all(r.success for r in results)
    metas = sorted((submit_meta(r) for r in results), key=lambda m: m.get("batches_created", 0))
    assert [m.get("batches_created", 0) for m in metas] == [0, 3]
    assert [m.get("reused_existing_batches", False) for m in metas] == [True, False]
    assert metas[0]["batch_ids"] == metas[1]["batch_ids"]
    assert len(server_batches(resource)) == 3
    assert pipeline.storage.attempts("a") == [1]


# --- known bugs --------------------------------------------------------------------------------


def test_reverting_input_revives_the_paid_batches_of_that_version(
    tmp_path, infron_resource, instance
):
    flow = make_flow(tmp_path, infron_resource)
    original = submit_meta(flow.submit(instance))  # A: 20 rows
    flow.rows["a"] = reviews_frame(5)
    b = submit_meta(flow.submit(instance))  # B: 5 rows, all unchanged and still in flight in A
    assert b.get("batches_created", 0) == 0 and b.get("carried_from_in_flight", 0) == 5
    flow.collect(instance)
    assert ids(flow.table("results")) == set(range(5))
    assert len(server_batches(infron_resource)) == 3

    del flow.rows["a"]  # back to A: nothing is paid twice, and A's rows are what is collected
    reverted = submit_meta(flow.submit(instance))
    assert reverted.get("batches_created", 0) == 0
    assert reverted.get("reused_existing_batches", False) is True
    assert reverted["attempt"] == 3
    assert reverted["batch_ids"] == original["batch_ids"]
    assert len(server_batches(infron_resource)) == 3
    flow.collect(instance)
    assert ids(flow.table("results")) == set(range(20))
    assert flow.table("failed").num_rows == 0


def test_empty_pandas_partition_keeps_the_whole_table_readable(tmp_path, infron_resource, instance):
    flow = make_flow(tmp_path, infron_resource)
    # A day with no reviews, built the usual pandas way: object columns, which Arrow types null.
    flow.rows["a"] = pd.DataFrame(columns=["id", "text", "stars"])
    for partition in ("a", "b"):
        flow.submit(instance, partition)
        flow.collect(instance, partition)
    root = str(flow.storage.table_root("results"))
    table = ds.dataset(root, partitioning="hive").to_table()
    assert table.num_rows == 20
    assert table.schema.field("text").type in (pa.string(), pa.large_string())
    count = duckdb.sql(
        f"select count(text) from read_parquet('{root}/*/*.parquet', hive_partitioning=true)"
    ).fetchall()
    assert count == [(20,)]


@pytest.mark.parametrize("resume_with", ["retry job", "materialize"])
def test_a_retry_whose_create_was_refused_resumes_as_the_same_attempt(
    tmp_path, instance, resume_with
):
    folder = make_local_dir(str(tmp_path / "faulty"), failure_rate=0.3)
    resource = InfronResource(base_url=f"local://{folder}", max_retries=0)
    flow = make_flow(tmp_path, resource)
    flow.submit(instance)
    flow.collect(instance)
    failed_before = ids(flow.table("failed"))
    assert failed_before
    # The provider's queue is full: the retry's create call is refused.
    save_config(folder, LocalServerConfig(**INSTANT, failure_rate=0.3, enqueued_token_limit=1))
    refused = flow.job("retry", instance, raise_on_error=False)
    assert refused.success is False and "Enqueued token limit" in step_error(refused)
    batches_before = len(server_batches(resource))

    save_config(folder, LocalServerConfig(**INSTANT, failure_rate=0.3))
    if resume_with == "retry job":
        resumed = flow.job("retry", instance)
    else:
        resumed = flow.submit(instance, upstream=False)
    assert resumed.success
    manifests = sorted(os.listdir(flow.storage.partition_dir("manifests", "a").path))
    assert manifests == ["attempt=1.json", "attempt=2.json"]  # resumed, not a third attempt
    attempt2 = flow.storage.read_json(flow.storage.manifest_path("a", 2))
    assert attempt2["state"] == "submitted" and attempt2["kind"] == "retry"
    assert len(server_batches(resource)) == batches_before + len(attempt2.get("chunks", 0))
    flow.collect(instance)
    assert_partitioned_exactly(flow, set(range(20)))
    assert ids(flow.table("failed")) <= failed_before


def test_bad_keep_columns_or_a_none_upstream_fail_the_submit_before_any_paid_call(
    tmp_path, infron_resource, instance
):
    flow = make_flow(tmp_path, infron_resource, keep_columns=["id", "no_such"])
    typo = flow.submit(instance, raise_on_error=False)
    assert typo.success is False and "keep_columns names 'no_such'" in step_error(typo)

    flow = make_flow(tmp_path / "none", infron_resource)
    flow.rows["a"] = None
    forgot = flow.submit(instance, raise_on_error=False)
    assert forgot.success is False and "produced no data (None)" in step_error(forgot)
    folder = infron_resource.base_url.removeprefix("local://")
    assert (
        not os.path.exists(os.path.join(folder, "batches")) or server_batches(infron_resource) == []
    )


def test_owners_tags_and_automation_condition_reach_the_assets(tmp_path):
    condition = dg.AutomationCondition.on_cron("0 6 * * *")
    pipeline = build_infron_batch_assets(
        name="rev",
        spec=SPEC,
        source="reviews",
        partitions_def=PARTS,
        storage_root=str(tmp_path / "lake"),
        owners=["team:analytics"],
        tags={"tier": "gold"},
        automation_condition=condition,
    )
    batches = pipeline.batches_asset.specs_by_key[dg.AssetKey("rev_batches")]
    assert batches.owners == ["team:analytics"] and batches.tags["tier"] == "gold"
    assert batches.automation_condition == condition
    for key in (pipeline.results_key, pipeline.failed_key):
        spec = pipeline.collect_assets.specs_by_key[key]
        assert spec.owners == ["team:analytics"] and spec.tags["tier"] == "gold"
    check_keys = {key.name for key in pipeline.collect_checks.check_keys}
    assert check_keys == {"completeness", "failure_rate"}
