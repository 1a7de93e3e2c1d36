"""Input that goes back to what an older attempt sent, when some of that attempt's chunks were
never created (they waited for admission): reviving it must never send a row that another
attempt already sent or answered.

Real Dagster runs and the real sensor on the embedded local server, with an enqueued-token
limit that one chunk fits (so the second waits); what was sent is counted at the server, from
its request files, per request line (a custom_id whose text changed is another request).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from conftest import make_local_dir
from harness import Pipeline, failure, metadata, reviews_frame

import infron_dagster.resume as resume_module
from infron_dagster import InfronResource
from infron_dagster.local.store import Store

PARTS = dg.StaticPartitionsDefinition(["a"])
ROWS = 14  # two chunks of 7
# One chunk of 7 requests is ~43 input + 7 x 16 output tokens: one fits, two do not.
LIMIT = 200


@pytest.fixture(autouse=True)
def _no_resume_backoff(monkeypatch):
    """The sensor requests the run that creates a waiting chunk as soon as it fits (the
    backoff between resume runs is for failing runs; none fails here)."""
    monkeypatch.setattr(resume_module, "RESUME_BACKOFF_SECONDS", 0.0)


def _flow(tmp_path, rows: dict[str, pd.DataFrame]) -> Pipeline:
    local = make_local_dir(str(tmp_path / "local"))
    resource = InfronResource(base_url=f"local://{local}", api_style="infron")
    return Pipeline.build(
        tmp_path,
        resource,
        PARTS,
        frame=lambda key: rows[key],
        params={"max_tokens": 16},
        max_enqueued_tokens=LIMIT,
    )


def _sent(flow: Pipeline) -> Counter:
    """(custom_id, request without it) -> how many times the server was sent it."""
    store = Store(flow.local_dir)
    sent: Counter = Counter()
    for batch in store.list_batches():
        for line in Path(store.content_path(batch["input_file_id"])).read_text().splitlines():
            request = json.loads(line)
            cid = request.pop("custom_id")
            sent[(cid, json.dumps(request, sort_keys=True))] += 1
    return sent


def _submit(flow: Pipeline, instance) -> dict:
    result = flow.submit(instance)
    assert result.success, failure(result)
    return metadata(result)


def _first_waits(flow: Pipeline, instance) -> None:
    """The first submission: chunk 0 is created, chunk 1 waits for admission."""
    first = _submit(flow, instance)
    assert first["pending_chunks"] == 1, first
    (attempt,) = flow.manifests()
    assert [bool(c.batch_id) for c in attempt.chunks] == [True, False]


def _submit_runs_until(flow: Pipeline, instance, done) -> None:
    """Ticks that run only the submit runs the sensor requests (nothing is collected)."""
    for _ in range(50):
        if done():
            return
        for request in flow.tick(instance, run=False):
            if request.asset_selection == [flow.batches_key]:
                flow.run(instance, request)
    raise AssertionError(f"not done: {flow.states()}")


def test_changed_and_back_while_chunks_waited_sends_no_row_twice(tmp_path, instance):
    rows = {"a": reviews_frame(ROWS)}
    flow = _flow(tmp_path, rows)
    _first_waits(flow, instance)
    rows["a"] = reviews_frame(ROWS + 1)  # a row added: attempt 2 sends chunk 1's rows and it
    _submit(flow, instance)
    flow.drive(instance)  # attempt 2's chunks created (chunk 0 of attempt 1 ended), collected
    rows["a"] = reviews_frame(ROWS)  # back to attempt 1's requests
    reverted = _submit(flow, instance)
    flow.drive(instance)
    assert reverted.get("batches_created", 0) == 0, reverted  # every row was answered
    assert reverted["carried_rows"] == ROWS
    sent = _sent(flow)
    assert len(sent) == ROWS + 1 and set(sent.values()) == {1}, sent
    assert flow.accounted() == ROWS and flow.table("failed").num_rows == 0
    assert all(c.batch_id for c in flow.manifests()[-1].chunks)


def test_back_while_the_newer_attempt_is_in_flight_waits_for_it(tmp_path, instance):
    rows = {"a": reviews_frame(ROWS)}
    flow = _flow(tmp_path, rows)
    _first_waits(flow, instance)
    rows["a"] = reviews_frame(ROWS + 1)
    _submit(flow, instance)
    _submit_runs_until(flow, instance, lambda: flow.manifests()[1].fully_submitted)
    assert flow.manifests()[1].state == "submitted"  # in flight, never collected
    rows["a"] = reviews_frame(ROWS)
    reverted = _submit(flow, instance)
    assert reverted.get("batches_created", 0) == 0, reverted
    assert reverted["carried_from_in_flight"] == ROWS  # 7 sent by attempt 1, 7 by attempt 2
    flow.drive(instance)
    sent = _sent(flow)
    assert len(sent) == ROWS + 1 and set(sent.values()) == {1}, sent
    assert flow.accounted() == ROWS and flow.table("failed").num_rows == 0


def test_back_to_rows_only_the_old_attempt_sent_reuses_its_batch(tmp_path, instance):
    rows = {"a": reviews_frame(ROWS)}
    flow = _flow(tmp_path, rows)
    _first_waits(flow, instance)
    first_batch = flow.manifests()[0].chunks[0].batch_id
    # Two rows of attempt 1's created chunk (rows go out in custom_id order): one changes,
    # the other is left out; attempt 2 carries the chunk's other rows.
    snapshot = flow.storage.read_table(flow.storage.attempt_file("inputs", "a", 1))
    one, two = snapshot.column("id").to_pylist()[:2]
    changed = reviews_frame(ROWS)
    changed.loc[changed.id == one, "text"] = "changed"
    rows["a"] = changed[changed.id != two]
    _submit(flow, instance)
    flow.drive(instance)
    rows["a"] = reviews_frame(ROWS)  # back: row 0's first request was paid in attempt 1 only
    reverted = _submit(flow, instance)
    flow.drive(instance)
    assert reverted.get("batches_created", 0) == 0, reverted
    sent = _sent(flow)
    assert len(sent) == ROWS + 1 and set(sent.values()) == {1}, sent
    results = flow.frame("results")
    assert len(results) == ROWS
    for row in (one, two):  # answered by the old attempt's batch, which alone sent them
        assert results.loc[results.id == row, "batch_id"].item() == first_batch
        assert results.loc[results.id == row, "text"].item() == f"review {row}"


def test_back_to_a_fully_submitted_attempt_still_revives_its_batches(tmp_path, instance):
    rows = {"a": reviews_frame(5)}  # one chunk: it fits at once
    flow = _flow(tmp_path, rows)
    first = _submit(flow, instance)
    flow.drive(instance)
    rows["a"] = reviews_frame(6)
    _submit(flow, instance)
    flow.drive(instance)
    rows["a"] = reviews_frame(5)
    reverted = _submit(flow, instance)
    assert reverted["reused_existing_batches"] is True and reverted["attempt"] == 3
    assert reverted.get("batch_id") == first["batch_id"]
    flow.drive(instance)
    assert set(_sent(flow).values()) == {1} and flow.accounted() == 5
