"""Changed input while batches are in flight: the unchanged rows wait for the answers already
paid for (carried from the running attempt) instead of being sent again; policy ``cancel``
cancels the running batches first and sends everything anew.

Real Dagster runs, the sensor, and the embedded local server on a settable clock (its ``time``
module is swapped, as in test_cancel.py), so the two attempts' batches end when the test says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import pandas as pd
import pytest
from conftest import dagster_instance, make_local_dir
from harness import Pipeline, metadata

from infron_dagster import InfronResource
from infron_dagster.submit import load_manifests

PARTS = dg.StaticPartitionsDefinition(["a"])
ROWS = 1000
IN_PROGRESS = 60.0  # seconds a batch runs on the local server's clock


@dataclass
class Flow(Pipeline):
    """The shared pipeline on editable ``texts``, counting what the local server was sent."""

    texts: list[str] = field(default_factory=list)

    def submitted(self, instance, **config: Any) -> dict[str, Any]:
        """Submit partition "a"; the submit asset's metadata."""
        return metadata(self.submit(instance, "a", **config))

    def sent(self) -> int:
        """Requests the local server was sent, over every batch ever created."""
        return sum(b["total"] for b in self.server_batches())

    def statuses(self) -> set[str]:
        with self.resource.get_client() as client:
            return {client.retrieve_batch(b["id"]).status.value for b in self.server_batches()}


def make_flow(tmp_path, api_style: str, **factory: Any) -> Flow:
    texts = [f"review {i}" for i in range(ROWS)]
    server = make_local_dir(str(tmp_path / "srv"), in_progress_seconds=IN_PROGRESS)
    flow = Flow.build(
        tmp_path,
        InfronResource(base_url=f"local://{server}", api_style=api_style),
        PARTS,
        frame=lambda _key: pd.DataFrame({"id": range(len(texts)), "text": list(texts)}),
        max_requests_per_batch=400,
        **factory,
    )
    flow.texts = texts
    return flow


@pytest.fixture
def instance():
    with dagster_instance() as instance:
        yield instance


def test_editing_one_row_in_flight_sends_one_request_and_waits_for_both_attempts(
    tmp_path, instance, clock, api_style
):
    flow = make_flow(tmp_path, api_style)
    first = flow.submitted(instance)
    assert first["attempt"] == 1 and first.get("batches_created", 0) == 3 and flow.sent() == ROWS
    assert flow.tick_runs(instance) == []  # in flight

    clock.now += 10  # attempt 1 is running; one row changes upstream
    flow.texts[500] = "review 500, edited"
    # The new batch is quick: it ends long before attempt 1's (the order that matters).
    make_local_dir(flow.local_dir, in_progress_seconds=5)
    second = flow.submitted(instance)
    assert flow.sent() == ROWS + 1  # exactly one more request
    assert second["attempt"] == 2 and second.get("batches_created", 0) == 1
    assert second.get("carried_rows", 0) == ROWS - 1
    assert second.get("carried_from_in_flight", 0) == ROWS - 1
    assert "still in flight" in second["carried_why"]
    (manifest_2,) = [m for m in load_manifests(flow.storage, "a") if m.attempt == 2]
    attempt_1_batches = next(m for m in load_manifests(flow.storage, "a") if m.attempt == 1)
    assert manifest_2.waiting_batch_ids == attempt_1_batches.batch_ids

    # An unchanged re-run pays nothing: the attempt is reused with what it waits for.
    again = flow.submitted(instance)
    assert again.get("reused_existing_batches", False) and flow.sent() == ROWS + 1

    # Attempt 2 (created at t0 + 10, runs 5 s) has ended; attempt 1 (t0, 60 s) still runs.
    clock.now += 10
    assert flow.statuses() == {"completed", "in_progress"}
    assert flow.tick_runs(instance) == []  # both attempts' batches must end first
    assert not flow.storage.exists(flow.storage.table_path("results", "a"))

    clock.now += IN_PROGRESS  # attempt 1 ends too
    assert flow.statuses() == {"completed"}
    (collected,) = flow.tick_runs(instance)
    assert collected.success
    results, failed = flow.frame("results"), flow.frame("failed")
    assert failed.empty and sorted(results["id"]) == list(range(ROWS))
    assert results["attempt"].value_counts().to_dict() == {1: ROWS - 1, 2: 1}
    row = results.loc[results["id"] == 500]
    assert row["text"].item() == "review 500, edited" and row["attempt"].item() == 2
    assert row["response_text"].item()
    assert flow.sent() == ROWS + 1  # nothing else was sent to finish it
    assert {m.attempt: m.state for m in load_manifests(flow.storage, "a")} == {
        1: "collected",
        2: "collected",
    }
    assert flow.tick_runs(instance) == []  # nothing left in flight


