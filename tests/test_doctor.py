"""``infron-dagster doctor``: a lake built by real runs (admission limit, price and budget,
pipeline-wide answer reuse), each control file damaged in each way a disk or a person
damages it (empty, truncated, garbage, foreign), then found, repaired from the manifests
where it can be derived (checked against the file before the damage), and reported with a
remedy where it cannot (a manifest). Locally, on moto S3, and through the real command.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from conftest import Clock, dagster_instance, make_local_dir, tick_and_run

from infron_dagster import InfronResource, RequestSpec, build_infron_batch_assets
from infron_dagster.budget import Budget, SpendLedger
from infron_dagster.carry_cache import answers_path
from infron_dagster.doctor import check_lake
from infron_dagster.pricing import ModelPrice
from infron_dagster.storage import BatchStorage

PARTS = dg.StaticPartitionsDefinition(["a", "b", "c"])
PRICE = ModelPrice(input_per_million=2.0, output_per_million=8.0, batch_discount=0.5)
ROWS = 12  # 7 requests per batch: 2 chunks per partition
MODES = ["empty", "truncated", "garbage", "foreign"]


def _flow(root: str, resource: InfronResource, options: dict[str, Any] | None = None):
    """The ``rev`` pipeline with every control file: admission, budget, answers."""

    @dg.asset(name="reviews", partitions_def=PARTS)
    def reviews(context):  # no annotation: see conftest.review_pipeline
        p = context.partition_key
        return pd.DataFrame(
            {"id": range(ROWS), "text": [f"review {i} of {p}" for i in range(ROWS)]}
        )

    pipeline = build_infron_batch_assets(
        name="rev",
        spec=RequestSpec(
            model="gpt-4o-mini",
            prompt_template="Sentiment of {text}",
            key_columns="id",
            params={"max_tokens": 50},
        ),
        source="reviews",
        partitions_def=PARTS,
        storage_root=root,
        storage_options=options,
        max_requests_per_batch=7,
        max_enqueued_tokens=1_000_000,
        price=PRICE,
        budget=Budget(max_cost_per_day=100.0),
        reuse_answers="pipeline",
    )
    resources = {"infron": resource, "io_manager": dg.InMemoryIOManager()}
    defs = dg.Definitions.merge(
        pipeline.definitions, dg.Definitions(assets=[reviews], resources=resources)
    )
    return pipeline, reviews, resources, defs


def _submit(flow, instance, partition: str) -> None:
    pipeline, reviews, resources, _ = flow
    result = dg.materialize(
        [reviews, pipeline.batches_asset],
        partition_key=partition,
        resources=resources,
        instance=instance,
    )
    assert result.success


@pytest.fixture(scope="module")
def built_lake(tmp_path_factory) -> str:
    """A lake where ``a`` and ``b`` were submitted and collected by the sensor's runs and
    ``c`` is in flight: its chunks in the admission ledger, its reservation unsettled."""
    base = tmp_path_factory.mktemp("doctor")
    folder = make_local_dir(str(base / "srv"), in_progress_seconds=60)
    resource = InfronResource(base_url=f"local://{folder}", api_style="infron", max_retries=2)
    root = str(base / "lake")
    flow = _flow(root, resource)
    with pytest.MonkeyPatch.context() as mp, dagster_instance() as instance:
        clock = Clock.install(mp)
        _submit(flow, instance, "a")
        _submit(flow, instance, "b")
        clock.now += 120  # both finished
        runs = tick_and_run(flow[0].sensor, flow[3], flow[2], instance)
        assert len(runs) == 2 and all(r.success for r in runs)
        _submit(flow, instance, "c")  # in progress: stays in flight
    storage = BatchStorage(root, "rev")
    assert all(storage.exists(storage.table_path("results", k)) for k in "ab")
    assert not storage.exists(storage.table_path("results", "c"))
    return root


@pytest.fixture
def lake(built_lake, tmp_path) -> str:
    """A copy of the built lake, for one test to damage."""
    root = str(tmp_path / "lake")
    shutil.copytree(built_lake, root)
    return root


# --- what each file is and how it is damaged ----------------------------------------------------


def _ledger(root: str) -> str:
    return os.path.join(root, "_admission", "infron.json")


def _entries(path: str) -> dict[str, dict[str, Any]]:
    """A ledger's entries, without the time each was reserved."""
    entries = json.loads(Path(path).read_bytes())["entries"]
    return {k: {f: v for f, v in e.items() if f != "reserved_at"} for k, e in entries.items()}


