"""The lake's control state holds at the edges (issue 17, items 1, 2, 6, 7 and 8).

Real Dagster runs, the real sensor ticked as the daemon would (each requested run executed
in process, each run_key once), the embedded local server (its WSGI app wrapped to count,
or to fail, the create calls: the library is not touched). A settable clock holds the local
server's batches in progress until a test lets them finish; where a test must see the
sensor's backoff, the sensor module's ``time`` is the real clock plus an offset the test
moves forward.

1. A cancel stops the chunks that still wait for admission: none is ever created, even when
   the sensor ticks and capacity frees; their rows fail ``batch_cancelled`` (retryable).
2. Editing one row of a half-admitted partition carries the created chunk's unchanged rows
   (the new attempt waits for its batch) instead of paying for them again.
6. A run killed (SIGKILL) right after admission, before any create: the sensor alone
   resubmits the partition, which converges, paid once, with the reservations released.
7. A provider refusal is retried after a short backoff, each time under a new run_key.
8. An ambiguous create in openai style ends the run successfully (``waiting_for``), and the
   sensor requests the runs that settle it: no run fails, nothing is paid twice; a complete,
   empty provider list proves the chunk unsent once the grace has passed.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import Clock, dagster_instance, make_local_dir
from harness import Pipeline, failure

import infron_dagster.resume as resume_module
import infron_dagster.sensor as sensor_module
import infron_dagster.submit as submit_module
from infron_dagster import InfronResource, ParquetSource, RequestSpec
from infron_dagster.admission import AdmissionControl
from infron_dagster.local import embedded

KEY = "a"
PARTS = dg.StaticPartitionsDefinition([KEY, "b"])
SPEC = RequestSpec(
    model="gpt-4o-mini",
    prompt_template="Sentiment of {text}",
    key_columns="id",
    params={"max_tokens": 16},
)
# Estimated enqueued tokens of a chunk of these rows: ~22 per request (input + 16 output).
PER_REQUEST = 22


# --- the pipeline ------------------------------------------------------------------------------


@dataclass
class Flow(Pipeline):
    """The shared pipeline on Parquet files; ``source`` is partition "a"'s ("b.parquet"
    beside it)."""

    source: str = ""


def _write_rows(path: str, texts: list[str]) -> None:
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), path)


def make_flow(
    tmp_path,
    *,
    rows: int,
    per_chunk: int,
    api_style: str = "infron",
    limit: int | None = None,
    **knobs: Any,
) -> Flow:
    """``rows`` rows in partitions "a" and "b" (Parquet files), ``per_chunk`` requests per
    batch; ``limit``: max_enqueued_tokens; ``knobs``: the local server's.

    Built the same way in a child process, so both see the same fingerprint."""
    source_dir = tmp_path / "source"
    source_dir.mkdir(exist_ok=True)
    source = str(source_dir / f"{KEY}.parquet")
    if not os.path.exists(source):
        _write_rows(source, [f"review {i}" for i in range(rows)])
        _write_rows(str(source_dir / "b.parquet"), [f"review {i} of b" for i in range(rows)])
    local_dir = str(tmp_path / "local")
    if not os.path.exists(os.path.join(local_dir, "config.json")):
        make_local_dir(local_dir, **knobs)
    resource = InfronResource(base_url=f"local://{local_dir}", api_style=api_style, max_retries=2)
    extra: dict[str, Any] = {"max_enqueued_tokens": limit} if limit else {}
    flow = Flow.build(
        tmp_path,
        resource,
        PARTS,
        spec=SPEC,
        source=ParquetSource(str(source_dir / "{partition_key}.parquet")),
        max_requests_per_batch=per_chunk,
        **extra,
    )
    flow.source = source
    return flow


# --- the local server's create calls, counted (and failed on demand) -------------------------


@dataclass
class Creates:
    """Status codes answered to create calls (POST .../batches) in this process."""

    statuses: Counter = field(default_factory=Counter)
    answered: int = 0


def _is_create(environ: dict[str, Any]) -> bool:
    return environ["REQUEST_METHOD"] == "POST" and environ["PATH_INFO"].endswith("/batches")


def _is_list(environ: dict[str, Any]) -> bool:
    return environ["REQUEST_METHOD"] == "GET" and environ["PATH_INFO"].endswith("/batches")


def watch_creates(monkeypatch, fail: Callable[[int], str | None] | None = None) -> Creates:
    """Wrap the embedded local app: count create calls; ``fail(n)`` (n = 1, 2, ... per
    create call) may answer the n-th one with a 500 instead: ``"lost"`` (it never reaches
    the server) or ``"late"`` (the server creates it only at the second list call after it,
    a provider still creating the batch when the client gave up)."""
    creates = Creates()
    late: list[list[Any]] = []  # [environ, body, list calls seen since]
    real = embedded.create_app

    def counting(*args: Any, **kwargs: Any):
        app = real(*args, **kwargs)

        def wrapped(environ, start_response):
            if _is_list(environ) and late:
                late[0][2] += 1
                if late[0][2] == 2:
                    held, body, _ = late.pop(0)
                    held["wsgi.input"] = io.BytesIO(body)
                    for _ in app(held, lambda *a, **k: None):  # the server creates it now
                        pass
            if not _is_create(environ):
                return app(environ, start_response)
            creates.answered += 1
            fault = fail(creates.answered) if fail else None
            if fault is not None:
                if fault == "late":
                    length = int(environ.get("CONTENT_LENGTH") or 0)
                    late.append([dict(environ), environ["wsgi.input"].read(length), 0])
                creates.statuses[500] += 1
                body = json.dumps(
                    {"error": {"message": "upstream timed out", "type": "server_error"}}
                ).encode()
                start_response(
                    "500 Internal Server Error",
                    [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
                )
                return [body]

            def start(status, headers, *exc):
                creates.statuses[int(status.split()[0])] += 1
                return start_response(status, headers, *exc)

            return app(environ, start)

        return wrapped

    monkeypatch.setattr(embedded, "create_app", counting)
    return creates


# --- the sensor, ticked as the daemon ticks it --------------------------------------------------


class SensorTime:
    """``time`` for the sensor and resume modules: the real clock plus an offset the test moves."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    @classmethod
    def install(cls, monkeypatch) -> SensorTime:
        fake = cls()
        monkeypatch.setattr(sensor_module, "time", fake)
        monkeypatch.setattr(resume_module, "time", fake)  # the resume runs' backoff clock
        return fake