def test_a_carried_row_whose_running_batch_is_cancelled_fails_retryable(tmp_path, instance, clock):
    flow = make_flow(tmp_path, "infron")
    flow.submit(instance)
    clock.now += 10
    flow.texts[0] = "review 0, edited"
    second = flow.submitted(instance)
    assert second.get("carried_from_in_flight", 0) == ROWS - 1
    # The cancel job stops the batches the partition waits for too (attempt 1's).
    result = flow.job("cancel", instance, "a")
    assert result.success
    clock.now += IN_PROGRESS * 2
    assert flow.statuses() == {"cancelled"}
    (collected,) = flow.tick_runs(instance)
    assert collected.success
    results, failed = flow.frame("results"), flow.frame("failed")
    # Every row is accounted for: none vanished with the cancelled attempt it waited for.
    assert sorted([*results["id"], *failed["id"]]) == list(range(ROWS))
    assert len(failed) > 0 and set(failed["error_code"]) == {"batch_cancelled"}
    assert failed["retryable"].all()


def test_policy_cancel_cancels_the_running_batches_and_sends_every_row(tmp_path, instance, clock):
    flow = make_flow(tmp_path, "infron", on_changed_input_in_flight="cancel")
    flow.submit(instance)
    clock.now += 10
    flow.texts[500] = "review 500, edited"
    second = flow.submitted(instance)
    assert flow.sent() == 2 * ROWS  # everything anew, as before
    assert second.get("carried_from_in_flight", 0) == 0 and second.get("carried_rows", 0) == 0
    assert len(second["cancelled_in_flight_batch_ids"]) == 3
    assert "cancelled" in second["carried_why"]
    attempt_1 = next(m for m in load_manifests(flow.storage, "a") if m.attempt == 1)
    with flow.resource.get_client() as client:
        states = {client.retrieve_batch(b).status.value for b in attempt_1.batch_ids}
    assert states <= {"cancelling", "cancelled"}
    clock.now += IN_PROGRESS * 2
    (collected,) = flow.tick_runs(instance)
    results = flow.frame("results")
    assert collected.success and sorted(results["id"]) == list(range(ROWS))
    assert set(results["attempt"]) == {2}


def test_a_dry_run_under_policy_cancel_cancels_nothing(tmp_path, instance, clock):
    flow = make_flow(tmp_path, "infron", on_changed_input_in_flight="cancel")
    flow.submit(instance)
    clock.now += 10
    flow.texts[1] = "edited"
    flow.submit(instance, "a", dry_run=True)
    assert flow.statuses() == {"in_progress"} and flow.sent() == ROWS


def test_an_attempt_waited_on_keeps_its_reserved_cost_in_the_budget(tmp_path, instance, clock):
    # OpenAI style reports no fees: attempt 1 was billed for all 1,000 rows, but only the
    # rows attempt 2 waited for are kept, so its ledger entry must not shrink to them.
    from infron_dagster import Budget, ModelPrice, SpendLedger

    price = ModelPrice(input_per_million=2.0, output_per_million=8.0)
    flow = make_flow(tmp_path, "openai", price=price, budget=Budget(max_cost_per_day=100.0))
    flow.submit(instance)
    clock.now += 10
    for i in range(900):  # most rows change while attempt 1 runs
        flow.texts[i] = f"review {i}, edited"
    make_local_dir(flow.local_dir, in_progress_seconds=5)
    flow.submit(instance)
    clock.now += IN_PROGRESS + 10
    (collected,) = flow.tick_runs(instance)
    assert collected.success
    first, second = load_manifests(flow.storage, "a")
    ledger = SpendLedger(flow.storage)
    entries = {
        m.attempt: ledger._store.read_json(
            ledger._store.partition_dir("spend", m.spend["day"]) / f"{m.spend['entry']}.json"
        )
        for m in (first, second)
    }
    assert entries[1]["actual_cost"] is None  # still its worst case: nothing understated
    assert entries[2]["actual_cost"] is not None  # the attempt collected whole is settled
    assert ledger.spent_on(first.spend["day"]) >= first.spend["worst_cost"]
