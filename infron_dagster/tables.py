"""Build the results and failed Arrow tables from per-request outcomes.

Pure data code: joins outcomes back to input rows on ``custom_id``, turns structured output
into typed columns (types from the JSON schema), and guarantees that every input row lands in
exactly one of the two tables.

Example::

    results, failed = build_tables(inputs, invalid, final, spec=spec)
    results.num_rows + failed.num_rows == inputs.num_rows + invalid.num_rows
    # -> True
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

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
from .outcomes import OUTCOME_SCHEMA, outcomes_to_table, read_json_lines
from .results import Outcome
from .row_costs import RowCosts
from .spec import RequestSpec

__all__ = [
    "EMBEDDING_TYPE",
    "FinalOutcome",
    "TableSummary",
    "TablesBuilder",
    "arrow_type_for_schema",
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


def arrow_type_for_schema(schema: Mapping[str, Any]) -> pa.DataType:
    """The Arrow type a JSON-schema value maps to (objects without properties -> JSON text).

    Example:
        >>> arrow_type_for_schema({"type": ["integer", "null"]})
        DataType(int64)
    """
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if "enum" in schema and kind is None:
        kind = "string"
    if kind == "integer":
        return pa.int64()
    if kind == "number":
        return pa.float64()
    if kind == "boolean":
        return pa.bool_()
    if kind == "array":
        return pa.list_(arrow_type_for_schema(schema.get("items") or {}))
    if kind == "object" and schema.get("properties"):
        props = schema["properties"]
        return pa.struct([pa.field(k, arrow_type_for_schema(v)) for k, v in props.items()])
    return pa.string()


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
        self.fields = _schema_fields(spec, set(inputs.names))
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

    def split(
        self, inputs: pa.Table, where: np.ndarray | None = None
    ) -> tuple[pa.Table, pa.Table]:
        """(results, failed) rows of one slice of the inputs snapshot; ``where``: its rows'
        :meth:`outcome_rows`, when known."""
        if where is None:
            where = self.outcome_rows(inputs.column(CUSTOM_ID))
        # The outcomes are taken once per table, by position
        ok = np.zeros(len(where), bool)
        ok[where >= 0] = self.final_ok[where[where >= 0]]
        ok_rows = np.flatnonzero(ok)
        texts = self.final.column("text").take(pa.array(where[ok_rows]))
        structured = _structured(texts, self.spec)
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
        self, inputs: pa.Table, where: np.ndarray, rows: np.ndarray, structured: _Parsed
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


# --- structured output ---------------------------------------------------------------------


@dataclass
class _Parsed:
    """Structured outputs of some answers: ``good`` marks those that fit the schema;
    ``values`` holds each property's column for the good ones (in order), ``problems``
    why each of the others failed (in order)."""

    good: np.ndarray
    values: dict[str, pa.Array]
    problems: list[str]


_ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError, ValueError)
_SCALARS = (pa.string(), pa.int64(), pa.float64(), pa.bool_())
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SMALLEST_SPLIT = 64


def _structured(texts: pa.Array, spec: RequestSpec) -> _Parsed:
    """Parse the answers' structured output (when the spec asks for it) by columns.

    ``pyarrow.json`` reads the texts with the schema's types; a text it cannot take
    (another type, a missing required field, odd JSON) is parsed alone by the per-row
    rules, so the outcome of each row is what the per-row path gives.
    """
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    n = len(texts)
    schema = spec.response_schema
    props = (schema or {}).get("properties") or {}
    if schema is None:
        return _Parsed(np.ones(n, bool), {}, [])
    types = {prop: arrow_type_for_schema(sub) for prop, sub in props.items()}
    fast_rows = np.zeros(n, bool)
    fast: pa.Table | None = None
    if _fast_types(types.values()) and n:
        rows = np.flatnonzero(_object_texts(texts))
        rows, fast = _read_objects(texts, rows, pa.schema(list(types.items())))
        if fast is not None:
            rows, fast = _complete(rows, fast, props, schema.get("required") or [])
            fast_rows[rows] = True
    return _merge_parsed(texts, fast_rows, fast, types, spec)


def _object_texts(texts: pa.Array) -> np.ndarray:
    """The texts the fast reader may take: "{" first and "}" last, no control character (a
    raw newline would split the line) and no escaped surrogate. The others (also a
    pretty-printed or padded object) are read by the per-row rules, which decide alike.

    On the bytes with numpy: a regex per text costs as much as reading them.
    """
    texts = texts.cast(pa.large_string())
    n = len(texts)
    _, offsets_buf, data_buf = texts.buffers()
    if data_buf is None:
        return np.zeros(n, bool)
    offsets = np.frombuffer(offsets_buf, np.int64, count=texts.offset + n + 1)[texts.offset :]
    data = np.frombuffer(data_buf, np.uint8)
    starts, ends = offsets[:-1], offsets[1:]
    ok = (ends > starts) & texts.is_valid().to_numpy(zero_copy_only=False)
    ok[ok] = (data[starts[ok]] == ord("{")) & (data[ends[ok] - 1] == ord("}"))
    used = data[offsets[0] : offsets[-1]]
    odd = np.flatnonzero(used < 0x20)
    surrogates = [m.start() for m in _SURROGATE_ESCAPE.finditer(memoryview(used))]
    odd = np.concatenate([odd, np.array(surrogates, np.int64)]) + offsets[0]
    ok[np.searchsorted(offsets, odd, side="right") - 1] = False
    return ok


def _fast_types(types: Iterable[pa.DataType]) -> bool:
    """Only scalars and lists of scalars: what the fast reader types as Python would."""
    for typ in types:
        if pa.types.is_list(typ):
            typ = typ.value_type
        if typ not in _SCALARS:
            return False
    return True


def _read_objects(
    texts: pa.Array, rows: np.ndarray, schema: pa.Schema
) -> tuple[np.ndarray, pa.Table | None]:
    """``pyarrow.json`` over the texts at ``rows``; refused texts are split off."""
    if not len(rows):
        return rows, None
    taken = texts.take(pa.array(rows)).cast(pa.large_string())
    text = pa.large_string()
    lines = pc.binary_join_element_wise(taken, pa.scalar("\n", text), pa.scalar("", text))
    _, offsets_buf, data_buf = lines.buffers()
    offsets = np.frombuffer(offsets_buf, np.int64, count=len(lines) + 1)
    data = memoryview(data_buf)[offsets[0] : offsets[-1]]
    options = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    longest = pc.max(pc.binary_length(taken)).as_py()
    try:
        table = read_json_lines(data, longest, options)
        if table.num_rows == len(rows):
            return rows, table
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    if len(rows) <= _SMALLEST_SPLIT:
        return rows[:0], None
    half = len(rows) // 2
    first_rows, first = _read_objects(texts, rows[:half], schema)
    second_rows, second = _read_objects(texts, rows[half:], schema)
    parts = [t for t in (first, second) if t is not None]
    if not parts:
        return rows[:0], None
    return np.concatenate([first_rows, second_rows]), pa.concat_tables(parts)


def _complete(
    rows: np.ndarray, table: pa.Table, props: Mapping[str, Any], required: Sequence[str]
) -> tuple[np.ndarray, pa.Table]:
    """Keep the rows whose required fields are there and whose numbers a float holds
    exactly (the others get their verdict and message from the per-row rules)."""
    keep = np.ones(len(rows), bool)
    for prop in required:
        kinds = props[prop].get("type")
        kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
        if "null" not in kinds:
            keep &= table.column(prop).is_valid().to_numpy(zero_copy_only=False)
    for column in table.columns:
        keep &= ~_past_exact_floats(column.combine_chunks())
    if keep.all():
        return rows, table
    return rows[keep], table.filter(pa.array(keep))


def _past_exact_floats(values: pa.Array) -> np.ndarray:
    """Rows holding a float of magnitude 2**53 or more: an integer written there may have
    been rounded by the fast reader, where the per-row rules refuse it."""
    flat, parents = values, None
    if pa.types.is_list(values.type):
        flat, parents = pc.list_flatten(values), pc.list_parent_indices(values).to_numpy()
    past = np.zeros(len(values), bool)
    if not pa.types.is_floating(flat.type) or not len(flat):
        return past
    big = pc.greater_equal(pc.abs(flat), 2.0**53).fill_null(False).to_numpy(zero_copy_only=False)
    past[big if parents is None else parents[big]] = True
    return past


def _merge_parsed(
    texts: pa.Array,
    fast_rows: np.ndarray,
    fast: pa.Table | None,
    types: Mapping[str, pa.DataType],
    spec: RequestSpec,
) -> _Parsed:
    """The fast rows' columns and the per-row results of the rest, in row order."""
    good = fast_rows.copy()
    slow_values: dict[int, dict[str, Any]] = {}
    problems: dict[int, str] = {}
    for row in np.flatnonzero(~fast_rows).tolist():
        value, problem = _one_structured(texts[row].as_py(), spec, types)
        if problem is None:
            good[row] = True
            slow_values[row] = value
        else:
            problems[row] = problem
    values = {}
    order = np.argsort(
        np.concatenate([np.flatnonzero(fast_rows), list(slow_values)]), kind="stable"
    )
    for prop, typ in types.items():
        parts = []
        if fast is not None and fast.num_rows:
            parts.append(fast.column(prop).combine_chunks().cast(typ))
        if slow_values:
            parts.append(
                pa.array([_for_arrow(v.get(prop), typ) for v in slow_values.values()], typ)
            )
        merged = pa.concat_arrays(parts) if parts else pa.array([], typ)
        values[prop] = merged.take(pa.array(order, pa.int64())) if len(order) else merged
    return _Parsed(good, values, [problems[r] for r in np.flatnonzero(~good).tolist()])


