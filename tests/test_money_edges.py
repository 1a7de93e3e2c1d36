"""Money at the edges: provider fees that cannot be true, reservations of submissions that
failed or were killed, and budget entries that were damaged.

Real runs on the embedded local server. A hostile provider is the local app with the
``fees`` of its Infron batch object rewritten (WSGI wrapper): the library is not touched.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import dagster as dg
import pytest
from conftest import dagster_instance, review_pipeline

from infron_dagster import InfronResource
from infron_dagster import submit as submit_module
from infron_dagster.budget import Budget, BudgetExceeded, SpendLedger
from infron_dagster.local import embedded
from infron_dagster.local.store import Store
from infron_dagster.manifest import Manifest
from infron_dagster.pricing import ModelPrice
from infron_dagster.spend import SpendControl
from infron_dagster.storage import BatchStorage
from infron_dagster.submit import load_manifests

PARTS = dg.StaticPartitionsDefinition(["a", "b", "c"])
PRICE = ModelPrice(input_per_million=2.0, output_per_million=8.0, batch_discount=0.5)
ROWS = 12


def _hostile_fees(monkeypatch, fees: str) -> None:
    """Every Infron batch object the local app answers reports ``fees``."""
    real = embedded.create_app

    def rewriting(*args: Any, **kwargs: Any):
        app = real(*args, **kwargs)

        def wrapped(environ, start_response):
            path = environ["PATH_INFO"]
            is_batch = environ["REQUEST_METHOD"] == "GET" and "/batches/" in path
            if not is_batch:
                return app(environ, start_response)
            seen: dict[str, Any] = {}

            def start(status, headers, *exc):
                seen["status"], seen["headers"], seen["exc"] = status, headers, exc

            body = b"".join(app(environ, start))
            if seen["status"].startswith("200"):
                data = json.loads(body)
                if "fees" in data:
                    data["fees"] = fees
                body = json.dumps(data).encode()
            headers = [(k, v) for k, v in seen["headers"] if k.lower() != "content-length"]
            start_response(seen["status"], [*headers, ("Content-Length", str(len(body)))])
            return [body]

        return wrapped

    monkeypatch.setattr(embedded, "create_app", rewriting)


def _build(tmp_path, local_dir, *, price=PRICE, budget=None):
    resource = InfronResource(base_url=f"local://{local_dir}", api_style="infron")
    return review_pipeline(
        tmp_path,
        resource,
        PARTS,
        rows=ROWS,
        params={"max_tokens": 50},
        max_requests_per_batch=5,
        price=price,
        budget=budget,
    )


def _submit(flow, instance, partition: str) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [flow.upstream, flow.pipeline.batches_asset],
        partition_key=partition,
        resources=flow.resources,
        instance=instance,
        raise_on_error=False,
    )


def _collect(flow, instance, partition: str) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        flow.pipeline.collect_definitions,
        partition_key=partition,
        resources=flow.resources,
        instance=instance,
        raise_on_error=False,
    )


def _row_costs(storage: BatchStorage, partition: str) -> list[Any]:
    costs = []
    for kind in ("results", "failed"):
        path = storage.table_path(kind, partition)
        if storage.exists(path):
            costs += storage.read_table(path).column("cost").to_pylist()
    return costs


def _ledger_files(storage: BatchStorage) -> list[str]:
    root = storage.base / "_ledger"
    return [os.path.join(d, f) for d, _, files in os.walk(root.path) for f in files if "spend" in d]


def _worst(flow, instance) -> float:
    """One partition's worst case, from a dry run."""
    dry = dg.materialize(
        [flow.upstream, flow.pipeline.batches_asset],
        partition_key="a",
        resources=flow.resources,
        instance=instance,
        run_config={"ops": {"rev_batches": {"config": {"dry_run": True}}}},
    )
    (obs,) = [e for e in dry.all_events if e.event_type_value == "ASSET_OBSERVATION"]
    metadata = obs.asset_observation_data.asset_observation.metadata
    return metadata["estimate/cost_worst_case_usd"].value


# --- 3. fees that cannot be true ---------------------------------------------------------


