"""The rows of a Parquet input in a given order, with memory set by a bucket of rows.

Prepare sends requests in custom_id order: the fingerprint is a running hash of the lines in
that order, so the same rows in another file order are the same input, and the chunks are the
same. A table in memory is simply taken in that order. A Parquet input is not loaded whole:
it is read once, a row group at a time, each row spilled to the bucket of its place in the
order (an Arrow IPC file per range of places, lz4-compressed, in the prepare's workdir); then
the buckets are read back one by one and sorted. A distribution sort on local disk: the disk
holds about the input's compressed size, memory one batch while spilling and one bucket
after.

Example:
    >>> rows = ParquetSource("/data/{partition_key}.parquet").input("2026-11-24")  # doctest: +SKIP
    >>> for positions, part in in_order(rows, order, 16_384, "/tmp/w"):  # doctest: +SKIP
    ...     ...  # part holds the rows at ``positions`` (file order), in that order
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from .sources import ParquetInput

__all__ = ["in_order"]

# Rows per bucket, at least: what memory is set by after the spill (a multiple of any slice).
BUCKET_ROWS = 65_536
# Buckets are open files while spilling: past this many, buckets grow instead.
MAX_BUCKETS = 512
_SPILL_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")


def in_order(
    rows: ParquetInput, order: np.ndarray, slice_rows: int, workdir: str | os.PathLike[str]
) -> Iterator[tuple[np.ndarray, pa.Table]]:
    """Slices of at most ``slice_rows`` rows in the order ``order`` gives (positions of the
    rows in file order, each once), each with its positions."""
    n = len(order)
    size = _bucket_rows(n, slice_rows)
    if n <= size:  # one bucket: read as it is
        table = rows.read()
        _check_unchanged(table.num_rows, n, end=True)
        for start in range(0, n, slice_rows):
            positions = order[start : start + slice_rows]
            yield positions, table.take(pa.array(positions))
        return
    os.makedirs(workdir, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="infron-order-", dir=os.fspath(workdir))
    try:
        place = np.empty(n, np.int64)
        place[order] = np.arange(n)
        column = _place_column(rows.schema)
        count = _spill(rows, place, size, folder, column)
        del place
        for bucket in range(count):
            positions = order[bucket * size :][:size]
            yield from _bucket_slices(folder, bucket, positions, slice_rows, column)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _bucket_rows(n: int, slice_rows: int) -> int:
    rows = max(BUCKET_ROWS, -(-n // MAX_BUCKETS))
    return -(-rows // slice_rows) * slice_rows


def _path(folder: str, bucket: int) -> str:
    return os.path.join(folder, f"{bucket:05d}.arrow")


def _place_column(schema: pa.Schema) -> str:
    """A column name the input does not use, for each spilled row's place."""
    name = "__place"
    while name in schema.names:
        name += "_"
    return name


def _spill(rows: ParquetInput, place: np.ndarray, size: int, folder: str, column: str) -> int:
    """Write each row to the bucket of its place; the number of buckets."""
    count = -(-len(place) // size)
    writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
    try:
        start = 0
        for batch in rows.iter_batches(BUCKET_ROWS):
            places = place[start : start + batch.num_rows]
            start += batch.num_rows
            _check_unchanged(start, len(place), end=False)
            buckets = places // size
            by_bucket = np.argsort(buckets, kind="stable")
            edges = np.flatnonzero(np.diff(buckets[by_bucket])) + 1
            for picked in np.split(by_bucket, edges):
                bucket = int(buckets[picked[0]])
                part = batch.take(pa.array(picked)).append_column(column, pa.array(places[picked]))
                if bucket not in writers:
                    writers[bucket] = pa.ipc.new_file(
                        _path(folder, bucket), part.schema, options=_SPILL_OPTIONS
                    )
                writers[bucket].write_table(part)
        _check_unchanged(start, len(place), end=True)
    finally:
        for writer in writers.values():
            writer.close()
    return count


def _check_unchanged(read: int, expected: int, *, end: bool) -> None:
    """The files were read twice (keys, then rows): refuse a row count that changed in
    between (prepare also checks each row's key against the first read)."""
    if read > expected or (end and read != expected):
        raise RuntimeError(
            f"the Parquet input changed while it was read: {read} rows, not {expected}; "
            "nothing was sent, run again"
        )


def _bucket_slices(
    folder: str, bucket: int, positions: np.ndarray, slice_rows: int, column: str
) -> Iterator[tuple[np.ndarray, pa.Table]]:
    """One bucket's rows sorted by their place, in slices."""
    path = _path(folder, bucket)
    with pa.OSFile(path, "rb") as source:
        table = pa.ipc.open_file(source).read_all()
    os.remove(path)
    places = table.column(column).to_numpy()
    table = table.drop_columns([column]).take(pa.array(np.argsort(places)))
    for start in range(0, table.num_rows, slice_rows):
        yield positions[start : start + slice_rows], table.slice(start, slice_rows)
