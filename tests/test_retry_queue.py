"""The retry markers (``<name>/retries/``) are a cache of what the manifests say: damaged,
stale or foreign, or left by a process killed anywhere around them, the unattended sensor
still converges, names a damaged file, and never pays for a row already answered or for a
cancelled partition (issue 18).

Each case starts from a copy of a prepared lake and server (``retry_child.build``: the
embedded local server in openai style, its state on disk; 6 rows of ``a`` in 2 chunks from
a ParquetSource; auto_retry with no backoff, 3 attempts):

- ``submitted``: ``a``'s attempt 1 created and ended with retryable failures, not collected;
- ``collected``: then collected, its retry marker written and due, no sensor tick since;
- ``retried``: then the automatic retry run (attempt 2, ended), the marker of attempt 1
  not dropped yet (the next tick does it);
- ``running``: ``a``'s attempt 1 created, its batches running for an hour.

The case damages or contradicts the marker, or runs one step in a child process that
SIGKILLs itself before (or right after) a marker write or delete (``retry_child.py``, the
write points counted as ``restart_child.py`` counts them), then lets the sensor tick (one
evaluation, or ticks and the runs they request, each run_key once, in an instance that never
saw the killed run) until nothing is queued.

A marker deleted outright is rebuilt from the manifests at the in-flight index's next full
rescan (forced by deleting ``inflight/_index.json``), only where a retry is owed; the other
ticks read nothing of the collected partitions.
"""

from __future__ import annotations

import collections
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import restart_anywhere
import retry_child as rc
from conftest import INSTANT, make_local_dir
from harness import Pipeline

import infron_dagster.resume as resume_module
from infron_dagster.auto_retry import AUTO_RETRY_TAG, MAX_AUTO_RETRY_RUNS
from infron_dagster.columns import CUSTOM_ID
from infron_dagster.history import PartitionHistory
from infron_dagster.local import LocalServerConfig, save_config
from infron_dagster.local.store import Store
from infron_dagster.retry_queue import QueuedRetry, RetryQueue
from infron_dagster.storage import encode_partition

ROWS, MAX_ATTEMPTS = rc.ROWS, rc.MAX_ATTEMPTS
build, write_inputs = rc.build, rc.write_inputs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    made = {}
    root = tmp_path_factory.mktemp("submitted")
    write_inputs(root / "inputs")
    make_local_dir(str(root / "local"), failure_rate=0.5)
    flow = build(root)
    instance = dg.DagsterInstance.ephemeral()
    assert flow.submit(instance, "a").success
    made["submitted"] = root
    made["collected"] = root = _copy(root, tmp_path_factory.mktemp("collected"))
    flow = build(root)
    flow.tick(instance)  # the collection, which queues the retry
    failed = flow.table("failed", "a")
    assert failed is not None and pc.sum(failed.column("retryable")).as_py() > 0
    [queued] = RetryQueue(flow.storage).queued()
    assert queued.attempt == 1
    made["retried"] = root = _copy(root, tmp_path_factory.mktemp("retried"), failure_rate=0.0)
    flow = build(root)
    [request] = flow.tick(instance)  # the automatic retry, run; its marker not dropped yet
    assert "auto-retry" in request.run_key
    assert [m.state for m in flow.manifests("a")] == ["collected", "submitted"]
    assert [r.attempt for r in RetryQueue(flow.storage).queued()] == [1]
    root = tmp_path_factory.mktemp("running")
    write_inputs(root / "inputs")
    make_local_dir(str(root / "local"), in_progress_seconds=3600.0)
    assert build(root).submit(dg.DagsterInstance.ephemeral(), "a").success
    made["running"] = root
    return made


def _copy(base: Path, root: Path, **knobs: Any) -> Path:
    shutil.copytree(base, root, dirs_exist_ok=True)
    if knobs:
        save_config(root / "local", LocalServerConfig(**{**INSTANT, **knobs}))
    return root


def clone(base: Path, tmp_path: Path, **knobs: Any) -> Path:
    """A copy of a prepared state; ``knobs`` (over instant timing) are the server's now."""
    return _copy(base, tmp_path / "case", **knobs)


def marker_path(flow: Pipeline, key: str | None = "a", attempt: int = 1) -> Path:
    folder = flow.storage.segment_dir("retries", encode_partition(key))
    return Path(folder.path) / f"attempt={attempt}.json"