def test_a_negative_fee_is_not_trusted_and_the_day_limit_still_holds(
    tmp_path, local_dir, monkeypatch
):
    _hostile_fees(monkeypatch, "-1")
    flow = _build(tmp_path, local_dir)
    with dagster_instance() as instance:
        worst = _worst(flow, instance)
        assert _submit(flow, instance, "a").success
        assert _collect(flow, instance, "a").success
        storage = flow.pipeline.storage
        (manifest,) = load_manifests(storage, "a")
        ledger = SpendLedger(storage)
        spent = ledger.spent_on(manifest.spend["day"])
        # the ledger keeps the estimate (the rows at the pipeline's price), not -3.00
        rows = _row_costs(storage, "a")
        assert all(c is not None and c >= 0 for c in rows)
        assert spent == pytest.approx(sum(rows)) and spent > 0
        # room for one more partition's worst case on top of what a spent, not for two
        limited = _build(tmp_path, local_dir, budget=Budget(max_cost_per_day=spent + 1.5 * worst))
        assert _submit(limited, instance, "b").success
        assert not _submit(limited, instance, "c").success
    assert len(Store(local_dir).list_batches()) == 6  # a's 3 and b's 3, never c's


def test_settle_says_why_a_fee_is_not_trusted(tmp_path):
    storage = BatchStorage(str(tmp_path / "lake"), "rev")
    control = SpendControl(storage, spec=None, price=PRICE, budget=Budget())  # type: ignore[arg-type]
    manifest = _manifest_with_batches(storage, worst=0.01)
    cases = {
        "-1": "negative",
        "nan": "not a finite",
        "1e308": "more than 100",
        "2.0": "more than 100",  # 200x the worst case
    }
    for fee, why in cases.items():
        batches = {"b1": {"cost": float(fee)}, "b2": {"cost": 0.001}}
        notes = control.settle([manifest], {manifest.attempt: 0.004}, batches)
        assert why in notes["cost_reported_untrusted"], (fee, notes)
        assert SpendLedger(storage).spent_on(manifest.spend["day"]) == pytest.approx(0.004)
    # fees that can be true are what the ledger keeps
    notes = control.settle([manifest], {1: 0.004}, {"b1": {"cost": 0.5}, "b2": {"cost": 0.5}})
    assert notes == {}
    assert SpendLedger(storage).spent_on(manifest.spend["day"]) == pytest.approx(1.0)


def test_two_huge_fees_never_write_infinity_and_the_day_goes_on(tmp_path, local_dir, monkeypatch):
    _hostile_fees(monkeypatch, "1e308")
    flow = _build(tmp_path, local_dir, budget=Budget(max_cost_per_day=1.0))
    with dagster_instance() as instance:
        assert _submit(flow, instance, "a").success
        assert _collect(flow, instance, "a").success
        storage = flow.pipeline.storage
        for path in _ledger_files(storage):
            with open(path) as fh:
                text = fh.read()
            assert "Infinity" not in text and "NaN" not in text, path
        spent = SpendLedger(storage).spent_on(SpendLedger.today())
        assert math.isfinite(spent) and spent == pytest.approx(sum(_row_costs(storage, "a")))
        assert _submit(flow, instance, "b").success  # the day is not blocked


def test_without_a_price_rows_never_get_a_negative_or_absurd_cost(tmp_path, local_dir, monkeypatch):
    for fees, part in (("-1", "a"), ("1e308", "b")):
        _hostile_fees(monkeypatch, fees)
        flow = _build(tmp_path, local_dir, price=None)
        with dagster_instance() as instance:
            assert _submit(flow, instance, part).success
            assert _collect(flow, instance, part).success
        costs = _row_costs(flow.pipeline.storage, part)
        assert costs and all(c is None for c in costs), (fees, costs[:3])


def test_no_lake_json_is_ever_written_with_nan_or_infinity(tmp_path):
    storage = BatchStorage(str(tmp_path / "lake"), "rev")
    path = storage.base / "x.json"
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match=r"x\.json not written"):
            storage.write_json(path, {"cost": bad})
        assert not storage.exists(path)
    ledger = SpendLedger(storage)
    reservation = ledger.reserve("a", 1, 0.5, Budget())
    with pytest.raises(ValueError, match="finite"):
        ledger.reserve("b", 1, float("inf"), Budget())
    ledger.settle(reservation.day, reservation.entry, float("inf"))  # kept at its estimate
    assert ledger.spent_on(reservation.day) == pytest.approx(0.5)


def test_a_ledger_written_with_infinity_or_negative_costs_is_read_conservatively(tmp_path):
    storage = BatchStorage(str(tmp_path / "lake"), "rev")
    ledger = SpendLedger(storage)
    r1 = ledger.reserve("a", 1, 0.5, Budget())
    r2 = ledger.reserve("b", 1, 0.25, Budget())
    for r, actual in ((r1, "Infinity"), (r2, "-2.0")):  # what older versions wrote
        path = storage.base / "_ledger" / "spend" / f"partition={r.day}" / f"{r.entry}.json"
        text = path.read_text().replace('"actual_cost": null', f'"actual_cost": {actual}')
        path.write_text(text)
    assert ledger.spent_on(r1.day) == pytest.approx(0.75)  # their reserved worst cases


