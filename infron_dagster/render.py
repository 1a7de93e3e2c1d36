"""Render request lines: a slice of rows -> the JSONL line of each row, or why it cannot be sent.

Pure data code, used by :mod:`prepare`. Two renderers give the same bytes:
:class:`ColumnRenderer` renders plain templates by columns, all rows at once;
:class:`RowRenderer` renders row by row what it cannot (``body_fn``, format specs and
conversions in the template). A row's own problem (a null template value, bytes that are
not UTF-8, a request over the size bound) fails only that row, as ``invalid_input``.

By columns, the bytes are exactly what the per-row renderer writes
(``json.dumps(line, ensure_ascii=False, separators=(",", ":"))``), because request hashes
and the fingerprint are computed over them and an upgrade must never send a partition
again: a line is the JSON of a sentinel request cut at its sentinels (fixed fragments,
computed once), with the JSON-escaped cell values put between the fragments. JSON escaping
is per character, so escaping the parts is escaping the whole.

Only plain templates (``{column}`` placeholders, no format spec or conversion) render
here; :meth:`ColumnRenderer.for_spec` returns None for anything else (and for ``body_fn``),
and the per-row renderer takes over.

Example::

    spec = RequestSpec(model="m", prompt_template="Hi {name}", key_columns=("id",))
    renderer = ColumnRenderer.for_spec(spec, max_request_bytes=1 << 20)
    out = renderer.render(pa.table({"name": ["Ann"]}), pa.array(["req-1"]))
    out.lines[0].as_py()
    # -> '{"custom_id":"req-1","method":"POST","url":"/v1/chat/completions","body":{"model":"m",...'
"""

from __future__ import annotations

import json
import math
import string
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .columns import INVALID_INPUT
from .spec import RequestSpec

__all__ = ["ColumnRenderer", "RenderedSlice", "RowRenderer", "line_buffer", "with_newlines"]

_SLOT = "\x00slot{}\x00"  # never in a template literal, a prompt or params: JSON escapes NUL
_ID_SLOT = "\x00id\x00"
# What JSON must escape in a string (encode_basestring's set, ensure_ascii=False).
_NEEDS_ESCAPE = r'[\x00-\x1f"\\]'
# A prompt holding one of these visible ASCII characters is not empty after strip().
_VISIBLE_ASCII = r"[!-~]"
_encode_basestring = json.encoder.encode_basestring  # type: ignore[attr-defined]


@dataclass
class RenderedSlice:
    """The lines of one slice: ``lines`` (without newlines) for the rows without a problem,
    in slice order; ``problems`` maps other rows to why they cannot be sent."""

    rows: np.ndarray  # slice positions of the rendered rows
    lines: pa.Array
    tokens: np.ndarray  # estimated input tokens of each rendered row
    problems: dict[int, str]