def _metadata(result: dg.ExecuteInProcessResult, key: dg.AssetKey) -> dict[str, Any]:
    (event,) = [
        e
        for e in result.all_events
        if e.event_type_value == "ASSET_MATERIALIZATION"
        and e.event_specific_data.materialization.asset_key == key
    ]
    meta = event.event_specific_data.materialization.metadata
    return {k: v.value for k, v in meta.items()}


# --- 1. cancel stops everything not yet sent -------------------------------------------------


def test_cancel_stops_the_chunks_waiting_for_admission_for_good(tmp_path, monkeypatch):
    api_style = "infron"  # admission is lake logic; the wire is covered by test_cancel
    # 4 rows, 2 per chunk (~44 tokens each); the limit lets one chunk in at a time.
    clock = Clock.install(monkeypatch)
    creates = watch_creates(monkeypatch)
    flow = make_flow(
        tmp_path, rows=4, per_chunk=2, limit=60, api_style=api_style, in_progress_seconds=60
    )

    def later() -> None:  # whatever is in flight ends
        clock.now += 3600

    with dagster_instance() as instance:
        first = flow.submit(instance)
        assert first.success
        assert _metadata(first, flow.batches_key)["pending_chunks"] == 1
        (manifest,) = flow.manifests()
        assert [bool(c.batch_id) for c in manifest.chunks] == [True, False]

        cancel = flow.job("cancel", instance, KEY)
        assert cancel.success
        (output,) = [e for e in cancel.all_events if e.event_type_value == "STEP_OUTPUT"]
        meta = {k: v.value for k, v in output.step_output_data.metadata.items()}

        # A submit run asked before the cancel (queued meanwhile) runs now: it sends nothing.
        queued = flow.submit(instance)
        assert queued.success
        assert creates.statuses == Counter({200: 1}), "the queued run created a cancelled chunk"

        later()  # the cancelled batch ends: capacity frees
        flow.drive(instance, flow.collected(), timeout=30, between=later)
        for _ in range(3):  # later ticks (capacity is free now) request nothing of it
            ticked = flow.tick(instance, run=False)
            assert [r for r in ticked if r.asset_selection == [flow.batches_key]] == []
            later()

        assert creates.statuses == Counter({200: 1}), "a chunk of the cancelled attempt was paid"
        assert len(flow.server_batches()) == 1
        failed = flow.table("failed").to_pylist()
        assert sorted(r["id"] for r in failed) == [0, 1, 2, 3]  # none finished before the cancel
        assert {(r["error_code"], r["retryable"]) for r in failed} == {("batch_cancelled", True)}
        (manifest,) = flow.manifests()
        assert manifest.cancelled_at, "the manifest (the truth) must say it was cancelled"
        assert manifest.chunks[1].batch_id is None and manifest.state == "collected"
        assert "cancelled" in _metadata(queued, flow.batches_key)
        assert meta["status"].startswith("cancelled: ")
        message = meta["summary"].splitlines()[0]
        assert "cancelled" in message and "will never be sent" in message
        control = AdmissionControl(flow.storage, max_enqueued_tokens=60, output_tokens=16)
        assert control.in_flight() == 0

        # Retryable means it: the retry sends the 4 rows as attempt 2 (admitted one chunk
        # at a time), never a chunk of the cancelled attempt.
        assert flow.job("retry", instance, KEY).success
        flow.drive(instance, flow.collected(), timeout=30, between=later)

    assert creates.statuses == Counter({200: 3})
    first, second = flow.manifests()
    assert first.chunks[1].batch_id is None and second.kind == "retry"
    assert flow.table("results").num_rows == 4
    assert flow.accounted_ids() == [0, 1, 2, 3]