def _manifest_with_batches(storage: BatchStorage, worst: float) -> Manifest:
    from infron_dagster.manifest import ChunkRecord

    reservation = SpendLedger(storage).reserve("p", 1, worst, Budget())
    manifest = Manifest(
        name="rev", partition_key="p", attempt=1, fingerprint="f", api_style="infron",
        endpoint="/v1/chat/completions", model="m", state="submitted",
        chunks=[
            ChunkRecord(index=0, path="x", requests=5, bytes=1, batch_id="b1"),
            ChunkRecord(index=1, path="y", requests=5, bytes=1, batch_id="b2"),
        ],
        spend={"day": reservation.day, "entry": reservation.entry,
               "expected_cost": worst / 2, "worst_cost": worst},
    )  # fmt: skip
    storage.write_json(storage.manifest_path("p", 1), manifest.to_dict())
    return manifest


# --- 5. reservations belong to an attempt ------------------------------------------------


def _fail_staging(monkeypatch) -> None:
    """The submission dies after its reservation, before its intent is written."""

    def dies(*args: Any, **kwargs: Any) -> None:
        raise OSError("killed while staging")

    monkeypatch.setattr(submit_module, "_stage", dies)


def test_the_rerun_of_a_failed_submission_replaces_its_own_reservation(
    tmp_path, local_dir, monkeypatch
):
    probe = _build(tmp_path / "probe", local_dir)
    with dagster_instance() as instance:
        worst = _worst(probe, instance)
        flow = _build(tmp_path, local_dir, budget=Budget(max_cost_per_day=worst * 1.5))
        with monkeypatch.context() as patch:
            _fail_staging(patch)
            assert not _submit(flow, instance, "a").success
        assert not load_manifests(flow.pipeline.storage, "a")
        rerun = _submit(flow, instance, "a")
        assert rerun.success, [
            e.step_failure_data.error.to_string()
            for e in rerun.all_events
            if e.event_type_value == "STEP_FAILURE"
        ]
    spent = SpendLedger(flow.pipeline.storage).spent_on(SpendLedger.today())
    assert spent == pytest.approx(worst, rel=1e-6)  # one reservation, not two


def test_a_reservation_whose_attempt_never_created_anything_is_released(
    tmp_path, local_dir, monkeypatch
):
    flow = _build(tmp_path, local_dir, budget=Budget(max_cost_per_day=100.0))
    storage = flow.pipeline.storage
    ledger = SpendLedger(storage)
    with dagster_instance() as instance:
        with monkeypatch.context() as patch:
            _fail_staging(patch)
            assert not _submit(flow, instance, "a").success
        assert _submit(flow, instance, "b").success  # a real, live attempt
    day = SpendLedger.today()
    before = ledger.spent_on(day)
    (b,) = load_manifests(storage, "b")
    assert before == pytest.approx(2 * b.spend["worst_cost"])
    # fresh: the reservation may belong to a submission still staging its intent
    assert ledger.release_unpaid(grace_seconds=3600) == []
    # a submission holding the partition's lock is live, whatever the age
    with storage.lock("a"):
        assert ledger.release_unpaid(grace_seconds=0) == []
    (released,) = ledger.release_unpaid(grace_seconds=0)
    assert "a" in released and "no manifest" in released
    assert ledger.spent_on(day) == pytest.approx(b.spend["worst_cost"])
    assert ledger.release_unpaid(grace_seconds=0) == []  # once


def test_an_abandoned_attempt_that_created_nothing_releases_its_reservation(tmp_path):
    storage = BatchStorage(str(tmp_path / "lake"), "rev")
    ledger = SpendLedger(storage)
    manifest = _manifest_with_batches(storage, worst=0.5)
    for chunk in manifest.chunks:
        chunk.batch_id = None
    manifest.state = "submitting"
    storage.write_json(storage.manifest_path("p", 1), manifest.to_dict())
    # submitting, nothing created yet: it may still create (admission, a rerun): kept
    assert ledger.release_unpaid(grace_seconds=0) == []
    manifest.chunks[0].uncertain = True
    manifest.state = "abandoned"
    storage.write_json(storage.manifest_path("p", 1), manifest.to_dict())
    assert ledger.release_unpaid(grace_seconds=0) == []  # it may have created one
    manifest.chunks[0].uncertain = False
    storage.write_json(storage.manifest_path("p", 1), manifest.to_dict())
    (released,) = ledger.release_unpaid(grace_seconds=0)
    assert "abandoned" in released
    assert ledger.spent_on(manifest.spend["day"]) == 0.0


