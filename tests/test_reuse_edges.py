"""Pay once across partitions, at the edges (``reuse_answers="pipeline"``): answers a partition
no longer asks stay reusable while their result files exist; an answers file is a cache (an
unreadable one is skipped, then rebuilt, with a warning naming it); an answer whose files are
gone is sent again, not carried into a failure. Real Dagster runs, the embedded local server
(its batches counted on disk), real files."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import pandas as pd
import pyarrow as pa
import pytest
from conftest import dagster_instance, make_local_dir
from harness import Pipeline, metadata

from infron_dagster import InfronResource
from infron_dagster.carry_cache import ANSWERS_SCHEMA, answers_path
from infron_dagster.local.store import Store
from infron_dagster.prepare import DEFAULT_MAX_REQUESTS

PARTS = dg.StaticPartitionsDefinition(["a", "b", "c", "d"])


def q(numbers: range | list[int]) -> list[str]:
    return [f"question {i}" for i in numbers]


@dataclass
class Flow(Pipeline):
    """Each partition asks the questions the test sets in ``asks`` (under its own ids); the
    test's instance is kept, so a test speaks of partitions only."""

    asks: dict[str, list[str]] = field(default_factory=dict)
    instance: Any = None

    def submit_meta(self, partition: str) -> dict[str, Any]:
        return metadata(self.submit(self.instance, partition))

    def collect_frames(self, partition: str) -> tuple[pd.DataFrame, pd.DataFrame]:
        self.collect(self.instance, partition)
        return self.frames(partition)

    def ask(self, partition: str, asks: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
        self.asks[partition] = asks
        self.submit_meta(partition)
        return self.collect_frames(partition)

    def sent(self) -> list[str]:
        """Every request body the local server was ever sent (its texts), in any batch."""
        store = Store(self.local_dir)
        texts = []
        for batch in store.list_batches():
            data = store.content_path(batch["input_file_id"]).read_text()
            texts += re.findall(r"Sentiment of (question \d+)", data)
        return texts


def make_flow(tmp_path, instance) -> Flow:
    asks: dict[str, list[str]] = {}

    def frame(partition: str) -> pd.DataFrame:
        texts = asks[partition]
        offset = 1000 * "abcd".index(partition)
        ids = [offset + int(text.split()[-1]) for text in texts]  # an id per question
        return pd.DataFrame({"id": ids, "text": texts})

    server = make_local_dir(str(tmp_path / "srv"))
    flow = Flow.build(
        tmp_path,
        InfronResource(base_url=f"local://{server}"),
        PARTS,
        frame=frame,
        max_requests_per_batch=DEFAULT_MAX_REQUESTS,
        reuse_answers="pipeline",
    )
    flow.asks, flow.instance = asks, instance
    return flow


def _answers(results: pd.DataFrame) -> dict[str, str]:
    return dict(zip(results["text"], results["response_text"], strict=True))


@pytest.fixture
def instance():
    with dagster_instance() as instance:
        yield instance


@pytest.fixture
def flow(tmp_path, instance) -> Flow:
    return make_flow(tmp_path, instance)


def test_an_answer_a_partition_no_longer_asks_still_serves_the_others(flow):
    first, _ = flow.ask("a", q(range(10)))
    # a's input changes: questions 0-4 are no longer asked there (5-9 are carried, 10-14 new)
    flow.ask("a", q(range(5, 15)))
    assert sorted(flow.sent()) == sorted(q(range(15)))

    flow.asks["b"] = q([0, 1, 2, 3, 4, 12, 99])
    meta = flow.submit_meta("b")
    # Only the question nobody answered is paid for; 0-4 come from a's first attempt
    assert sorted(flow.sent()) == sorted(q([*range(15), 99]))
    assert meta.get("carried_from_other_partitions", 0) == 6
    results, failed = flow.collect_frames("b")
    assert failed.empty and len(results) == 7
    old = _answers(first)
    got = _answers(results)
    assert all(got[text] == old[text] for text in q(range(5)))


def test_a_corrupt_answers_file_is_skipped_then_rebuilt(flow, caplog):
    first, _ = flow.ask("a", q(range(10)))
    flow.ask("c", q(range(100, 105)))
    path = answers_path(flow.storage, "a")
    path.write_bytes(b"\x00garbage, not Parquet\xff" * 10)

    caplog.set_level(logging.WARNING, logger="infron_dagster")
    flow.asks["b"] = q([0, 1, 100])
    meta = flow.submit_meta("b")  # no ArrowInvalid: a's file is skipped, c's still serves
    assert any(str(path) in r.getMessage() for r in caplog.records), caplog.text
    assert meta.get("carried_from_other_partitions", 0) == 1
    assert sorted(flow.sent()) == sorted(q([*range(10), *range(100, 105), 0, 1]))
    results, failed = flow.collect_frames("b")  # what lived only in a's file was sent, not lost
    assert failed.empty and sorted(results["text"]) == sorted(q([0, 1, 100]))

    # a's next collection rebuilds its file (from its manifests and result files)
    caplog.clear()
    flow.ask("a", q(range(5, 10)))
    assert any(str(path) in r.getMessage() for r in caplog.records), caplog.text
    before = len(flow.sent())
    flow.asks["d"] = q(range(10))
    meta = flow.submit_meta("d")
    assert len(flow.sent()) == before and meta.get("carried_from_other_partitions", 0) == 10
    results, failed = flow.collect_frames("d")
    assert failed.empty and _answers(results) == _answers(first)


@pytest.mark.parametrize(
    "damage",
    [
        b"",  # empty
        "truncated",
        "foreign schema",
    ],
)
def test_any_damaged_answers_file_only_loses_its_own_reuse(flow, damage, caplog):
    flow.ask("a", q(range(5)))
    path = answers_path(flow.storage, "a")
    if damage == "truncated":
        damage = path.read_bytes()[:-20]
    elif damage == "foreign schema":
        table = pa.table({"hash64": pa.array(["x"]), "custom_id": pa.array([1])})
        flow.storage.write_table(path, table)
        damage = path.read_bytes()
    path.write_bytes(damage)
    caplog.set_level(logging.WARNING, logger="infron_dagster")
    flow.asks["b"] = q(range(5))
    flow.submit_meta("b")
    assert any(str(path) in r.getMessage() for r in caplog.records), caplog.text
    results, failed = flow.collect_frames("b")
    assert failed.empty and len(results) == 5
    assert len(flow.sent()) == 10  # sent again: the answers could not be found


def test_an_old_layout_answers_file_is_read_and_completed(flow):
    """Before: one file per partition, rewritten at each collection with the current rows
    only (no list of the attempts it covers). It is still read; the next collection adds
    the answers of the earlier attempts whose result files exist."""
    first, _ = flow.ask("a", q(range(10)))
    flow.ask("a", q(range(5, 15)))
    # What the old layout left: the current rows only, no metadata
    path = answers_path(flow.storage, "a")
    table = flow.storage.read_table(path)
    keep = pa.compute.is_in(
        table.column("attempt"), value_set=pa.array([2], pa.int64())
    )  # attempt 2 sent 10-14; its carried 5-9 came from attempt 1
    current = flow.storage.read_table(flow.storage.table_path("results", "a"))
    carried = pa.compute.is_in(table.column("custom_id"), value_set=current.column("custom_id"))
    old = table.filter(pa.compute.or_(keep, carried)).select(ANSWERS_SCHEMA.names)
    flow.storage.write_table(path, old.replace_schema_metadata(None).cast(ANSWERS_SCHEMA))
    assert old.num_rows == 10

    flow.asks["b"] = q([7, 12])  # the old file still serves what it lists
    assert flow.submit_meta("b")["carried_from_other_partitions"] == 2
    results, failed = flow.collect_frames("b")
    assert failed.empty and len(results) == 2

    flow.ask("a", q(range(5, 16)))  # a collects again: attempt 1's answers are added back
    before = len(flow.sent())
    flow.asks["c"] = q(range(5))
    assert flow.submit_meta("c")["carried_from_other_partitions"] == 5
    assert len(flow.sent()) == before
    results, failed = flow.collect_frames("c")
    assert failed.empty and _answers(results) == {t: _answers(first)[t] for t in q(range(5))}


def test_an_answer_whose_files_are_gone_is_sent_not_carried(flow):
    flow.ask("a", q(range(10)))
    flow.ask("c", q([12]))
    # a's downloaded answers are deleted (retention) before b asks: its file still lists them
    marker = flow.storage.attempt_dir("raw", "a", 1) / "batches.json"
    marker.unlink()
    before = flow.sent()
    flow.asks["b"] = q([0, 1, 12])
    meta = flow.submit_meta("b")
    assert meta.get("carried_from_other_partitions", 0) == 1  # 12 still lives in c
    assert sorted(flow.sent()) == sorted([*before, *q([0, 1])])
    results, failed = flow.collect_frames("b")
    assert failed.empty and sorted(results["text"]) == sorted(q([0, 1, 12]))


def test_answers_of_an_attempt_replaced_in_flight_serve_the_others(flow, clock):
    """a's input changes while its first attempt runs: the second carries the unchanged rows
    from it (waits for it); the answers only the first attempt gave stay reusable too."""
    make_local_dir(flow.local_dir, in_progress_seconds=60)
    flow.asks["a"] = q(range(10))
    flow.submit_meta("a")
    clock.now += 10
    flow.asks["a"] = q(range(5, 15))
    assert flow.submit_meta("a")["carried_from_in_flight"] == 5
    clock.now += 100
    results, failed = flow.collect_frames("a")
    assert failed.empty and sorted(results["text"]) == sorted(q(range(5, 15)))

    before = sorted(flow.sent())
    assert before == sorted(q(range(15)))
    flow.asks["b"] = q(range(5))  # answered only by a's first attempt
    assert flow.submit_meta("b")["carried_from_other_partitions"] == 5
    assert sorted(flow.sent()) == before
    results, failed = flow.collect_frames("b")
    assert failed.empty and sorted(results["text"]) == sorted(q(range(5)))
    assert results["response_text"].str.len().gt(0).all()
