"""Structured output -> typed columns: each answer's JSON read with the response schema's types.

Pure data code, used by :mod:`tables`. The types come from the JSON schema
(:func:`arrow_type_for_schema`); ``pyarrow.json`` reads the answers by columns, and an
answer it cannot take is parsed alone by the per-row rules, so each row's verdict is the
per-row one. An answer that does not fit the schema fails its row
(``invalid_structured_output``) rather than change a column's type in one partition.

Example:
    >>> from infron_dagster import RequestSpec
    >>> spec = RequestSpec(model="m", prompt_template="{t}", key_columns=("id",),
    ...                    response_schema={"type": "object",
    ...                                     "properties": {"score": {"type": "number"}}})
    >>> parsed = parse_structured(pa.array(['{"score": 0.5}', 'not json']), spec)
    >>> parsed.good.tolist(), parsed.values["score"].to_pylist(), parsed.problems
    ([True, False], [0.5], ['model output is not valid JSON for the response schema'])
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from .columns import OUTPUT_NAMES
from .outcomes import read_json_lines
from .spec import RequestSpec

__all__ = ["StructuredOutputs", "arrow_type_for_schema", "parse_structured", "schema_fields"]


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


@dataclass
class StructuredOutputs:
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


def parse_structured(texts: pa.Array, spec: RequestSpec) -> StructuredOutputs:
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
        return StructuredOutputs(np.ones(n, bool), {}, [])
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
) -> StructuredOutputs:
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
    return StructuredOutputs(good, values, [problems[r] for r in np.flatnonzero(~good).tolist()])


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


def schema_fields(spec: RequestSpec, taken: set[str]) -> list[tuple[tuple[str, str], pa.DataType]]:
    props = (spec.response_schema or {}).get("properties") or {}
    fields = []
    for prop, sub in props.items():
        column = prop if prop not in taken and prop not in OUTPUT_NAMES else f"output_{prop}"
        fields.append(((column, prop), arrow_type_for_schema(sub)))
    return fields
