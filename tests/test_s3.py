"""The whole flow with its storage on S3 (moto's real S3 server over HTTP, through s3fs)."""

from __future__ import annotations

import io
import threading
import uuid
from typing import Any

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import s3fs
from conftest import dagster_instance, make_local_dir

from infron_dagster import (
    BatchStorage,
    InfronBatchPipeline,
    InfronResource,
    ParquetSource,
    RequestSpec,
    build_infron_batch_assets,
)
from infron_dagster.storage import LockTimeout

SCHEMA = {
    "type": "object",
    "properties": {"sentiment": {"type": "string"}, "score": {"type": "number"}},
    "required": ["sentiment", "score"],
}
SPEC = RequestSpec(
    model="gpt-4o-mini",
    prompt_template="Sentiment of {text}",
    key_columns="id",
    response_schema=SCHEMA,
)
PARTS = dg.StaticPartitionsDefinition(["a", "b"])


@pytest.fixture
def prefix() -> str:
    return f"lake/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def fs(moto_s3) -> s3fs.S3FileSystem:
    """An independent client to look at the bucket, as another tool would."""
    return s3fs.S3FileSystem(
        key="testing",
        secret="testing",
        client_kwargs={"endpoint_url": moto_s3.endpoint_url},
        skip_instance_cache=True,
        use_listings_cache=False,
    )


@pytest.fixture(scope="module")
def instance():
    with dagster_instance() as inst:
        yield inst


@dg.asset(name="reviews", partitions_def=PARTS)
def reviews() -> pd.DataFrame:
    return pd.DataFrame({"id": range(20), "text": [f"review {i}" for i in range(20)]})


def make_pipeline(prefix: str, options: dict[str, Any], **kwargs: Any) -> InfronBatchPipeline:
    kwargs.setdefault("source", "reviews")
    return build_infron_batch_assets(
        name="rev",
        spec=SPEC,
        partitions_def=PARTS,
        storage_root=f"s3://{prefix}",
        storage_options=options,
        max_requests_per_batch=7,
        **kwargs,
    )


def definitions(pipeline: InfronBatchPipeline, resources: dict[str, Any]) -> dg.Definitions:
    return dg.Definitions.merge(
        pipeline.definitions, dg.Definitions(assets=[reviews], resources=resources)
    )


def tick(pipeline, defs, instance, resource, cursor=None) -> dg.SensorResult:
    context = dg.build_sensor_context(
        instance=instance, definitions=defs, resources={"infron": resource}, cursor=cursor
    )
    return pipeline.sensor(context)


def run_request(defs, instance, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
    job = defs.resolve_implicit_global_asset_job_def()
    return job.execute_in_process(
        partition_key=request.partition_key,
        asset_selection=request.asset_selection,
        instance=instance,
    )


def read_hive(fs: s3fs.S3FileSystem, root: str) -> pa.Table:
    return ds.dataset(root, filesystem=fs, format="parquet", partitioning="hive").to_table()


def submit_meta(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    (materialization,) = result.asset_materializations_for_node("rev_batches")
    return {k: v.value for k, v in materialization.metadata.items()}


def test_whole_flow_on_s3(tmp_path, api_style, moto_s3, fs, prefix, instance):
    folder = make_local_dir(str(tmp_path / "local"), failure_rate=0.3)
    resource = InfronResource(base_url=f"local://{folder}", api_style=api_style)
    pipeline = make_pipeline(prefix, moto_s3.storage_options)
    resources = {
        "infron": resource,
        "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io")),
    }
    defs = definitions(pipeline, resources)
    base = f"{prefix}/rev"

    # SUBMIT: requests, inputs and the manifest land on S3; the lock is released.
    first = dg.materialize(
        [reviews, pipeline.batches_asset], partition_key="a", instance=instance, resources=resources
    )
    meta = submit_meta(first)
    assert meta.get("batches_created", 0) == 3 and meta["attempt"] == 1
    assert fs.exists(f"{base}/manifests/partition=a/attempt=1.json")
    assert len(fs.ls(f"{base}/requests/partition=a/attempt=1")) == 3
    assert (
        pq.read_table(f"{base}/inputs/partition=a/attempt=1.parquet", filesystem=fs).num_rows == 20
    )
    assert not fs.exists(f"{base}/locks/partition=a/lock.json")
    assert not (tmp_path / "lake").exists()

    again = dg.materialize(
        [reviews, pipeline.batches_asset],
        selection=[pipeline.batches_asset],
        partition_key="a",
        instance=instance,
        resources=resources,
    )
    assert submit_meta(again)["reused_existing_batches"] is True
    assert submit_meta(again)["batch_ids"] == meta["batch_ids"]

    # POLL + COLLECT: the sensor reads the manifests on S3 and asks for one collection run.
    sensed = tick(pipeline, defs, instance, resource)
    (request,) = sensed.run_requests
    assert (request.partition_key, request.run_key.rsplit(":", 1)[0]) == ("a", "rev:a:1")
    assert run_request(defs, instance, request).success
    assert tick(pipeline, defs, instance, resource, sensed.cursor).run_requests == []

    results = read_hive(fs, f"{base}/results")
    failed = read_hive(fs, f"{base}/failed")
    assert set(results.column("partition").to_pylist()) == {"a"}
    assert results.schema.field("score").type == pa.float64()
    ok, bad = set(results.column("id").to_pylist()), set(failed.column("id").to_pylist())
    assert bad and not ok & bad and ok | bad == set(range(20))
    assert all(failed.column("retryable").to_pylist())

    # RETRY: the retry job resubmits the failed rows; the sensor collects attempt 2.
    retry = defs.resolve_job_def("rev_retry").execute_in_process(
        partition_key="a", instance=instance
    )
    assert submit_meta(retry)["attempt"] == 2
    assert submit_meta(retry)["dagster/row_count"] == len(bad)
    assert fs.exists(f"{base}/manifests/partition=a/attempt=2.json")
    sensed = tick(pipeline, defs, instance, resource, sensed.cursor)
    (request,) = sensed.run_requests
    assert request.run_key.rsplit(":", 1)[0] == "rev:a:2"
    assert run_request(defs, instance, request).success

    results = read_hive(fs, f"{base}/results")
    failed_after = set(read_hive(fs, f"{base}/failed").column("id").to_pylist())
    assert failed_after < bad
    assert set(results.column("id").to_pylist()) | failed_after == set(range(20))
    assert set(results.column("partition").to_pylist()) == {"a"}
    with fs.open(f"{base}/results/partition=a/part-0.parquet", "rb") as fh:
        direct = pq.read_table(io.BytesIO(fh.read()))
    assert direct.num_rows == results.num_rows


