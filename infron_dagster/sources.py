"""Where input rows come from when they are not an upstream asset: Parquet on storage.

Example::

    src = ParquetSource("s3://lake/reviews/date={partition_key}/*.parquet")
    table = src.read("2026-11-24")
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

__all__ = ["ParquetInput", "ParquetSource"]

PLACEHOLDER = "{partition_key}"
# A key holding one of these would become a path step or a glob once put in the template.
_PATH_CHARACTERS = "/\\"
_GLOB_CHARACTERS = "*?[]{}"


@dataclass(frozen=True)
class ParquetSource:
    """Parquet input named by a path template with ``{partition_key}``: a file, folder or glob.

    A partition key is an identity, never a path or a pattern: the key is put into the
    template as one literal piece of one path step. A key that would change which files are
    read, one holding ``/`` or ``\\``, a glob character (``* ? [ ] { }``), a control
    character, or equal to ``.``, ``..`` or the empty string, is refused with a ValueError
    naming it, so ``../../secret/x`` cannot read outside the source and ``*`` cannot read
    (and send, and pay for) every partition. Globbing comes from the template only.

    Example::

        ParquetSource("/data/reviews/{partition_key}.parquet").path_for("2026-11-24")
        # -> '/data/reviews/2026-11-24.parquet'
        ParquetSource("/data/{partition_key}.parquet").path_for("../x")
        # -> Traceback (most recent call last):
        #    ValueError: partition key '../x' cannot be put into a path: it holds '/' ...
    """

    path_template: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.path_template, str) or not self.path_template:
            raise ValueError(
                f"path_template must be a non-empty path string, not {self.path_template!r}"
            )

    def path_for(self, partition_key: str | None) -> str:
        """The template with the partition key filled in (refused if the key is not safe)."""
        if PLACEHOLDER not in self.path_template:
            return self.path_template
        if partition_key is None:
            raise ValueError("path_template uses {partition_key} but the asset is unpartitioned")
        _check_key(partition_key)
        return self.path_template.replace(PLACEHOLDER, partition_key)

    def files(self, partition_key: str | None) -> list[UPath]:
        """The Parquet files for a partition, sorted; empty when nothing matches."""
        path = UPath(self.path_for(partition_key), **self.storage_options)
        if any(ch in path.path for ch in "*?["):
            return sorted(
                (
                    UPath(p, protocol=path.protocol, **self.storage_options)
                    for p in path.fs.glob(path.path)
                ),
                key=str,
            )
        if path.is_dir():
            return sorted((p for p in path.rglob("*.parquet")), key=str)
        return [path] if path.exists() else []

    def read(self, partition_key: str | None) -> pa.Table:
        """All rows of a partition as one table. A missing path is an error naming it."""
        return self.input(partition_key).read()

    def input(self, partition_key: str | None) -> ParquetInput:
        """A partition's files, to be read a row group at a time (what prepare does: a
        10M-row partition never sits in memory whole). A missing path is an error naming it.

        Example::

            rows = ParquetSource("/data/reviews/{partition_key}.parquet").input("2026-11-24")
            rows.num_rows, rows.schema.names
            # -> (10000000, ['review_id', 'text'])
        """
        files = self.files(partition_key)
        if not files:
            raise FileNotFoundError(f"no Parquet input at {self.path_for(partition_key)!r}")
        return ParquetInput(tuple(files))


class ParquetInput:
    """The Parquet files of one partition, read by columns or a row group at a time.

    The files' schemas are unified as ``pa.concat_tables(promote_options="permissive")``
    would (a column missing from a file is null there, int32 and int64 make int64), so
    streaming reads what reading whole would.

    Example::

        rows = ParquetInput((UPath("/data/a.parquet"), UPath("/data/b.parquet")))
        keys = rows.read(["review_id"])
        for batch in rows.iter_batches(65_536):
            print(batch.num_rows)
    """

    def __init__(self, files: tuple[UPath, ...]) -> None:
        self.files = files
        schemas, counts = [], []
        for file in files:
            with file.open("rb") as fh:
                meta = pq.ParquetFile(fh)
                schemas.append(meta.schema_arrow)
                counts.append(meta.metadata.num_rows)
        self.schema = _decoded(pa.unify_schemas(schemas, promote_options="permissive"))
        self.num_rows = sum(counts)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """These columns (all by default) of every row, in file order."""
        parts = list(self.iter_batches(None, columns))
        return pa.concat_tables(parts) if parts else self._schema(columns).empty_table()

    def iter_batches(
        self, batch_size: int | None, columns: list[str] | None = None
    ) -> Iterator[pa.Table]:
        """The rows in file order, ``batch_size`` at most at a time (None: a file at a time),
        under the unified schema."""
        schema = self._schema(columns)
        for file in self.files:
            with file.open("rb") as fh:
                parquet = pq.ParquetFile(fh)
                present = [c for c in schema.names if c in parquet.schema_arrow.names]
                if batch_size is None:
                    yield _conform(parquet.read(columns=present), schema)
                    continue
                for batch in parquet.iter_batches(batch_size=batch_size, columns=present):
                    yield _conform(pa.Table.from_batches([batch]), schema)

    def _schema(self, columns: list[str] | None) -> pa.Schema:
        if columns is None:
            return self.schema
        return pa.schema([self.schema.field(c) for c in columns], metadata=self.schema.metadata)


def _decoded(schema: pa.Schema) -> pa.Schema:
    """Dictionary-encoded (categorical) columns as their values: each file and row group has
    a dictionary of its own, which cannot be merged or spilled as one column."""
    for i, column in enumerate(schema):
        if pa.types.is_dictionary(column.type):
            schema = schema.set(i, column.with_type(column.type.value_type))
    return schema


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` under ``schema``: the columns it lacks as nulls, in the schema's order."""
    columns = [
        table.column(f.name).cast(f.type)
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _check_key(key: str) -> None:
    """Refuse a partition key that would be more than one literal piece of a path step."""
    problem = _key_problem(key)
    if problem is not None:
        raise ValueError(
            f"partition key {key!r} cannot be put into a path: it {problem}; a partition key "
            "names one partition and must never become a path or a glob"
        )


def _key_problem(key: object) -> str | None:
    if not isinstance(key, str):
        return f"is a {type(key).__name__}, not a string"
    if key in ("", ".", ".."):
        return "would name the folder itself or its parent"
    for ch in key:
        if ch in _PATH_CHARACTERS:
            return f"holds {ch!r}, a path separator"
        if ch in _GLOB_CHARACTERS:
            return f"holds {ch!r}, a glob character"
        if unicodedata.category(ch) == "Cc":  # NUL, newline, DEL: never part of a real name
            return f"holds the control character {ch!r}"
        if unicodedata.category(ch) == "Cs":  # a lone surrogate cannot be encoded as a path
            return f"holds {ch!a}, which is not valid text"
    return None
