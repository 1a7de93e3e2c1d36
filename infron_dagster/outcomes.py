"""Result files -> an Arrow table of outcomes, one row per result line, by columns.

Pure data code, used by :mod:`collect`. Each block of whole lines is read by
``pyarrow.json`` with an explicit schema of the line shape; the lines whose outcome the
columns settle plainly (an answer with text or a vector, an error with a code and a message)
become rows at once. Every other line, and every block the fast reader refuses (a type it
does not expect, a duplicate key, a line that is not JSON), goes through the per-line parser
of :mod:`results`, so each of its guarantees holds: a bad line fails its row, never the file;
an over-long line fails its row as ``result_too_large``; the counts of the report are the
per-line parser's. One known difference: JSON nested deeper than Python's recursion limit
(about 1,000 levels) in a field the columns ignore is read here; the per-line parser fails
that row as ``unparseable_result``.

Example:
    >>> line = (b'{"custom_id": "r1", "response": {"status_code": 200, "body": '
    ...         b'{"choices": [{"message": {"content": "hi"}}]}}}\\n')
    >>> table = read_outcome_table(io.BytesIO(line), ParseReport(), "batch_1", first_seq=0)
    >>> table.column_names[:3]
    ['custom_id', 'ok', 'text']
    >>> table.column("text").to_pylist()
    ['hi']
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from .outcome_columns import LINE_SCHEMA, OUTCOME_FIELDS, OUTCOME_SCHEMA, plain_outcomes
from .results import DEFAULT_MAX_LINE_BYTES, Outcome, ParseReport, parse_counted, too_large_outcome

__all__ = [
    "OUTCOME_SCHEMA",
    "outcomes_to_table",
    "read_json_lines",
    "read_outcome_table",
    "redact_table",
]

_PARSE = pj.ParseOptions(explicit_schema=LINE_SCHEMA, unexpected_field_behavior="ignore")
# A block the fast reader refuses is split in two until the refused lines stand alone.
_SMALLEST_SPLIT = 64
_JSON_BLOCK = 1 << 20  # pyarrow.json's unit of work: a read is parsed on every core
_READ_BYTES = 16 << 20  # a block of lines: what memory is set by, with the line bound
# Text that cannot be kept as it is: control characters (printable() escapes them) or an
# escaped surrogate (not valid Unicode). Lines holding one go through the per-line parser.
_SURROGATE_ESCAPE = r"\\u[dD][89a-fA-F]"
_SURROGATE_BYTES = re.compile(_SURROGATE_ESCAPE.encode())
_LIMITS = {"model": 200, "finish_reason": 200, "error_code": 100, "error_message": 2000}


def read_outcome_table(
    source: IO[bytes],
    report: ParseReport,
    batch_id: str | None,
    *,
    first_seq: int,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> pa.Table:
    """Every usable line of one result file as an outcome row (see the module docstring)."""
    parts: list[pa.Table] = []
    seq = first_seq
    for block in _line_blocks(source, max_line_bytes):
        if isinstance(block, _TooLarge):
            if not block.head.strip():  # blank, however long: skipped uncounted, as per line
                seq += 1
                continue
            outcome = too_large_outcome(block.head, max_line_bytes, report)
            report.lines += 1
            if outcome is not None:
                parts.append(outcomes_to_table([outcome], [seq], batch_id))
            seq += 1
            continue
        table, seq = _block_outcomes(block.data, block.ends, report, batch_id, seq)
        parts.append(table)
    if not parts:
        return OUTCOME_SCHEMA.empty_table()
    return pa.concat_tables(parts)


@dataclass(frozen=True)
class _TooLarge:
    head: bytes


@dataclass(frozen=True)
class _Block:
    """Whole lines, and where each ends (its newline) in ``data``."""

    data: bytes
    ends: np.ndarray


def _line_blocks(source: IO[bytes], limit: int) -> Iterator[_Block | _TooLarge]:
    """Blocks of whole lines (each at most ``limit`` bytes), and the head of each longer line.

    Memory is set by the block size and ``limit``, never by the file or the longest line.
    """
    pending = b""
    skipping: bytes | None = None  # the head of an over-long line whose end is not read yet
    while piece := source.read(_READ_BYTES):
        if skipping is not None:
            end = piece.find(b"\n")
            if end < 0:
                continue
            yield _TooLarge(skipping)
            skipping, piece = None, piece[end + 1 :]
        pending = pending + piece if pending else piece
        last = pending.rfind(b"\n")
        if last >= 0:
            yield from _split_long(pending[: last + 1], limit)
            pending = pending[last + 1 :]
        if len(pending) > limit:  # no newline within the bound: the rest is skipped
            skipping, pending = pending[:4096], b""
    if skipping is not None:
        yield _TooLarge(skipping)
    elif pending:
        yield from _split_long(pending + b"\n", limit)


def _split_long(block: bytes, limit: int) -> Iterator[_Block | _TooLarge]:
    """``block`` with each line over ``limit`` (without its newline) set apart."""
    ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10).astype(np.int64)
    starts = np.concatenate(([0], ends[:-1] + 1))
    long_lines = np.flatnonzero(ends - starts > limit)
    start, first = 0, 0  # the next line's byte, and its number
    for i in long_lines.tolist():
        if i > first:
            yield _Block(block[start : starts[i]], ends[first:i] - start)
        yield _TooLarge(block[starts[i] : min(starts[i] + 4096, ends[i])])
        start, first = int(ends[i]) + 1, i + 1
    if first < len(ends):
        yield _Block(block[start:] if start else block, ends[first:] - start)


def _block_outcomes(
    block: bytes, ends: np.ndarray, report: ParseReport, batch_id: str | None, seq: int
) -> tuple[pa.Table, int]:
    """The outcomes of one block of whole lines (it ends in a newline); the next line number."""
    lines, starts = _lines_array(block, ends)
    count = len(lines)
    raw = np.frombuffer(block, np.uint8)
    # An object on one line: "{" first, "}" last (blank and odd lines go line by line)
    shaped = (
        (ends > starts) & (raw[starts] == ord("{")) & (raw[np.maximum(ends - 1, 0)] == ord("}"))
    )
    candidate = shaped & _no_carriage_return(block, starts)
    candidate &= _valid_utf8(block, lines)
    rows = np.flatnonzero(candidate)
    whole = block if len(rows) == count else None
    fast_rows, fast = _fast_parse(lines, ends - starts + 1, rows, whole, block=block)
    plain, _ = plain_outcomes(fast, fast_rows, lines)
    settled = np.zeros(count, bool)
    settled[plain.rows] = True
    slow = _slow_outcomes(lines, np.flatnonzero(~settled), report, seq)
    report.lines += len(plain.rows)  # the per-line parser counted its own lines
    seqs = np.arange(seq, seq + count)
    parts = [plain.take_rows(seqs, batch_id), outcomes_to_table(*slow, batch_id)]
    return pa.concat_tables([t for t in parts if t.num_rows] or parts[:1]), seq + count


def _lines_array(block: bytes, ends: np.ndarray) -> tuple[pa.Array, np.ndarray]:
    """The lines of ``block`` as a binary array over the block itself (no copy), each value
    with its newline; and where each line starts in the block."""
    starts = np.concatenate(([0], ends[:-1] + 1)).astype(np.int64)
    offsets = np.concatenate(([0], ends + 1)).astype(np.int64)
    array = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(ends), [None, pa.py_buffer(offsets), pa.py_buffer(block)]
    )
    return array, starts


def _valid_utf8(block: bytes, lines: pa.Array) -> np.ndarray:
    """Lines that are UTF-8 text (pyarrow.json does not check: a line that is not would
    come out as a string that is not text, where the per-line parser fails its row)."""
    offsets = pa.py_buffer(np.array([0, len(block)], np.int64))
    whole = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), 1, [None, offsets, pa.py_buffer(block)]
    )
    try:
        whole.cast(pa.large_string())  # Arrow's vectorised check: the usual block passes
        return np.ones(len(lines), bool)
    except pa.ArrowInvalid:
        pass
    ok = np.ones(len(lines), bool)
    for i, line in enumerate(lines.to_pylist()):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            ok[i] = False
    return ok


def _no_carriage_return(block: bytes, starts: np.ndarray) -> np.ndarray:
    """Lines without a raw CR. pyarrow.json also ends its blocks at a CR: a line such as
    ``{..}\\r null {..}`` could start a block with ``null``, which crashes pyarrow 26's reader
    (a segfault, not an error). No JSON writer puts a raw CR in a line."""
    ok = np.ones(len(starts), bool)
    if b"\r" in block:  # a byte search (memchr): the usual block has none
        crs = np.flatnonzero(np.frombuffer(block, np.uint8) == 13)
        ok[np.searchsorted(starts, crs, side="right") - 1] = False
    return ok


def _no_surrogate(lines: pa.Array, block: bytes) -> np.ndarray:
    """Lines without an escaped surrogate (a valid pair too: the escape is all bytes tell)."""
    if _SURROGATE_BYTES.search(block) is None:  # the usual block: one search, no per-line pass
        return np.ones(len(lines), bool)
    # Per line, on the bytes (no UTF-8 check, no copy)
    text = lines.cast(pa.large_string(), safe=False)
    odd = pc.match_substring_regex(text, _SURROGATE_ESCAPE)
    return ~odd.fill_null(True).to_numpy(zero_copy_only=False)


def _fast_parse(
    lines: pa.Array,
    sizes: np.ndarray,
    rows: np.ndarray,
    whole: bytes | None = None,
    *,
    block: bytes | None = None,
) -> tuple[np.ndarray, pa.Table | None]:
    """``pyarrow.json`` over the chosen lines (``whole``: all of them, as one buffer); the
    lines it refuses are split off and left to the per-line parser (they are not in the
    returned rows). ``block``: the lines' block, on the first try; when it is refused, its
    lines with an escaped surrogate (the usual cause: the fast reader refuses a lone one)
    are set aside first, so that a few of them do not cost a split at every level."""
    if not len(rows):
        return rows, None
    if whole is None:
        taken = lines.take(pa.array(rows))
        empty = pa.scalar(b"", pa.large_binary())
        joined = pc.binary_join_element_wise(taken, empty, empty)
        data, offsets = _buffer(joined)
        whole = data[offsets[0] : offsets[-1]]
    try:
        table = read_json_lines(whole, int(sizes[rows].max()), _PARSE)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        table = None
    if table is not None and table.num_rows == len(rows):
        return rows, table
    if block is not None:
        keep = _no_surrogate(lines, block)[rows]
        if not keep.all():
            return _fast_parse(lines, sizes, rows[keep])
    if len(rows) <= _SMALLEST_SPLIT:
        return rows[:0], None
    half = len(rows) // 2
    first_rows, first = _fast_parse(lines, sizes, rows[:half])
    second_rows, second = _fast_parse(lines, sizes, rows[half:])
    parts = [t for t in (first, second) if t is not None]
    if not parts:
        return rows[:0], None
    return np.concatenate([first_rows, second_rows]), pa.concat_tables(parts)


def read_json_lines(data: bytes | memoryview, longest: int, parse: pj.ParseOptions) -> pa.Table:
    """``pyarrow.json`` over newline-delimited objects, in blocks read on every core.

    A block must hold the longest line whole (else pyarrow refuses the line as straddling
    two blocks); a few MB each lets the blocks of a file be parsed side by side.
    """
    block = max(_JSON_BLOCK, longest + 2)
    return pj.read_json(
        io.BytesIO(data), read_options=pj.ReadOptions(block_size=block), parse_options=parse
    )


def _buffer(array: pa.Array) -> tuple[memoryview, np.ndarray]:
    _, offsets_buf, data_buf = array.buffers()
    offsets = np.frombuffer(offsets_buf, np.int64, count=array.offset + len(array) + 1)
    return memoryview(data_buf), offsets[array.offset :]


def _slow_outcomes(
    lines: pa.Array, rows: np.ndarray, report: ParseReport, seq: int
) -> tuple[list[Outcome], list[int]]:
    """The per-line parser over the rows the columns could not settle."""
    outcomes, seqs = [], []
    for row in rows.tolist():
        raw = lines[row].as_py()[:-1]  # without its newline
        if not raw.strip():
            continue  # the per-line parser skips a blank line uncounted
        report.lines += 1
        outcome = parse_counted(raw, report)
        if outcome is not None:
            outcomes.append(outcome)
            seqs.append(seq + row)
    return outcomes, seqs


def outcomes_to_table(
    outcomes: Iterable[Outcome], seqs: Iterable[int], batch_id: str | None
) -> pa.Table:
    """Per-line outcomes as rows of the outcome table."""
    outcomes = list(outcomes)
    columns = {
        name: [getattr(o, name) for o in outcomes]
        for name in OUTCOME_FIELDS
        if name not in ("seq", "batch_id")
    }
    columns["batch_id"] = [batch_id if o.batch_id is None else o.batch_id for o in outcomes]
    columns["seq"] = list(seqs)
    return pa.table(
        [pa.array(columns[f], OUTCOME_SCHEMA.field(f).type) for f in OUTCOME_FIELDS],
        schema=OUTCOME_SCHEMA,
    )


def redact_table(table: pa.Table, redactor: Callable[[str], str] | None) -> pa.Table:
    """The API key taken out of the texts (a provider may echo it, escaped in ways a filter
    on the downloaded bytes cannot see). The redactor runs once over each column's bytes
    and, only when that changes something, row by row."""
    if redactor is None or not table.num_rows:
        return table
    for name in ("text", "error_message", "error_code"):
        column = table.column(name).combine_chunks()
        if not _may_hold(column, redactor):
            continue
        values = [None if v is None else redactor(v) for v in column.to_pylist()]
        index = table.column_names.index(name)
        table = table.set_column(index, name, pa.array(values, column.type))
    return table


def _may_hold(column: pa.Array, redactor: Callable[[str], str]) -> bool:
    """False only when no value can contain anything the redactor replaces: it leaves the
    values, one after another, unchanged (a value that holds the key makes the whole hold it)."""
    if not len(column) or column.null_count == len(column):
        return False
    _, _, data_buf = column.buffers()
    if data_buf is None:
        return False
    text = bytes(memoryview(data_buf)).decode("utf-8", "replace")
    return redactor(text) != text