def test_parquet_source_on_s3(tmp_path, moto_s3, fs, prefix, instance):
    frame = pd.DataFrame({"id": range(5), "text": [f"doc {i}" for i in range(5)]})
    with fs.open(f"{prefix}/src/b.parquet", "wb") as fh:
        pq.write_table(pa.Table.from_pandas(frame), fh)
    source = ParquetSource(f"s3://{prefix}/src/{{partition_key}}.parquet", moto_s3.storage_options)
    pipeline = make_pipeline(prefix, moto_s3.storage_options, source=source)
    folder = make_local_dir(str(tmp_path / "local"))
    resources = {"infron": InfronResource(base_url=f"local://{folder}")}

    result = dg.materialize(
        [pipeline.batches_asset], partition_key="b", instance=instance, resources=resources
    )
    assert submit_meta(result)["dagster/row_count"] == 5
    dg.materialize(
        [pipeline.collect_assets], partition_key="b", instance=instance, resources=resources
    )
    results = read_hive(fs, f"{prefix}/rev/results")
    assert sorted(results.column("id").to_pylist()) == list(range(5))


def test_partition_lock_is_exclusive_on_s3(moto_s3, prefix):
    storage = BatchStorage(f"s3://{prefix}", "rev", moto_s3.storage_options)
    other = BatchStorage(f"s3://{prefix}", "rev", moto_s3.storage_options)
    entered = threading.Event()
    with storage.lock("a"):
        blocked = pytest.raises(LockTimeout, match="partition 'a' is locked by another run")
        with blocked, other.lock("a", wait_seconds=0.3):
            entered.set()
        with other.lock("b", wait_seconds=0.3):  # other partitions are not blocked
            pass
    assert not entered.is_set()
    with other.lock("a", wait_seconds=0.3):  # released on exit
        pass


def test_sensor_sees_manifests_written_by_another_process(tmp_path, moto_s3, prefix, instance):
    folder = make_local_dir(str(tmp_path / "local"))
    resource = InfronResource(base_url=f"local://{folder}")
    resources = {
        "infron": resource,
        "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io")),
    }
    # The sensor's code server and the run workers are different processes: different S3
    # clients, each with its own caches. A harmless extra option gives the worker side its own
    # s3fs instance here, as a separate process would have.
    sensor_side = make_pipeline(prefix, moto_s3.storage_options)
    worker_options = {**moto_s3.storage_options, "default_block_size": 16 * 2**20}
    worker_side = make_pipeline(prefix, worker_options)
    assert worker_side.storage.base.fs is not sensor_side.storage.base.fs
    defs = definitions(sensor_side, resources)

    dg.materialize(
        [reviews, worker_side.batches_asset],
        partition_key="a",
        instance=instance,
        resources=resources,
    )
    first = tick(sensor_side, defs, instance, resource)
    assert [r.run_key.rsplit(":", 1)[0] for r in first.run_requests] == ["rev:a:1"]

    dg.materialize(
        [reviews, worker_side.batches_asset],
        partition_key="b",
        instance=instance,
        resources=resources,
    )
    second = tick(sensor_side, defs, instance, resource, first.cursor)
    assert [r.run_key.rsplit(":", 1)[0] for r in second.run_requests] == ["rev:b:1"]