def test_cancelling_a_partition_whose_chunks_all_wait_sends_none_of_them(tmp_path, monkeypatch):
    # b holds the capacity; all of a's chunks wait. Cancelling a stops them for good, while
    # b's own waiting chunk is still sent when capacity frees.
    clock = Clock.install(monkeypatch)
    creates = watch_creates(monkeypatch)
    flow = make_flow(tmp_path, rows=4, per_chunk=2, limit=60, in_progress_seconds=60)

    def later() -> None:
        clock.now += 3600

    with dagster_instance() as instance:
        assert flow.submit(instance, "b").success
        waiting = flow.submit(instance, KEY)
        assert waiting.success and _metadata(waiting, flow.batches_key)["pending_chunks"] == 2
        assert creates.statuses == Counter({200: 1})
        cancel = flow.job("cancel", instance, KEY)
        assert cancel.success
        later()
        flow.drive(instance, flow.collected(KEY, "b"), timeout=30, between=later)
        for _ in range(3):
            flow.tick(instance, run=False)
            later()

    (manifest,) = flow.manifests(KEY)
    assert not manifest.batch_ids, "a chunk of the cancelled partition was created"
    assert creates.statuses == Counter({200: 2})  # b's two chunks only
    failed = flow.table("failed", KEY).to_pylist()
    assert sorted(r["id"] for r in failed) == [0, 1, 2, 3]
    assert {(r["error_code"], r["retryable"]) for r in failed} == {("batch_cancelled", True)}
    assert flow.table("results", "b").num_rows == 4