def test_a_reservation_replaced_on_another_day_is_released(tmp_path):
    storage = BatchStorage(str(tmp_path / "lake"), "rev")
    ledger = SpendLedger(storage)
    manifest = _manifest_with_batches(storage, worst=0.5)
    old_day = "2000-01-01"
    old = storage.base / "_ledger" / "spend" / f"partition={old_day}" / "a1-old.json"
    record = {"partition_key": "p", "attempt": 1, "worst_cost": 0.5, "actual_cost": None}
    storage.write_json(old, {**record, "reserved_at": "2000-01-01T00:00:00+00:00"})
    (released,) = ledger.release_unpaid(grace_seconds=0, days=[old_day])
    assert "another" in released
    assert ledger.spent_on(old_day) == 0.0
    assert ledger.spent_on(manifest.spend["day"]) == pytest.approx(0.5)  # the live one stays


# --- 9. a damaged budget entry ------------------------------------------------------------


@pytest.mark.parametrize("damage", [b"", b'{"worst_cost": 0.1', b"[1, 2]", b'{"worst_cost": "x"}'])
def test_a_damaged_budget_entry_blocks_neither_the_day_nor_its_partition(
    tmp_path, local_dir, damage, caplog
):
    flow = _build(tmp_path, local_dir, budget=Budget(max_cost_per_day=100.0))
    storage = flow.pipeline.storage
    with dagster_instance() as instance:
        assert _submit(flow, instance, "a").success
        (a,) = load_manifests(storage, "a")
        entry = storage.base / "_ledger" / "spend" / f"partition={a.spend['day']}"
        entry = entry / f"{a.spend['entry']}.json"
        entry.write_bytes(damage)
        caplog.set_level(logging.WARNING)
        # the day is counted conservatively: a's entry at its manifest's worst case
        assert SpendLedger(storage).spent_on(a.spend["day"]) == pytest.approx(a.spend["worst_cost"])
        assert entry.name in caplog.text
        assert _submit(flow, instance, "b").success  # other partitions go on
        collected = _collect(flow, instance, "a")  # its own partition is collected
        assert collected.success
        (results, _) = collected.asset_materializations_for_node("rev_collect")
        billed = results.metadata["cost_reported_by_provider_usd"].value
    assert f"budget entry {entry}" in caplog.text and "rebuilt from the manifest" in caplog.text
    record = json.loads(entry.read_bytes())  # rebuilt from the manifest, then settled
    assert record["partition_key"] == "a" and record["attempt"] == a.attempt
    assert record["worst_cost"] == a.spend["worst_cost"]
    assert record["actual_cost"] == pytest.approx(billed, abs=1e-6)


def test_a_damaged_entry_without_a_manifest_counts_the_partition_limit(tmp_path, caplog):
    storage = BatchStorage(str(tmp_path / "lake"), "rev")
    ledger = SpendLedger(storage)
    reservation = ledger.reserve("a", 1, 0.2, Budget())
    path = storage.base / "_ledger" / "spend" / f"partition={reservation.day}"
    (path / f"{reservation.entry}.json").write_bytes(b"not json")
    caplog.set_level(logging.WARNING)
    budget = Budget(max_cost_per_partition=0.3, max_cost_per_day=0.7)
    assert ledger.spent_on(reservation.day, budget=budget) == pytest.approx(0.3)
    assert ledger.spent_on(reservation.day) == 0.0  # no limit to count: nothing was sent
    assert reservation.entry in caplog.text and "delete the file" in caplog.text.lower()
    ledger.reserve("b", 1, 0.3, budget)  # 0.3 + 0.3 fits 0.7
    with pytest.raises(BudgetExceeded, match="over max_cost_per_day"):
        ledger.reserve("c", 1, 0.2, budget)


def test_a_damaged_entry_and_manifest_refuse_the_day_limit_naming_the_files(tmp_path):
    storage = BatchStorage(str(tmp_path / "lake"), "rev")
    ledger = SpendLedger(storage)
    manifest = _manifest_with_batches(storage, worst=0.2)
    entry = storage.base / "_ledger" / "spend" / f"partition={manifest.spend['day']}"
    entry = entry / f"{manifest.spend['entry']}.json"
    entry.write_bytes(b"{")
    storage.manifest_path("p", 1).write_bytes(b"")
    with pytest.raises(BudgetExceeded, match=rf"{entry.name}.*Restore either file"):
        ledger.reserve("b", 1, 0.1, Budget(max_cost_per_day=1.0))
    # with a partition limit, the unknown entry counts that much
    ledger.reserve("b", 1, 0.1, Budget(max_cost_per_partition=0.5, max_cost_per_day=1.0))
    assert ledger.spent_on(manifest.spend["day"], budget=Budget(max_cost_per_partition=0.5)) == (
        pytest.approx(0.6)
    )
