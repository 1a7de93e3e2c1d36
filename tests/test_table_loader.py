"""``<name>_results`` / ``<name>_failed`` as inputs of downstream assets (issue 10, item 5).

Real runs: the embedded local server answers instantly, collection writes real Parquet, and a
downstream asset loads it through :class:`InfronTableIOManager` in a real ``dg.materialize``.
"""

import io
import uuid
from dataclasses import dataclass
from typing import Any

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import dagster_instance, make_local_dir
from harness import Pipeline

from infron_dagster import BatchStorage, InfronResource, RequestSpec
from infron_dagster.assets import build_infron_batch_assets
from infron_dagster.prepare import DEFAULT_MAX_REQUESTS
from infron_dagster.table_loader import (
    InfronTableIOManager,
    MissingPartitionError,
    read_batch_table,
    tables_io_manager_key,
)

SPEC = RequestSpec(model="gpt-4o-mini", prompt_template="Sentiment of {text}", key_columns="id")
PARTS = dg.StaticPartitionsDefinition(["a", "b", "c"])
IO_KEY = "dagster/io_manager_key"
# Per partition: ids, and one row (id 1 in "a") whose null template value fails it unsent.
ROWS = {
    "a": pd.DataFrame({"id": [0, 1, 2, 3], "text": ["good", None, "bad", "fine"]}),
    "b": pd.DataFrame({"id": [100, 101], "text": ["meh", "great"]}),
    None: pd.DataFrame({"id": [7, 8, 9], "text": ["x", "y", "z"]}),
}


@pytest.fixture(scope="module")
def instance():
    with dagster_instance() as inst:
        yield inst


def reviews_asset(partitions_def: dg.PartitionsDefinition | None) -> dg.AssetsDefinition:
    @dg.asset(name="reviews", partitions_def=partitions_def)
    def reviews(context: dg.AssetExecutionContext) -> pd.DataFrame:
        return ROWS[context.partition_key if context.has_partition_key else None]

    return reviews


@dataclass
class Flow(Pipeline):
    """The shared pipeline with the test's instance, and a downstream asset to load its tables."""

    instance: Any = None

    def submit_and_collect(self, partition: str | None) -> None:
        assert self.submit(self.instance, partition).success
        collected = self.collect(self.instance, partition)
        done = {e.asset_key for e in collected.asset_materializations_for_node("rev_collect")}
        assert done == {self.pipeline.results_key, self.pipeline.failed_key}

    def downstream(self, asset: dg.AssetsDefinition, partition: str | None = None, **kw):
        return dg.materialize(
            [self.pipeline.collect_assets, asset],  # the tables IO manager is bound to it
            selection=[asset],
            partition_key=partition,
            instance=self.instance,
            resources=self.resources,
            **kw,
        )


def make_flow(tmp_path, instance, partitions_def=PARTS, **kwargs: Any) -> Flow:
    folder = make_local_dir(str(tmp_path / "local"))
    resource = InfronResource(base_url=f"local://{folder}", api_style="infron", max_retries=0)
    kwargs.setdefault("max_requests_per_batch", DEFAULT_MAX_REQUESTS)
    flow = Flow.build(
        tmp_path, resource, partitions_def, spec=SPEC, frame=lambda key: ROWS[key], **kwargs
    )
    flow.instance = instance
    return flow


def on_disk(flow: Flow, kind: str, partition: str | None) -> pa.Table:
    store = flow.pipeline.storage
    return store.read_table(store.table_path(kind, partition))


