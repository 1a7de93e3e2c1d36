"""The input of prepare, taken a slice at a time, so memory is set by a slice.

Pure data code, used by :mod:`prepare`. A pandas DataFrame converts only the rows taken
(under the type the whole frame gives each column); a pyarrow Table is taken as it is; a
:class:`~infron_dagster.sources.ParquetInput` is read a row group at a time, never whole.

Example:
    >>> source = InputSlices(pa.table({"id": [3, 1, 2]}), "for the partition")
    >>> [rows.to_pylist() for rows, _, _ in source.slices(np.array([1, 2, 0]), 2, "/tmp")]
    [[1, 2], [0]]
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from .columns import BODY_HASH, CARRIED_FROM, CARRIED_ID, CARRIED_PARTITION, CUSTOM_ID, REQUEST_HASH
from .keys import key_texts
from .reorder import in_order
from .sources import ParquetInput
from .validate import (
    ARROW_ERRORS,
    InputError,
    NonUnicodeCell,
    check_column_names,
    input_table,
    no_null_types,
    to_table,
)

__all__ = ["InputSlices"]


class InputSlices:
    """The input, taken a slice at a time: a pandas DataFrame converts only the rows taken
    (under the type the whole frame gives each column), a pyarrow Table is taken as is."""

    def __init__(self, data: pd.DataFrame | pa.Table | ParquetInput | None, which: str) -> None:
        self.frame: pd.DataFrame | None = None
        self.parquet: ParquetInput | None = None
        self.bad_text: dict[int, list[NonUnicodeCell]] = {}
        if isinstance(data, ParquetInput):  # read a row group at a time, never whole
            check_column_names(data.schema.names)
            self.parquet = data
            self.schema = no_null_types(data.schema.empty_table()).schema
            return
        if isinstance(data, pd.DataFrame):
            frame = data.reset_index(drop=True)  # copy-on-write: no data is copied
            check_column_names(list(frame.columns))
            frame.columns = [str(c) for c in frame.columns]
            schema = _frame_schema(frame)
            if schema is not None:
                self.frame, self.schema = frame, schema
                return
        # A table, or a frame whose types only a whole conversion can settle (or name)
        self.table, self.bad_text = input_table(data, which)
        self.schema = self.table.schema

    @property
    def column_names(self) -> list[str]:
        return list(self.schema.names)

    def snapshot_schema(self, bodies: bool = False) -> pa.Schema:
        """The schema of the snapshot of the rows sent: the input's plus the bookkeeping
        (``bodies``: with the body hashes and cross-partition sources, for pipeline reuse)."""
        extra = [
            pa.field(CUSTOM_ID, pa.string()),
            pa.field(REQUEST_HASH, pa.string()),
            pa.field(CARRIED_FROM, pa.int64()),
        ]
        if bodies:
            extra += [
                pa.field(BODY_HASH, pa.string()),
                pa.field(CARRIED_PARTITION, pa.string()),
                pa.field(CARRIED_ID, pa.string()),
            ]
        return pa.schema([*self.schema, *extra], metadata=self.schema.metadata)

    def key_table(
        self, key_columns: Sequence[str]
    ) -> tuple[pa.Table, dict[int, list[NonUnicodeCell]]]:
        """The key columns of every row (what custom_ids are made of)."""
        if self.parquet is not None:
            self._keys = no_null_types(self.parquet.read(list(key_columns)))
            return self._keys, {}
        if self.frame is None:
            bad = {r: [b for b in v if b.column in key_columns] for r, v in self.bad_text.items()}
            return self.table.select(list(key_columns)), bad
        return input_table(self.frame[list(key_columns)], "")

    def slices(
        self, order: np.ndarray, slice_rows: int, workdir: str | os.PathLike[str]
    ) -> Iterator[tuple[pa.Array, pa.Table, dict[int, list[NonUnicodeCell]]]]:
        """The rows in ``order``, a slice at a time: their positions, the rows, and those
        whose text had to be escaped (by place in the slice)."""
        if self.parquet is not None:
            for positions, part in in_order(self.parquet, order, slice_rows, workdir):
                rows = pa.array(positions)
                part = no_null_types(part)
                self._check_same_keys(rows, part)
                yield rows, part, {}
            return
        for start in range(0, len(order), slice_rows):
            rows = pa.array(order[start : start + slice_rows])
            yield rows, *self.take(rows)

    def _check_same_keys(self, rows: pa.Array, part: pa.Table) -> None:
        """The files are read twice (keys for the ids, then the rows): a row whose key
        changed in between would go out under another row's custom_id."""
        expected = self._keys.take(rows)
        got = part.select(expected.column_names)
        # Arrow's equality holds NaN unequal to itself: then compare the keys' texts (what
        # custom_ids are made of), as the first read made them
        names = expected.column_names
        if not got.equals(expected) and key_texts(got, names) != key_texts(expected, names):
            raise InputError(
                "the Parquet input changed while it was read (a row's key differs between the "
                "two reads); nothing was sent: run again once the files are written"
            )

    def take(self, rows: pa.Array) -> tuple[pa.Table, dict[int, list[NonUnicodeCell]]]:
        """The rows at ``rows`` (positions), and those whose text had to be escaped."""
        if self.frame is None:
            taken = self.table.take(rows)
            if not self.bad_text:
                return taken, {}
            bad = self.bad_text
            return taken, {i: bad[r] for i, r in enumerate(rows.to_pylist()) if r in bad}
        part, bad_text = to_table(self.frame.take(rows.to_numpy()))
        part = no_null_types(part)
        if not part.schema.equals(self.schema, check_metadata=False):
            try:
                part = part.cast(self.schema)
            except ARROW_ERRORS as exc:
                raise InputError(
                    f"the input's rows do not share one type per column: {exc}"
                ) from None
        return part, bad_text


def _frame_schema(frame: pd.DataFrame) -> pa.Schema | None:
    """The Arrow schema of the whole frame (all-null columns as text), without converting it;
    None when only converting it can tell (mixed types, which the conversion names)."""
    try:
        schema = pa.Schema.from_pandas(frame, preserve_index=False)
    except (*ARROW_ERRORS, UnicodeEncodeError, TypeError, ValueError):
        return None
    for i, field_ in enumerate(schema):
        if pa.types.is_null(field_.type):
            schema = schema.set(i, field_.with_type(pa.string()))
    return schema
