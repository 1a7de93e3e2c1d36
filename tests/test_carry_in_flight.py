"""Changed input while batches are in flight: the unchanged rows wait for the answers already
paid for (carried from the running attempt) instead of being sent again; policy ``cancel``
cancels the running batches first and sends everything anew.

Real Dagster runs, the sensor, and the embedded local server on a settable clock (its ``time``
module is swapped, as in test_cancel.py), so the two attempts' batches end when the test says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dagster as dg
import pandas as pd
import pytest
from conftest import make_local_dir, tick_and_run

from infron_dagster import InfronResource, RequestSpec, build_infron_batch_assets
from infron_dagster.local.store import Store
from infron_dagster.submit import load_manifests

PARTS = dg.StaticPartitionsDefinition(["a"])
ROWS = 1000
IN_PROGRESS = 60.0  # seconds a batch runs on the local server's clock


@dataclass
class Flow:
    texts: list[str]
    pipeline: Any
    defs: dg.Definitions
    resources: dict[str, Any]
    instance: dg.DagsterInstance
    server: str

    @property
    def store(self):
        return self.pipeline.storage

    def submit(self, **config: Any) -> dict[str, Any]:
        upstream = self.defs.resolve_assets_def("reviews")
        result = dg.materialize(
            [upstream, self.pipeline.batches_asset],
            partition_key="a",
            instance=self.instance,
            resources=self.resources,
            run_config={"ops": {"rev_batches": {"config": config}}} if config else None,
        )
        meta = result.asset_materializations_for_node("rev_batches")[0].metadata
        return {k: v.value for k, v in meta.items()}

    def sensor_collects(self) -> list[dg.ExecuteInProcessResult]:
        """One sensor tick, and the collection runs it requests executed like the daemon."""
        return tick_and_run(self.pipeline.sensor, self.defs, self.resources, self.instance)

    def sent(self) -> int:
        """Requests the local server was sent, over every batch ever created."""
        return sum(b["total"] for b in Store(self.server).list_batches())

    def statuses(self) -> set[str]:
        with self.resources["infron"].get_client() as client:
            return {client.retrieve_batch(b["id"]).status.value for b in self.batches()}

    def batches(self) -> list[dict[str, Any]]:
        return Store(self.server).list_batches()

    def table(self, kind: str) -> pd.DataFrame:
        return self.store.read_table(self.store.table_path(kind, "a")).to_pandas()


def make_flow(tmp_path, instance, api_style: str, **factory: Any) -> Flow:
    texts = [f"review {i}" for i in range(ROWS)]

    @dg.asset(name="reviews", partitions_def=PARTS)
    def reviews():
        return pd.DataFrame({"id": range(len(texts)), "text": list(texts)})

    pipeline = build_infron_batch_assets(
        name="rev",
        spec=RequestSpec(
            model="gpt-4o-mini", prompt_template="Sentiment of {text}", key_columns="id"
        ),
        source="reviews",
        partitions_def=PARTS,
        storage_root=str(tmp_path / "lake"),
        max_requests_per_batch=400,
        **factory,
    )
    server = make_local_dir(str(tmp_path / "srv"), in_progress_seconds=IN_PROGRESS)
    resources = {
        "infron": InfronResource(base_url=f"local://{server}", api_style=api_style),
        "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io")),
    }
    defs = dg.Definitions.merge(
        pipeline.definitions, dg.Definitions(assets=[reviews], resources=resources)
    )
    return Flow(texts, pipeline, defs, resources, instance, server)


@pytest.fixture
def instance():
    with dg.instance_for_test() as instance:
        yield instance


def test_editing_one_row_in_flight_sends_one_request_and_waits_for_both_attempts(
    tmp_path, instance, clock, api_style
):
    flow = make_flow(tmp_path, instance, api_style)
    first = flow.submit()
    assert first["attempt"] == 1 and first["batches_created"] == 3 and flow.sent() == ROWS
    assert flow.sensor_collects() == []  # in flight

    clock.now += 10  # attempt 1 is running; one row changes upstream
    flow.texts[500] = "review 500, edited"
    # The new batch is quick: it ends long before attempt 1's (the order that matters).
    make_local_dir(flow.server, in_progress_seconds=5)
    second = flow.submit()
    assert flow.sent() == ROWS + 1  # exactly one more request
    assert second["attempt"] == 2 and second["batches_created"] == 1
    assert second["carried_rows"] == ROWS - 1 and second["carried_from_in_flight"] == ROWS - 1
    assert "still in flight" in second["carried_why"]
    (manifest_2,) = [m for m in load_manifests(flow.store, "a") if m.attempt == 2]
    attempt_1_batches = next(m for m in load_manifests(flow.store, "a") if m.attempt == 1)
    assert manifest_2.waiting_batch_ids == attempt_1_batches.batch_ids

    # An unchanged re-run pays nothing: the attempt is reused with what it waits for.
    again = flow.submit()
    assert again["reused_existing_batches"] and flow.sent() == ROWS + 1

    # Attempt 2 (created at t0 + 10, runs 5 s) has ended; attempt 1 (t0, 60 s) still runs.
    clock.now += 10
    assert flow.statuses() == {"completed", "in_progress"}
    assert flow.sensor_collects() == []  # both attempts' batches must end first
    assert not flow.store.exists(flow.store.table_path("results", "a"))

    clock.now += IN_PROGRESS  # attempt 1 ends too
    assert flow.statuses() == {"completed"}
    (collected,) = flow.sensor_collects()
    assert collected.success
    results, failed = flow.table("results"), flow.table("failed")
    assert failed.empty and sorted(results["id"]) == list(range(ROWS))
    assert results["attempt"].value_counts().to_dict() == {1: ROWS - 1, 2: 1}
    row = results.loc[results["id"] == 500]
    assert row["text"].item() == "review 500, edited" and row["attempt"].item() == 2
    assert row["response_text"].item()
    assert flow.sent() == ROWS + 1  # nothing else was sent to finish it
    assert {m.attempt: m.state for m in load_manifests(flow.store, "a")} == {
        1: "collected",
        2: "collected",
    }
    assert flow.sensor_collects() == []  # nothing left in flight


def test_a_carried_row_whose_running_batch_is_cancelled_fails_retryable(
    tmp_path, instance, clock
):
    flow = make_flow(tmp_path, instance, "infron")
    flow.submit()
    clock.now += 10
    flow.texts[0] = "review 0, edited"
    second = flow.submit()
    assert second["carried_from_in_flight"] == ROWS - 1
    # The cancel job stops the batches the partition waits for too (attempt 1's).
    cancel = flow.defs.resolve_job_def("rev_cancel")
    result = cancel.execute_in_process(partition_key="a", instance=instance)
    assert result.success
    clock.now += IN_PROGRESS * 2
    assert flow.statuses() == {"cancelled"}
    (collected,) = flow.sensor_collects()
    assert collected.success
    results, failed = flow.table("results"), flow.table("failed")
    # Every row is accounted for: none vanished with the cancelled attempt it waited for.
    assert sorted([*results["id"], *failed["id"]]) == list(range(ROWS))
    assert len(failed) > 0 and set(failed["error_code"]) == {"batch_cancelled"}
    assert failed["retryable"].all()


def test_policy_cancel_cancels_the_running_batches_and_sends_every_row(tmp_path, instance, clock):
    flow = make_flow(tmp_path, instance, "infron", on_changed_input_in_flight="cancel")
    flow.submit()
    clock.now += 10
    flow.texts[500] = "review 500, edited"
    second = flow.submit()
    assert flow.sent() == 2 * ROWS  # everything anew, as before
    assert second["carried_from_in_flight"] == 0 and second["carried_rows"] == 0
    assert len(second["cancelled_in_flight_batches"]) == 3
    assert "cancelled" in second["carried_why"]
    attempt_1 = next(m for m in load_manifests(flow.store, "a") if m.attempt == 1)
    with flow.resources["infron"].get_client() as client:
        states = {client.retrieve_batch(b).status.value for b in attempt_1.batch_ids}
    assert states <= {"cancelling", "cancelled"}
    clock.now += IN_PROGRESS * 2
    (collected,) = flow.sensor_collects()
    results = flow.table("results")
    assert collected.success and sorted(results["id"]) == list(range(ROWS))
    assert set(results["attempt"]) == {2}


def test_a_dry_run_under_policy_cancel_cancels_nothing(tmp_path, instance, clock):
    flow = make_flow(tmp_path, instance, "infron", on_changed_input_in_flight="cancel")
    flow.submit()
    clock.now += 10
    flow.texts[1] = "edited"
    upstream = flow.defs.resolve_assets_def("reviews")
    dg.materialize(
        [upstream, flow.pipeline.batches_asset],
        partition_key="a",
        instance=instance,
        resources=flow.resources,
        run_config={"ops": {"rev_batches": {"config": {"dry_run": True}}}},
    )
    assert flow.statuses() == {"in_progress"} and flow.sent() == ROWS


def test_an_attempt_waited_on_keeps_its_reserved_cost_in_the_budget(tmp_path, instance, clock):
    # OpenAI style reports no fees: attempt 1 was billed for all 1,000 rows, but only the
    # rows attempt 2 waited for are kept, so its ledger entry must not shrink to them.
    from infron_dagster import Budget, ModelPrice, SpendLedger

    price = ModelPrice(input_per_million=2.0, output_per_million=8.0)
    flow = make_flow(
        tmp_path, instance, "openai", price=price, budget=Budget(max_cost_per_day=100.0)
    )
    flow.submit()
    clock.now += 10
    for i in range(900):  # most rows change while attempt 1 runs
        flow.texts[i] = f"review {i}, edited"
    make_local_dir(flow.server, in_progress_seconds=5)
    flow.submit()
    clock.now += IN_PROGRESS + 10
    (collected,) = flow.sensor_collects()
    assert collected.success
    first, second = load_manifests(flow.store, "a")
    ledger = SpendLedger(flow.store)
    entries = {
        m.attempt: ledger._store.read_json(
            ledger._store.partition_dir("spend", m.spend["day"]) / f"{m.spend['entry']}.json"
        )
        for m in (first, second)
    }
    assert entries[1]["actual_cost"] is None  # still its worst case: nothing understated
    assert entries[2]["actual_cost"] is not None  # the attempt collected whole is settled
    assert ledger.spent_on(first.spend["day"]) >= first.spend["worst_cost"]
