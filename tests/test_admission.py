"""Admission control: a backfill never enqueues more tokens than ``max_enqueued_tokens``.

Real Dagster runs, the real sensor, the embedded local server enforcing the same limit as
``--enqueued-token-limit``. Every create call's answer is counted by wrapping the local app
(WSGI) the client talks to: the library itself is not touched.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import dagster_instance, make_local_dir
from harness import Pipeline

from infron_dagster import InfronResource, ParquetSource
from infron_dagster.admission import AdmissionControl
from infron_dagster.local import embedded
from infron_dagster.manifest import ChunkRecord, Manifest
from infron_dagster.models import Batch, BatchStatus
from infron_dagster.storage import BatchStorage
from infron_dagster.submit import load_manifests

# 20 days: a backfill the limit holds back several rounds (30 took twice the time, proving no more)
DAYS = dg.DailyPartitionsDefinition(start_date="2026-01-01", end_date="2026-01-21")
KEYS = DAYS.get_partition_keys()
ROWS = 4  # per partition, 2 per chunk: 2 chunks of ~45 estimated tokens each
LIMIT = 300  # about 3 partitions' chunks at once


def _count_creates(monkeypatch) -> Counter:
    """Status codes the local app answered to POST .../batches, in this process."""
    statuses: Counter = Counter()
    real = embedded.create_app

    def counting(*args: Any, **kwargs: Any):
        app = real(*args, **kwargs)

        def wrapped(environ, start_response):
            create = environ["REQUEST_METHOD"] == "POST" and environ["PATH_INFO"].endswith(
                "/batches"
            )

            def start(status, headers, *exc):
                if create:
                    statuses[int(status.split()[0])] += 1
                return start_response(status, headers, *exc)

            return app(environ, start)

        return wrapped

    monkeypatch.setattr(embedded, "create_app", counting)
    return statuses


def _submit_metadata(instance, key: dg.AssetKey) -> dict[str, dict]:
    records = instance.fetch_materializations(key, limit=1000).records
    found: dict[str, dict] = {}
    for r in sorted(records, key=lambda r: r.storage_id):
        found.setdefault(r.partition_key, r.asset_materialization.metadata)
    return found


def _parquet_pipeline(tmp_path, resource: InfronResource) -> Pipeline:
    source = tmp_path / "source"
    source.mkdir()
    for key in KEYS:
        texts = [f"review {i} of {key}" for i in range(ROWS)]
        pq.write_table(pa.table({"id": range(ROWS), "text": texts}), source / f"{key}.parquet")
    return Pipeline.build(
        tmp_path,
        resource,
        DAYS,
        params={"max_tokens": 16},
        source=ParquetSource(str(source / "{partition_key}.parquet")),
        max_requests_per_batch=2,
        backfill_policy=dg.BackfillPolicy.single_run(),
        max_enqueued_tokens=LIMIT,
    )


def test_a_backfill_of_20_partitions_stays_under_the_enqueued_token_limit(tmp_path, monkeypatch):
    statuses = _count_creates(monkeypatch)
    local = make_local_dir(str(tmp_path / "local"), in_progress_seconds=0.3)
    # The server enforces the same limit (it counts input tokens; the pipeline also counts
    # each request's output limit, so it never asks for more than the server allows).
    from infron_dagster.local import LocalServerConfig, save_config

    save_config(
        local,
        LocalServerConfig(
            validating_seconds=0.0,
            in_progress_seconds=0.3,
            finalizing_seconds=0.0,
            enqueued_token_limit=LIMIT,
        ),
    )
    resource = InfronResource(base_url=f"local://{local}", api_style="infron")
    flow = _parquet_pipeline(tmp_path, resource)
    with dagster_instance() as instance:
        backfill = dg.materialize(  # a single-run backfill of the 20 submit partitions
            [flow.pipeline.batches_asset],
            resources=flow.resources,
            instance=instance,
            tags={
                "dagster/asset_partition_range_start": KEYS[0],
                "dagster/asset_partition_range_end": KEYS[-1],
            },
        )
        assert backfill.success  # no SubmitIncomplete: what does not fit waits
        first = _submit_metadata(instance, flow.pipeline.batches_asset.key)
        waiting = [k for k in KEYS if first[k].get("pending_chunks")]
        assert len(waiting) >= len(KEYS) - 5, "the limit must hold most partitions back at first"
        assert "max_enqueued_tokens=300" in first[KEYS[-1]]["pending_why"].value
        requested = flow.drive(instance, KEYS)
    storage = flow.pipeline.storage
    for key in KEYS:
        assert flow.accounted(key) == ROWS, key
        (manifest,) = load_manifests(storage, key)
        assert manifest.state == "collected" and manifest.fully_submitted
    submits = [r for r in requested if r.asset_selection == [flow.pipeline.batches_asset.key]]
    assert len(submits) >= len(waiting)  # the sensor asked for the runs that submitted them
    assert statuses[200] == len(KEYS) * 2  # one create per chunk, never a second
    assert set(statuses) == {200}, statuses  # never a 429, never a limit refusal
    assert AdmissionControl(storage, max_enqueued_tokens=LIMIT, output_tokens=16).in_flight() == 0


def test_a_partition_bigger_than_the_limit_is_sent_alone_and_completes(tmp_path, monkeypatch):
    statuses = _count_creates(monkeypatch)
    local = make_local_dir(str(tmp_path / "local"), in_progress_seconds=0.2)
    resource = InfronResource(base_url=f"local://{local}", api_style="infron")
    parts = dg.StaticPartitionsDefinition(["a", "b"])
    # one chunk of 4 requests: ~12 input + 4 x 16 output tokens, over a limit of 40
    flow = Pipeline.build(
        tmp_path,
        resource,
        parts,
        rows=ROWS,
        params={"max_tokens": 16},
        max_requests_per_batch=10,
        max_enqueued_tokens=40,
    )
    with dagster_instance() as instance:
        for key in ("a", "b"):
            assert flow.submit(instance, key).success
        meta = _submit_metadata(instance, flow.pipeline.batches_asset.key)
        assert "sent alone" in meta["a"]["pending_why"].value
        assert meta["b"]["pending_chunks"].value == 1  # a is in flight: b waits
        flow.drive(instance, ["a", "b"])
    for key in ("a", "b"):
        assert flow.accounted(key) == ROWS
    assert statuses == Counter({200: 2})


def _manifest(name: str, attempt: int, chunks: int, tokens: int) -> Manifest:
    return Manifest(
        name=name,
        partition_key=f"p{attempt}",
        attempt=1,
        fingerprint="f",
        api_style="infron",
        endpoint="/v1/chat/completions",
        model="m",
        chunks=[
            ChunkRecord(index=i, path=f"c{i}", requests=1, bytes=10, estimated_tokens=tokens)
            for i in range(chunks)
        ],
    )


def _admit_many(root: str, name: str, go, out) -> None:
    control = AdmissionControl(BatchStorage(root, name), max_enqueued_tokens=50, output_tokens=0)
    go.wait(60)
    admitted = 0
    for n in range(10):
        admitted += len(control.admit(_manifest(name, n, chunks=3, tokens=10)).chunks)
    out.put(admitted)


def test_two_processes_admitting_at_once_never_pass_the_limit(tmp_path):
    spawn = multiprocessing.get_context("spawn")  # as two runs of a deployment would
    go, out = spawn.Event(), spawn.Queue()
    root = str(tmp_path / "lake")
    workers = [
        spawn.Process(target=_admit_many, args=(root, name, go, out)) for name in ("one", "two")
    ]
    for worker in workers:
        worker.start()
    time.sleep(1.5)
    go.set()
    admitted = [out.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    # two pipelines of one storage root share the limit: 5 chunks of 10 tokens in all
    assert sum(admitted) == 5, admitted
    control = AdmissionControl(BatchStorage(root, "one"), max_enqueued_tokens=50, output_tokens=0)
    assert control.in_flight() == 50


def test_a_create_the_provider_refuses_for_its_queue_waits_as_pending(tmp_path, monkeypatch):
    import infron_dagster.resume as resume

    monkeypatch.setattr(resume, "RESUME_BACKOFF_SECONDS", 0.0)  # the backoff has its own test
    # The provider's queue is fuller than the pipeline's limit knows (another client of the
    # account): its refusal leaves the chunk pending, the run succeeds, the sensor resubmits.
    # Chunk 1 stays in progress 2 s, so chunk 2's create (right after it, in the same run) is
    # refused even on a loaded machine (with 0.2 s, a full suite run once created it after
    # chunk 1 had ended, and nothing was refused).
    local = make_local_dir(str(tmp_path / "local"))
    from infron_dagster.local import LocalServerConfig, save_config

    save_config(
        local,
        LocalServerConfig(
            validating_seconds=0.0,
            in_progress_seconds=2.0,
            finalizing_seconds=0.0,
            enqueued_token_limit=14,  # one chunk of 2 requests (~12 input tokens) at a time
        ),
    )
    resource = InfronResource(base_url=f"local://{local}", api_style="infron")
    flow = Pipeline.build(
        tmp_path,
        resource,
        dg.StaticPartitionsDefinition(["a"]),
        rows=ROWS,
        max_requests_per_batch=2,
        params={"max_tokens": 16},
        max_enqueued_tokens=100_000,
    )
    with dagster_instance() as instance:
        assert flow.submit(instance, "a").success
        meta = _submit_metadata(instance, flow.pipeline.batches_asset.key)["a"]
        assert meta["pending_chunks"].value == 1
        assert "the provider refused the create" in meta["pending_why"].value
        (manifest,) = load_manifests(flow.pipeline.storage, "a")
        assert not manifest.fully_submitted and not any(c.uncertain for c in manifest.chunks)
        flow.drive(instance, ["a"])
    assert flow.accounted("a") == ROWS


def test_a_retry_that_waits_for_capacity_resumes_as_the_same_retry(tmp_path):
    # a's retry is submitted while b holds all the capacity: its chunks wait, and the
    # sensor's run must resume that retry (attempt 2), not start a new initial attempt.
    local = make_local_dir(str(tmp_path / "local"), in_progress_seconds=0.2, failure_rate=0.3)
    resource = InfronResource(base_url=f"local://{local}", api_style="infron", max_retries=3)
    rows = 20
    flow = Pipeline.build(
        tmp_path,
        resource,
        dg.StaticPartitionsDefinition(["a", "b"]),
        rows=rows,
        params={"max_tokens": 16},
        max_requests_per_batch=20,
        max_enqueued_tokens=400,  # one partition's chunk (~60 input + 20 x 16 output tokens)
    )
    with dagster_instance() as instance:
        assert flow.submit(instance, "a").success
        flow.drive(instance, ["a"])
        failed = flow.pipeline.storage.read_table(flow.pipeline.storage.table_path("failed", "a"))
        assert failed.num_rows, "failure_rate=0.3 should fail some of 20 rows"
        assert flow.submit(instance, "b").success  # holds the capacity
        assert flow.job("retry", instance, "a").success
        (_, waiting) = load_manifests(flow.pipeline.storage, "a")
        assert waiting.kind == "retry" and not waiting.batch_ids  # pending, not sent
        storage = flow.pipeline.storage
        requested = flow.drive(
            instance,
            lambda: all(m.state == "collected" for k in "ab" for m in load_manifests(storage, k)),
        )
    manifests = load_manifests(flow.pipeline.storage, "a")
    assert [(m.attempt, m.kind) for m in manifests] == [(1, "initial"), (2, "retry")]
    assert manifests[1].fully_submitted
    admitted = [r for r in requested if ":submit:" in (r.run_key or "")]
    assert admitted and all(
        r.run_config == {"ops": {"rev_batches": {"config": {"retry_failed": True}}}}
        for r in admitted
    )
    assert flow.accounted("a") == rows


def _waiting_manifest(key: str, attempt: int, tokens: int) -> Manifest:
    chunk = ChunkRecord(index=0, path="c0", requests=1, bytes=10, estimated_tokens=tokens)
    return Manifest(
        name="p",
        partition_key=key,
        attempt=attempt,
        fingerprint=f"f{attempt}",
        api_style="infron",
        endpoint="/v1/chat/completions",
        model="m",
        chunks=[chunk],
    )


def _ended(batch_id: str) -> dict[str, Batch]:
    return {batch_id: Batch(id=batch_id, status=BatchStatus.COMPLETED, api_style="infron")}


def test_waiting_attempts_are_scheduled_oldest_first_and_only_reservations_hold_room(tmp_path):
    storage = BatchStorage(str(tmp_path), "p")
    control = AdmissionControl(storage, max_enqueued_tokens=100, output_tokens=0)

    def admit(manifest: Manifest, batch_id: str | None = None) -> list[int]:
        admitted = control.admit(manifest).chunks
        if batch_id is not None:
            manifest.chunks[0].batch_id, manifest.state = batch_id, "submitted"
        storage.write_json(
            storage.manifest_path(manifest.partition_key, manifest.attempt), manifest.to_dict()
        )
        control.settle(manifest, bool(admitted))
        return admitted

    assert admit(_waiting_manifest("z", 1, 100), "bz") == [0]  # z holds all the room
    x1, y1 = _waiting_manifest("x", 1, 80), _waiting_manifest("y", 1, 50)
    assert admit(x1) == [] and admit(y1) == []  # both wait: nothing reserved for them
    assert control.in_flight() == 100
    assert control.ready([x1, y1]) == []
    control.release(_ended("bz"), lambda ids: {})
    # Room for x (oldest) only: one tick never promises the same room twice.
    assert control.ready([x1, y1]) == [x1]
    # x's input changed: attempt 2 sent; attempt 1's chunk was never reserved, so it holds
    # no room, and the sensor (which only resumes active attempts) no longer offers it.
    assert admit(_waiting_manifest("x", 2, 10), "bx2") == [0]
    assert control.ready([y1]) == [y1]