@dataclass(frozen=True)
class ColumnRenderer:
    """Renders plain-template requests for many rows at once."""

    literals: tuple[str, ...]  # between the placeholders (one more than columns)
    columns: tuple[str, ...]  # the column of each placeholder, in template order
    fragments: tuple[str, ...]  # the JSON line cut at the id slot and the value slots
    system_len: int
    max_bytes: int

    @classmethod
    def for_spec(cls, spec: RequestSpec, *, max_request_bytes: int) -> ColumnRenderer | None:
        """A renderer for ``spec``, or None when only the per-row renderer can render it."""
        if spec.body_fn is not None or spec.prompt_template is None:
            return None
        literals, columns, pending = [], [], ""
        for literal, name, format_spec, conversion in string.Formatter().parse(
            spec.prompt_template
        ):
            pending += literal  # "{{" and "}}" split a literal into several pieces
            if name is None:
                continue
            if format_spec or conversion:  # Python's formatting: rendered row by row
                return None
            literals.append(pending)
            columns.append(name)
            pending = ""
        literals.append(pending)
        fragments = _fragments(spec, literals)
        if fragments is None:
            return None
        return cls(
            literals=tuple(literals),
            columns=tuple(columns),
            fragments=fragments,
            system_len=len(spec.system_prompt or ""),
            max_bytes=max_request_bytes,
        )

    def render(
        self, rows: pa.Table, custom_ids: pa.Array, problems: dict[int, str]
    ) -> RenderedSlice:
        """The request lines of ``rows`` (a slice of the input) with their ``custom_ids``.

        ``problems`` holds the rows already known not to be sendable; it gains the rest.
        """
        texts: dict[str, pa.Array] = {}
        for column in dict.fromkeys(self.columns):
            texts[column] = _column_text(column, rows.column(column), problems)
        prompt_len = np.full(rows.num_rows, sum(len(lit) for lit in self.literals), np.int64)
        for column in self.columns:
            prompt_len += _utf8_length(texts[column])
        if not any(lit.strip() for lit in self.literals):
            _flag_empty_prompts(self, texts, problems)
        escaped = {c: _json_escaped(t) for c, t in texts.items()}
        text = pa.large_string()
        fragments = [pa.scalar(f, text) for f in self.fragments]
        parts: list[pa.Array | pa.Scalar] = [fragments[0], custom_ids.cast(text), fragments[1]]
        for column, fragment in zip(self.columns, fragments[2:], strict=True):
            parts += [escaped[column], fragment]
        lines = pc.binary_join_element_wise(*parts, pa.scalar("", text))
        # A null line (a row with a null value) has a problem already
        sizes = pc.binary_length(lines).fill_null(0).to_numpy(zero_copy_only=False)
        for row in np.flatnonzero(sizes > self.max_bytes).tolist():
            problems.setdefault(
                row, f"{INVALID_INPUT}: request is {sizes[row]} bytes, over {self.max_bytes}"
            )
        keep = np.ones(rows.num_rows, bool)
        keep[list(problems)] = False
        kept = np.flatnonzero(keep)
        if len(kept) < rows.num_rows:
            lines = lines.filter(pa.array(keep))
        tokens = (prompt_len[kept] + self.system_len) // 4 + 1
        return RenderedSlice(kept, lines, tokens, problems)


