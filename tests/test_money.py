"""Money seen before it is spent: estimates, dry runs, the budget guard and its ledger.

Real runs on the embedded local server; the number of batches on the server is the proof
that nothing was paid for.
"""

import multiprocessing
import time

import dagster as dg
import pyarrow.compute as pc
import pytest
from conftest import dagster_instance, review_pipeline

from infron_dagster import RequestSpec, build_infron_batch_assets
from infron_dagster.budget import Budget, SpendLedger
from infron_dagster.local.store import Store
from infron_dagster.pricing import ModelPrice
from infron_dagster.submit import load_manifests

PARTS = dg.StaticPartitionsDefinition(["a", "b", "c"])
PRICE = ModelPrice(input_per_million=2.0, output_per_million=8.0, batch_discount=0.5)
MAX_TOKENS = 50
ROWS = 12


def build(tmp_path, infron_resource, **kwargs):
    """The ``rev`` pipeline at a price, 12 rows of at most 50 output tokens, 3 batches."""
    flow = review_pipeline(
        tmp_path,
        infron_resource,
        PARTS,
        rows=ROWS,
        params={"max_tokens": MAX_TOKENS},
        max_requests_per_batch=5,
        price=PRICE,
        **kwargs,
    )
    return flow.pipeline, flow.upstream, flow.resources


def submit(pipeline, reviews, resources, instance, partition, **config):
    return dg.materialize(
        [reviews, pipeline.batches_asset],
        partition_key=partition,
        resources=resources,
        instance=instance,
        run_config={"ops": {"rev_batches": {"config": config}}} if config else None,
        raise_on_error=False,
    )


def server_batches(local_dir) -> int:
    return len(Store(local_dir).list_batches())


def batches_metadata(result) -> dict:
    (mat,) = result.asset_materializations_for_node("rev_batches")
    return {k: v.value for k, v in mat.metadata.items()}


def worst_case(input_tokens: int) -> float:
    return PRICE.cost(input_tokens, MAX_TOKENS * ROWS)


def test_a_dry_run_sends_and_writes_nothing_and_reports_the_estimate(
    tmp_path, infron_resource, local_dir
):
    pipeline, reviews, resources = build(tmp_path, infron_resource)
    with dagster_instance() as instance:
        result = submit(pipeline, reviews, resources, instance, "a", dry_run=True)
        assert result.success
        assert not result.asset_materializations_for_node("rev_batches")
        (observation,) = [
            e.asset_observation_data.asset_observation
            for e in result.all_events
            if e.event_type_value == "ASSET_OBSERVATION"
        ]
        meta = {k: v.value for k, v in observation.metadata.items()}
        materialized = instance.get_materialized_partitions(pipeline.batches_asset.key)
    assert observation.partition == "a"
    assert meta["dry_run"] is True and meta["would_pay"] is True
    assert meta["estimate/requests"] == ROWS
    assert meta["estimate/output_tokens_worst_case"] == MAX_TOKENS * ROWS
    worst = round(worst_case(meta["estimate/input_tokens"]), 6)
    assert meta["estimate/cost_worst_case_usd"] == worst
    assert meta["estimate/input_tokens"] > 0
    assert server_batches(local_dir) == 0
    assert not load_manifests(pipeline.storage, "a")
    assert not materialized


def test_over_its_budget_a_partition_is_refused_before_any_create_then_allowed_once(
    tmp_path, infron_resource, local_dir
):
    pipeline, reviews, resources = build(
        tmp_path, infron_resource, budget=Budget(max_cost_per_partition=1e-9)
    )
    with dagster_instance() as instance:
        refused = submit(pipeline, reviews, resources, instance, "a")
        assert not refused.success
        failure = next(e for e in refused.all_events if e.event_type_value == "STEP_FAILURE")
        message = failure.step_failure_data.error.to_string()
        assert "over max_cost_per_partition" in message and "already spent" in message
        assert server_batches(local_dir) == 0
        assert not load_manifests(pipeline.storage, "a")

        allowed = submit(pipeline, reviews, resources, instance, "a", allow_over_budget=True)
        assert allowed.success
        meta = batches_metadata(allowed)
    assert server_batches(local_dir) == meta["chunks"] == 3
    (manifest,) = load_manifests(pipeline.storage, "a")
    assert manifest.spend["worst_cost"] == pytest.approx(worst_case(meta["estimate/input_tokens"]))
    ledger = SpendLedger(pipeline.storage)
    assert ledger.spent_on(manifest.spend["day"]) == pytest.approx(manifest.spend["worst_cost"])


def _submit_in_a_process(tmp_path, local_dir, limit: float, partition: str, go, out) -> None:
    """A run of its own, as two workers of a deployment would start them."""
    from infron_dagster import InfronResource

    resource = InfronResource(base_url=f"local://{local_dir}", api_style="infron")
    pipeline, reviews, resources = build(tmp_path, resource, budget=Budget(max_cost_per_day=limit))
    with dagster_instance() as instance:
        go.wait(60)  # both processes are ready: submit at the same moment
        out.put((partition, submit(pipeline, reviews, resources, instance, partition).success))