# --- 2. editing a half-admitted partition --------------------------------------------------------


def _chunk_ids(flow: Flow, attempt: int, index: int) -> set[int]:
    """The input ids whose requests are in chunk ``index`` of ``attempt`` (chunks are not in
    id order: the requests are ordered for batching)."""
    manifest = next(m for m in flow.manifests() if m.attempt == attempt)
    chunk = manifest.chunks[index]
    with flow.storage.resolve(chunk.path).open("rb") as fh:
        sent = {json.loads(line)["custom_id"] for line in fh.read().splitlines() if line.strip()}
    inputs = flow.storage.read_table(flow.storage.attempt_file("inputs", KEY, attempt))
    ids = zip(inputs.column("custom_id").to_pylist(), inputs.column("id").to_pylist(), strict=True)
    return {row for cid, row in ids if cid in sent}


@pytest.mark.parametrize("where", ["created", "waiting"])
def test_editing_a_half_admitted_partition_carries_the_created_chunk(tmp_path, monkeypatch, where):
    # 6 rows, 3 per chunk (~66 tokens); a limit of 100 lets one such chunk in at a time.
    # One row is edited: in the chunk that was created, or in the one waiting for admission.
    clock = Clock.install(monkeypatch)
    creates = watch_creates(monkeypatch)
    flow = make_flow(tmp_path, rows=6, per_chunk=3, limit=100, in_progress_seconds=60)
    texts = [f"review {i}" for i in range(6)]
    with dagster_instance() as instance:
        assert flow.submit(instance).success
        (first,) = flow.manifests()
        assert [bool(c.batch_id) for c in first.chunks] == [True, False]  # half-admitted
        created = _chunk_ids(flow, 1, 0)
        assert len(created) == 3
        edited = min(created) if where == "created" else min(set(range(6)) - created)
        carried = created - {edited}  # sent, paid for, unchanged

        texts[edited] = "an edited review"
        _write_rows(flow.source, texts)
        assert flow.submit(instance).success
        _, second = flow.manifests()
        assert second.carried_count == len(carried), (
            f"attempt 2 carries {second.carried_count} rows; the created chunk's "
            f"{len(carried)} unchanged rows are paid for already"
        )
        assert first.chunks[0].batch_id in second.waiting_batch_ids  # it waits for that batch

        clock.now += 3600  # the first batch ends

        def later() -> None:
            clock.now += 3600

        flow.drive(instance, flow.collected(), timeout=30, between=later)

    sent = sum(b["total"] for b in flow.server_batches())
    assert sent == 3 + 6 - len(carried), f"{sent} requests paid for 6 rows, 1 of them edited"
    assert set(creates.statuses) == {200}
    assert flow.accounted_ids() == list(range(6))
    results = flow.table("results").to_pylist()
    assert sorted(r["id"] for r in results) == list(range(6))
    by_id = {r["id"]: r for r in results}
    assert by_id[edited]["attempt"] == 2 and by_id[edited]["text"] == "an edited review"
    answered_by_first = {i for i, r in by_id.items() if r["attempt"] == 1}
    assert answered_by_first == carried, "the carried rows keep the first attempt's answers"


# --- 6. kill -9 after admission ----------------------------------------------------------------


def _die_after_admission(tmp: str) -> None:
    """A child: the submit run of partition "a", killed right after admission returns."""
    import pathlib

    real = AdmissionControl.admit

    def admit_then_die(self, manifest):
        admitted = real(self, manifest)
        os.kill(os.getpid(), signal.SIGKILL)
        return admitted

    AdmissionControl.admit = admit_then_die  # type: ignore[method-assign]
    flow = make_flow(pathlib.Path(tmp), rows=6, per_chunk=3, limit=1000)
    with dagster_instance() as instance:
        flow.submit(instance)