def step_error(result: dg.ExecuteInProcessResult) -> str:
    (event,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return event.step_failure_data.error.to_string()


def tree(flow: Flow) -> dict[str, int]:
    base = flow.pipeline.storage.base
    return {str(p): p.stat().st_size for p in base.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def collected(tmp_path_factory, instance) -> Flow:
    """Partitions "a" and "b" collected; "c" never submitted."""
    flow = make_flow(tmp_path_factory.mktemp("collected"), instance)
    flow.submit_and_collect("a")
    flow.submit_and_collect("b")
    return flow


def test_a_partitioned_downstream_gets_its_partition_as_dataframes(collected):
    flow = collected
    before = tree(flow)
    seen: dict[str, Any] = {}

    @dg.asset(partitions_def=PARTS)
    def top_topics(rev_results: pd.DataFrame, rev_failed: pd.DataFrame) -> None:
        seen["results"], seen["failed"] = rev_results, rev_failed

    assert flow.downstream(top_topics, "a").success
    results, failed = seen["results"], seen["failed"]
    assert isinstance(results, pd.DataFrame) and isinstance(failed, pd.DataFrame)
    assert sorted(results["id"]) == [0, 2, 3]
    assert failed["id"].tolist() == [1] and failed["error_code"].tolist() == ["invalid_input"]
    # Exactly the file collection wrote: no partition column, no internal column.
    pd.testing.assert_frame_equal(results, on_disk(flow, "results", "a").to_pandas())
    pd.testing.assert_frame_equal(failed, on_disk(flow, "failed", "a").to_pandas())
    assert "partition" not in results.columns
    assert not [c for c in results.columns if c.startswith("__")]

    assert flow.downstream(top_topics, "b").success
    assert sorted(seen["results"]["id"]) == [100, 101] and seen["failed"].empty
    assert tree(flow) == before  # loading (and the IO manager) wrote nothing


def test_an_input_annotated_arrow_gets_a_table(collected):
    seen: dict[str, Any] = {}

    @dg.asset(partitions_def=PARTS)
    def as_arrow(rev_results: pa.Table) -> None:
        seen["table"] = rev_results

    assert collected.downstream(as_arrow, "b").success
    assert isinstance(seen["table"], pa.Table)
    assert seen["table"].equals(on_disk(collected, "results", "b"))


def test_an_unpartitioned_downstream_gets_its_partitions_with_a_partition_column(collected):
    seen: dict[str, Any] = {}
    two = dg.SpecificPartitionsPartitionMapping(["a", "b"])
    every_collected = {"allow_missing_partitions": True}  # all partitions; "c" is skipped

    @dg.asset(
        ins={
            "results": dg.AssetIn("rev_results", partition_mapping=two),
            "failed": dg.AssetIn("rev_failed", metadata=every_collected),
        }
    )
    def everything(results: pd.DataFrame, failed: pa.Table) -> None:
        seen["results"], seen["failed"] = results, failed

    assert collected.downstream(everything).success
    results = seen["results"]
    assert results.groupby("partition")["id"].apply(sorted).to_dict() == {
        "a": [0, 2, 3],
        "b": [100, 101],
    }
    assert list(results.columns) == [*on_disk(collected, "results", "a").column_names, "partition"]
    assert seen["failed"].column("partition").to_pylist() == ["a"]
    assert seen["failed"].column("id").to_pylist() == [1]
    assert seen["failed"].schema.field("partition").type == pa.string()


def test_a_missing_partition_is_an_error_naming_it_and_its_path(collected):
    @dg.asset
    def everything(rev_results: pd.DataFrame) -> None:  # all partitions: "c" is missing
        pass

    failed = collected.downstream(everything, raise_on_error=False)
    assert not failed.success
    message = step_error(failed)
    assert "MissingPartitionError" in message
    assert "partition 'c' of rev_results has no Parquet file at" in message
    assert str(collected.pipeline.storage.table_path("results", "c")) in message


def test_an_input_of_another_type_is_refused_by_name(collected):
    @dg.asset(partitions_def=PARTS)
    def wrong(rev_results: dict) -> None:
        pass

    result = collected.downstream(wrong, "b", raise_on_error=False)
    assert not result.success
    assert "load as pandas.DataFrame or pyarrow.Table" in step_error(result)


def test_another_code_location_loads_the_tables_as_external_assets(collected, instance):
    key = tables_io_manager_key("rev")
    external = dg.AssetSpec("rev_failed", partitions_def=PARTS).with_io_manager_key(key)
    seen: dict[str, Any] = {}

    @dg.asset(partitions_def=PARTS)
    def triage(rev_failed: pd.DataFrame) -> None:
        seen["failed"] = rev_failed

    store = BatchStorage(collected.pipeline.storage.root, "rev")  # built anew, from config
    result = dg.materialize(
        [external, triage],
        selection=[triage],
        partition_key="a",
        instance=instance,
        resources={key: InfronTableIOManager(store)},
    )
    assert result.success
    pd.testing.assert_frame_equal(seen["failed"], on_disk(collected, "failed", "a").to_pandas())


def test_an_unpartitioned_pipeline_loads_its_one_table(tmp_path, instance):
    flow = make_flow(tmp_path, instance, partitions_def=None)
    flow.submit_and_collect(None)
    seen: dict[str, Any] = {}

    @dg.asset
    def whole(rev_results) -> None:  # unannotated: a DataFrame
        seen["rows"] = rev_results

    assert flow.downstream(whole).success
    assert isinstance(seen["rows"], pd.DataFrame)
    assert sorted(seen["rows"]["id"]) == [7, 8, 9] and "partition" not in seen["rows"]


def test_results_load_from_s3(tmp_path, instance, moto_s3):
    prefix = f"s3://{moto_s3.bucket}/t-{uuid.uuid4().hex[:12]}"
    flow = make_flow(
        tmp_path, instance, storage_root=prefix, storage_options=moto_s3.storage_options
    )
    assert not flow.pipeline.storage.is_local
    flow.submit_and_collect("a")
    seen: dict[str, Any] = {}

    @dg.asset(partitions_def=PARTS)
    def one(rev_results: pd.DataFrame) -> None:
        seen["one"] = rev_results

    @dg.asset(ins={"rows": dg.AssetIn("rev_results", metadata={"allow_missing_partitions": True})})
    def every(rows: pa.Table) -> None:
        seen["every"] = rows

    @dg.asset
    def strict(rev_failed: pa.Table) -> None:
        pass

    assert flow.downstream(one, "a").success
    pd.testing.assert_frame_equal(seen["one"], on_disk(flow, "results", "a").to_pandas())
    assert sorted(seen["one"]["id"]) == [0, 2, 3]
    assert flow.downstream(every).success
    assert seen["every"].select(["id", "partition"]).sort_by("id").to_pydict() == {
        "id": [0, 2, 3],
        "partition": ["a", "a", "a"],
    }
    missing = flow.downstream(strict, raise_on_error=False)
    assert f"has no Parquet file at {prefix}/rev/failed/partition=b/" in step_error(missing)
    assert not (tmp_path / "lake").exists()  # nothing was read from (or put on) local disk


def test_the_io_manager_only_reads(tmp_path):
    flow_store = build_infron_batch_assets(
        name="rev", spec=SPEC, source="reviews", storage_root=str(tmp_path / "lake")
    ).storage
    manager = InfronTableIOManager(flow_store)
    context = dg.build_output_context(asset_key=dg.AssetKey("rev_results"))
    manager.handle_output(context, None)  # what a MaterializeResult without value would pass
    assert not (tmp_path / "lake").exists()
    with pytest.raises(dg.DagsterInvariantViolationError, match="written by collection"):
        manager.handle_output(context, pd.DataFrame({"id": [1]}))
    assert not (tmp_path / "lake").exists()


def test_read_batch_table_drops_internal_columns_and_keeps_exact_keys(tmp_path):
    store = build_infron_batch_assets(
        name="rev", spec=SPEC, source="reviews", storage_root=str(tmp_path / "lake")
    ).storage
    long_key = "k|" + "é" * 200  # stored under a hashed folder name
    for key, ids in (("x/y", [1]), (long_key, [2, 3])):
        table = pa.table({"id": ids, "__request_hash": ["h"] * len(ids)})
        sink = io.BytesIO()
        pq.write_table(table, sink)
        store.write_bytes(store.table_path("results", key), sink.getvalue())

    both = read_batch_table(store, "results", ["x/y", long_key], partition_column=True)
    assert both.column_names == ["id", "partition"]
    assert both.to_pydict() == {"id": [1, 2, 3], "partition": ["x/y", long_key, long_key]}
    with pytest.raises(MissingPartitionError, match="partition 'nope' of rev_results") as exc:
        read_batch_table(store, "results", ["x/y", "nope"])
    assert exc.value.path == str(store.table_path("results", "nope"))


def test_the_pipeline_definitions_wire_the_tables_io_manager(tmp_path, instance):
    folder = make_local_dir(str(tmp_path / "local"))
    resource = InfronResource(base_url=f"local://{folder}", api_style="infron", max_retries=0)
    pipeline = build_infron_batch_assets(
        name="rev",
        spec=SPEC,
        source="reviews",
        partitions_def=PARTS,
        storage_root=str(tmp_path / "lake"),
    )
    seen: dict[str, Any] = {}

    @dg.asset(partitions_def=PARTS)
    def top_topics(rev_results: pd.DataFrame) -> None:
        seen["rows"] = rev_results

    io_manager = dg.FilesystemIOManager(base_dir=str(tmp_path / "io"))
    defs = dg.Definitions.merge(
        pipeline.definitions,  # supplies rev_tables itself: not passed here
        dg.Definitions(
            assets=[reviews_asset(PARTS), top_topics],
            resources={"infron": resource, "io_manager": io_manager},
        ),
    )
    job = defs.resolve_implicit_global_asset_job_def()
    for selection in (
        [dg.AssetKey("reviews"), pipeline.batches_asset.key],
        [pipeline.results_key, pipeline.failed_key],
        [dg.AssetKey("top_topics")],
    ):
        result = job.execute_in_process(
            partition_key="b", asset_selection=selection, instance=instance
        )
        assert result.success
    assert sorted(seen["rows"]["id"]) == [100, 101]