def _fragments(spec: RequestSpec, literals: list[str]) -> tuple[str, ...] | None:
    """The JSON line of a request whose id and values are slots, cut at the slots."""
    prompt = literals[0] + "".join(
        _SLOT.format(i) + literal for i, literal in enumerate(literals[1:])
    )
    line = {"custom_id": _ID_SLOT, "method": "POST", "url": spec.endpoint}
    line["body"] = spec.build_body(prompt)  # type: ignore[assignment]
    try:
        text = json.dumps(line, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        return None  # the per-row renderer names the problem in every row
    slots = [json.dumps(_ID_SLOT)[1:-1]]
    slots += [json.dumps(_SLOT.format(i))[1:-1] for i in range(len(literals) - 1)]
    fragments = []
    for slot in slots:
        if text.count(slot) != 1:  # the prompt is not in the body exactly once
            return None
        head, text = text.split(slot)
        fragments.append(head)
    fragments.append(text)
    return tuple(fragments)


def _column_text(column: str, values: pa.ChunkedArray, problems: dict[int, str]) -> pa.Array:
    """A template column as the text ``format_map`` puts in the prompt; nulls noted."""
    values = values.combine_chunks()
    null = values.is_null()
    if pa.types.is_floating(values.type):
        null = pc.or_kleene(null, pc.is_nan(values))  # NaN is pandas' null
    _note(problems, null, f"{INVALID_INPUT}: column {column!r} is null")
    kind = values.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return values.cast(pa.large_string())
    if pa.types.is_integer(kind):  # Arrow writes integers as str() does
        return values.cast(pa.large_string())
    if (
        pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_fixed_size_binary(kind)
    ):
        return _decoded_text(column, values, problems)
    # Python's text of anything else (floats, booleans, dates, lists): what format_map writes
    texts = [None if v is None else format(v, "") for v in values.to_pylist()]
    return pa.array(texts, pa.large_string())


def _decoded_text(column: str, values: pa.Array, problems: dict[int, str]) -> pa.Array:
    """Binary cells as UTF-8 text; a cell that is not UTF-8 fails its own row."""
    texts: list[str | None] = []
    for row, value in enumerate(values.to_pylist()):
        if value is None:
            texts.append(None)
            continue
        try:
            texts.append(value.decode("utf-8"))
        except UnicodeDecodeError as exc:
            texts.append(None)
            problems.setdefault(
                row,
                f"{INVALID_INPUT}: column {column!r} holds bytes that are not UTF-8 text "
                f"({exc.reason} at byte {exc.start})",
            )
    return pa.array(texts, pa.large_string())


def _note(problems: dict[int, str], mask: pa.Array, reason: str) -> None:
    """Give ``reason`` to the masked rows that have no earlier problem (template order)."""
    if mask.null_count:
        mask = mask.fill_null(False)
    if not pc.any(mask).as_py():
        return
    for row in np.flatnonzero(mask.to_numpy(zero_copy_only=False)).tolist():
        problems.setdefault(row, reason)


def _utf8_length(texts: pa.Array) -> np.ndarray:
    """Characters per row (0 for null), as ``len`` counts them."""
    return pc.utf8_length(texts).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def _flag_empty_prompts(
    renderer: ColumnRenderer, texts: dict[str, pa.Array], problems: dict[int, str]
) -> None:
    """Rows whose prompt is only whitespace (possible only when the literals are)."""
    visible = None
    for column in renderer.columns:
        found = pc.match_substring_regex(texts[column], _VISIBLE_ASCII).fill_null(False)
        visible = found if visible is None else pc.or_(visible, found)
    candidates = np.ones(len(next(iter(texts.values()))), bool)
    if visible is not None:
        candidates = ~visible.to_numpy(zero_copy_only=False)
    for row in np.flatnonzero(candidates).tolist():
        if row in problems:
            continue
        prompt = renderer.literals[0] + "".join(
            str(texts[c][row].as_py()) + lit
            for c, lit in zip(renderer.columns, renderer.literals[1:], strict=True)
        )
        if not prompt.strip():
            problems[row] = f"{INVALID_INPUT}: prompt is empty after rendering"


def _json_escaped(texts: pa.Array) -> pa.Array:
    """Each text as it appears between the quotes of a JSON string (json.dumps' bytes).

    Backslashes, quotes, newlines, carriage returns and tabs (what reviews hold) are
    replaced by Arrow; a text with any other control character goes through json's own
    encoder.
    """
    needs = pc.match_substring_regex(texts, _NEEDS_ESCAPE).fill_null(False)
    if not pc.any(needs).as_py():
        return texts
    out = texts
    for char, escape in _SIMPLE_ESCAPES:
        out = pc.replace_substring(out, char, escape)
    rare = pc.match_substring_regex(texts, _RARE_ESCAPE).fill_null(False)
    if pc.any(rare).as_py():
        rows = np.flatnonzero(rare.to_numpy(zero_copy_only=False))
        escaped = [_encode_basestring(texts[int(r)].as_py())[1:-1] for r in rows]
        out = pc.replace_with_mask(out, rare, pa.array(escaped, pa.large_string()))
    return out


# In this order: a backslash first, so that the escapes added after it are not escaped again.
_SIMPLE_ESCAPES = (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t"))
_RARE_ESCAPE = r"[\x00-\x08\x0b\x0c\x0e-\x1f]"


def with_newlines(lines: pa.Array) -> pa.Array:
    """Each line followed by a newline: the bytes of a JSONL file."""
    newline = pa.scalar(b"\n" if pa.types.is_large_binary(lines.type) else "\n", lines.type)
    return pc.binary_join_element_wise(lines, newline, pa.scalar(newline.as_py()[:0], lines.type))


def line_buffer(lines: pa.Array) -> tuple[memoryview, np.ndarray]:
    """The bytes of a string array and each value's (start) offset into them, plus the end.

    Lines are contiguous in an Arrow string array, so a run of them is written at once.
    """
    if isinstance(lines, pa.ChunkedArray):
        lines = lines.combine_chunks()
    large = pa.types.is_large_string(lines.type) or pa.types.is_large_binary(lines.type)
    _, offsets_buf, data_buf = lines.buffers()
    count = lines.offset + len(lines) + 1
    offsets = np.frombuffer(offsets_buf, dtype=np.int64 if large else np.int32, count=count)
    offsets = offsets[lines.offset :].astype(np.int64)
    data = memoryview(data_buf) if data_buf is not None else memoryview(b"")
    return data, offsets


# --- row by row -----------------------------------------------------------------------------


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


class RowRenderer:
    """The per-row renderer over a slice, for what :class:`ColumnRenderer` cannot render
    (``body_fn``, format specs and conversions in the template)."""

    def __init__(self, spec: RequestSpec, *, max_request_bytes: int) -> None:
        self.spec, self.max_bytes = spec, max_request_bytes

    def render(
        self, rows: pa.Table, custom_ids: pa.Array, problems: dict[int, str]
    ) -> RenderedSlice:
        renderer = _RowLines(rows, self.spec, max_request_bytes=self.max_bytes)
        lines, kept, tokens = [], [], []
        for row, custom_id in enumerate(custom_ids.to_pylist()):
            if row in problems:
                continue
            line, problem, row_tokens = renderer.render(row, custom_id)
            if problem is not None:
                problems[row] = problem
                continue
            lines.append(line)
            kept.append(row)
            tokens.append(row_tokens)
        return RenderedSlice(
            np.array(kept, np.int64),
            pa.array(lines, pa.large_binary()),
            np.array(tokens, np.int64),
            problems,
        )


class _RowLines:
    """Turns one row into one request line, or a reason it cannot be sent."""

    def __init__(self, table: pa.Table, spec: RequestSpec, *, max_request_bytes: int) -> None:
        self.spec = spec
        self.max_bytes = max_request_bytes
        self.columns = {c: table.column(c).to_pylist() for c in spec.template_columns}
        self.rows = table.to_pylist() if spec.body_fn is not None else None
        self.system_len = len(spec.system_prompt or "")

    def render(self, row: int, custom_id: str) -> tuple[bytes, str | None, int]:
        body, problem, prompt_len = self._body(row)
        if problem is not None:
            return b"", problem, 0
        line_obj = {
            "custom_id": custom_id,
            "method": "POST",
            "url": self.spec.endpoint,
            "body": body,
        }
        try:
            text = json.dumps(line_obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            return b"", f"{INVALID_INPUT}: request body cannot be serialised to JSON: {exc}", 0
        try:
            line = text.encode()
        except UnicodeEncodeError as exc:  # only body_fn output can still hold a lone surrogate
            source = "body_fn returned" if self.rows is not None else "request body holds"
            detail = f"a lone surrogate {text[exc.start]!a}"
            return b"", f"{INVALID_INPUT}: {source} text that is not valid Unicode ({detail})", 0
        if len(line) > self.max_bytes:
            return b"", f"{INVALID_INPUT}: request is {len(line)} bytes, over {self.max_bytes}", 0
        return line, None, (prompt_len + self.system_len) // 4 + 1

    def _body(self, row: int) -> tuple[dict[str, Any], str | None, int]:
        if self.rows is not None:
            assert self.spec.body_fn is not None
            try:
                body = self.spec.body_fn(self.rows[row])
            except Exception as exc:  # a user callable: any error is this row's problem
                return {}, f"{INVALID_INPUT}: body_fn raised {type(exc).__name__}: {exc}", 0
            if not isinstance(body, dict):
                return {}, f"{INVALID_INPUT}: body_fn returned {type(body).__name__}, not dict", 0
            return body, None, len(json.dumps(body, default=str))
        values = {}
        for column, cells in self.columns.items():
            value = cells[row]
            if _is_null(value):
                return {}, f"{INVALID_INPUT}: column {column!r} is null", 0
            if isinstance(value, (bytes, bytearray)):
                value, problem = _decoded(column, value)
                if problem is not None:
                    return {}, problem, 0
            values[column] = value
        try:
            prompt = self.spec.prompt_template.format_map(values)  # type: ignore[union-attr]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            columns = ", ".join(repr(c) for c in self.columns)
            reason = f"template cannot render this row's {columns}: {type(exc).__name__}: {exc}"
            return {}, f"{INVALID_INPUT}: {reason}", 0
        if not prompt.strip():
            return {}, f"{INVALID_INPUT}: prompt is empty after rendering", 0
        return self.spec.build_body(prompt), None, len(prompt)


def _decoded(column: str, value: bytes | bytearray) -> tuple[str, str | None]:
    """A binary cell as text, or the reason it fails its row.

    Why decode rather than refuse the column: Parquet written without the UTF8 annotation
    (Impala, Hive, older Spark) reads as binary, and ParquetSource has no hook to cast it,
    so refusing would block those tables outright. The old rendering, ``b'...'``, was never
    a usable prompt, so no valid request changes. Bytes that are not UTF-8 fail their own
    row only, naming the column, like a null does.
    """
    try:
        return bytes(value).decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return "", (
            f"{INVALID_INPUT}: column {column!r} holds bytes that are not UTF-8 text "
            f"({exc.reason} at byte {exc.start})"
        )
