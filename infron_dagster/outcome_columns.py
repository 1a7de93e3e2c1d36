"""The outcome columns of the result lines that ``pyarrow.json`` read and settles plainly.

Pure data code, used by :mod:`outcomes`. A block of result lines read by columns
(:class:`BlockFields` over its struct fields) holds, for most lines, all an outcome needs:
an answer with text or a vector, or an error with a code and a message. Those lines become
outcome rows here (:func:`plain_outcomes`), with exactly what the per-line parser of
:mod:`results` would give them; any line the columns cannot settle plainly is left to it.

Example:
    >>> import io, pyarrow.json as pj
    >>> line = (b'{"custom_id": "r1", "response": {"status_code": 200, "body": '
    ...         b'{"choices": [{"message": {"content": "hi"}}]}}}\\n')
    >>> parse = pj.ParseOptions(explicit_schema=LINE_SCHEMA, unexpected_field_behavior="ignore")
    >>> table = pj.read_json(io.BytesIO(line), parse_options=parse)
    >>> plain, rest = plain_outcomes(table, np.array([0]), pa.array([line]))
    >>> plain.columns["text"].to_pylist(), rest.tolist()
    (['hi'], [])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "LINE_SCHEMA",
    "OUTCOME_FIELDS",
    "OUTCOME_SCHEMA",
    "BlockFields",
    "PlainOutcomes",
    "plain_outcomes",
]

# The outcome table: one row per result line (see outcomes.read_outcome_table).
OUTCOME_SCHEMA = pa.schema(
    [
        ("custom_id", pa.string()),
        ("ok", pa.bool_()),
        ("text", pa.large_string()),
        ("embedding", pa.list_(pa.float64())),
        ("model", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("error_code", pa.string()),
        ("error_message", pa.string()),
        ("http_status", pa.int64()),
        ("batch_id", pa.string()),
        ("seq", pa.int64()),  # the line's place in what was read: duplicates keep the order
    ]
)
OUTCOME_FIELDS = [f.name for f in OUTCOME_SCHEMA]

_ERROR = pa.struct(
    [
        ("code", pa.string()),
        ("type", pa.string()),
        ("message", pa.string()),
        ("error", pa.struct([("code", pa.string())])),  # nested errors: the per-line parser
    ]
)
_USAGE = pa.struct(
    [
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("input_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
    ]
)
_CHOICE = pa.struct(
    [
        ("message", pa.struct([("content", pa.large_string())])),
        ("finish_reason", pa.string()),
    ]
)
_BODY = pa.struct(
    [
        ("model", pa.string()),
        ("choices", pa.list_(_CHOICE)),
        ("data", pa.list_(pa.struct([("embedding", pa.list_(pa.float64()))]))),
        ("usage", _USAGE),
        ("error", _ERROR),
    ]
)
LINE_SCHEMA = pa.schema(
    [
        ("custom_id", pa.string()),
        ("response", pa.struct([("status_code", pa.int64()), ("body", _BODY)])),
        ("error", _ERROR),
        # An object here is an Anthropic-style line: read by the per-line parser. Another
        # type makes the fast reader refuse the block, which sends the line there too.
        ("result", pa.struct([])),
    ]
)
# Control characters: printable() escapes them, so a label holding one is not plain.
_CONTROL = r"[\x00-\x1f\x7f]"


@dataclass
class PlainOutcomes:
    """The outcome columns of the lines the fast reader settled, at ``rows`` of the block."""

    rows: np.ndarray
    columns: dict[str, pa.Array]

    def take_rows(self, seqs: np.ndarray, batch_id: str | None) -> pa.Table:
        n = len(self.rows)
        if not n:
            return OUTCOME_SCHEMA.empty_table()
        arrays = dict(self.columns)
        arrays["batch_id"] = pa.array([batch_id] * n, pa.string())
        arrays["seq"] = pa.array(seqs[self.rows], pa.int64())
        columns = [arrays[f].cast(OUTCOME_SCHEMA.field(f).type) for f in OUTCOME_FIELDS]
        return pa.table(columns, schema=OUTCOME_SCHEMA)


def plain_outcomes(
    table: pa.Table | None, rows: np.ndarray, lines: pa.Array
) -> tuple[PlainOutcomes, np.ndarray]:
    """Split the fast reader's rows into plain outcomes and rows for the per-line parser."""
    if table is None or not len(rows):
        return PlainOutcomes(rows[:0], {}), rows[:0]
    g = BlockFields(table, lambda: lines.take(pa.array(rows)))
    answer = g.answer()
    top_error = g.top_error()
    body_error = g.body_error()
    plain = pc.or_(pc.or_(answer, top_error), body_error)
    plain = pc.and_(plain, g.anthropic.is_null()).fill_null(False)
    plain_np = plain.to_numpy(zero_copy_only=False)
    columns = g.columns(answer, top_error)
    if not plain_np.all():
        picked = pa.array(np.flatnonzero(plain_np))
        columns = {name: col.take(picked) for name, col in columns.items()}
    return PlainOutcomes(rows[plain_np], columns), rows[~plain_np]


