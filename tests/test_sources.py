"""ParquetSource: a partition key is an identity, never a path or a glob. Real files on disk."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infron_dagster import ParquetSource


def write(path, ids: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "text": [f"t{i}" for i in ids]}), str(path))


@pytest.fixture
def lake(tmp_path):
    """Two partitions of reviews, and a secret table beside (outside) the source."""
    write(tmp_path / "lake" / "reviews" / "date=a" / "part-0.parquet", [1, 2])
    write(tmp_path / "lake" / "reviews" / "date=a" / "part-1.parquet", [3])
    write(tmp_path / "lake" / "reviews" / "date=b" / "part-0.parquet", [4])
    write(tmp_path / "lake" / "flat" / "a.parquet", [1])
    write(tmp_path / "secret" / "x.parquet", [666])
    return tmp_path


def test_a_key_cannot_climb_out_of_the_source(lake):
    source = ParquetSource(str(lake / "lake" / "flat" / "{partition_key}.parquet"))
    with pytest.raises(ValueError, match=r"partition key '\.\./\.\./secret/x'"):
        source.read("../../secret/x")


def test_a_key_cannot_glob_every_partition(lake):
    source = ParquetSource(str(lake / "lake" / "reviews" / "date={partition_key}" / "*.parquet"))
    assert sorted(source.read("a").column("id").to_pylist()) == [1, 2, 3]  # the template globs
    with pytest.raises(ValueError, match=r"partition key '\*'"):
        source.read("*")
    with pytest.raises(ValueError, match=r"partition key '\[ab\]'"):
        source.files("[ab]")


@pytest.mark.parametrize(
    "key",
    [
        *("a/b", "a\\b", "/", "a/", "*", "a?", "[a]", "a]", "{a}", "}"),
        *("a\x00b", "a\nb", "\x7f", "\ud800", ".", "..", ""),
    ],
)
def test_keys_that_would_be_paths_or_globs_are_refused_naming_the_key(key):
    source = ParquetSource("/data/reviews/{partition_key}.parquet")
    with pytest.raises(ValueError) as raised:
        source.path_for(key)
    assert "partition key" in str(raised.value) and repr(key) in str(raised.value)


@pytest.mark.parametrize("key", ["2026-11-24", "a b", "x..y", "café", "us|eu", "2026-11-24T10:00"])
def test_ordinary_keys_fill_the_template(key):
    source = ParquetSource("/data/reviews/{partition_key}.parquet")
    assert source.path_for(key) == f"/data/reviews/{key}.parquet"


def test_a_template_without_the_placeholder_needs_no_key(lake):
    path = str(lake / "lake" / "flat" / "a.parquet")
    assert ParquetSource(path).read(None).column("id").to_pylist() == [1]
    with pytest.raises(ValueError, match="unpartitioned"):
        ParquetSource("/data/{partition_key}.parquet").path_for(None)


def test_a_folder_template_reads_only_its_partition(lake):
    source = ParquetSource(str(lake / "lake" / "reviews" / "date={partition_key}"))
    assert sorted(source.read("b").column("id").to_pylist()) == [4]


@pytest.mark.parametrize("template", ["", None, 3])
def test_the_path_template_must_be_a_non_empty_string(template):
    with pytest.raises(ValueError, match="path_template"):
        ParquetSource(template)


def test_a_partitioned_pipeline_needs_the_key_in_its_parquet_template(tmp_path):
    import dagster as dg

    from infron_dagster import RequestSpec, build_infron_batch_assets

    with pytest.raises(ValueError, match=r"no \{partition_key\} placeholder"):
        build_infron_batch_assets(
            name="p",
            spec=RequestSpec(model="m", prompt_template="{t}", key_columns=("id",)),
            source=ParquetSource(str(tmp_path / "all.parquet")),
            partitions_def=dg.StaticPartitionsDefinition(["a", "b"]),
            storage_root=str(tmp_path / "lake"),
        )
