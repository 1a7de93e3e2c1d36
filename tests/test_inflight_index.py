"""The in-flight index: a tick reads what is in flight, not the lake's history, and the index
is only ever a cache of what the manifests say (missing, stale or half-built, it loses nothing).

Lakes are written as submit and collect leave them (manifests, markers); the S3 test counts
the requests moto's real server answers.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import dagster as dg
import pytest
from conftest import review_pipeline

from infron_dagster import BatchStorage
from infron_dagster.inflight import PROGRESS, SENTINEL, InFlightIndex
from infron_dagster.manifest import ChunkRecord, Manifest
from infron_dagster.sensor import find_in_flight, find_in_flight_full_scan
from infron_dagster.storage import encode_partition

ROOT = Path(__file__).resolve().parents[1]
LONG_KEY = "région-" * 40  # stored under a hashed folder name


def write_attempt(
    storage: BatchStorage,
    key: str | None,
    attempt: int,
    state: str,
    *,
    kind: str = "initial",
    base: int = 0,
    sent: bool = True,
    mark: bool = False,
) -> Manifest:
    """One attempt's manifest as submit/collect write it; ``mark`` adds its index marker."""
    chunk = ChunkRecord(
        index=0, path="r.jsonl", requests=1, bytes=1, batch_id=f"b-{attempt}" if sent else None
    )
    manifest = Manifest(
        name=storage.name,
        partition_key=key,
        attempt=attempt,
        fingerprint=f"f{attempt}",
        api_style="infron",
        endpoint="/v1/chat/completions",
        model="m",
        kind=kind,  # type: ignore[arg-type]
        base_attempt=base,
        state=state,  # type: ignore[arg-type]
        chunks=[chunk],
    )
    if mark:
        InFlightIndex(storage).mark(key, attempt)
    storage.write_json(storage.manifest_path(key, attempt), manifest.to_dict())
    return manifest


def summary(found) -> list[tuple[str | None, list[int]]]:
    return sorted((p.partition_key, [m.attempt for m in p.attempts]) for p in found)


def markers(storage: BatchStorage) -> set[tuple[str, int]]:
    """(segment, attempt) of every marker on storage."""
    out = set()
    for name in storage.list_files(storage.base / "inflight"):
        if name.startswith("partition="):
            segment, attempt = name[len("partition=") :].split("/attempt=")
            out.add((segment, int(attempt.removesuffix(".json"))))
    return out


def mixed_lake(storage: BatchStorage) -> None:
    """Every shape a partition's manifests take, written by a version without the index."""
    write_attempt(storage, "collected", 1, "collected")
    write_attempt(storage, "flying", 1, "submitted")
    write_attempt(storage, "sending", 1, "submitting", sent=False)
    write_attempt(storage, "retried", 1, "collected")
    write_attempt(storage, "retried", 2, "submitted", kind="retry", base=1)
    write_attempt(storage, "replaced", 1, "submitted")
    write_attempt(storage, "replaced", 2, "submitted")
    write_attempt(storage, "gave-up", 1, "submitted")
    write_attempt(storage, "gave-up", 2, "abandoned")
    write_attempt(storage, LONG_KEY, 1, "submitted")
    write_attempt(storage, "", 1, "submitted")


def test_the_index_finds_what_the_full_scan_finds(tmp_path):
    storage = BatchStorage(str(tmp_path / "lake"), "rev")
    mixed_lake(storage)
    expected = [
        ("", [1]),
        ("flying", [1]),
        ("gave-up", [1]),
        (LONG_KEY, [1]),
        ("replaced", [2]),
        ("retried", [1, 2]),
    ]
    assert summary(find_in_flight_full_scan(storage, True)) == sorted(expected)
    # First tick: no index yet, so a full scan builds it; then the index alone answers.
    assert summary(find_in_flight(storage, True)) == sorted(expected)
    assert storage.exists(storage.base / "inflight" / SENTINEL)
    assert summary(find_in_flight(storage, True)) == sorted(expected)
    # Markers only for open partitions, and only for their active attempts: "sending" is
    # open (its batches are being created) but not yet in flight for the sensor.
    assert markers(storage) == {
        (encode_partition(key), attempt)
        for key, attempts in [*expected, ("sending", [1])]
        for attempt in attempts
    }


def test_collection_and_replacement_remove_markers(tmp_path):
    storage = BatchStorage(str(tmp_path / "lake"), "rev")
    find_in_flight(storage, True)  # an empty lake: the index is complete at once
    write_attempt(storage, "a", 1, "submitted", mark=True)
    write_attempt(storage, "b", 1, "submitted", mark=True)
    assert summary(find_in_flight(storage, True)) == [("a", [1]), ("b", [1])]
    write_attempt(storage, "a", 1, "collected")
    write_attempt(storage, "b", 2, "submitted", mark=True)  # new input replaces attempt 1
    assert summary(find_in_flight(storage, True)) == [("b", [2])]
    assert markers(storage) == {("b", 2)}


