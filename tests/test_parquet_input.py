"""A ParquetSource partition is prepared a row group at a time (a distribution sort on local
disk puts the rows in custom_id order), and writes exactly what preparing the same rows read
whole writes: request files, fingerprint, snapshot, invalid rows."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_prepare_slices import _written  # what a prepare wrote, to compare two
from upath import UPath

from infron_dagster import ParquetSource, RequestSpec, prepare_requests, reorder
from infron_dagster import prepare as prepare_module
from infron_dagster.input_slices import InputSlices
from infron_dagster.sources import ParquetInput
from infron_dagster.validate import InputError

SPEC = RequestSpec(
    model="m", prompt_template="Review {id}: {text}", key_columns=("id",), system_prompt="s"
)


def _rows(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = rng.permutation(n)  # file order unrelated to custom_id order
    text = [None if i % 101 == 0 else f'text "{i}" ' + "x" * int(i % 37) for i in ids]
    return pa.table({"id": pa.array(ids, pa.int64()), "text": text, "n": ids * 2})


def _write_files(folder: pathlib.Path, table: pa.Table, files: int) -> None:
    folder.mkdir(parents=True)
    step = -(-table.num_rows // files)
    for i, start in enumerate(range(0, table.num_rows, step)):
        part = table.slice(start, step)
        if i == 1:  # another physical type in one file: unified as reading whole would
            part = part.set_column(2, "n", part.column("n").cast(pa.int32()))
        pq.write_table(part, folder / f"part-{i}.parquet", row_group_size=700)


@pytest.fixture
def small_buckets(monkeypatch):
    """Buckets of 1,000 rows and slices of 250: a few thousand rows take the spill path."""
    monkeypatch.setattr(prepare_module, "SLICE_ROWS", 250)
    monkeypatch.setattr(reorder, "BUCKET_ROWS", 1000)


def test_streamed_parquet_writes_what_the_whole_table_writes(tmp_path, small_buckets):
    table = _rows(5003)
    _write_files(tmp_path / "src" / "p", table, files=3)
    rows = ParquetSource(str(tmp_path / "src" / "{partition_key}")).input("p")
    assert rows.num_rows == 5003
    whole = pa.concat_tables(
        [pq.read_table(f) for f in sorted((tmp_path / "src" / "p").glob("*.parquet"))],
        promote_options="permissive",
    )
    kwargs = dict(spec=SPEC, name="s", partition_key="p", max_requests_per_batch=900)
    expected = prepare_requests(whole, workdir=tmp_path / "whole", **kwargs)
    spilled = []
    real_spill = reorder._spill
    reorder._spill = lambda *a: spilled.append(real_spill(*a)) or spilled[-1]
    try:
        streamed = prepare_requests(rows, workdir=tmp_path / "streamed", **kwargs)
    finally:
        reorder._spill = real_spill
    assert spilled == [6]  # the rows went through six buckets on disk
    assert _written(streamed) == _written(expected)
    assert len(streamed.invalid) == 50  # the null texts fail their own rows
    # The spill folder is gone; only the request files and the snapshot stay
    assert sorted(os.listdir(tmp_path / "streamed")) == sorted(
        [os.path.basename(c.path) for c in streamed.chunks] + ["inputs.parquet"]
    )


def test_memory_grows_the_buckets_not_the_open_files(tmp_path, monkeypatch, small_buckets):
    monkeypatch.setattr(reorder, "MAX_BUCKETS", 3)
    table = _rows(4000, seed=1)
    _write_files(tmp_path / "src", table, files=1)
    rows = ParquetInput((UPath(tmp_path / "src" / "part-0.parquet"),))
    order = np.argsort(table.column("id").to_numpy())
    seen = []
    for positions, part in reorder.in_order(rows, order, 250, tmp_path / "w"):
        assert part.column("id").to_pylist() == table.column("id").take(positions).to_pylist()
        seen.append(positions)
    assert np.array_equal(np.concatenate(seen), order)
    # 4,000 rows in at most 3 buckets: 1,500 rows each (a multiple of the slice)
    assert reorder._bucket_rows(4000, 250) == 1500
    assert os.listdir(tmp_path / "w") == []


def test_a_file_that_grows_between_the_two_reads_is_refused(tmp_path, small_buckets):
    table = _rows(3000)
    _write_files(tmp_path / "src", table, files=1)
    rows = ParquetInput((UPath(tmp_path / "src" / "part-0.parquet"),))
    pq.write_table(pa.concat_tables([table, table]), tmp_path / "src" / "part-0.parquet")
    order = np.arange(3000)
    with pytest.raises(RuntimeError, match="changed while it was read"):
        list(reorder.in_order(rows, order, 250, tmp_path / "w"))
    assert os.listdir(tmp_path / "w") == []


def test_a_small_partition_is_read_at_once(tmp_path):
    table = _rows(300)
    _write_files(tmp_path / "src", table, files=2)
    rows = ParquetSource(str(tmp_path / "src")).input(None)
    order = np.argsort(table.column("id").to_numpy())
    slices = list(reorder.in_order(rows, order, 128, tmp_path / "w"))
    assert [len(p) for p, _ in slices] == [128, 128, 44]
    got = pa.concat_tables([part for _, part in slices])
    assert got.column("id").to_pylist() == sorted(table.column("id").to_pylist())


def test_a_missing_partition_names_its_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ParquetSource(str(tmp_path / "{partition_key}.parquet")).input("nope")


@pytest.mark.parametrize("rows", [3, 5003], ids=["one-bucket", "spilled"])
def test_a_file_rewritten_between_the_two_reads_is_refused(tmp_path, small_buckets, rows):
    # Keys are read first, then the rows: a row whose key changed in between (same row count)
    # would go out under another row's custom_id.
    table = _rows(rows)
    path = tmp_path / "src" / "p.parquet"
    _write_files(tmp_path / "src", table, files=1)
    (tmp_path / "src" / "part-0.parquet").rename(path)
    source = ParquetSource(str(tmp_path / "src" / "{partition_key}.parquet")).input("p")
    real = InputSlices.key_table

    def read_keys_then_rewrite(self, columns):
        keys = real(self, columns)
        shifted = table.set_column(0, "id", pa.compute.add(table.column("id"), 1))
        pq.write_table(shifted, path)
        return keys

    InputSlices.key_table = read_keys_then_rewrite
    try:
        with pytest.raises(InputError, match="changed while it was read"):
            prepare_requests(source, SPEC, name="s", partition_key="p", workdir=tmp_path / "w")
    finally:
        InputSlices.key_table = real


def test_an_input_column_named_like_the_spill_bookkeeping_is_kept(tmp_path, small_buckets):
    table = _rows(3000).append_column("__place", pa.array(["kept"] * 3000))
    _write_files(tmp_path / "src", table, files=1)
    rows = ParquetSource(str(tmp_path / "src")).input(None)
    kwargs = dict(spec=SPEC, name="s", partition_key="p")
    streamed = prepare_requests(rows, workdir=tmp_path / "streamed", **kwargs)
    expected = prepare_requests(rows.read(), workdir=tmp_path / "whole", **kwargs)
    assert _written(streamed) == _written(expected)
    assert set(pq.read_table(streamed.snapshot_path).column("__place").to_pylist()) == {"kept"}


@pytest.mark.parametrize("rows", [200, 5200], ids=["one-bucket", "spilled"])
def test_categorical_columns_across_files_are_read_as_their_values(tmp_path, small_buckets, rows):
    # Each file (and row group) has a dictionary of its own: merged or spilled as values.
    folder = tmp_path / "src"
    folder.mkdir()
    half = rows // 2
    for f in range(2):
        text = pa.array([f"t{f}_{i % 7}" for i in range(half)]).dictionary_encode()
        part = pa.table({"id": pa.array(range(f * half, (f + 1) * half)), "text": text})
        pq.write_table(part, folder / f"p{f}.parquet", row_group_size=700)
    source = ParquetSource(str(folder)).input(None)
    assert source.schema.field("text").type == pa.string()
    kwargs = dict(spec=SPEC, name="s", partition_key="p")
    streamed = prepare_requests(source, workdir=tmp_path / "streamed", **kwargs)
    expected = prepare_requests(source.read(), workdir=tmp_path / "whole", **kwargs)
    assert streamed.valid_rows == rows
    assert _written(streamed) == _written(expected)


def test_a_key_holding_nan_inside_a_list_is_not_taken_for_a_change(tmp_path, small_buckets):
    keys = pa.array([[float(i), float("nan")] for i in range(3000)], pa.list_(pa.float64()))
    table = pa.table({"id": keys, "text": [f"t{i}" for i in range(3000)]})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=700)
    source = ParquetSource(str(tmp_path / "in.parquet")).input(None)
    kwargs = dict(spec=SPEC, name="s", partition_key="p")
    streamed = prepare_requests(source, workdir=tmp_path / "streamed", **kwargs)
    expected = prepare_requests(table, workdir=tmp_path / "whole", **kwargs)
    assert streamed.valid_rows == 3000
    # (NaN is unequal to itself in Python too: compare the requests and the ids)
    assert _written(streamed)[:2] == _written(expected)[:2]
    ids = [pq.read_table(p.snapshot_path).column("custom_id") for p in (streamed, expected)]
    assert ids[0].equals(ids[1])