def sent_ids(local_dir: str) -> collections.Counter:
    """How many times the server was sent each custom_id (every batch is paid for)."""
    store = Store(local_dir)
    sent: collections.Counter = collections.Counter()
    for batch in store.list_batches():
        with open(store.content_path(batch["input_file_id"]), encoding="utf-8") as fh:
            sent.update(json.loads(line)[CUSTOM_ID] for line in fh if line.strip())
    return sent


def answered_ids(local_dir: str) -> dict[str, int]:
    """custom_id -> how many batches answered it successfully."""
    store = Store(local_dir)
    answered: collections.Counter = collections.Counter()
    for batch in store.list_batches():
        output = (batch["final"] or {}).get("output_file_id")
        if output:  # only 200 answers: an infron-style output file holds errors too
            with open(store.content_path(output), encoding="utf-8") as fh:
                lines = [json.loads(line) for line in fh if line.strip()]
            answered.update(
                line[CUSTOM_ID]
                for line in lines
                if not line.get("error") and (line.get("response") or {}).get("status_code") == 200
            )
    return dict(answered)


def auto_retries(requests) -> list[dg.RunRequest]:
    return [r for r in requests or [] if "auto-retry" in (r.run_key or "")]


def converge(flow: Pipeline, instance, key: str = "a") -> list[dg.RunRequest]:
    """Tick and run until ``key``'s latest attempt is collected and no retry is queued,
    then tick once more (what ended is released); what the sensor requested."""

    def done() -> bool:
        active = PartitionHistory.load(flow.storage, key).active
        return active[-1].state == "collected" and not RetryQueue(flow.storage).queued()

    requested = flow.drive(instance, done, timeout=30.0)
    flow.tick(instance)
    return requested


def check_converged(flow: Pipeline, key: str = "a") -> None:
    """Every row accounted once; nothing retryable left while attempts remain; no row sent
    twice in one attempt, none sent again once answered; no marker left."""
    active = PartitionHistory.load(flow.storage, key).active
    assert active[-1].state == "collected"
    assert [m.kind for m in active][1:] == ["retry"] * (len(active) - 1)
    assert flow.accounted_ids(key) == list(range(ROWS))
    failed = flow.table("failed", key)
    retryable = (pc.sum(failed.column("retryable")).as_py() or 0) if failed is not None else 0
    assert retryable == 0 or len(active) == MAX_ATTEMPTS, (retryable, len(active))
    sent, answered = sent_ids(flow.local_dir), answered_ids(flow.local_dir)
    assert all(n <= len(active) for n in sent.values()), f"a row sent twice in one attempt: {sent}"
    assert all(n == 1 for n in answered.values()), f"a row answered (paid) twice: {answered}"
    assert not RetryQueue(flow.storage).queued()


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")

    def naming(self, path: Path, level: str = "WARNING") -> list[str]:
        return [line for line in self.lines if line.startswith(level) and str(path) in line]


# --- damaged markers: written again from the manifest, the file named ---------------------------


