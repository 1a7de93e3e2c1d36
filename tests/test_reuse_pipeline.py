"""Pay once across partitions (``reuse_answers="pipeline"``): a request whose exact body was
answered in another partition is carried from there, not sent. Real Dagster runs, the
embedded local server (its batches counted on disk), real files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dagster as dg
import pandas as pd
import pytest
from conftest import dagster_instance, make_local_dir
from harness import Pipeline, metadata

from infron_dagster import InfronResource
from infron_dagster.keys import make_custom_id

PARTS = dg.StaticPartitionsDefinition(["a", "b", "c"])
ROWS = 1000


def frame(partition: str) -> pd.DataFrame:
    # Every partition asks the same 1,000 questions, under its own ids and its own columns.
    offset = {"a": 0, "b": 10_000, "c": 20_000}[partition]
    return pd.DataFrame(
        {
            "id": range(offset, offset + ROWS),
            "text": [f"review {i}" for i in range(ROWS)],
            "day": partition,
        }
    )


@dataclass
class Flow(Pipeline):
    """Partitions asking ``frame(partition)``; the local server's batches counted."""

    def batches(self) -> int:
        return len(self.server_batches())

    def sent(self) -> int:
        return sum(b["total"] for b in self.server_batches())


def make_flow(tmp_path, **factory: Any) -> Flow:
    def rows(partition: str) -> pd.DataFrame:
        return frame(partition)  # looked up at each run: a test may swap it

    server = make_local_dir(str(tmp_path / "srv"))
    resource = InfronResource(base_url=f"local://{server}")
    return Flow.build(tmp_path, resource, PARTS, frame=rows, max_requests_per_batch=400, **factory)


def submit(flow: Flow, instance, partition: str) -> dict[str, Any]:
    return metadata(flow.submit(instance, partition))


def collect(flow: Flow, instance, partition: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    flow.collect(instance, partition)
    return flow.frames(partition)


@pytest.fixture
def instance():
    with dagster_instance() as instance:
        yield instance


def test_a_partition_answered_elsewhere_sends_nothing(tmp_path, instance):
    flow = make_flow(tmp_path, reuse_answers="pipeline")
    submit(flow, instance, "a")
    results_a, _ = collect(flow, instance, "a")
    assert len(results_a) == ROWS and flow.sent() == ROWS and flow.batches() == 3

    meta = submit(flow, instance, "b")
    assert flow.sent() == ROWS and flow.batches() == 3  # not one request, not one batch
    assert meta.get("batches_created", 0) == 0 and meta.get("carried_rows", 0) == ROWS
    assert meta.get("carried_from_other_partitions", 0) == ROWS
    assert "another partition" in meta["carried_why"]
    results, failed = collect(flow, instance, "b")
    # Completeness: every input row of b, under b's own ids and columns, with a's answers.
    assert failed.empty and sorted(results["id"]) == list(range(10_000, 10_000 + ROWS))
    assert set(results["day"]) == {"b"}
    ids = {make_custom_id("rev", "b", str(i)) for i in results["id"]}
    assert set(results["custom_id"]) == ids
    answer_a = dict(zip(results_a["text"], results_a["response_text"], strict=True))
    pairs = zip(results["text"], results["response_text"], strict=True)
    assert all(answer_a[text] == answer for text, answer in pairs)
    # a paid (its share of the fees its batches reported); b paid nothing for a's answers
    assert results_a["cost"].sum() > 0 and (results["cost"] == 0).all()

    # c carries from a too (a's file lists its own answers; b's answers live in a)
    meta_c = submit(flow, instance, "c")
    assert meta_c.get("carried_from_other_partitions", 0) == ROWS and flow.sent() == ROWS
    results_c, failed_c = collect(flow, instance, "c")
    assert failed_c.empty and len(results_c) == ROWS


def test_one_new_question_is_the_only_request_sent(tmp_path, instance):
    flow = make_flow(tmp_path, reuse_answers="pipeline")
    submit(flow, instance, "a")
    collect(flow, instance, "a")
    original = frame

    def changed(partition: str) -> pd.DataFrame:
        rows = original(partition)
        if partition == "b":
            rows.loc[7, "text"] = "a question nobody asked before"
        return rows

    globals()["frame"] = changed
    try:
        meta = submit(flow, instance, "b")
    finally:
        globals()["frame"] = original
    assert flow.sent() == ROWS + 1 and meta.get("carried_from_other_partitions", 0) == ROWS - 1
    results, failed = collect(flow, instance, "b")
    assert failed.empty and len(results) == ROWS


def test_by_default_every_partition_pays_for_its_own_answers(tmp_path, instance):
    flow = make_flow(tmp_path)
    submit(flow, instance, "a")
    collect(flow, instance, "a")
    meta = submit(flow, instance, "b")
    assert flow.sent() == 2 * ROWS and meta.get("carried_from_other_partitions", 0) == 0


def test_a_vanished_source_fails_its_rows_retryable(tmp_path, instance):
    flow = make_flow(tmp_path, reuse_answers="pipeline")
    submit(flow, instance, "a")
    collect(flow, instance, "a")
    submit(flow, instance, "b")
    store = flow.pipeline.storage
    marker = store.attempt_dir("raw", "a", 1) / "batches.json"
    marker.unlink()  # a's downloaded answers are gone
    results, failed = collect(flow, instance, "b")
    assert results.empty and len(failed) == ROWS  # never lost: failed, retryable
    assert set(failed["error_code"]) == {"missing_result"} and failed["retryable"].all()