def _first(lists: pa.Array) -> pa.Array:
    """The first element of each list (null for a null or empty list)."""
    shortest = pc.min(pc.list_value_length(lists)).as_py()
    if shortest is None:
        return pa.nulls(len(lists), lists.type.value_type)
    if shortest > 0:  # no empty list: the kernel does it (it refuses an empty one)
        return pc.list_element(lists, 0)
    heads = pc.list_slice(lists, 0, 1)
    values = pc.list_flatten(heads)
    index = np.full(len(lists), -1, np.int64)
    index[pc.list_parent_indices(heads).to_numpy()] = np.arange(len(values))
    return values.take(pa.array(index, mask=index < 0))


class BlockFields:
    """The struct fields of a fast-read block, and which lines are plainly settled."""

    def __init__(self, table: pa.Table, lines: Callable[[], pa.Array]) -> None:
        self.n = table.num_rows
        self.lines = lines  # the block's lines, taken only when needed (a copy)
        self.custom_id = table.column("custom_id").combine_chunks()
        response = self.response = table.column("response").combine_chunks()
        self.status = pc.struct_field(response, "status_code")
        body = pc.struct_field(response, "body")
        self.model = pc.struct_field(body, "model")
        self.choices = pc.struct_field(body, "choices")
        choice = _first(self.choices)
        self.content = pc.struct_field(pc.struct_field(choice, "message"), "content")
        self.finish_reason = pc.struct_field(choice, "finish_reason")
        self.data = pc.struct_field(body, "data")
        self.vector = pc.struct_field(_first(self.data), "embedding")
        self.usage = pc.struct_field(body, "usage")
        self.body_err = pc.struct_field(body, "error")
        self.error = table.column("error").combine_chunks()
        self.anthropic = table.column("result").combine_chunks()

    # --- which lines are plain ------------------------------------------------------------

    def _id_ok(self) -> pa.Array:
        return pc.greater(pc.binary_length(self.custom_id), 0)

    def answer(self) -> pa.Array:
        """A 2xx/3xx answer whose text or vector the columns hold, with readable usage."""
        status_ok = pc.and_(pc.greater_equal(self.status, 200), pc.less(self.status, 400))
        chat = pc.is_valid(self.content)
        embed = self._vector_plain()
        if pc.any(embed).as_py():
            # "choices" decides before "data" does, even null: only a line without it embeds
            # (and without an escape, which could spell the key); an error in the body of
            # an embedding is the per-line parser's to read.
            no_choices_key = self._lines_without('"choices"', "\\u")
            embed = pc.and_(pc.and_(no_choices_key, embed), self.body_err.is_null())
        out = pc.and_(pc.and_(status_ok, self.error.is_null()), pc.or_(chat, embed))
        out = pc.and_(out, pc.and_(self._tokens_plain(), self._labels_plain()))
        return pc.and_(out, self._id_ok()).fill_null(False)

    def _vector_plain(self) -> pa.Array:
        """A vector of finite numbers (the per-line parser refuses a null inside, and decides
        on an infinity: an integer too large for a float is one here, an error there)."""
        flat = pc.list_flatten(self.vector)
        odd = pc.invert(pc.is_finite(flat)).fill_null(True)
        bad = np.zeros(self.n, bool)
        if pc.any(odd).as_py():
            parents = pc.list_parent_indices(self.vector).to_numpy()
            bad[parents[odd.to_numpy(zero_copy_only=False)]] = True
        return pc.and_(pc.is_valid(self.vector), pa.array(~bad))

    def _tokens_plain(self) -> pa.Array:
        """No token count that only the per-line parser can settle: a null count beside
        an Anthropic-style one (absent or null cannot be told apart by columns)."""
        out = pa.array(np.ones(self.n, bool))
        pairs = (("prompt_tokens", "input_tokens"), ("completion_tokens", "output_tokens"))
        for name, other in pairs:
            mine = pc.struct_field(self.usage, name)
            theirs = pc.struct_field(self.usage, other)
            ambiguous = pc.and_(mine.is_null(), pc.is_valid(theirs))
            out = pc.and_(out, pc.invert(ambiguous.fill_null(False)))
        return out

    def _labels_plain(self) -> pa.Array:
        """Model and finish reason kept as they are by printable(): short, no controls."""
        return pc.and_(_plain_label(self.model, 200), _plain_label(self.finish_reason, 200))

    def top_error(self) -> pa.Array:
        """An ``error`` object with a code (or type) and a message, beside a response with a
        status code or beside nothing (a response without one, or a body at the top, gives
        the per-line parser another status)."""
        out = pc.and_(self._error_plain(self.error), self._id_ok()).fill_null(False)
        if not pc.any(out).as_py():
            return out
        with_status = pc.and_(pc.is_valid(self.response), pc.is_valid(self.status))
        alone = pc.and_(pc.is_null(self.response), self._lines_without('"body"', "\\u"))
        return pc.and_(out, pc.or_(with_status, alone)).fill_null(False)

    def _lines_without(self, *needles: str) -> pa.Array:
        """Lines that hold none of ``needles`` (bytes, as written: keys may be escaped)."""
        lines = self.lines()
        found = pc.match_substring(lines, needles[0])
        for needle in needles[1:]:
            found = pc.or_(found, pc.match_substring(lines, needle))
        return pc.invert(found)

    def body_error(self) -> pa.Array:
        """A 4xx/5xx answer whose body holds an error with a code (or type) and a message."""
        status = pc.and_(pc.greater_equal(self.status, 400), pc.less_equal(self.status, 599))
        out = pc.and_(pc.and_(status, self.error.is_null()), self._error_plain(self.body_err))
        return pc.and_(out, self._id_ok()).fill_null(False)

    @staticmethod
    def _error_plain(error: pa.Array) -> pa.Array:
        if error.null_count == len(error):  # no error at all (the usual block of answers)
            return pa.array(np.zeros(len(error), bool))
        nested = pc.struct_field(error, "error")
        out = pc.and_(pc.is_valid(error), nested.is_null())
        out = pc.and_(out, _plain_label(_error_code(error), 100, empty_ok=False))
        message = pc.struct_field(error, "message")
        return pc.and_(out, _plain_label(message, 2000, empty_ok=False)).fill_null(False)

    # --- the outcome columns --------------------------------------------------------------

    def _either(self, top: pa.Array, field: Callable[[pa.Array], pa.Array]) -> pa.Array:
        """``field`` of the top-level error where ``top``, else of the body's error."""
        return pc.if_else(top, field(self.error), field(self.body_err))

    def columns(self, answer: pa.Array, top_error: pa.Array) -> dict[str, pa.Array]:
        chat = pc.is_valid(self.content)
        failed = pc.invert(answer)
        valid_status = pc.and_(pc.greater_equal(self.status, 100), pc.less_equal(self.status, 599))
        # A top-level error takes its status from the response beside it, if any
        status = _where(valid_status.fill_null(False), self.status)
        answer_chat = pc.and_(answer, chat)
        return {
            "custom_id": self.custom_id,
            "ok": answer,
            "text": _where(answer_chat, self.content),
            "embedding": _where(pc.and_(answer, pc.invert(chat)), self.vector),
            "model": _where(answer, self.model),
            "finish_reason": _where(answer_chat, self.finish_reason),
            "prompt_tokens": _where(answer, _tokens(self.usage, "prompt_tokens", "input_tokens")),
            "completion_tokens": _where(
                answer, _tokens(self.usage, "completion_tokens", "output_tokens")
            ),
            "error_code": _where(failed, self._either(top_error, _error_code)),
            "error_message": _where(failed, self._either(top_error, _message)),
            "http_status": _where(failed, status),
        }