DAMAGE = {
    "garbage": lambda raw: b"\x00\xffnot json at all",
    "truncated": lambda raw: raw[: len(raw) // 2],
    "empty": lambda raw: b"",
    "a_list": lambda raw: b"[1, 2, 3]",
    "wrong_types": lambda raw: json.dumps({**json.loads(raw), "due_at": "soon"}).encode(),
    "infinite": lambda raw: raw.replace(b'"due_at": ', b'"due_at": Infinity, "x": '),
    "foreign_partition": lambda raw: json.dumps({**json.loads(raw), "partition_key": "b"}).encode(),
    "foreign_attempt": lambda raw: json.dumps({**json.loads(raw), "attempt": 7}).encode(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_marker_is_written_again_from_its_manifest_and_named(damage, prepared, tmp_path):
    flow = build(clone(prepared["collected"], tmp_path))
    marker = marker_path(flow)
    marker.write_bytes(DAMAGE[damage](marker.read_bytes()))
    log = Lines()
    queue = RetryQueue(flow.storage, log=_logger(log))
    assert queue.queued() == [QueuedRetry("a", "a", 1, 0.0, 0)]
    assert len(log.naming(marker)) == 1, log.lines
    # Repaired: read again, it is whole and says nothing more
    assert RetryQueue(flow.storage, log=_logger(log)).due(0.0) == [QueuedRetry("a", "a", 1, 0.0, 0)]
    assert len(log.lines) == 1


def test_a_damaged_marker_of_no_attempt_is_deleted_and_one_whose_manifest_is_damaged_waits(
    prepared, tmp_path
):
    flow = build(clone(prepared["collected"], tmp_path))
    stray = marker_path(flow, "a", attempt=5)  # partition a has no attempt 5
    nowhere = marker_path(flow, "zz", attempt=1)  # nor is there a partition zz
    for path in (stray, nowhere):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"{")
    manifest = Path(flow.storage.manifest_path("a", 1).path)
    marker = marker_path(flow)
    marker.write_bytes(b"{")
    manifest.write_bytes(b"{")  # the truth is damaged too: a person must look
    log = Lines()
    assert RetryQueue(flow.storage, log=_logger(log)).queued() == []
    assert log.naming(stray) and log.naming(nowhere)
    assert not stray.exists() and not nowhere.exists()
    assert log.naming(marker) and log.naming(manifest), log.lines
    assert marker.read_bytes() == b"{"  # kept: once the manifest is repaired, it is rebuilt


def test_files_that_are_not_markers_are_left_alone(prepared, tmp_path):
    flow = build(clone(prepared["collected"], tmp_path))
    folder = marker_path(flow).parent
    others = [folder / ".attempt=1.json.tmp-1234", folder / "README", folder.parent / "x.json"]
    for path in others:
        path.write_bytes(b"not a marker")
    log = Lines()
    [retry] = RetryQueue(flow.storage, log=_logger(log)).queued()
    assert (retry.partition_key, retry.attempt) == ("a", 1) and retry.rows > 0
    assert not log.lines and all(p.exists() for p in others)


def _logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"test_retry_queue.{id(handler)}")
    logger.propagate = False
    logger.addHandler(handler)
    return logger


def test_the_sensor_retries_a_partition_whose_marker_was_damaged(prepared, tmp_path):
    flow = build(clone(prepared["collected"], tmp_path, failure_rate=0.0))
    marker = marker_path(flow)
    marker.write_bytes(marker.read_bytes()[:20])
    instance = dg.DagsterInstance.ephemeral()
    lines: list[str] = []
    first = flow.sense(instance, log=lines)
    assert [line for line in lines if line.startswith("WARNING") and str(marker) in line]
    assert len(auto_retries(first.run_requests)) == 1
    requested = converge(flow, instance)
    assert len(auto_retries(requested)) == 1
    check_converged(flow)
    assert len(PartitionHistory.load(flow.storage, "a").active) == 2


# --- markers the manifests contradict: dropped, nothing paid ------------------------------


def _stale_marker(flow: Pipeline) -> None:
    """The marker of attempt 1 again, as a tick killed before its drop would leave it."""
    RetryQueue(flow.storage).mark("a", 1, 0.0, 3)


def _retried_since(flow: Pipeline, instance) -> None:
    """A person launched the retry job (attempt 2 in flight)."""
    assert flow.job("retry", instance, "a").success
    _stale_marker(flow)


def _collected_again(flow: Pipeline, instance) -> None:
    """Retried by hand and collected since: the marker names attempt 1, the truth is 2."""
    assert flow.job("retry", instance, "a").success
    assert flow.collect(instance, "a").success
    for retry in RetryQueue(flow.storage).queued():
        RetryQueue(flow.storage).drop(retry)
    _stale_marker(flow)


def _new_input(flow: Pipeline, instance) -> None:
    """The input changed: a new initial attempt replaces attempt 1 (in flight)."""
    path = Path(flow.local_dir).parent / "inputs" / "a.parquet"
    table = pq.read_table(path)
    edited = pa.array([f"edited {i}" for i in table.column("id").to_pylist()])
    pq.write_table(table.set_column(1, "text", edited), path)
    assert flow.submit(instance, "a").success


def _exhausted(flow: Pipeline, instance) -> None:
    """Nothing to change: the pipeline now allows one attempt (max_attempts=1)."""


def _cancelled(flow: Pipeline, instance) -> None:
    """The manifest of attempt 1 says a person cancelled it."""
    path = flow.storage.manifest_path("a", 1)
    body = flow.storage.read_json(path)
    flow.storage.write_json(path, {**body, "cancelled_at": "2026-11-24T00:00:00+00:00"})


def _a_pilot(flow: Pipeline, instance) -> None:
    """The manifest of attempt 1 says it is a pilot: its verdict decides what follows."""
    path = flow.storage.manifest_path("a", 1)
    body = flow.storage.read_json(path)
    flow.storage.write_json(path, {**body, "pilot": {"role": "pilot"}})


def _nothing_retryable(flow: Pipeline, instance) -> None:
    """The failed table holds no retryable row any more (the marker is someone else's)."""
    storage = flow.storage
    path = storage.table_path("failed", "a")
    failed = storage.read_table(path)
    index = failed.column_names.index("retryable")
    falses = pa.array([False] * failed.num_rows)
    storage.write_table(path, failed.set_column(index, "retryable", falses))


def _no_partition(flow: Pipeline, instance) -> None:
    """A marker for partition b, which was never submitted (a's own is gone)."""
    RetryQueue(flow.storage).drop(QueuedRetry("a", "a", 1, 0.0, 0))
    RetryQueue(flow.storage).mark("b", 1, 0.0, 3)


# case -> (what changes, factory overrides, whether later attempts are legitimately paid)
CONTRADICTED = {
    "retried_since": (_retried_since, {}, True),
    "collected_again": (_collected_again, {}, True),
    "new_input": (_new_input, {}, True),
    "attempts_exhausted": (_exhausted, {"max_attempts": 1}, False),
    "cancelled": (_cancelled, {}, False),
    "a_pilot": (_a_pilot, {}, False),
    "nothing_retryable": (_nothing_retryable, {}, False),
    "no_such_partition": (_no_partition, {}, False),
}


@pytest.mark.parametrize("case", sorted(CONTRADICTED))
def test_a_marker_the_manifests_contradict_is_dropped_and_never_paid_for(case, prepared, tmp_path):
    change, factory, pays_on = CONTRADICTED[case]
    flow = build(clone(prepared["collected"], tmp_path), **factory)
    instance = dg.DagsterInstance.ephemeral()
    change(flow, instance)
    queued = RetryQueue(flow.storage).queued()
    assert [r.attempt for r in queued] == [1]
    before = sent_ids(flow.local_dir)
    result = flow.sense(instance)
    assert not auto_retries(result.run_requests), [r.run_key for r in result.run_requests]
    assert not RetryQueue(flow.storage).queued(), "the stale marker is dropped"
    if pays_on:
        return  # what follows is the new attempt's own story (other tests)
    converge(flow, instance)
    assert sent_ids(flow.local_dir) == before, "the marker's retry was paid for"
    assert not flow.requested


# --- the real flows around a marker ----------------------------------------------------------


def test_a_cancelled_partition_is_collected_and_never_retried(prepared, tmp_path):
    flow = build(clone(prepared["running"], tmp_path))
    instance = dg.DagsterInstance.ephemeral()
    assert flow.job("cancel", instance, "a").success
    before = sent_ids(flow.local_dir)
    converge(flow, instance)
    for _ in range(2):  # ticks after the collection: a queued retry would be requested here
        flow.tick(instance)
    assert not auto_retries(flow.requested)
    assert sent_ids(flow.local_dir) == before, "rows sent after the cancel"
    failed = flow.table("failed", "a")
    assert failed.num_rows == ROWS and set(failed.column("error_code").to_pylist()) == {
        "batch_cancelled"
    }
    meta = flow.runs[-1].asset_materializations_for_node("rev_collect")
    notes = [m.metadata["auto_retry"].value for m in meta if "auto_retry" in m.metadata]
    assert notes == [
        "6 retryable row(s) stay failed: attempt 1 was cancelled, no automatic retry"
    ], notes


def _failed_run(instance, run_key: str) -> None:
    """A retry run that died before writing its attempt (as run monitoring records it)."""

    @dg.op
    def dies() -> None:
        raise RuntimeError("killed")

    @dg.job
    def retry_run() -> None:
        dies()

    result = retry_run.execute_in_process(
        instance=instance, tags={AUTO_RETRY_TAG: run_key}, raise_on_error=False
    )
    assert not result.success


def test_a_retry_run_that_failed_is_requested_again_then_left_to_a_person(
    prepared, tmp_path, monkeypatch
):
    monkeypatch.setattr(resume_module, "RESUME_BACKOFF_SECONDS", 0.0)
    flow = build(clone(prepared["collected"], tmp_path))
    instance = dg.DagsterInstance.ephemeral()
    run_key = PartitionHistory.load(flow.storage, "a").active[-1].run_key
    keys = []
    for _ in range(MAX_AUTO_RETRY_RUNS):
        [request] = auto_retries(flow.sense(instance).run_requests)
        assert request.tags[AUTO_RETRY_TAG] == run_key
        keys.append(request.run_key)
        _failed_run(instance, run_key)
    assert keys == [f"{run_key}:auto-retry", f"{run_key}:auto-retry:1", f"{run_key}:auto-retry:2"]
    lines: list[str] = []
    result = flow.sense(instance, log=lines)
    assert not auto_retries(result.run_requests)
    assert "launch the retry job" in str(result.skip_reason)
    assert not RetryQueue(flow.storage).queued()


def test_a_retry_run_a_person_canceled_stops_the_automatic_retry(prepared, tmp_path):
    flow = build(clone(prepared["collected"], tmp_path))
    instance = dg.DagsterInstance.ephemeral()
    [request] = auto_retries(flow.sense(instance).run_requests)
    job = flow.defs.resolve_implicit_global_asset_job_def()
    run = instance.create_run_for_job(job, tags=request.tags, run_config=request.run_config)
    assert len(auto_retries(flow.sense(instance).run_requests)) == 0  # queued: it waits
    instance.report_run_canceled(run)
    result = flow.sense(instance)
    assert not auto_retries(result.run_requests)
    assert "was canceled" in str(result.skip_reason)
    assert not RetryQueue(flow.storage).queued()


# --- kill -9 around each marker write and delete, then the sensor alone ---------------------------

# (step, the write point, 0: killed before it, 1: killed at the point after it); the
# state each step starts from: collect from "submitted", retry from "collected", drop from
# "retried" (see retry_child.py).
STARTS = {"collect": "submitted", "retry": "collected", "drop": "retried"}
KILLS = [
    ("collect", "write retries", 0),  # the marker never written: collected again
    ("collect", "write retries", 1),  # written, the commit point not reached
    ("collect", "control", 0),
    ("retry", "upload inputs", 0),  # the retry run wrote nothing of attempt 2
    ("retry", "write manifests", 0),  # before the intent of attempt 2
    ("retry", "client create_batch>", 0),  # a batch of attempt 2 created, not recorded
    ("retry", "control", 0),
    ("drop", "delete retries", 0),  # the marker of attempt 1 left after attempt 2 exists
    ("drop", "delete retries", 1),  # deleted; attempt 2's collection not started
    ("drop", "control", 0),
]


@pytest.fixture(scope="module")
def retry_forks() -> Iterator[restart_anywhere.ForkServer]:
    # retry_child.py speaks restart_child.py's protocol (restart_child.fork_server)
    server = restart_anywhere.ForkServer("retry_child.py")
    yield server
    server.close()


def _label(kind: str, what: str) -> str:
    """``write retries``, ``delete retries``, ``write manifests``, ``client create_batch>``:
    the verb and the lake folder (``<root>/rev/<folder>/...``, ``<root>/<folder>/...``)."""
    if kind.startswith("client."):
        return f"client {kind[len('client.') :]}"
    verb = {"write_bytes": "write", "open_write": "open", "upload_file": "upload"}.get(
        kind[len("storage.") :], "delete"
    )
    parts = what.split("/lake/", 1)[-1].split("/")
    return f"{verb} {parts[1] if parts[0] == 'rev' and len(parts) > 1 else parts[0]}"


def _reached(log: str) -> list[str]:
    """The labels of the write points the child reached, and ``done`` if it ended."""
    with open(log, encoding="utf-8") as fh:
        rows = [line.rstrip("\n").split("\t") for line in fh]
    return ["done" if r[0] == "done" else _label(r[1], r[2]) for r in rows]


@pytest.fixture(scope="module")
def controls(prepared, retry_forks, tmp_path_factory) -> dict[str, list[str]]:
    """Each step run to its end once: its write points, by label."""
    found = {}
    for step, start in STARTS.items():
        root = clone(prepared[start], tmp_path_factory.mktemp(f"control-{step}"), failure_rate=0)
        log = str(root / "points.log")
        status = retry_forks.run(step, rc_case(root), 0, log)
        assert status == 0, Path(log + ".out").read_text()[-3000:]
        found[step] = _reached(log)
        assert found[step][-1] == "done"
    return found


def rc_case(root: Path) -> Any:
    return restart_anywhere.rc.Case(
        root=str(root), server_dir=str(root / "local"), io_dir=str(root / "io")
    )


@pytest.mark.parametrize("step, point, after", KILLS)
def test_a_kill_around_a_marker_converges_unattended_and_pays_nothing_twice(
    step, point, after, prepared, retry_forks, controls, tmp_path
):
    points = controls[step]
    root = clone(prepared[STARTS[step]], tmp_path, failure_rate=0.0)
    flow = build(root)
    log = str(root / "points.log")
    if point == "control":
        k = 0
    else:
        assert point in points, f"{step} no longer reaches {point!r}: {points}"
        k = points.index(point) + 1 + after
        assert k < len(points), f"nothing follows {point!r} in {step}: {points}"
    status = retry_forks.run(step, rc_case(root), k, log)
    reached = _reached(log)
    if k:
        assert status == -9, Path(log + ".out").read_text()[-3000:]
        assert reached == points[:k], "the step's writes changed between two runs"
    else:
        assert status == 0 and reached == points
    instance = dg.DagsterInstance.ephemeral()
    converge(flow, instance)
    check_converged(flow)
    recorded = {bid for m in flow.manifests("a") for bid in m.batch_ids}
    orphans = [b["id"] for b in Store(flow.local_dir).list_batches() if b["id"] not in recorded]
    assert not orphans, f"batches on the server that no manifest records (paid, lost): {orphans}"
    markers = [m for m in flow.storage.list_files(flow.storage.base / "inflight") if "=" in m]
    assert not markers, f"in-flight markers left: {markers}"


# --- a lost marker: rebuilt from the manifests at the in-flight index's full rescan ----------


def lose_marker(flow: Pipeline) -> None:
    """The marker of ``a``'s attempt 1 deleted by hand (or lost in a partial sync)."""
    marker = marker_path(flow)
    assert marker.exists()
    marker.unlink()


def force_rescan(flow: Pipeline) -> None:
    """The next tick is a full rescan of the in-flight index (as a day after the last one)."""
    sentinel = Path(flow.storage.base.path) / "inflight" / "_index.json"
    assert sentinel.exists(), "the prepared lake's sensor built its index"
    sentinel.unlink()


def rebuilt_warnings(lines: list[str]) -> list[str]:
    return [
        line
        for line in lines
        if line.startswith("WARNING") and "partition a: the retry marker of attempt 1" in line
    ]


def test_a_lost_marker_is_rebuilt_at_the_next_rescan_and_the_sensor_alone_retries_it(
    prepared, tmp_path
):
    flow = build(clone(prepared["collected"], tmp_path, failure_rate=0.0))
    lose_marker(flow)
    instance = dg.DagsterInstance.ephemeral()
    lines: list[str] = []
    assert not auto_retries(flow.tick(instance)), "not a rescan: nothing is rebuilt yet"
    assert not marker_path(flow).exists()
    force_rescan(flow)
    first = flow.sense(instance, log=lines)
    assert len(rebuilt_warnings(lines)) == 1, lines
    [queued] = RetryQueue(flow.storage).queued()
    assert (queued.partition_key, queued.attempt, queued.due_at) == ("a", 1, 0.0)
    assert queued.rows > 0
    assert len(auto_retries(first.run_requests)) == 1, "due at once, on the same tick"
    requested = converge(flow, instance)
    assert len(auto_retries(requested)) == 1
    check_converged(flow)  # nothing sent twice in one attempt, nothing answered twice
    assert [m.kind for m in PartitionHistory.load(flow.storage, "a").active] == [
        "initial",
        "retry",
    ]


def _snapshot(flow: Pipeline) -> dict[Path, bytes]:
    """Every manifest and table file of the lake, to lift a case's change afterwards."""
    base = Path(flow.storage.base.path)
    return {
        p: p.read_bytes()
        for folder in ("manifests", "failed")
        for p in (base / folder).rglob("*")
        if p.is_file()
    }


def _canceled_retry_run(flow: Pipeline, instance) -> None:
    """A person canceled the automatic retry run (the sensor gave up and said so)."""
    [request] = auto_retries(flow.sense(instance).run_requests)
    job = flow.defs.resolve_implicit_global_asset_job_def()
    run = instance.create_run_for_job(job, tags=request.tags, run_config=request.run_config)
    instance.report_run_canceled(run)
    assert "was canceled" in str(flow.sense(instance).skip_reason)
    assert not RetryQueue(flow.storage).queued()


def _collected_long_ago(flow: Pipeline, instance) -> None:
    """Attempt 1 was collected long ago: a lake from before auto_retry was turned on."""
    path = flow.storage.manifest_path("a", 1)
    body = flow.storage.read_json(path)
    flow.storage.write_json(path, {**body, "collected_at": "2020-01-01T00:00:00+00:00"})


def _nothing(flow: Pipeline, instance) -> None:
    """Nothing to change: the factory overrides say it (max_attempts=1, auto_retry off)."""


# case -> (what changes, factory overrides while it holds)
NOT_OWED = {
    "cancelled": (_cancelled, {}),
    "attempts_exhausted": (_nothing, {"max_attempts": 1}),
    "nothing_retryable": (_nothing_retryable, {}),
    "a_pilot": (_a_pilot, {}),
    "auto_retry_off": (_nothing, {"auto_retry": False}),
    "retry_run_canceled": (_canceled_retry_run, {}),
    "collected_long_ago": (_collected_long_ago, {}),
}


@pytest.mark.parametrize("case", sorted(NOT_OWED))
def test_no_marker_is_rebuilt_for_a_partition_that_owes_no_retry_until_it_does(
    case, prepared, tmp_path
):
    change, factory = NOT_OWED[case]
    root = clone(prepared["collected"], tmp_path)
    flow = build(root, **factory)
    instance = dg.DagsterInstance.ephemeral()
    saved = _snapshot(flow)
    change(flow, instance)
    if marker_path(flow).exists():
        lose_marker(flow)
    before = sent_ids(flow.local_dir)
    force_rescan(flow)
    lines: list[str] = []
    result = flow.sense(instance, log=lines)
    assert not rebuilt_warnings(lines), lines
    assert not marker_path(flow).exists() and not RetryQueue(flow.storage).queued()
    assert not auto_retries(result.run_requests)
    assert sent_ids(flow.local_dir) == before
    # The control: the same lake once the case no longer holds is owed its retry
    for path, raw in saved.items():
        path.write_bytes(raw)
    if case == "retry_run_canceled":
        for record in instance.get_run_records():
            instance.delete_run(record.dagster_run.run_id)
    flow = build(root)
    force_rescan(flow)
    lines.clear()
    result = flow.sense(instance, log=lines)
    assert len(rebuilt_warnings(lines)) == 1, lines
    assert len(auto_retries(result.run_requests)) == 1


def test_a_tick_that_is_not_a_rescan_reads_nothing_of_the_collected_partitions(
    prepared, tmp_path, monkeypatch
):
    flow = build(clone(prepared["collected"], tmp_path))
    lose_marker(flow)
    instance = dg.DagsterInstance.ephemeral()
    assert not auto_retries(flow.tick(instance))  # the index drops a's in-flight marker
    touched: list[str] = []
    storage_type = type(flow.storage)

    def spy(name: str) -> None:
        real = getattr(storage_type, name)

        def reading(self, what, *args, **kwargs):
            what = list(what) if name == "read_many" else what  # an iterable, read once
            touched.extend(f"{name} {p}" for p in (what if name == "read_many" else [what]))
            return real(self, what, *args, **kwargs)

        monkeypatch.setattr(storage_type, name, reading)

    for name in ("read_many", "read_table", "read_json", "list_files", "exists"):
        spy(name)
    a_reads = lambda: [t for t in touched if "partition=a" in t]  # noqa: E731
    for _ in range(2):
        assert not auto_retries(flow.tick(instance))
    assert not a_reads(), "a tick that is not a rescan read the collected partition"
    force_rescan(flow)
    assert len(auto_retries(flow.sense(instance).run_requests)) == 1
    reads = a_reads()
    assert any("manifests/partition=a" in t for t in reads), reads
    assert [t for t in reads if t.startswith("read_table") and "failed" in t], reads
