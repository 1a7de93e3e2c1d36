"""Embeddings are stored as float32 lists (what the wire carries), not float64; partitions
collected before as float64 still read, alone or together with new ones, and the asset's
column schema says float."""

from __future__ import annotations

import os
import shutil

import dagster as dg
import pandas as pd
import pyarrow as pa
from conftest import dagster_instance, make_local_dir

from infron_dagster import BatchStorage, InfronResource, RequestSpec, build_infron_batch_assets
from infron_dagster.table_loader import read_batch_table

GOLDEN = os.path.join(os.path.dirname(__file__), "fixtures", "golden", "lake")
FLOAT32 = pa.list_(pa.float32())


def test_an_old_float64_partition_reads_beside_a_new_float32_one(tmp_path):
    shutil.copytree(GOLDEN, tmp_path / "lake")
    storage = BatchStorage(str(tmp_path / "lake"), "embed")
    old = storage.read_table(storage.table_path("results", "Zürich"))
    assert old.schema.field("embedding").type == pa.list_(pa.float64())  # written by 9c9d438
    new = old.set_column(
        old.column_names.index("embedding"), "embedding", old.column("embedding").cast(FLOAT32)
    )
    storage.write_table(storage.table_path("results", "new"), new)

    alone = read_batch_table(storage, "results", ["Zürich"])
    assert alone.column("embedding").to_pylist() == old.column("embedding").to_pylist()
    both = read_batch_table(storage, "results", ["Zürich", "new"], partition_column=True)
    assert both.num_rows == 2 * old.num_rows
    vectors = both.column("embedding").to_pylist()
    assert vectors[old.num_rows :] == new.column("embedding").to_pylist()


def test_collected_embeddings_are_float32_and_the_column_schema_says_so(tmp_path):
    parts = dg.StaticPartitionsDefinition(["a"])

    @dg.asset(partitions_def=parts)
    def docs() -> pd.DataFrame:
        return pd.DataFrame({"id": range(5), "text": [f"doc {i}" for i in range(5)]})

    pipeline = build_infron_batch_assets(
        name="emb",
        spec=RequestSpec(
            model="e",
            endpoint="/v1/embeddings",
            prompt_template="{text}",
            key_columns=("id",),
            params={"dimensions": 8},
        ),
        source=docs,
        partitions_def=parts,
        storage_root=str(tmp_path / "lake"),
    )
    local = make_local_dir(str(tmp_path / "srv"))
    resources = {"infron": InfronResource(base_url=f"local://{local}", api_style="infron")}
    with dagster_instance() as instance:
        for assets in ([docs, pipeline.batches_asset], [pipeline.collect_assets]):
            dg.materialize(assets, partition_key="a", resources=resources, instance=instance)
        event = instance.get_latest_materialization_event(dg.AssetKey("emb_results"))
    results = pipeline.storage.read_table(pipeline.storage.table_path("results", "a"))
    assert results.schema.field("embedding").type == FLOAT32
    assert results.num_rows == 5 and all(
        len(v) == 8 for v in results.column("embedding").to_pylist()
    )
    metadata = event.asset_materialization.metadata
    columns = {c.name: c.type for c in metadata["dagster/column_schema"].value.columns}
    assert columns["embedding"] == "list<item: float>"
