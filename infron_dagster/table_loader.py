"""Load ``<name>_results`` and ``<name>_failed`` as inputs of downstream assets.

Collection writes the hive-partitioned Parquet itself (``results/partition=<p>/part-0.parquet``)
and reports a ``MaterializeResult`` without a value, so the IO manager here only reads: its
``handle_output`` writes nothing. A downstream input annotated ``pd.DataFrame`` (or left
unannotated) gets a DataFrame, one annotated ``pa.Table`` gets an Arrow table.

Which partitions are read follows Dagster's partition mapping:

- a downstream partitioned like the pipeline gets its own partition, with the table's own
  columns;
- an unpartitioned downstream (all partitions), or one mapped to several upstream partitions
  (a partition range), gets them all, one after the other, with a ``partition`` column holding
  each row's partition key, as ``pyarrow.dataset`` or DuckDB read the hive table (always a
  string here: the Dagster key itself, also for keys stored hashed);
- a partition whose file is missing (never collected, or still in flight) is an error naming
  the partition and its path, unless the input's metadata says
  ``{"allow_missing_partitions": True}`` (Dagster's own convention): then it is skipped.

Example::

    import dagster as dg
    import pandas as pd
    @dg.asset(partitions_def=daily)
    def top_topics(review_sentiment_results: pd.DataFrame) -> pd.DataFrame:
        return review_sentiment_results.groupby("sentiment").size().to_frame("n")
    @dg.asset(ins={"rows": dg.AssetIn("review_sentiment_results",
                                      metadata={"allow_missing_partitions": True})})
    def all_time(rows: pa.Table) -> None:  # every collected day, with a partition column
        ...

The collect assets name their IO manager :func:`tables_io_manager_key` (``<name>_tables``) and
the pipeline supplies it. Another code location reads the same tables by declaring them as
external assets with that key (see :class:`InfronTableIOManager`); without Dagster, use
:func:`read_batch_table`.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dagster as dg
import pandas as pd
import pyarrow as pa

from .columns import HIDDEN_COLUMNS
from .errors import InfronDagsterError
from .storage import BatchStorage

__all__ = [
    "ALLOW_MISSING_PARTITIONS",
    "KINDS",
    "PARTITION_COLUMN",
    "InfronTableIOManager",
    "MissingPartitionError",
    "read_batch_table",
    "tables_io_manager_key",
]

PARTITION_COLUMN = "partition"
ALLOW_MISSING_PARTITIONS = "allow_missing_partitions"
KINDS = ("results", "failed")
_READ_THREADS = 8


class MissingPartitionError(InfronDagsterError, FileNotFoundError):
    """A partition of a results/failed table has no file: it was never collected.

    Example::

        try:
            read_batch_table(store, "results", ["2026-11-30"])
        except MissingPartitionError as exc:
            print(exc.partition_key, exc.path)
    """

    def __init__(self, storage: BatchStorage, kind: str, partition_key: str | None) -> None:
        self.partition_key = partition_key
        self.path = str(storage.table_path(kind, partition_key))
        which = (
            "the unpartitioned table" if partition_key is None else f"partition {partition_key!r}"
        )
        super().__init__(
            f"{which} of {storage.name}_{kind} has no Parquet file at {self.path}: it has not "
            f"been collected (materialize {storage.name}_results for it, or let "
            f"{storage.name}_sensor collect it when its batches end)"
        )


def tables_io_manager_key(name: str) -> str:
    """The resource key of a pipeline's table IO manager: ``<name>_tables``.

    Example:
        >>> tables_io_manager_key("review_sentiment")
        'review_sentiment_tables'
    """
    return f"{name}_tables"


def read_batch_table(
    storage: BatchStorage,
    kind: str,
    partition_keys: Sequence[str | None],
    *,
    partition_column: bool = False,
    allow_missing: bool = False,
) -> pa.Table:
    """Read partitions of the ``results`` or ``failed`` table that collection wrote.

    Reads through the storage's own file system (local or ``s3://``), one file per
    partition, in the order given. With ``partition_column`` each row carries its partition
    key in a ``partition`` string column (None for an unpartitioned pipeline). Columns a
    partition lacks are null in its rows; internal columns never appear. A missing file
    raises :class:`MissingPartitionError`, or is skipped with ``allow_missing``.

    Example::

        store = BatchStorage("s3://lake/llm", "review_sentiment")
        read_batch_table(store, "results", ["2026-11-24", "2026-11-25"],
                         partition_column=True).column_names[-1]
        # -> 'partition'
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    keys = list(partition_keys)
    with ThreadPoolExecutor(max_workers=min(_READ_THREADS, max(1, len(keys)))) as pool:
        read = list(pool.map(lambda key: _read_partition(storage, kind, key), keys))
    tables = []
    for key, table in zip(keys, read, strict=True):
        if table is None:
            if not allow_missing:
                raise MissingPartitionError(storage, kind, key)
            continue
        table = _public_columns(table)
        if partition_column:
            if PARTITION_COLUMN in table.column_names:
                raise ValueError(
                    f"{storage.name}_{kind} already has a {PARTITION_COLUMN!r} column; "
                    "cannot add the partition key"
                )
            value = None if key is None else str(key)
            table = table.append_column(
                pa.field(PARTITION_COLUMN, pa.string()),
                pa.array([value] * table.num_rows, pa.string()),
            )
        tables.append(table)
    if not tables:
        fields = [pa.field(PARTITION_COLUMN, pa.string())] if partition_column else []
        return pa.schema(fields).empty_table()
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="permissive")


