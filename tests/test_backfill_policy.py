"""A single-run backfill submits a range of partitions in one run, each partition its own
attempt, manifest and batches; one bad partition fails the run without hiding the others."""

import dagster as dg
import pandas as pd
import pytest
from conftest import dagster_instance

from infron_dagster import RequestSpec, build_infron_batch_assets
from infron_dagster.local.store import Store
from infron_dagster.submit import load_manifests

DAYS = dg.DailyPartitionsDefinition(start_date="2026-11-01", end_date="2026-11-05")
KEYS = ["2026-11-01", "2026-11-02", "2026-11-03"]


def _build(tmp_path, infron_resource, bad_day: str | None = None):
    @dg.asset(name="reviews", partitions_def=DAYS)
    def reviews(context: dg.AssetExecutionContext):
        day = int(context.partition_key[-2:])
        n = 3 + day  # a different row count per day shows each partition kept its own rows
        frame = pd.DataFrame({"id": range(n), "text": [f"day {day} review {i}" for i in range(n)]})
        if context.partition_key == bad_day:
            frame = frame.drop(columns="id")  # the key column is missing: a clear error
        return frame

    pipeline = build_infron_batch_assets(
        name="rev",
        spec=RequestSpec(model="gpt-4o-mini", prompt_template="Label {text}", key_columns="id"),
        source="reviews",
        partitions_def=DAYS,
        storage_root=str(tmp_path / "lake"),
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool="infron_provider",
    )
    resources = {
        "infron": infron_resource,
        "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io")),
    }
    return pipeline, reviews, resources


def _materialize_range(assets, resources, instance, first: str, last: str, **kw):
    return dg.materialize(
        assets,
        resources=resources,
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": first,
            "dagster/asset_partition_range_end": last,
        },
        **kw,
    )


def _batch_count(local_dir: str) -> int:
    return len(Store(local_dir).list_batches())


def _materialized(instance, key: dg.AssetKey) -> dict[str, dict]:
    records = instance.fetch_materializations(key, limit=100).records
    return {r.partition_key: r.asset_materialization.metadata for r in records}


def test_a_single_run_backfill_gives_each_partition_its_own_attempt(
    tmp_path, infron_resource, local_dir
):
    pipeline, reviews, resources = _build(tmp_path, infron_resource)
    assert pipeline.batches_asset.backfill_policy == dg.BackfillPolicy.single_run()
    with dagster_instance() as instance:
        for key in KEYS:
            dg.materialize([reviews], partition_key=key, resources=resources, instance=instance)
        result = _materialize_range(
            [pipeline.batches_asset, reviews.to_source_asset()],
            resources,
            instance,
            KEYS[0],
            KEYS[-1],
        )
        assert result.success
        metadata = _materialized(instance, pipeline.batches_asset.key)

    assert sorted(metadata) == KEYS
    for key in KEYS:
        manifests = load_manifests(pipeline.storage, key)
        assert [m.attempt for m in manifests] == [1]
        day = int(key[-2:])
        assert manifests[0].row_count == 3 + day
        assert metadata[key]["dagster/row_count"].value == 3 + day
        # one batch: its id as text (a one-item JSON list says less)
        assert [metadata[key]["batch_id"].value] == manifests[0].batch_ids
    assert _batch_count(local_dir) == len(KEYS)  # one batch per partition, none shared


def test_one_bad_partition_fails_the_run_but_keeps_the_others_submitted_and_recorded(
    tmp_path, infron_resource, local_dir
):
    pipeline, reviews, resources = _build(tmp_path, infron_resource, bad_day=KEYS[1])
    with dagster_instance() as instance:
        for key in KEYS:
            dg.materialize([reviews], partition_key=key, resources=resources, instance=instance)
        assets = [pipeline.batches_asset, reviews.to_source_asset()]
        with pytest.raises(dg.Failure, match=r"1 of 3 partitions were not submitted: 2026-11-02"):
            _materialize_range(assets, resources, instance, KEYS[0], KEYS[-1])
        assert sorted(_materialized(instance, pipeline.batches_asset.key)) == [KEYS[0], KEYS[2]]
        assert not load_manifests(pipeline.storage, KEYS[1])
        assert _batch_count(local_dir) == 2

        # Running the range again after the fix pays only for the partition that failed.
        fixed, fixed_reviews, _ = _build(tmp_path, infron_resource)
        dg.materialize(
            [fixed_reviews], partition_key=KEYS[1], resources=resources, instance=instance
        )
        assert _materialize_range(
            [fixed.batches_asset, fixed_reviews.to_source_asset()],
            resources,
            instance,
            KEYS[0],
            KEYS[-1],
        ).success
    assert _batch_count(local_dir) == 3
    assert all(len(load_manifests(pipeline.storage, k)) == 1 for k in KEYS)


def test_a_range_loaded_as_one_frame_is_refused_naming_the_remedy(tmp_path, infron_resource):
    class OneFrameIOManager(dg.IOManager):
        def handle_output(self, context, obj):  # the upstream is not materialized here
            raise NotImplementedError

        def load_input(self, context):
            return pd.DataFrame({"id": [1, 2], "text": ["a", "b"]})

    pipeline, _, resources = _build(tmp_path, infron_resource)
    source = dg.SourceAsset("reviews", partitions_def=DAYS, io_manager_key="frames")
    with (
        dagster_instance() as instance,
        pytest.raises(dg.Failure, match="loaded one DataFrame for the whole range"),
    ):
        _materialize_range(
            [pipeline.batches_asset, source],
            {**resources, "frames": OneFrameIOManager()},
            instance,
            KEYS[0],
            KEYS[-1],
        )
    assert not any(load_manifests(pipeline.storage, k) for k in KEYS)


def test_pool_is_declared_on_submit_and_collect(tmp_path, infron_resource):
    pipeline, _, _ = _build(tmp_path, infron_resource)
    assert pipeline.batches_asset.op.pool == "infron_provider"
    assert pipeline.collect_assets.op.pool == "infron_provider"