def test_the_daily_limit_holds_for_two_runs_submitting_at_once(
    tmp_path, infron_resource, local_dir
):
    probe, reviews, resources = build(tmp_path / "probe", infron_resource)
    with dagster_instance() as instance:
        dry = submit(probe, reviews, resources, instance, "a", dry_run=True)
        (observation,) = [e for e in dry.all_events if e.event_type_value == "ASSET_OBSERVATION"]
        one = observation.asset_observation_data.asset_observation.metadata
        per_partition = one["estimate/cost_worst_case_usd"].value
    limit = per_partition * 1.5  # room for one partition's worst case, not for two

    spawn = multiprocessing.get_context("spawn")  # Dagster runs are not thread-safe
    go, out = spawn.Event(), spawn.Queue()
    workers = [
        spawn.Process(target=_submit_in_a_process, args=(tmp_path, local_dir, limit, p, go, out))
        for p in ("a", "b")
    ]
    for worker in workers:
        worker.start()
    time.sleep(3)  # let both import Dagster and build their definitions
    go.set()
    outcomes = dict(out.get(timeout=180) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    assert sorted(outcomes.values()) == [False, True]
    assert server_batches(local_dir) == 3  # one partition's chunks, never both
    pipeline, _, _ = build(tmp_path, infron_resource)
    assert SpendLedger(pipeline.storage).spent_on(SpendLedger.today()) <= limit


@pytest.mark.parametrize("style", ["infron", "openai"])
def test_collection_settles_the_ledger_to_the_actual_cost(tmp_path, local_dir, style):
    from infron_dagster import InfronResource

    resource = InfronResource(base_url=f"local://{local_dir}", api_style=style)
    pipeline, reviews, resources = build(tmp_path, resource, budget=Budget(max_cost_per_day=10.0))
    with dagster_instance() as instance:
        assert submit(pipeline, reviews, resources, instance, "a").success
        collected = dg.materialize(
            pipeline.collect_definitions,
            partition_key="a",
            resources=resources,
            instance=instance,
        )
        (results_mat, _) = collected.asset_materializations_for_node("rev_collect")
        meta = {k: v.value for k, v in results_mat.metadata.items()}
    # Every row carries its cost; they sum to the partition's cost.
    store = pipeline.storage
    tables = [store.read_table(store.table_path(kind, "a")) for kind in ("results", "failed")]
    row_costs = sum(pc.sum(t.column("cost")).as_py() or 0.0 for t in tables)
    assert meta["cost_usd"] == round(row_costs, 6) > 0
    tokens = PRICE.cost(meta["prompt_tokens"], meta["completion_tokens"])
    assert row_costs == pytest.approx(tokens)  # at the pipeline's price
    assert meta["cost_estimated_usd"] > 0
    assert meta["cost_estimate_basis"]  # what the expected output tokens were taken from
    if style == "infron":  # Infron reports fees per batch: the ledger keeps what was billed
        billed = meta["cost_reported_by_provider_usd"]
        per_million = billed / (meta["prompt_tokens"] + meta["completion_tokens"]) * 1e6
        assert meta["observed_price_per_million_tokens_usd"] == pytest.approx(per_million, rel=1e-3)
        assert meta["model"] == "gpt-4o-mini"
    else:  # OpenAI's batch object has no fees: the rows' cost
        assert "cost_reported_by_provider_usd" not in meta
        billed = row_costs
    (manifest,) = load_manifests(pipeline.storage, "a")
    spent = SpendLedger(pipeline.storage).spent_on(manifest.spend["day"])
    assert spent == pytest.approx(billed, abs=1e-6)  # the reserved worst case is replaced
    assert spent < manifest.spend["worst_cost"]


def test_without_a_price_the_reported_fees_are_shared_by_tokens(tmp_path, local_dir):
    from infron_dagster import InfronResource

    resource = InfronResource(base_url=f"local://{local_dir}", api_style="infron")
    flow = review_pipeline(tmp_path, resource, PARTS, rows=ROWS, max_requests_per_batch=5)
    with dagster_instance() as instance:
        assert dg.materialize(
            [flow.upstream, flow.pipeline.batches_asset],
            partition_key="a",
            resources=flow.resources,
            instance=instance,
        ).success
        collected = dg.materialize(
            flow.pipeline.collect_definitions,
            partition_key="a",
            resources=flow.resources,
            instance=instance,
        )
        (results_mat, _) = collected.asset_materializations_for_node("rev_collect")
    store = flow.pipeline.storage
    results = store.read_table(store.table_path("results", "a"))
    fees = results_mat.metadata["cost_reported_by_provider_usd"].value
    by_batch = results.group_by("batch_id").aggregate([("cost", "sum"), ("total_tokens", "sum")])
    assert by_batch.num_rows == 3
    assert pc.sum(results.column("cost")).as_py() == pytest.approx(fees, abs=1e-5)
    # A row's share is its tokens' share of its batch.
    first = results.slice(0, 1).to_pylist()[0]
    batch = next(b for b in by_batch.to_pylist() if b["batch_id"] == first["batch_id"])
    share = first["total_tokens"] / batch["total_tokens_sum"]
    assert first["cost"] == pytest.approx(batch["cost_sum"] * share)


def test_a_budget_without_a_price_is_refused_at_definition(tmp_path):
    with pytest.raises(ValueError, match="a Budget needs a ModelPrice"):
        build_infron_batch_assets(
            name="rev",
            spec=RequestSpec(model="m", prompt_template="{text}", key_columns="id"),
            source="reviews",
            budget=Budget(max_cost_per_day=1.0),
            storage_root=str(tmp_path),
        )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"input_per_million": -1.0, "output_per_million": 1.0},
        {"input_per_million": float("nan"), "output_per_million": 1.0},
        {"input_per_million": 1.0, "output_per_million": 1.0, "batch_discount": 1.0},
    ],
)
def test_nonsense_prices_are_refused(kwargs):
    with pytest.raises(ValueError, match="ModelPrice"):
        ModelPrice(**kwargs)
