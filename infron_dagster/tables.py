"""Build the results and failed Arrow tables from per-request outcomes.

Pure data code: joins outcomes back to input rows on ``custom_id``, puts the structured
output in typed columns (read by :mod:`structured`), and guarantees that every input row
lands in exactly one of the two tables.

Example::

    results, failed = build_tables(inputs, invalid, final, spec=spec)
    results.num_rows + failed.num_rows == inputs.num_rows + invalid.num_rows
    # -> True
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .columns import (
    COST,
    CUSTOM_ID,
    ERROR_CODE,
    ERROR_MESSAGE,
    HIDDEN_COLUMNS,
    INVALID_STRUCTURED_OUTPUT,
    MISSING_RESULT,
    OUTPUT_NAMES,
    RETRYABLE_CODES,
)
from .outcomes import OUTCOME_SCHEMA, outcomes_to_table
from .results import Outcome
from .row_costs import RowCosts
from .spec import RequestSpec
from .structured import StructuredOutputs, parse_structured, schema_fields

__all__ = [
    "EMBEDDING_TYPE",
    "FinalOutcome",
    "TableSummary",
    "TablesBuilder",
    "build_tables",
    "final_table",
]

# Embeddings are float32 on the wire (and in base64); float64 doubled the table for nothing.
# Partitions written before as float64 still read: the loader promotes per partition.
EMBEDDING_TYPE = pa.list_(pa.float32())


@dataclass(frozen=True)
class FinalOutcome:
    """A request's outcome after merging attempts, with the attempt it came from."""

    outcome: Outcome
    attempt: int


def build_tables(
    inputs: pa.Table,
    invalid: pa.Table,
    final: Mapping[str, FinalOutcome] | pa.Table,
    *,
    spec: RequestSpec,
    keep_columns: Sequence[str] | None = None,
    invalid_attempt: int = 1,
) -> tuple[pa.Table, pa.Table]:
    """Split ``inputs`` into (results, failed); ``invalid`` rows all go to failed.

    ``final`` is the merged outcome per custom_id: a mapping of :class:`FinalOutcome`, or
    the table :func:`final_table` makes (what collection streams through, a slice at a time,
    with :class:`TablesBuilder`).
    """
    if not isinstance(final, pa.Table):
        final = final_table(final)
    builder = TablesBuilder(inputs.schema, final, spec=spec, keep_columns=keep_columns)
    results, failed = builder.split(inputs)
    failed = pa.concat_tables([failed, builder.invalid_rows(invalid, invalid_attempt)])
    return results, failed


FINAL_SCHEMA = pa.schema([*OUTCOME_SCHEMA, pa.field("attempt", pa.int64())])


def final_table(final: Mapping[str, FinalOutcome]) -> pa.Table:
    """Merged per-request outcomes (a mapping) as the outcome table, with their attempts."""
    items = list(final.values())
    table = outcomes_to_table([f.outcome for f in items], range(len(items)), None)
    return table.append_column("attempt", pa.array([f.attempt for f in items], pa.int64()))


@dataclass
class TableSummary:
    """What the asset's metadata needs of a written table, without reading it back."""

    schema: pa.Schema
    rows: int = 0
    sums: Counter[str] = field(default_factory=Counter)
    error_counts: Counter[str] = field(default_factory=Counter)
    cost_by_attempt: dict[int, float] = field(default_factory=dict)

    @property
    def cost(self) -> float:
        """The ``cost`` column's sum (rows of unknown cost count as nothing)."""
        return sum(self.cost_by_attempt.values())

    def add(self, part: pa.Table) -> None:
        self.rows += part.num_rows
        for name in ("prompt_tokens", "completion_tokens", "retryable"):
            if name in part.column_names:
                self.sums[name] += int(pc.sum(part.column(name)).as_py() or 0)
        if ERROR_CODE in part.column_names:
            for code, n in zip(*_value_counts(part.column(ERROR_CODE)), strict=True):
                self.error_counts[code] += n
        if COST in part.column_names and part.num_rows:
            by = part.select(["attempt", COST]).group_by("attempt").aggregate([(COST, "sum")])
            attempts, costs = by.column("attempt").to_pylist(), by.column(f"{COST}_sum").to_pylist()
            for attempt, cost in zip(attempts, costs, strict=True):
                if attempt is not None and cost is not None:
                    self.cost_by_attempt[attempt] = self.cost_by_attempt.get(attempt, 0.0) + cost


def _value_counts(column: pa.ChunkedArray) -> tuple[list[Any], list[int]]:
    counts = pc.value_counts(column)
    return counts.field("values").to_pylist(), counts.field("counts").to_pylist()