def _where(mask: pa.Array, values: pa.Array) -> pa.Array:
    """``values`` where ``mask`` (no nulls) holds, else null; as they are (no copy, no
    kernel: a list kernel is slow) when no value is dropped."""
    dropped = pc.and_(pc.is_valid(values), pc.invert(mask))
    if not pc.any(dropped).as_py():
        return values
    return pc.if_else(mask, values, pa.scalar(None, values.type))


def _message(error: pa.Array) -> pa.Array:
    return pc.struct_field(error, "message")


def _error_code(error: pa.Array) -> pa.Array:
    """``code or type or "error"``, as the per-line parser takes it."""
    code = pc.struct_field(error, "code")
    kind = pc.struct_field(error, "type")
    has_code = pc.greater(pc.binary_length(code), 0).fill_null(False)
    has_kind = pc.greater(pc.binary_length(kind), 0).fill_null(False)
    return pc.if_else(has_code, code, pc.if_else(has_kind, kind, pa.scalar("error", code.type)))


def _plain_label(values: pa.Array, limit: int, *, empty_ok: bool = True) -> pa.Array:
    """Text printable() keeps as it is (or a null, which the parser drops alike)."""
    values = values.cast(pa.large_string())
    short = pc.less_equal(pc.utf8_length(values), limit)
    clean = pc.invert(pc.match_substring_regex(values, _CONTROL))
    out = pc.and_(short, clean)
    if not empty_ok:
        out = pc.and_(out, pc.greater(pc.utf8_length(values), 0))
        return out.fill_null(False)
    return out.fill_null(True)


def _tokens(usage: pa.Array, name: str, other: str) -> pa.Array:
    """A count as ``_tokens`` keeps it: 0 <= n < 2**53, else null."""
    value = pc.coalesce(pc.struct_field(usage, name), pc.struct_field(usage, other))
    sane = pc.and_(pc.greater_equal(value, 0), pc.less(value, 2**53))
    return pc.if_else(sane, value, pa.scalar(None, pa.int64()))
