"""Dynamic partitions with awkward keys, end to end: submit, sensor, collect, hive read.

A partition key is an identity, never a path or a glob: keys that look like reserved names,
paths, globs, or that are too long for a file name all round-trip, each to its own folder.
"""

import dagster as dg
import pandas as pd
import pyarrow.dataset as ds
import pytest
from conftest import dagster_instance

from infron_dagster import RequestSpec, build_infron_batch_assets
from infron_dagster.storage import BatchStorage, encode_partition

DYNAMIC = dg.DynamicPartitionsDefinition(name="customers")
LONG_KEYS = ["k" * 300, "東" * 90]
KEYS = ["acme/eu west 100%", "Zürich", "__all__", "*", "../../x", "a~b", *LONG_KEYS]


@pytest.mark.parametrize("key", KEYS)
def test_dynamic_partition_with_odd_key_round_trips(tmp_path, infron_resource, key):
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
    resources = {"infron": infron_resource, "io_manager": dg.mem_io_manager}
    defs = dg.Definitions.merge(
        pipeline.definitions, dg.Definitions(assets=[tickets], resources=resources)
    )
    with dagster_instance() as instance:
        instance.add_dynamic_partitions("customers", [key])
        dg.materialize(
            [tickets, pipeline.batches_asset],
            partition_key=key,
            resources=resources,
            instance=instance,
        )
        tick = pipeline.sensor(
            dg.build_sensor_context(instance=instance, definitions=defs, resources=resources)
        )
        [request] = tick.run_requests
        assert request.partition_key == key
        dg.materialize(
            [pipeline.collect_assets], partition_key=key, resources=resources, instance=instance
        )
    table = ds.dataset(str(pipeline.storage.table_root("results")), partitioning="hive")
    rows = table.to_table().to_pandas()
    assert sorted(rows["id"]) == [1, 2, 3]
    if key not in LONG_KEYS:  # pyarrow decodes the hive segment; a long key is hashed
        assert set(rows["partition"].astype(str)) == {key}
    assert pipeline.storage.partitions_with_manifests() == [key]


def test_partition_keys_encode_injectively_into_one_short_segment(tmp_path):
    odd = ["", "__empty__", "%5F_all__", "a%7Eb", "%2A", *KEYS, "k" * 301, "東" * 91]
    odd += ["a\ud800", "a\udfff"]
    keys = [None, *dict.fromkeys(odd)]
    encoded = [encode_partition(k) for k in keys]
    assert len(set(encoded)) == len(keys)
    for segment in encoded:
        assert "/" not in segment and "*" not in segment and segment not in (".", "..")
        assert len(f"partition={segment}".encode()) <= 200
    store = BatchStorage(tmp_path, "p")
    for key in keys[1:]:
        if "\ud800" in key or "\udfff" in key:
            continue  # cannot be written into a JSON manifest; only the encoding matters
        store.write_json(store.manifest_path(key, 1), {"partition_key": key, "attempt": 1})
    written = [k for k in keys[1:] if "\ud800" not in k and "\udfff" not in k]
    assert sorted(store.partitions_with_manifests()) == sorted(written)
    assert [p for p in tmp_path.rglob("*") if p.is_file() and "p" not in p.parts] == []