def test_a_run_killed_after_admission_is_resubmitted_by_the_sensor_alone(tmp_path, monkeypatch):
    creates = watch_creates(monkeypatch)
    flow = make_flow(tmp_path, rows=6, per_chunk=3, limit=1000)
    child = multiprocessing.get_context("spawn").Process(
        target=_die_after_admission, args=(str(tmp_path),)
    )
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL, f"the child ended with {child.exitcode}"
    (manifest,) = flow.manifests()  # what the killed run left
    assert manifest.state == "submitting" and not manifest.batch_ids
    assert not any(c.uncertain for c in manifest.chunks)
    control = AdmissionControl(flow.storage, max_enqueued_tokens=1000, output_tokens=16)
    assert control.in_flight() > 0, "the killed run held reservations"

    with dagster_instance() as instance:  # no human run from here on: the sensor only
        flow.drive(instance, flow.collected(), timeout=30)

    assert flow.submits(), "the sensor must request the submit run itself"
    assert creates.statuses == Counter({200: 2})  # each chunk once
    batches = flow.server_batches()
    assert len(batches) == 2 and sum(b["total"] for b in batches) == 6
    assert flow.accounted_ids() == list(range(6))
    (manifest,) = flow.manifests()
    assert manifest.attempt == 1 and manifest.state == "collected"
    assert control.in_flight() == 0, "reservations no live run holds are released"


# --- 7. a provider refusal: short backoff, a new run_key each time ---------------------------


def test_a_provider_refusal_is_retried_after_a_short_backoff_with_new_run_keys(
    tmp_path, monkeypatch
):
    # The provider's queue takes one chunk of 2 requests (~12 input tokens) at a time; the
    # pipeline's own limit is far away (another client of the account fills the queue).
    clock = Clock.install(monkeypatch)
    later = SensorTime.install(monkeypatch)
    creates = watch_creates(monkeypatch)
    flow = make_flow(
        tmp_path,
        rows=4,
        per_chunk=2,
        limit=100_000,
        in_progress_seconds=60,
        enqueued_token_limit=14,
    )
    with dagster_instance() as instance:
        first = flow.submit(instance)
        assert first.success
        assert (
            "the provider refused the create" in _metadata(first, flow.batches_key)["pending_why"]
        )

        def submit_requests() -> list[dg.RunRequest]:
            ticked = flow.tick(instance, run=False)
            return [r for r in ticked if r.asset_selection == [flow.batches_key]]

        keys = []
        for retry in range(3):  # each refused again: chunk 0 holds the provider's queue
            if retry == 0:
                (request,) = submit_requests()  # the first resubmission comes at once
            else:
                assert submit_requests() == [], "no resubmission before any backoff"
                later.offset += 5
                assert submit_requests() == [], "a backoff of seconds, not a hot loop"
                # The first retry within 30 s of the refused run, later ones doubling.
                later.offset += 15 * 2 ** (retry - 1) + 1
                requests = submit_requests()
                assert len(requests) == 1, (
                    f"retry {retry}: no new submit request {later.offset:.0f} s after the "
                    f"refused run (requested so far: {[r.run_key for r in flow.requested]})"
                )
                (request,) = requests
            keys.append(request.run_key)
            flow.run(instance, request)
            assert not flow.manifests()[0].fully_submitted  # refused once more
            later.offset = 0.0  # the sensor's clock, from the end of this run

        assert len(set(keys)) == len(keys), f"a run_key was reused: {keys}"
        clock.now += 3600  # chunk 0 ends: the provider's queue frees

        def onward() -> None:
            clock.now += 3600
            later.offset += 3600

        flow.drive(instance, flow.collected(), timeout=30, between=onward)

    assert creates.statuses[200] == 2  # each chunk created once
    assert set(creates.statuses) <= {200, 400}, creates.statuses
    run_keys = [r.run_key for r in flow.requested]
    assert len(set(run_keys)) == len(run_keys)
    assert flow.accounted_ids() == [0, 1, 2, 3]
    assert flow.table("results").num_rows == 4


