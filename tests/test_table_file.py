"""A results or failed table is written a row group at a time (the encoding on a thread of
its own) and appears whole or not at all: locally and on S3 (moto's server)."""

from __future__ import annotations

import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infron_dagster.collect import _TableFile
from infron_dagster.storage import BatchStorage

SCHEMA = pa.schema([("id", pa.int64()), ("text", pa.string())])


def _part(start: int, n: int) -> pa.Table:
    ids = list(range(start, start + n))
    return pa.table({"id": ids, "text": [f"row {i}" for i in ids]}, schema=SCHEMA)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> BatchStorage:
    if request.param == "local":
        return BatchStorage(str(tmp_path / "lake"), "t")
    s3 = request.getfixturevalue("moto_s3")
    return BatchStorage(f"s3://{s3.bucket}/{uuid.uuid4().hex}", "t", s3.storage_options)


def test_row_groups_are_written_in_order_and_summed(storage):
    path = storage.table_path("results", "p")
    with _TableFile(storage, path, SCHEMA) as table:
        for start in (0, 100, 250):
            table.write(_part(start, 100 if start < 250 else 7))
        table.write(SCHEMA.empty_table())  # an empty slice adds no row group
    assert table.summary.rows == 207
    with path.open("rb") as fh:
        written = pq.ParquetFile(fh)
        assert written.metadata.num_row_groups == 3
        assert written.read().column("id").to_pylist() == list(range(200)) + list(range(250, 257))


@pytest.mark.parametrize("last", [True, False], ids=["last-row-group", "middle-row-group"])
def test_a_row_group_that_cannot_be_written_leaves_no_file(storage, last):
    path = storage.table_path("results", "p")
    wrong = pa.table({"id": ["not a number"], "text": ["x"]})
    with pytest.raises(ValueError, match="schema"), _TableFile(storage, path, SCHEMA) as table:
        table.write(_part(0, 10))
        table.write(wrong)  # refused on the writer thread: seen at the next write or exit
        if not last:
            table.write(_part(10, 10))
    assert not storage.exists(path)


def test_an_error_while_joining_leaves_no_file(storage):
    path = storage.table_path("failed", "p")
    with pytest.raises(RuntimeError, match="join failed"), _TableFile(storage, path, SCHEMA) as t:
        t.write(_part(0, 10))
        raise RuntimeError("join failed")
    assert not storage.exists(path)