def test_a_marker_whose_manifest_is_not_written_yet_is_kept_for_a_grace_period(tmp_path):
    storage = BatchStorage(str(tmp_path / "lake"), "rev")
    InFlightIndex(storage).in_flight()
    InFlightIndex(storage).mark("a", 1)  # a submission between its marker and its manifest
    assert InFlightIndex(storage, grace_seconds=3600).in_flight() == []
    assert markers(storage) == {("a", 1)}
    write_attempt(storage, "a", 1, "submitted")  # the submission goes on: found at once
    assert summary(InFlightIndex(storage).in_flight()) == [("a", [1])]
    InFlightIndex(storage).mark("z", 1)  # one that died before writing its intent
    InFlightIndex(storage, grace_seconds=0).in_flight()
    assert markers(storage) == {("a", 1)}


def test_attempts_written_without_a_marker_are_found_by_the_periodic_scan(tmp_path):
    storage = BatchStorage(str(tmp_path / "lake"), "rev")
    find_in_flight(storage, True)
    write_attempt(storage, "old-writer", 1, "submitted")  # e.g. a host not yet upgraded
    assert find_in_flight(storage, True, rescan_seconds=None) == []
    assert summary(find_in_flight(storage, True, rescan_seconds=0)) == [("old-writer", [1])]
    assert markers(storage) == {("old-writer", 1)}


def test_a_full_scan_too_long_for_one_tick_goes_on_over_several(tmp_path):
    storage = BatchStorage(str(tmp_path / "lake"), "rev")
    for i in range(600):
        write_attempt(storage, f"h{i:04d}", 1, "collected")
    for key in ("h0003x", "h0299x", "h0599x"):  # one in each slice of 250
        write_attempt(storage, key, 1, "submitted")
    found: set[str | None] = set()
    ticks, done = 0, False
    while not done and ticks < 10:
        index = InFlightIndex(storage, scan_budget_seconds=0)  # one slice per tick
        found |= {p.partition_key for p in index.in_flight()}
        ticks += 1
        done = storage.exists(storage.base / "inflight" / SENTINEL)
        assert done != storage.exists(storage.base / "inflight" / PROGRESS)
    assert ticks == 3 and found == {"h0003x", "h0299x", "h0599x"}
    assert summary(find_in_flight(storage, True)) == [(k, [1]) for k in sorted(found)]


# -- through the sensor and real runs ----------------------------------------------------------


def test_submit_marks_first_and_the_sensor_unmarks_after_collection(
    tmp_path, infron_resource, instance
):
    built = review_pipeline(tmp_path, infron_resource, dg.StaticPartitionsDefinition(["a", "b"]))
    storage = built.pipeline.storage

    def tick() -> dg.SensorResult:
        context = dg.build_sensor_context(
            instance=instance, definitions=built.defs, resources={"infron": infron_resource}
        )
        return built.pipeline.sensor(context)

    for key in ("a", "b"):
        dg.materialize(
            [built.upstream, built.pipeline.batches_asset],
            partition_key=key,
            instance=instance,
            resources=built.resources,
        )
    # The submissions indexed themselves: no tick has run yet.
    assert markers(storage) == {("a", 1), ("b", 1)}
    # An upgrade: batches submitted by a version that kept no index.
    storage.base.fs.rm((storage.base / "inflight").path, recursive=True)
    requests = tick().run_requests
    assert sorted(r.partition_key for r in requests) == ["a", "b"]
    assert markers(storage) == {("a", 1), ("b", 1)}
    job = built.defs.resolve_implicit_global_asset_job_def()
    for request in requests:
        job.execute_in_process(
            partition_key=request.partition_key,
            asset_selection=request.asset_selection,
            instance=instance,
        )
    assert tick().skip_reason.skip_message == "No batches in flight."
    assert markers(storage) == set()


# -- cost on S3 ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def counting_s3():
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.counting_s3 import running
    finally:
        sys.path.remove(str(ROOT))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with running(port) as server:
        yield server


def _requests(s3, storage: BatchStorage, **kwargs) -> tuple[int, list]:
    with s3.measure() as counts:
        found = find_in_flight(storage, True, **kwargs)
    return counts["total"], found


def test_a_tick_on_s3_costs_what_is_in_flight_not_the_history(counting_s3):
    storage = BatchStorage("s3://lake/scale", "rev", counting_s3.storage_options)
    find_in_flight(storage, True)  # the index of an empty lake
    for i in range(5):
        write_attempt(storage, f"f{i}", 1, "submitted", mark=True)

    def add_history(start: int, count: int) -> None:
        history = {}
        for i in range(start, start + count):
            data = Manifest("rev", f"h{i}", 1, "f", "infron", "/", "m", state="collected")
            history[storage.manifest_path(f"h{i}", 1).path] = json.dumps(data.to_dict()).encode()
        storage.base.fs.pipe(history)

    add_history(0, 20)
    small, found = _requests(counting_s3, storage)
    assert len(found) == 5
    add_history(20, 130)
    large, found = _requests(counting_s3, storage)
    assert len(found) == 5
    # One listing of the index, one read per in-flight manifest: history costs nothing.
    assert small == large == 1 + 5
    full = _requests(counting_s3, storage, use_index=False)[0]
    assert full > 2 * 155, full  # the old way: a listing and reads for every partition