# --- 8. an ambiguous create in openai style waits, it does not fail runs -------------------


@pytest.mark.parametrize(
    ("fault", "limit"),
    [("lost", None), ("late", None), ("lost", 1000)],
    ids=["lost", "late", "lost-with-admission"],
)
def test_an_ambiguous_openai_create_waits_and_the_sensor_settles_it(
    tmp_path, monkeypatch, fault, limit
):
    # Two chunks; the create of chunk 1 answers 500. "lost": it never reached the server
    # (sent after the grace, once the provider's list shows it absent); "late": the server
    # creates it after the client gave up (re-attached by its metadata, never sent again).
    # With admission control, the uncertain chunk keeps its reservation until settled.
    monkeypatch.setattr(submit_module, "REATTACH_GRACE_SECONDS", 2)
    monkeypatch.setattr(resume_module, "RESUME_BACKOFF_SECONDS", 0.2, raising=False)
    monkeypatch.setattr(resume_module, "MAX_RESUME_BACKOFF_SECONDS", 1.0, raising=False)
    creates = watch_creates(monkeypatch, fail=lambda n: fault if n == 2 else None)
    flow = make_flow(
        tmp_path, rows=6, per_chunk=3, api_style="openai", limit=limit, in_progress_seconds=0.2
    )
    with dagster_instance() as instance:
        first = flow.submit(instance)  # a run that can only wait ends successfully
        assert first.success, failure(first)
        meta = _metadata(first, flow.batches_key)
        assert "waiting_for" in meta and "re-attached by its metadata" in meta["waiting_for"]
        (manifest,) = flow.manifests()
        assert manifest.chunks[1].uncertain and not manifest.chunks[1].batch_id
        flow.drive(instance, flow.collected(), timeout=40)  # every run the sensor asks succeeds

    assert flow.submits(), "the sensor must request the run that settles the ambiguity"
    assert all(run.success for run in flow.runs)
    assert creates.statuses[500] == 1
    batches = flow.server_batches()
    assert len(batches) == 2, f"{len(batches)} batches for 2 chunks: one was paid twice"
    assert sum(b["total"] for b in batches) == 6
    expected_creates = {"lost": 2, "late": 1}[fault]  # "late": the orphan is re-attached
    assert creates.statuses[200] == expected_creates
    assert flow.accounted_ids() == list(range(6))
    assert flow.table("results").num_rows == 6
    if limit:
        control = AdmissionControl(flow.storage, max_enqueued_tokens=limit, output_tokens=16)
        assert control.in_flight() == 0


def test_an_ambiguous_create_of_a_first_and_only_batch_is_sent_after_the_grace(
    tmp_path, monkeypatch
):
    # One chunk, the very first create on this provider account answers 500 and never
    # reached the server: the provider's list is complete and empty. After the grace the
    # chunk must be taken as never created and sent, by a run the sensor requests.
    monkeypatch.setattr(submit_module, "REATTACH_GRACE_SECONDS", 2)
    monkeypatch.setattr(resume_module, "RESUME_BACKOFF_SECONDS", 0.2, raising=False)
    monkeypatch.setattr(resume_module, "MAX_RESUME_BACKOFF_SECONDS", 1.0, raising=False)
    creates = watch_creates(monkeypatch, fail=lambda n: "lost" if n == 1 else None)
    flow = make_flow(tmp_path, rows=3, per_chunk=3, api_style="openai", in_progress_seconds=0.2)
    with dagster_instance() as instance:
        first = flow.submit(instance)
        assert first.success, failure(first)
        assert "waiting_for" in _metadata(first, flow.batches_key)
        flow.drive(instance, flow.collected(), timeout=12)
    assert creates.statuses == Counter({500: 1, 200: 1})
    assert len(flow.server_batches()) == 1
    assert flow.accounted_ids() == [0, 1, 2]
