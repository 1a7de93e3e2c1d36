"""Dynamic partitions with awkward keys, end to end: submit, sensor, collect, hive read."""

import dagster as dg
import pandas as pd
import pyarrow.dataset as ds

from infron_dagster import RequestSpec, build_infron_batch_assets

DYNAMIC = dg.DynamicPartitionsDefinition(name="customers")
KEY = "acme/eu west 100%"


def test_dynamic_partition_with_odd_key_round_trips(tmp_path, infron_resource):
    @dg.asset(partitions_def=DYNAMIC)
    def tickets(context: dg.AssetExecutionContext) -> pd.DataFrame:
        return pd.DataFrame(
            {"id": [1, 2, 3], "text": [f"{context.partition_key} #{i}" for i in range(3)]}
        )

    pipeline = build_infron_batch_assets(
        name="tix",
        spec=RequestSpec(model="m", prompt_template="{text}", key_columns=("id",)),
        source=tickets,
        partitions_def=DYNAMIC,
        storage_root=str(tmp_path / "lake"),
    )
    resources = {"infron": infron_resource}
    defs = dg.Definitions.merge(
        pipeline.definitions, dg.Definitions(assets=[tickets], resources=resources)
    )
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("customers", [KEY])
        dg.materialize(
            [tickets, pipeline.batches_asset],
            partition_key=KEY,
            resources=resources,
            instance=instance,
        )
        tick = pipeline.sensor(
            dg.build_sensor_context(instance=instance, definitions=defs, resources=resources)
        )
        [request] = tick.run_requests
        assert request.partition_key == KEY
        dg.materialize(
            [pipeline.collect_assets], partition_key=KEY, resources=resources, instance=instance
        )
    table = ds.dataset(str(pipeline.storage.table_root("results")), partitioning="hive")
    rows = table.to_table().to_pandas()
    assert sorted(rows["id"]) == [1, 2, 3]
    assert set(rows["partition"].astype(str)) == {KEY}  # pyarrow decodes the hive segment
    assert pipeline.storage.partitions_with_manifests() == [KEY]
