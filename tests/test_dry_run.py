"""A dry run writes nothing, says truly whether a real run would pay and whether the budget
would refuse it, and a dry run that finds a problem does not mark the partition failed.

Real Dagster runs on the embedded local server (issue 17, item 12).
"""

import os

import dagster as dg
import pandas as pd
from conftest import dagster_instance, review_pipeline

from infron_dagster import RequestSpec, build_infron_batch_assets
from infron_dagster.budget import Budget
from infron_dagster.local.store import Store
from infron_dagster.pricing import ModelPrice
from infron_dagster.submit import load_manifests

PARTS = dg.StaticPartitionsDefinition(["a"])
PRICE = ModelPrice(input_per_million=2.0, output_per_million=8.0)


def _files(folder) -> list[str]:
    found = []
    for base, _, names in os.walk(folder):
        found += [os.path.relpath(os.path.join(base, n), folder) for n in names]
    return sorted(found)


def _dry_run(flow, instance, **config):
    return dg.materialize(
        [flow.upstream, flow.pipeline.batches_asset],
        partition_key="a",
        resources=flow.resources,
        instance=instance,
        run_config={"ops": {"rev_batches": {"config": {"dry_run": True, **config}}}},
        raise_on_error=False,
    )


def _observation(result) -> dict:
    (event,) = [e for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"]
    metadata = event.asset_observation_data.asset_observation.metadata
    return {k: v.value for k, v in metadata.items()}


def test_a_dry_run_writes_no_file_at_all(tmp_path, infron_resource, local_dir):
    flow = review_pipeline(tmp_path, infron_resource, PARTS, rows=6, price=PRICE)
    with dagster_instance() as instance:
        result = _dry_run(flow, instance)
        assert result.success and _observation(result)["would_pay"] is True
    # Not even the partition's lock file (it was left behind before)
    assert _files(tmp_path / "lake") == []
    assert Store(local_dir).list_batches() == []


def test_a_dry_run_of_a_partition_waiting_for_admission_would_pay(tmp_path, infron_resource):
    flow = review_pipeline(
        tmp_path,
        infron_resource,
        PARTS,
        rows=4,
        max_requests_per_batch=2,
        params={"max_tokens": 16},
        max_enqueued_tokens=60,  # one chunk of 2 requests fits, the other waits
    )
    with dagster_instance() as instance:
        submitted = dg.materialize(
            [flow.upstream, flow.pipeline.batches_asset],
            partition_key="a",
            resources=flow.resources,
            instance=instance,
        )
        assert submitted.success
        (manifest,) = load_manifests(flow.pipeline.storage, "a")
        assert len(manifest.batch_ids) == 1 and len(manifest.chunks) == 2
        before = _files(tmp_path / "lake")
        meta = _observation(_dry_run(flow, instance))
    # The waiting chunk would be created (and paid for) by a real run
    assert meta["would_pay"] is True
    assert _files(tmp_path / "lake") == before


def test_a_dry_run_says_the_budget_would_refuse_a_real_run(tmp_path, infron_resource):
    flow = review_pipeline(
        tmp_path,
        infron_resource,
        PARTS,
        rows=6,
        price=PRICE,
        budget=Budget(max_cost_per_partition=1e-9),
    )
    with dagster_instance() as instance:
        result = _dry_run(flow, instance)
        assert result.success
        meta = _observation(result)
        allowed = _observation(_dry_run(flow, instance, allow_over_budget=True))
    assert "over max_cost_per_partition" in meta["budget_would_refuse"]
    assert "budget_would_refuse" not in allowed
    assert _files(tmp_path / "lake") == []


def test_a_dry_run_that_finds_a_problem_does_not_fail_the_partition(tmp_path, infron_resource):
    @dg.asset(name="reviews", partitions_def=PARTS)
    def reviews():
        return pd.DataFrame({"id": [1, 2], "body": ["x", "y"]})  # no 'text' column

    pipeline = build_infron_batch_assets(
        name="rev",
        spec=RequestSpec(model="m", prompt_template="Sentiment of {text}", key_columns="id"),
        source="reviews",
        partitions_def=PARTS,
        storage_root=str(tmp_path / "lake"),
    )
    resources = {
        "infron": infron_resource,
        "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io")),
    }
    with dagster_instance() as instance:
        result = dg.materialize(
            [reviews, pipeline.batches_asset],
            partition_key="a",
            resources=resources,
            instance=instance,
            run_config={"ops": {"rev_batches": {"config": {"dry_run": True}}}},
            raise_on_error=False,
        )
        types = {e.event_type_value for e in result.all_events}
        meta = _observation(result)
    assert result.success
    assert "STEP_FAILURE" not in types and "ASSET_FAILED_TO_MATERIALIZE" not in types
    assert "text" in meta["dry_run_error"] and meta["would_pay"] is False
