"""The rows of a pilot batch: the sample it sends, and what a stopped pilot never sends.

Pure data code, used by :mod:`~infron_dagster.pilot`.

Example::

    sample, picked, total = pilot_sample(rows, spec, "reviews", "2026-11-24", 200)
    picked, total
    # -> (200, 12000)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .columns import CARRIED_FROM, ERROR_CODE, ERROR_MESSAGE, HIDDEN_COLUMNS
from .input_slices import InputSlices
from .keys import check_unique_keys, row_custom_ids
from .pilot_verdict import PILOT_STOPPED
from .prepare import PreparedRequests
from .sources import ParquetInput
from .spec import RequestSpec

__all__ = ["pilot_sample", "stop_rest"]


def pilot_sample(
    rows: Any, spec: RequestSpec, name: str, key: str | None, n: int
) -> tuple[Any, int, int]:
    """The pilot's rows: the ``n`` whose ``custom_id`` sort first (ids are hashes, so a
    fair sample, and a rerun picks the same rows), the number picked and the total."""
    source = InputSlices(rows, f"for partition {key!r}")
    keys, _ = source.key_table(spec.key_columns)
    ids = row_custom_ids(keys, spec.key_columns, name, key)
    order = pc.sort_indices(ids).to_numpy()
    check_unique_keys(ids, order, keys, spec.key_columns)  # before the pilot, not after it
    total = len(ids)
    if total <= n:
        return rows, total, total
    picked = np.sort(order[:n])
    if isinstance(rows, pd.DataFrame):
        return rows.iloc[picked], n, total
    if isinstance(rows, ParquetInput):
        return _take_parquet(rows, picked), n, total
    if isinstance(rows, pa.Table):
        return rows.take(pa.array(picked)), n, total
    return source.take(pa.array(picked))[0], n, total


def _take_parquet(rows: ParquetInput, picked: np.ndarray) -> pa.Table:
    parts, start = [], 0
    for part in rows.iter_batches(65_536):
        end = start + part.num_rows
        inside = picked[(picked >= start) & (picked < end)] - start
        if len(inside):
            parts.append(part.take(pa.array(inside)))
        start = end
    return pa.concat_tables(parts) if parts else rows.schema.empty_table()


def stop_rest(prepared: PreparedRequests, reason: str, workdir: str) -> PreparedRequests:
    """``prepared`` with nothing to send: the rows it would send become failed rows
    (``pilot_stopped``, ``reason``), the carried ones stay. Read a row group at a time."""
    path = os.path.join(workdir, "inputs-stopped.parquet")
    source = pq.ParquetFile(prepared.snapshot_path)
    schema = prepared.invalid.schema
    kept = 0
    stopped = [prepared.invalid]
    with pq.ParquetWriter(path, source.schema_arrow, compression="zstd") as out:
        for batch in source.iter_batches():
            table = pa.Table.from_batches([batch], source.schema_arrow)
            carried = table.column(CARRIED_FROM).is_valid()
            out.write_table(table.filter(carried))
            kept += int(pc.sum(carried).as_py() or 0)
            rest = table.filter(pc.invert(carried))
            if rest.num_rows:
                rest = rest.drop_columns([c for c in HIDDEN_COLUMNS if c in rest.column_names])
                codes = pa.array([PILOT_STOPPED] * rest.num_rows, pa.string())
                rest = rest.append_column(ERROR_CODE, codes)
                messages = pa.array([reason] * rest.num_rows, pa.string())
                stopped.append(rest.append_column(ERROR_MESSAGE, messages).cast(schema))
    invalid = pa.concat_tables(stopped)
    reasons = dict(prepared.invalid_reasons)
    reasons[PILOT_STOPPED] = invalid.num_rows - prepared.invalid.num_rows
    digest = hashlib.sha256(f"{PILOT_STOPPED}\x1f{prepared.fingerprint}".encode()).hexdigest()
    return dataclasses.replace(
        prepared,
        invalid=invalid,
        chunks=[],
        fingerprint=digest,
        estimated_input_tokens=0,
        snapshot_path=path,
        valid_rows=kept,
        request_bytes=0,
        invalid_reasons=reasons,
    )