def _spend_entry(root: str, partition: str) -> str:
    storage = BatchStorage(root, "rev")
    manifest = json.loads(storage.manifest_path(partition, 1).read_bytes())
    day, entry = manifest["spend"]["day"], manifest["spend"]["entry"]
    return os.path.join(root, "rev", "_ledger", "spend", f"partition={day}", f"{entry}.json")


def _manifest(root: str, partition: str) -> str:
    return BatchStorage(root, "rev").manifest_path(partition, 1).path


def _answers(root: str, partition: str) -> str:
    return answers_path(BatchStorage(root, "rev"), partition).path


def _answer_rows(path: str) -> tuple[list[tuple[Any, ...]], bytes]:
    table = pq.read_table(path)
    rows = sorted(zip(*(table.column(n).to_pylist() for n in table.column_names), strict=True))
    return rows, (table.schema.metadata or {}).get(b"infron_answers_complete_attempts", b"")


def _damaged(data: bytes, mode: str, parquet: bool) -> bytes:
    if mode == "empty":
        return b""
    if mode == "truncated":
        return data[: len(data) // 2]
    if mode == "garbage":
        return b"\x00\xffnot what was written\n" * 4
    if parquet:  # a Parquet file, but not an answers file
        sink = io.BytesIO()
        pq.write_table(pa.table({"x": [1, 2]}), sink)
        return sink.getvalue()
    return json.dumps({"format": "another tool", "entries": [1, 2]}).encode()


def _damage(path: str, mode: str) -> None:
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(_damaged(data, mode, path.endswith(".parquet")))


def _by_file(report) -> dict[str, Any]:
    return {os.path.normpath(f.file): f for f in report.findings}


# --- the tests ---------------------------------------------------------------------------------


def test_a_healthy_lake_has_no_finding(lake):
    report = check_lake(lake)
    assert report.pipelines == ["rev"]
    assert report.findings == [], [f.line() for f in report.findings]
    assert report.healthy


@pytest.mark.parametrize("mode", MODES)
def test_doctor_finds_each_damaged_file_and_repairs_what_derives(lake, mode):
    ledger, before_ledger = _ledger(lake), _entries(_ledger(lake))
    assert len(before_ledger) == 2  # c's two chunks, in flight
    spend_a, spend_c = _spend_entry(lake, "a"), _spend_entry(lake, "c")
    before_c = json.loads(Path(spend_c).read_bytes())
    answers_a = _answers(lake, "a")
    before_answers = _answer_rows(answers_a)
    assert len(before_answers[0]) == ROWS
    manifest_b = _manifest(lake, "b")
    damaged = [ledger, spend_a, spend_c, answers_a, manifest_b]
    for path in damaged:
        _damage(path, mode)
    manifest_bytes = Path(manifest_b).read_bytes()

    found = _by_file(check_lake(lake))
    assert set(damaged) <= set(found), sorted(found)
    assert not any(f.repaired for f in found.values())  # a check writes nothing
    assert all(found[p].repairable for p in (ledger, spend_a, spend_c, answers_a))
    assert not found[manifest_b].repairable
    assert "restore" in found[manifest_b].remedy

    report = check_lake(lake, repair=True)
    fixed = _by_file(report)
    assert all(fixed[p].repaired for p in (ledger, spend_a, spend_c, answers_a))
    assert not fixed[manifest_b].repaired
    assert report.remaining == [fixed[manifest_b]]
    # each repaired file is what it was before the damage
    assert _entries(ledger) == before_ledger
    c_now = json.loads(Path(spend_c).read_bytes())
    for field in ("partition_key", "attempt", "worst_cost", "actual_cost"):
        assert c_now[field] == before_c[field], field
    a_now = json.loads(Path(spend_a).read_bytes())
    assert (a_now["partition_key"], a_now["attempt"]) == ("a", 1)
    assert a_now["worst_cost"] > 0 and a_now["actual_cost"] is None  # counted at its worst case
    assert _answer_rows(answers_a) == before_answers
    assert Path(manifest_b).read_bytes() == manifest_bytes  # truth is never rewritten

    again = check_lake(lake)
    assert [os.path.normpath(f.file) for f in again.findings] == [manifest_b]


def test_markers_unpaid_reservations_bad_costs_and_tables(lake):
    storage = BatchStorage(lake, "rev")
    marker_c = os.path.join(lake, "rev", "inflight", "partition=c", "attempt=1.json")
    os.remove(marker_c)  # c is in flight: the sensor would miss it
    stale = os.path.join(lake, "rev", "inflight", "partition=a", "attempt=1.json")
    os.makedirs(os.path.dirname(stale), exist_ok=True)
    with open(stale, "w") as fh:
        fh.write("{}")  # a is collected
    # a submission of partition d reserved an hour ago and died before its manifest
    reservation = SpendLedger(storage).reserve("d", 1, 0.25, Budget())
    unpaid = os.path.join(
        lake, "rev", "_ledger", "spend", f"partition={reservation.day}", f"{reservation.entry}.json"
    )
    record = json.loads(Path(unpaid).read_bytes())
    hour_ago = datetime.now(timezone.utc) - timedelta(hours=1)
    record["reserved_at"] = hour_ago.isoformat(timespec="seconds")
    Path(unpaid).write_text(json.dumps(record))
    # hostile costs written by an older version: negative, and not JSON at all
    spend_a, spend_c = _spend_entry(lake, "a"), _spend_entry(lake, "c")
    a_record = json.loads(Path(spend_a).read_bytes())
    worst_a = a_record["worst_cost"]
    Path(spend_a).write_text(json.dumps({**a_record, "actual_cost": -2.0}))
    c_text = Path(spend_c).read_text().replace('"worst_cost": ', '"worst_cost": Infinity, "x": ')
    Path(spend_c).write_text(c_text)
    results_a = storage.table_path("results", "a").path
    _damage(results_a, "truncated")

    found = _by_file(check_lake(lake, grace_seconds=0))  # a was collected moments ago
    stale_b = stale.replace("partition=a", "partition=b")  # left by the collect runs too
    expected = {marker_c, stale, stale_b, unpaid, spend_a, spend_c, results_a}
    assert set(found) == expected, sorted(found)
    assert "no in-flight marker" in found[marker_c].problem
    assert "collected" in found[stale].problem
    assert "no manifest" in found[unpaid].problem
    assert "-2.0" in found[spend_a].problem and "inf" in found[spend_c].problem
    assert not found[results_a].repairable and "rev_results" in found[results_a].remedy

    report = check_lake(lake, repair=True, grace_seconds=0)
    assert [os.path.normpath(f.file) for f in report.remaining] == [results_a]
    assert os.path.exists(marker_c) and not os.path.exists(stale) and not os.path.exists(stale_b)
    released = json.loads(Path(unpaid).read_bytes())
    assert released["actual_cost"] == 0.0 and "no manifest" in released["released"]
    assert json.loads(Path(spend_a).read_bytes())["worst_cost"] == worst_a
    assert json.loads(Path(spend_c).read_bytes())["worst_cost"] > 0
    assert SpendLedger(storage).spent_on(reservation.day) < 100.0


def test_a_damaged_entry_no_manifest_records_is_deleted(lake):
    storage = BatchStorage(lake, "rev")
    day = SpendLedger.today()
    orphan = os.path.join(
        lake, "rev", "_ledger", "spend", f"partition={day}", "a7-" + "0" * 20 + ".json"
    )
    Path(orphan).write_text("{not json")
    assert not _by_file(check_lake(lake, grace_seconds=3600))[orphan].repairable  # may be staging
    report = check_lake(lake, repair=True, grace_seconds=0)
    assert report.healthy and not os.path.exists(orphan)
    assert "nothing was sent" in _by_file(report)[orphan].repair
    assert SpendLedger(storage).spent_on(day) < 100.0


def test_an_admission_ledger_that_disagrees_with_the_manifests_is_rebuilt(lake):
    ledger = _ledger(lake)
    data = json.loads(Path(ledger).read_bytes())
    before = _entries(ledger)
    _, kept = sorted(data["entries"])
    # a chunk in flight forgotten, and an entry for collected partition a left behind
    gone = dict(data["entries"][kept], partition_key="a", batch_id="batch_gone")
    data["entries"] = {kept: data["entries"][kept], "0" * 24: gone}
    Path(ledger).write_text(json.dumps(data))
    (finding,) = check_lake(lake).findings
    assert "1 chunk(s) in flight missing" in finding.problem
    assert "'a' attempt 1: collected" in finding.problem
    assert check_lake(lake, repair=True).healthy
    assert _entries(ledger) == before
    # deleted while chunks are in flight: found and rebuilt too
    os.remove(ledger)
    (finding,) = check_lake(lake).findings
    assert "missing while 2 chunk(s) are in flight" in finding.problem
    assert check_lake(lake, repair=True).healthy
    assert _entries(ledger) == before


def test_the_command(lake):
    command = os.path.join(os.path.dirname(sys.executable), "infron-dagster")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [command, "doctor", lake, *args], capture_output=True, text=True, timeout=120
        )

    before = _entries(_ledger(lake))
    assert run().returncode == 0
    _damage(_ledger(lake), "garbage")
    checked = run()
    assert checked.returncode == 1
    assert "REPAIRABLE" in checked.stdout and "infron.json" in checked.stdout
    assert "--repair" in checked.stdout
    repaired = run("--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "REPAIRED" in repaired.stdout and "0 remaining" in repaired.stdout
    assert _entries(_ledger(lake)) == before
    _damage(_manifest(lake, "c"), "empty")
    manual = run("--repair")
    assert manual.returncode == 1
    assert "MANUAL" in manual.stdout and "attempt=1.json" in manual.stdout


# --- on an object store ------------------------------------------------------------------------


def test_on_s3_locks_and_ledgers(tmp_path, moto_s3, clock):
    options = moto_s3.storage_options
    root = f"s3://lake/t-{uuid.uuid4().hex[:12]}"
    folder = make_local_dir(str(tmp_path / "srv"), in_progress_seconds=60)
    resource = InfronResource(base_url=f"local://{folder}", api_style="infron", max_retries=2)
    flow = _flow(root, resource, options)
    with dagster_instance() as instance:
        _submit(flow, instance, "a")
    fs = s3fs.S3FileSystem(
        key="testing",
        secret="testing",
        client_kwargs={"endpoint_url": moto_s3.endpoint_url},
        skip_instance_cache=True,
    )
    bare = root[len("s3://") :]
    assert check_lake(root, options).findings == []

    ledger = f"{bare}/_admission/infron.json"
    before = json.loads(fs.cat_file(ledger))["entries"]
    assert before
    fs.pipe_file(ledger, b"")
    (entry,) = [p for p in fs.find(f"{bare}/rev/_ledger/spend") if p.endswith(".json")]
    original = json.loads(fs.cat_file(entry))
    fs.pipe_file(entry, fs.cat_file(entry)[:20])
    stale = f"{bare}/rev/locks/partition=a/lock.json"
    fs.pipe_file(stale, json.dumps({"token": "dead", "created": time.time() - 3600}).encode())
    live = f"{bare}/rev/locks/partition=b/lock.json"
    fs.pipe_file(live, json.dumps({"token": "alive", "created": time.time()}).encode())
    foreign = f"{bare}/rev/_ledger/locks/partition=2026-01-01/lock.json"
    fs.pipe_file(foreign, b"<html>not a lock</html>")

    report = check_lake(root, options, repair=True)
    found = {f.file.split("://")[-1]: f for f in report.findings}
    assert set(found) == {ledger, entry, stale, foreign}, sorted(found)
    assert found[ledger].repaired and found[entry].repaired and found[stale].repaired
    assert not found[foreign].repaired and "younger" in found[foreign].remedy
    strip = lambda e: {k: {f: v for f, v in x.items() if f != "reserved_at"} for k, x in e.items()}  # noqa: E731
    assert strip(json.loads(fs.cat_file(ledger))["entries"]) == strip(before)
    now = json.loads(fs.cat_file(entry))
    assert now["worst_cost"] == original["worst_cost"] and now["actual_cost"] is None
    assert not fs.exists(stale) and fs.exists(live) and fs.exists(foreign)

    time.sleep(1.5)  # the unreadable lock is older than a short staleness now
    later = check_lake(root, options, repair=True, lock_stale_seconds=1.0)
    assert not fs.exists(foreign)
    assert later.healthy, [f.line() for f in later.findings]