class TablesBuilder:
    """Builds results and failed rows for slices of the inputs snapshot, joined on
    ``custom_id`` to the merged outcomes; every input row lands in exactly one table.

    The schemas are fixed before the first slice (from the inputs' schema, the spec and the
    response schema), so the slices can be written as row groups of one file each.
    """

    def __init__(
        self,
        inputs_schema: pa.Schema,
        final: pa.Table,
        *,
        spec: RequestSpec,
        keep_columns: Sequence[str] | None = None,
        costs: RowCosts | None = None,
    ) -> None:
        self.spec = spec
        self.costs = costs
        self.keep = _kept(inputs_schema, keep_columns)
        self.final = final  # taken from on every slice: best in one chunk (see collect)
        self.final_ids = final.column(CUSTOM_ID).combine_chunks()
        self.final_ok = final.column("ok").fill_null(False).to_numpy()
        inputs = _input_schema(inputs_schema, self.keep)
        self.fields = schema_fields(spec, set(inputs.names))
        self.results_schema = _results_schema(inputs, spec, self.fields)
        self.failed_schema = pa.schema([*inputs, *FAILURE_FIELDS], metadata=inputs_schema.metadata)
        self.results_schema = self.results_schema.with_metadata(inputs_schema.metadata)

    @property
    def input_columns(self) -> list[str]:
        """The snapshot columns a slice needs (read only these)."""
        return [*self.keep, CUSTOM_ID]

    def outcome_rows(self, custom_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Each id's row in the outcomes (-1: none). One call for all the inputs: each call
        hashes every outcome id again."""
        found = pc.index_in(custom_ids, value_set=self.final_ids)
        return found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)

    def split(self, inputs: pa.Table, where: np.ndarray | None = None) -> tuple[pa.Table, pa.Table]:
        """(results, failed) rows of one slice of the inputs snapshot; ``where``: its rows'
        :meth:`outcome_rows`, when known."""
        if where is None:
            where = self.outcome_rows(inputs.column(CUSTOM_ID))
        # The outcomes are taken once per table, by position
        ok = np.zeros(len(where), bool)
        ok[where >= 0] = self.final_ok[where[where >= 0]]
        ok_rows = np.flatnonzero(ok)
        texts = self.final.column("text").take(pa.array(where[ok_rows]))
        structured = parse_structured(texts, self.spec)
        good = np.zeros(len(ok), bool)
        good[ok_rows[structured.good]] = True
        results = self._results(inputs, where, good, structured)
        bad_messages = np.full(len(ok), None, object)
        bad_messages[ok_rows[~structured.good]] = structured.problems
        failed = self._failed(inputs, where, ~good, bad_messages)
        return results, failed

    def _outcomes(self, where: np.ndarray) -> pa.Table:
        """The outcome rows at ``where`` (-1: a null row)."""
        return self.final.take(pa.array(where, mask=where < 0))

    def _results(
        self, inputs: pa.Table, where: np.ndarray, rows: np.ndarray, structured: StructuredOutputs
    ) -> pa.Table:
        picked = np.flatnonzero(rows)
        table = _input_columns(inputs, self.keep).take(pa.array(picked))
        got = self._outcomes(where[picked])
        columns: dict[str, pa.Array] = {}
        if self.spec.endpoint == "/v1/embeddings":
            columns["embedding"] = got.column("embedding").cast(EMBEDDING_TYPE)
        else:
            columns["response_text"] = got.column("text").cast(pa.string())
        for (column, prop), typ in self.fields:
            columns[column] = structured.values[prop].cast(typ)
        prompt, completion = got.column("prompt_tokens"), got.column("completion_tokens")
        either = pc.or_(pc.is_valid(prompt), pc.is_valid(completion))
        total = pc.add(prompt.fill_null(0), completion.fill_null(0))
        columns["model"] = got.column("model")
        columns["finish_reason"] = got.column("finish_reason")
        columns["prompt_tokens"] = prompt
        columns["completion_tokens"] = completion
        columns["total_tokens"] = pc.if_else(either, total, pa.scalar(None, pa.int64()))
        columns[COST] = self._cost(got)
        columns["batch_id"] = got.column("batch_id")
        columns["attempt"] = got.column("attempt")
        for name, column in columns.items():
            table = table.append_column(name, column)
        return table.cast(self.results_schema)

    def _failed(
        self, inputs: pa.Table, where: np.ndarray, rows: np.ndarray, bad_messages: np.ndarray
    ) -> pa.Table:
        picked = np.flatnonzero(rows)
        table = _input_columns(inputs, self.keep).take(pa.array(picked))
        got = self._outcomes(where[picked])
        structured_bad = pa.array(bad_messages[rows], pa.string())
        is_bad = pc.is_valid(structured_bad)
        missing = pc.is_null(got.column(CUSTOM_ID))
        code = pc.if_else(
            is_bad,
            pa.scalar(INVALID_STRUCTURED_OUTPUT),
            pc.if_else(missing, pa.scalar(MISSING_RESULT), got.column("error_code")),
        )
        message = pc.if_else(
            is_bad,
            structured_bad,
            pc.if_else(
                missing,
                pa.scalar("no line for this request in any result file"),
                got.column("error_message"),
            ),
        )
        status = pc.if_else(is_bad, pa.scalar(None, pa.int64()), got.column("http_status"))
        table = _append_failure_columns(
            table, code, message, status, got.column("attempt"), got.column("batch_id")
        )
        # A failed answer may still have been billed (invalid structured output, say).
        return table.append_column(COST, self._cost(got)).cast(self.failed_schema)

    def _cost(self, got: pa.Table) -> pa.Array:
        if self.costs is None or not got.num_rows:
            return pa.nulls(got.num_rows, pa.float64())
        prompt, completion = got.column("prompt_tokens"), got.column("completion_tokens")
        return self.costs(prompt, completion, got.column("batch_id"))

    def invalid_rows(self, invalid: pa.Table, attempt: int) -> pa.Table:
        """The rows prepare never sent, as failed rows of ``attempt``."""
        n = invalid.num_rows
        present = [c for c in self.keep if c in invalid.column_names]
        table = _input_columns(invalid, present)
        null_text = pa.nulls(n, pa.string())
        codes = invalid.column(ERROR_CODE) if n else null_text
        messages = invalid.column(ERROR_MESSAGE) if n else null_text
        table = _append_failure_columns(
            table,
            codes,
            messages,
            pa.nulls(n, pa.int64()),
            pa.array([attempt] * n, pa.int64()),
            null_text,
            retryable=pa.array([False] * n, pa.bool_()),
        )
        table = table.append_column(COST, pa.array([0.0] * n, pa.float64()))  # never sent
        return table.cast(self.failed_schema) if n else self.failed_schema.empty_table()


FAILURE_FIELDS = [
    pa.field(ERROR_CODE, pa.string()),
    pa.field(ERROR_MESSAGE, pa.string()),
    pa.field("http_status", pa.int64()),
    pa.field("retryable", pa.bool_()),
    pa.field("attempt", pa.int64()),
    pa.field("batch_id", pa.string()),
    pa.field(COST, pa.float64()),  # null: unknown; 0 for rows never sent
]
_RETRYABLE = pa.array(sorted(RETRYABLE_CODES), pa.string())


def _retryable(code: pa.Array, status: pa.Array) -> pa.Array:
    """``is_retryable`` by columns: a 5xx, 408, 409 or 429 answer, or a retryable code."""
    by_status = pc.or_(
        pc.greater_equal(status, 500), pc.is_in(status, pa.array([408, 409, 429], pa.int64()))
    ).fill_null(False)
    return pc.or_(by_status, pc.is_in(code, value_set=_RETRYABLE).fill_null(False))


def _append_failure_columns(
    table: pa.Table,
    codes: Any,
    messages: Any,
    statuses: Any,
    attempts: Any,
    batches: Any,
    *,
    retryable: Any = None,
) -> pa.Table:
    if retryable is None:
        retryable = _retryable(codes, statuses)
    columns = {
        ERROR_CODE: codes,
        ERROR_MESSAGE: messages,
        "http_status": statuses,
        "retryable": retryable,
        "attempt": attempts,
        "batch_id": batches,
    }
    for name, column in columns.items():
        table = table.append_column(name, column)
    return table


def _input_schema(schema: pa.Schema, keep: list[str]) -> pa.Schema:
    fields = [schema.field(c) for c in [*keep, CUSTOM_ID]]
    return pa.schema(
        [f.with_name(f"input_{f.name}") if f.name in OUTPUT_NAMES else f for f in fields]
    )


def _results_schema(
    inputs: pa.Schema, spec: RequestSpec, fields: list[tuple[tuple[str, str], pa.DataType]]
) -> pa.Schema:
    if spec.endpoint == "/v1/embeddings":
        answer = [pa.field("embedding", EMBEDDING_TYPE)]
    else:
        answer = [pa.field("response_text", pa.string())]
    structured = [pa.field(column, typ) for (column, _), typ in fields]
    tail = [
        pa.field("model", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("total_tokens", pa.int64()),
        pa.field(COST, pa.float64()),
        pa.field("batch_id", pa.string()),
        pa.field("attempt", pa.int64()),
    ]
    return pa.schema([*inputs, *answer, *structured, *tail])


def _input_columns(table: pa.Table, keep: list[str]) -> pa.Table:
    selected = table.select([*keep, CUSTOM_ID])
    names = [f"input_{c}" if c in OUTPUT_NAMES else c for c in selected.column_names]
    return selected.rename_columns(names)


def _kept(inputs: pa.Schema, keep_columns: Sequence[str] | None) -> list[str]:
    if keep_columns is None:
        return [c for c in inputs.names if c != CUSTOM_ID and c not in HIDDEN_COLUMNS]
    missing = [c for c in keep_columns if c not in inputs.names]
    if missing:
        raise ValueError(f"keep_columns names {missing[0]!r}, which is not an input column")
    return list(keep_columns)
