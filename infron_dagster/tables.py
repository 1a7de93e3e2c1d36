"""Build the results and failed Arrow tables from per-request outcomes.

Pure data code: joins outcomes back to input rows on ``custom_id``, turns structured output
into typed columns (types from the JSON schema), and guarantees that every input row lands in
exactly one of the two tables.

Example:
    >>> results, failed = build_tables(inputs, invalid, final, spec=spec)
    >>> results.num_rows + failed.num_rows == inputs.num_rows + invalid.num_rows
    True
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from .prepare import CUSTOM_ID, ERROR_CODE, ERROR_MESSAGE, HIDDEN_COLUMNS
from .results import Outcome
from .spec import RequestSpec

__all__ = ["FinalOutcome", "arrow_type_for_schema", "build_tables"]

RESULT_COLUMNS = (
    "model",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "batch_id",
    "attempt",
)


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
    final: Mapping[str, FinalOutcome],
    *,
    spec: RequestSpec,
    keep_columns: Sequence[str] | None = None,
    invalid_attempt: int = 1,
) -> tuple[pa.Table, pa.Table]:
    """Split ``inputs`` into (results, failed); ``invalid`` rows all go to failed."""
    keep = _kept(inputs, keep_columns)
    ids = inputs.column(CUSTOM_ID).to_pylist()
    outcomes = [final.get(cid) for cid in ids]
    structured = _structured_outputs(outcomes, spec)
    ok_rows = [i for i, f in enumerate(outcomes) if f and f.outcome.ok and i not in structured.bad]
    ok_set = set(ok_rows)
    bad_rows = [i for i in range(len(ids)) if i not in ok_set]
    results = _results_table(inputs, keep, ok_rows, outcomes, structured, spec)
    failed = pa.concat_tables(
        [
            _failed_table(inputs, keep, bad_rows, outcomes, structured.bad),
            _invalid_rows(invalid, keep, invalid_attempt),
        ],
        promote_options="permissive",
    )
    return results, failed


# Names this library writes, plus the hive partition column: an input column with one of
# these names is kept as ``input_<name>`` so the tables never hold two columns of one name.
OUTPUT_NAMES = frozenset(
    {
        *RESULT_COLUMNS,
        "response_text",
        "embedding",
        ERROR_CODE,
        ERROR_MESSAGE,
        "http_status",
        "retryable",
        "partition",
    }
)


def _input_columns(table: pa.Table, keep: list[str]) -> pa.Table:
    selected = table.select([*keep, CUSTOM_ID])
    names = [f"input_{c}" if c in OUTPUT_NAMES else c for c in selected.column_names]
    return selected.rename_columns(names)


def _kept(inputs: pa.Table, keep_columns: Sequence[str] | None) -> list[str]:
    if keep_columns is None:
        return [c for c in inputs.column_names if c != CUSTOM_ID and c not in HIDDEN_COLUMNS]
    missing = [c for c in keep_columns if c not in inputs.column_names]
    if missing:
        raise ValueError(f"keep_columns names {missing[0]!r}, which is not an input column")
    return list(keep_columns)


@dataclass
class _Structured:
    values: dict[int, dict[str, Any]]
    bad: dict[int, str]


def _structured_outputs(outcomes: list[FinalOutcome | None], spec: RequestSpec) -> _Structured:
    parsed = _Structured({}, {})
    if spec.response_schema is None:
        return parsed
    for row, final in enumerate(outcomes):
        if not (final and final.outcome.ok):
            continue
        try:
            value = json.loads(final.outcome.text or "")
            # Lone surrogates (from \ud800 escapes) cannot be written to Parquet.
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except (ValueError, RecursionError, UnicodeEncodeError):
            parsed.bad[row] = "model output is not valid JSON for the response schema"
            continue
        if not isinstance(value, dict):
            parsed.bad[row] = "model output is JSON but not an object"
            continue
        problem = _schema_mismatch(value, spec.response_schema)
        if problem:
            parsed.bad[row] = problem
            continue
        parsed.values[row] = value
    _drop_untypable(parsed, spec)
    return parsed


_ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError, ValueError)


def _drop_untypable(parsed: _Structured, spec: RequestSpec) -> None:
    """Rows whose value cannot take its field's Arrow type fail as invalid_structured_output.

    One such row (an integer past int64, ``1e300`` for an integer, a nested mismatch) would
    otherwise change the column's type in this partition and break reading the whole table.
    Each column is tried whole first; rows are tried one by one only when it fails.
    """
    props = (spec.response_schema or {}).get("properties") or {}
    for prop, sub in props.items():
        typ = arrow_type_for_schema(sub)
        rows = list(parsed.values)
        values = [_for_arrow(parsed.values[r].get(prop), typ) for r in rows]
        try:
            pa.array(values, typ)
            continue
        except _ARROW_ERRORS:
            pass
        for row, value in zip(rows, values, strict=True):
            try:
                pa.array([value], typ)
            except _ARROW_ERRORS:
                del parsed.values[row]
                parsed.bad[row] = f"model output field {prop!r} does not fit the schema's type"


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


def _results_table(
    inputs: pa.Table,
    keep: list[str],
    rows: list[int],
    outcomes: list[FinalOutcome | None],
    structured: _Structured,
    spec: RequestSpec,
) -> pa.Table:
    idx = pa.array(rows, pa.int64())
    table = _input_columns(inputs, keep).take(idx)
    picked = [outcomes[r] for r in rows]
    out = [p.outcome for p in picked if p]
    if spec.endpoint == "/v1/embeddings":
        table = table.append_column(
            "embedding", pa.array([o.embedding for o in out], pa.list_(pa.float64()))
        )
    else:
        table = table.append_column("response_text", pa.array([o.text for o in out], pa.string()))
    for name, typ in _schema_fields(spec, set(table.column_names)):
        values = [structured.values.get(r, {}).get(name[1]) for r in rows]
        table = table.append_column(name[0], _typed(values, typ))
    prompt = [o.prompt_tokens for o in out]
    completion = [o.completion_tokens for o in out]
    total = [
        (p or 0) + (c or 0) if p is not None or c is not None else None
        for p, c in zip(prompt, completion, strict=True)
    ]
    extra = {
        "model": pa.array([o.model for o in out], pa.string()),
        "finish_reason": pa.array([o.finish_reason for o in out], pa.string()),
        "prompt_tokens": pa.array(prompt, pa.int64()),
        "completion_tokens": pa.array(completion, pa.int64()),
        "total_tokens": pa.array(total, pa.int64()),
        "batch_id": pa.array([o.batch_id for o in out], pa.string()),
        "attempt": pa.array([p.attempt for p in picked if p], pa.int64()),
    }
    for name, column in extra.items():
        table = table.append_column(name, column)
    return table


def _schema_fields(spec: RequestSpec, taken: set[str]) -> list[tuple[tuple[str, str], pa.DataType]]:
    props = (spec.response_schema or {}).get("properties") or {}
    fields = []
    for prop, sub in props.items():
        column = prop if prop not in taken and prop not in OUTPUT_NAMES else f"output_{prop}"
        fields.append(((column, prop), arrow_type_for_schema(sub)))
    return fields


def _typed(values: list[Any], typ: pa.DataType) -> pa.Array:
    values = [_for_arrow(v, typ) for v in values]
    try:
        return pa.array(values, typ)
    except _ARROW_ERRORS:
        # A value the schema did not promise: keep it, as JSON text, rather than lose the row.
        return pa.array([None if v is None else json.dumps(v) for v in values], pa.string())


def _failed_table(
    inputs: pa.Table,
    keep: list[str],
    rows: list[int],
    outcomes: list[FinalOutcome | None],
    bad_structured: dict[int, str],
) -> pa.Table:
    table = _input_columns(inputs, keep).take(pa.array(rows, pa.int64()))
    codes, messages, statuses, retryable, attempts, batches = [], [], [], [], [], []
    for row in rows:
        final = outcomes[row]
        outcome = final.outcome if final else None
        if row in bad_structured:
            code, message, status = "invalid_structured_output", bad_structured[row], None
        elif outcome is None:
            code, message, status = (
                "missing_result",
                "no line for this request in any result file",
                None,
            )
        else:
            code, message, status = outcome.error_code, outcome.error_message, outcome.http_status
        codes.append(code)
        messages.append(message)
        statuses.append(status)
        retryable.append(Outcome("", ok=False, error_code=code, http_status=status).retryable)
        attempts.append(final.attempt if final else None)
        batches.append(outcome.batch_id if outcome else None)
    return _append_failure_columns(table, codes, messages, statuses, retryable, attempts, batches)


def _append_failure_columns(
    table: pa.Table,
    codes: list[Any],
    messages: list[Any],
    statuses: list[Any],
    retryable: list[Any],
    attempts: list[Any],
    batches: list[Any],
) -> pa.Table:
    columns = {
        ERROR_CODE: pa.array(codes, pa.string()),
        ERROR_MESSAGE: pa.array(messages, pa.string()),
        "http_status": pa.array(statuses, pa.int64()),
        "retryable": pa.array(retryable, pa.bool_()),
        "attempt": pa.array(attempts, pa.int64()),
        "batch_id": pa.array(batches, pa.string()),
    }
    for name, column in columns.items():
        table = table.append_column(name, column)
    return table


def _invalid_rows(invalid: pa.Table, keep: list[str], attempt: int) -> pa.Table:
    n = invalid.num_rows
    present = [c for c in keep if c in invalid.column_names]
    table = _input_columns(invalid, present)
    return _append_failure_columns(
        table,
        invalid.column(ERROR_CODE).to_pylist() if n else [],
        invalid.column(ERROR_MESSAGE).to_pylist() if n else [],
        [None] * n,
        [False] * n,
        [attempt] * n,
        [None] * n,
    )