def _one_structured(
    text: str | None, spec: RequestSpec, types: Mapping[str, pa.DataType]
) -> tuple[dict[str, Any], str | None]:
    """One answer's structured output by the per-row rules: (value, None) or (_, why not)."""
    try:
        value = json.loads(text or "")
        # Lone surrogates (from \ud800 escapes) cannot be written to Parquet.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError, UnicodeEncodeError):
        return {}, "model output is not valid JSON for the response schema"
    if not isinstance(value, dict):
        return {}, "model output is JSON but not an object"
    problem = _schema_mismatch(value, spec.response_schema or {})
    if problem:
        return {}, problem
    # A value that cannot take its field's Arrow type would change the column's type in
    # this partition (an integer past int64, 1e300 for an integer) and break the table.
    for prop, typ in types.items():
        try:
            pa.array([_for_arrow(value.get(prop), typ)], typ)
        except _ARROW_ERRORS:
            return {}, f"model output field {prop!r} does not fit the schema's type"
    return value, None


def _for_arrow(value: Any, typ: pa.DataType) -> Any:
    if pa.types.is_string(typ) and value is not None and not isinstance(value, str):
        return json.dumps(value)
    return value


_PY_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}


def _schema_mismatch(value: dict[str, Any], schema: Mapping[str, Any]) -> str | None:
    """Why a structured output does not fit the top-level property types, or None.

    A value of the wrong type would otherwise change the column's type in one partition
    (or be truncated, 2.5 -> 2) and break reading the whole table.
    """
    required = set(schema.get("required") or [])
    for prop, sub in (schema.get("properties") or {}).items():
        kinds = sub.get("type")
        kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
        item = value.get(prop)
        if item is None:
            if prop in required and "null" not in kinds:
                return f"model output lacks required field {prop!r}"
            continue
        allowed = tuple(t for k in kinds for t in _PY_TYPES.get(k, ()))
        is_bool_as_number = isinstance(item, bool) and "boolean" not in kinds
        whole_float = isinstance(item, float) and item.is_integer() and "integer" in kinds
        if allowed and (not isinstance(item, allowed) or is_bool_as_number) and not whole_float:
            return f"model output field {prop!r} is {type(item).__name__}, schema says {kinds}"
    return None


def _schema_fields(spec: RequestSpec, taken: set[str]) -> list[tuple[tuple[str, str], pa.DataType]]:
    props = (spec.response_schema or {}).get("properties") or {}
    fields = []
    for prop, sub in props.items():
        column = prop if prop not in taken and prop not in OUTPUT_NAMES else f"output_{prop}"
        fields.append(((column, prop), arrow_type_for_schema(sub)))
    return fields