def _read_partition(storage: BatchStorage, kind: str, key: str | None) -> pa.Table | None:
    # fresh(): an object store's cached listing must not hide a file collected since.
    path = storage.fresh(storage.table_path(kind, key))
    try:
        return storage.read_table(path)
    except FileNotFoundError:
        return None


def _public_columns(table: pa.Table) -> pa.Table:
    hidden = [c for c in table.column_names if c in HIDDEN_COLUMNS]
    return table.drop_columns(hidden) if hidden else table


class InfronTableIOManager(dg.IOManager):
    """Loads a pipeline's ``<name>_results`` / ``<name>_failed`` for downstream assets.

    Read-only: collection writes the files, so :meth:`handle_output` writes nothing.
    :meth:`load_input` reads the partitions the downstream asks for (see the module
    docstring) and returns a ``pd.DataFrame``, or a ``pa.Table`` when the input is
    annotated so.

    The pipeline supplies one for its own collect assets. Elsewhere (another code
    location), declare the tables as external assets on the same key:

    Example::

        key = tables_io_manager_key("review_sentiment")
        results = dg.AssetSpec("review_sentiment_results", partitions_def=daily)
        defs = dg.Definitions(
            assets=[results.with_io_manager_key(key), top_topics],
            resources={key: InfronTableIOManager(
                BatchStorage("s3://lake/llm", "review_sentiment"))})
    """

    def __init__(self, storage: BatchStorage) -> None:
        self.storage = storage

    def __repr__(self) -> str:
        return f"InfronTableIOManager({self.storage!r})"

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        """Nothing to store: collection has written the Parquet already."""
        if obj is not None:
            raise dg.DagsterInvariantViolationError(
                f"{context.asset_key.to_user_string()} is written by collection; its IO "
                f"manager only reads, so an output value ({type(obj).__name__}) cannot be stored"
            )

    def load_input(self, context: dg.InputContext) -> pd.DataFrame | pa.Table:
        """The partitions of the upstream table this input maps to."""
        kind = self._kind(context.asset_key)
        wanted = _output_type(context)
        if context.has_asset_partitions:
            keys: list[str | None] = list(context.asset_partition_keys)
            several = len(keys) != 1 or not context.has_partition_key
        else:
            keys, several = [None], False
        allow_missing = bool((context.definition_metadata or {}).get(ALLOW_MISSING_PARTITIONS))
        table = read_batch_table(
            self.storage, kind, keys, partition_column=several, allow_missing=allow_missing
        )
        context.log.debug(
            f"loaded {table.num_rows} rows of {context.asset_key.to_user_string()} "
            f"from {len(keys)} partition(s) under {self.storage.table_root(kind)}"
        )
        return table if wanted is pa.Table else table.to_pandas()

    def _kind(self, asset_key: dg.AssetKey) -> str:
        last = asset_key.path[-1]
        for kind in KINDS:
            if last == f"{self.storage.name}_{kind}":
                return kind
        raise dg.DagsterInvariantViolationError(
            f"{asset_key.to_user_string()} is not a table of the {self.storage.name} pipeline; "
            f"its IO manager loads only {self.storage.name}_results and {self.storage.name}_failed"
        )


def _output_type(context: dg.InputContext) -> type:
    """``pa.Table`` or ``pd.DataFrame``, from the input's annotation (none: DataFrame)."""
    annotation = context.dagster_type.typing_type
    wanted = annotation
    if typing.get_origin(wanted) in _UNIONS:  # Optional[X]
        args = [a for a in typing.get_args(wanted) if a is not type(None)]
        wanted = args[0] if len(args) == 1 else wanted
    if wanted in (Any, object, None):
        return pd.DataFrame
    if isinstance(wanted, type) and issubclass(wanted, pa.Table):
        return pa.Table
    if wanted is pd.DataFrame:
        return pd.DataFrame
    raise dg.DagsterInvariantViolationError(
        f"input {context.name!r} loading {context.asset_key.to_user_string()} is annotated "
        f"{annotation!r}; Infron tables load as pandas.DataFrame or pyarrow.Table"
    )


_UNIONS = (typing.Union, types.UnionType)
