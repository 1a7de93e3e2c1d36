"""A partition whose input changes in a few rows pays only for those rows: unchanged requests
that were already answered are carried into the new attempt. Real Dagster runs, real files."""

import dagster as dg
import pandas as pd
import pytest
from conftest import BOTH_STYLES, dagster_instance, make_local_dir

from infron_dagster import InfronResource, RequestSpec, build_infron_batch_assets

PARTS = dg.StaticPartitionsDefinition(["a"])
SPEC = RequestSpec(model="m", prompt_template="Review: {text}", key_columns=("id",))


@pytest.fixture
def setup(tmp_path, api_style):
    texts = {"value": [f"review {i}" for i in range(20)]}

    @dg.asset(partitions_def=PARTS)
    def reviews() -> pd.DataFrame:
        return pd.DataFrame({"id": range(len(texts["value"])), "text": texts["value"]})

    pipeline = build_infron_batch_assets(
        name="rev",
        spec=SPEC,
        source=reviews,
        partitions_def=PARTS,
        storage_root=str(tmp_path / "lake"),
        max_requests_per_batch=8,
    )
    local_dir = make_local_dir(str(tmp_path / "srv"))
    resource = InfronResource(base_url=f"local://{local_dir}", api_style=api_style)
    with dagster_instance() as instance:
        yield texts, reviews, pipeline, resource, instance


def values(metadata: dict) -> dict:
    """The plain values of a materialization's metadata (a counter at zero is left out)."""
    return {k: v.value for k, v in metadata.items()}


def _submit(setup):
    _, reviews, pipeline, resource, instance = setup
    result = dg.materialize(
        [reviews, pipeline.batches_asset],
        partition_key="a",
        resources={"infron": resource},
        instance=instance,
    )
    return values(result.asset_materializations_for_node("rev_batches")[0].metadata)


def _collect(setup):
    _, _, pipeline, resource, instance = setup
    dg.materialize(
        [pipeline.collect_assets],
        partition_key="a",
        resources={"infron": resource},
        instance=instance,
    )
    results = pipeline.storage.read_table(pipeline.storage.table_path("results", "a"))
    failed = pipeline.storage.read_table(pipeline.storage.table_path("failed", "a"))
    return results.to_pandas(), failed.to_pandas()


@BOTH_STYLES
def test_one_changed_row_sends_one_request(setup):
    texts = setup[0]
    first = _submit(setup)
    assert first.get("batches_created", 0) == 3 and first.get("carried_rows", 0) == 0
    results, failed = _collect(setup)
    assert len(results) == 20 and failed.empty

    texts["value"] = [*texts["value"][:19], "review 19, edited"]
    second = _submit(setup)
    assert second["attempt"] == 2 and second.get("carried_rows", 0) == 19
    assert second.get("batches_created", 0) == 1
    assert second["estimate/input_tokens"] < first["estimate/input_tokens"] / 10
    results, failed = _collect(setup)
    assert failed.empty and sorted(results["id"]) == list(range(20))
    attempts = dict(zip(results["id"], results["attempt"], strict=True))
    assert attempts[19] == 2 and {attempts[i] for i in range(19)} == {1}
    assert results.loc[results["id"] == 19, "text"].item() == "review 19, edited"
    assert "__request_hash" not in results.columns and "__carried_from" not in results.columns


def test_an_unchanged_rerun_after_a_carry_pays_nothing_and_a_revert_revives(setup):
    texts = setup[0]
    _submit(setup)
    _collect(setup)
    original = list(texts["value"])
    texts["value"] = [*original[:19], "changed"]
    _submit(setup)
    _collect(setup)
    again = _submit(setup)
    assert again.get("reused_existing_batches", False) and again.get("batches_created", 0) == 0

    texts["value"] = original  # back to the first input: its paid batches are revived
    revived = _submit(setup)
    assert revived.get("batches_created", 0) == 0 and revived["attempt"] == 3
    results, failed = _collect(setup)
    assert failed.empty and sorted(results["id"]) == list(range(20))
    assert set(results["text"]) == set(original)


def _retry(setup):
    _, reviews, pipeline, resource, instance = setup
    result = dg.materialize(
        [reviews, pipeline.batches_asset],
        selection=[pipeline.batches_asset],
        partition_key="a",
        resources={"infron": resource},
        instance=instance,
        run_config={"ops": {"rev_batches": {"config": {"retry_failed": True}}}},
    )
    return values(result.asset_materializations_for_node("rev_batches")[0].metadata)


def test_flipping_back_to_an_input_whose_attempt_carried_rows_keeps_every_answer(setup):
    texts = setup[0]
    base = list(texts["value"])
    _submit(setup)
    _collect(setup)
    for last in ("B", "C", "B"):
        texts["value"] = [*base[:19], last]
        _submit(setup)
        results, failed = _collect(setup)
        assert failed.empty and sorted(results["id"]) == list(range(20)), last
    assert results.loc[results["id"] == 19, "text"].item() == "B"


def test_a_new_invalid_row_makes_a_new_attempt_that_sends_nothing(setup):
    texts = setup[0]
    _submit(setup)
    _collect(setup)
    texts["value"] = [*texts["value"][:19], None]  # row 19 loses its text
    meta = _submit(setup)
    assert not meta.get("reused_existing_batches", False) and meta.get("batches_created", 0) == 0
    assert meta.get("carried_rows", 0) == 19 and meta.get("invalid_rows", 0) == 1
    results, failed = _collect(setup)
    assert sorted(results["id"]) == list(range(19))
    assert failed["id"].tolist() == [19] and failed["error_code"].tolist() == ["invalid_input"]


@pytest.fixture
def failing(tmp_path, setup):
    """The same pipeline, on a server where every request fails."""
    texts, reviews, pipeline, _, instance = setup
    local_dir = make_local_dir(str(tmp_path / "failing"), failure_rate=1.0)
    resource = InfronResource(base_url=f"local://{local_dir}")
    return texts, reviews, pipeline, resource, instance


def test_a_retry_of_a_replaced_attempt_is_never_reused(failing):
    _submit(failing)
    _collect(failing)
    assert _retry(failing)["attempt"] == 2  # in flight, never collected
    _, _, _, resource, instance = failing
    forced = (
        dg.materialize(
            [failing[1], failing[2].batches_asset],
            partition_key="a",
            resources={"infron": resource},
            instance=instance,
            run_config={"ops": {"rev_batches": {"config": {"force_resubmit": True}}}},
        )
        .asset_materializations_for_node("rev_batches")[0]
        .metadata
    )
    forced = values(forced)
    assert forced["attempt"] == 3
    _collect(failing)
    again = _retry(failing)
    assert again["attempt"] == 4 and not again.get("reused_existing_batches", False)


def test_answers_collected_before_a_retry_in_flight_are_still_carried(tmp_path, setup):
    texts, reviews, pipeline, _, instance = setup
    local_dir = make_local_dir(str(tmp_path / "half"), failure_rate=0.5)
    half = (texts, reviews, pipeline, InfronResource(base_url=f"local://{local_dir}"), instance)
    _submit(half)
    results, failed = _collect(half)
    assert len(results) and len(failed)
    _retry(half)  # submitted, not collected
    texts["value"] = [*texts["value"], "a new review"]
    meta = _submit(half)
    # Every collected answer (not zero), and the retried rows wait for the retry in flight
    assert meta.get("carried_rows", 0) == len(results) + len(failed)
    assert meta.get("carried_from_in_flight", 0) == len(failed)
    assert meta["dagster/row_count"] == 21 and "invalid_rows" not in meta
