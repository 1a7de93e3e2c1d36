"""A collection run that fails is requested again by the sensor, a bounded number of times."""

import dagster as dg
import pandas as pd
from conftest import dagster_instance

from infron_dagster import InfronResource, RequestSpec, build_infron_batch_assets

PARTS = dg.StaticPartitionsDefinition(["a"])


def test_the_sensor_requests_a_failed_collection_again(tmp_path, infron_resource):
    @dg.asset(partitions_def=PARTS)
    def rows() -> pd.DataFrame:
        return pd.DataFrame({"id": [1, 2], "text": ["x", "y"]})

    pipeline = build_infron_batch_assets(
        name="r",
        spec=RequestSpec(model="m", prompt_template="{text}", key_columns=("id",)),
        source=rows,
        partitions_def=PARTS,
        storage_root=str(tmp_path / "lake"),
    )
    good = {"infron": infron_resource}
    # A resource whose server knows none of the batches: collection fails (404), as a run
    # would on a transient outage.
    broken = {"infron": InfronResource(base_url=f"local://{tmp_path / 'elsewhere'}")}
    defs = dg.Definitions.merge(pipeline.definitions, dg.Definitions(assets=[rows], resources=good))

    with dagster_instance() as instance:

        def tick(cursor=None) -> dg.SensorResult:
            context = dg.build_sensor_context(
                instance=instance, cursor=cursor, definitions=defs, resources=good
            )
            return pipeline.sensor(context)

        def collect(request, resources) -> bool:
            return dg.materialize(
                [pipeline.collect_assets],
                partition_key="a",
                instance=instance,
                resources=resources,
                tags=request.tags,
                raise_on_error=False,
            ).success

        dg.materialize(
            [rows, pipeline.batches_asset], partition_key="a", resources=good, instance=instance
        )
        first = tick()
        [request] = first.run_requests
        assert not collect(request, broken)
        second = tick(first.cursor)
        [rerun] = second.run_requests
        assert rerun.run_key == f"{request.run_key}:rerun1"
        assert rerun.tags["infron/collect_key"] == request.run_key
        assert collect(rerun, good)
        assert tick(second.cursor).run_requests == []  # collected: nothing more to ask
