"""PREPARE: input rows -> validated, rendered request JSONL chunks.

Pure data code: no Dagster, no HTTP. Valid rows render into OpenAI-style batch lines in
``custom_id`` order (so the fingerprint does not depend on row order); invalid rows are set
aside with a reason and never sent.

Example:
    >>> import pandas as pd
    >>> spec = RequestSpec(model="m", prompt_template="Say hi to {name}", key_columns=("id",))
    >>> prepared = prepare_requests(pd.DataFrame({"id": [1, 2], "name": ["Ann", None]}),
    ...                             spec, name="greet", partition_key="p1", workdir="/tmp/w")
    >>> prepared.valid.num_rows, prepared.invalid.num_rows
    (1, 1)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import pandas as pd
import pyarrow as pa

from .spec import RequestSpec

__all__ = [
    "CUSTOM_ID",
    "InputError",
    "LocalChunk",
    "PreparedRequests",
    "make_custom_id",
    "prepare_requests",
    "to_arrow",
]

CUSTOM_ID = "custom_id"
# Hidden bookkeeping columns of the input snapshot (never in results or failed):
REQUEST_HASH = "__request_hash"  # hash of the exact request line sent for the row
CARRIED_FROM = "__carried_from"  # attempt whose paid-for success this row reuses
HIDDEN_COLUMNS = (REQUEST_HASH, CARRIED_FROM)
ERROR_CODE = "error_code"
ERROR_MESSAGE = "error_message"
INVALID_INPUT = "invalid_input"
DEFAULT_MAX_REQUESTS = 50_000
DEFAULT_MAX_BYTES = 200 * 1024 * 1024
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024


class InputError(ValueError):
    """The input as a whole cannot be prepared (a missing column, duplicate keys, ...)."""


@dataclass(frozen=True)
class LocalChunk:
    """One request JSONL file on local disk, ready to upload."""

    index: int
    path: str
    requests: int
    bytes: int


@dataclass
class PreparedRequests:
    """The outcome of preparing one partition.

    ``valid`` holds every input column plus ``custom_id`` for the rows that were rendered;
    ``invalid`` holds the rest plus ``error_code`` and ``error_message``.
    """

    valid: pa.Table
    invalid: pa.Table
    chunks: list[LocalChunk]
    fingerprint: str
    estimated_input_tokens: int
    request_bytes: int = 0
    invalid_reasons: dict[str, int] = field(default_factory=dict)
    carried: int = 0


def make_custom_id(name: str, partition_key: str | None, key: str) -> str:
    """The stable request id of a row: from (asset, partition, key), never position.

    Example:
        >>> make_custom_id("reviews", "2026-11-24", "r-17")
        'req-6a1f0b5c23d0a4b1f8a1b2c5d16d1f7f'  # doctest: +SKIP
    """
    raw = f"{name}\x1f{partition_key or ''}\x1f{key}".encode()
    return "req-" + hashlib.sha256(raw).hexdigest()[:32]


def to_arrow(data: pd.DataFrame | pa.Table) -> pa.Table:
    """Accept a pandas DataFrame or a pyarrow Table; name the column that cannot convert.

    All-null columns (an empty partition's object columns) become strings, so one partition
    cannot give a column a type that breaks reading the whole hive table. Column names must
    be unique strings; text that is not valid Unicode (a lone surrogate, which pandas holds
    but Arrow and UTF-8 cannot) is an error naming the column and row.

    Example:
        >>> to_arrow(pd.DataFrame({"id": [1], "text": ["a"]})).column_names
        ['id', 'text']
        >>> to_arrow(None)  # doctest: +ELLIPSIS, +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        InputError: the upstream asset produced no data (None) for the partition; ...
    """
    table, bad_text = _input_table(data, "for the partition")
    if bad_text:
        row = min(bad_text)
        raise InputError(f"{bad_text[row][0].message} in row {row}; fix or drop the row upstream")
    return table


@dataclass(frozen=True)
class _BadText:
    """A cell whose text is not valid Unicode (stored escaped, so the row can be kept)."""

    column: str
    detail: str

    @property
    def message(self) -> str:
        return f"column {self.column!r} holds text that is not valid Unicode ({self.detail})"


def _input_table(
    data: pd.DataFrame | pa.Table | None, which: str
) -> tuple[pa.Table, dict[int, list[_BadText]]]:
    """The input as Arrow, and the rows whose text had to be escaped to fit in it."""
    if data is None:  # an upstream asset that forgot its ``return``
        raise InputError(
            f"the upstream asset produced no data (None) {which}; "
            "expected a pandas DataFrame or a pyarrow Table"
        )
    table, bad_text = _to_table(data)
    return _no_null_types(table), bad_text


def _no_null_types(table: pa.Table) -> pa.Table:
    for i, column in enumerate(table.schema):
        if pa.types.is_null(column.type):
            table = table.set_column(i, column.name, table.column(i).cast(pa.string()))
    return table


def _to_table(data: pd.DataFrame | pa.Table) -> tuple[pa.Table, dict[int, list[_BadText]]]:
    if isinstance(data, pa.Table):
        _check_column_names(data.column_names)
        return data, {}
    if not isinstance(data, pd.DataFrame):
        raise InputError(f"expected a pandas DataFrame or pyarrow Table, got {type(data).__name__}")
    frame = data.reset_index(drop=True)
    _check_column_names(list(frame.columns))
    frame.columns = [str(c) for c in frame.columns]  # numpy str_ -> str; names are str already
    try:
        return pa.Table.from_pandas(frame, preserve_index=False), {}
    except UnicodeEncodeError:
        pass
    except _ARROW_ERRORS:
        _name_unstorable_column(frame)  # else the trouble is text, which escaping fixes
    frame, bad_text = _escape_bad_text(frame)
    try:
        return pa.Table.from_pandas(frame, preserve_index=False), bad_text
    except UnicodeEncodeError as exc:  # text the scan could not reach
        raise InputError(f"the input holds text that is not valid Unicode: {exc}") from None
    except _ARROW_ERRORS:
        _name_unstorable_column(frame)
        raise


_ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError)


def _name_unstorable_column(frame: pd.DataFrame) -> None:
    """Raise an InputError naming the first column Arrow cannot convert (text aside)."""
    for column in frame.columns:
        try:
            pa.array(frame[column], from_pandas=True)
        except UnicodeEncodeError:
            continue
        except _ARROW_ERRORS as exc:
            raise InputError(f"column {column!r} cannot be stored as Parquet: {exc}") from None


def _check_column_names(names: list[Any]) -> None:
    """Unique string names: ``str()`` would merge 1 and "1", and Arrow keeps duplicates."""
    odd = [n for n in names if not isinstance(n, str) or _bad_text(n) is not None]
    if odd:
        shown = ", ".join(f"{n!a} ({type(n).__name__})" for n in odd[:10])
        raise InputError(
            f"input column names must be valid text strings; rename {shown} "
            "(for example df.columns = [str(c) for c in df.columns])"
        )
    duplicates = sorted(n for n, count in Counter(names).items() if count > 1)
    if duplicates:
        raise InputError(f"duplicate column name(s) {duplicates[:10]} in the input; rename them")


def _escape_bad_text(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict[int, list[_BadText]]]:
    """Escape text that UTF-8 cannot hold (lone surrogates) and record which rows had it.

    Only run after a conversion failed, so valid input never pays for the scan.
    """
    bad_text: dict[int, list[_BadText]] = {}
    frame = frame.copy()
    for column in frame.columns:
        try:
            pa.array(frame[column], from_pandas=True)
            continue
        except UnicodeEncodeError:
            pass
        except _ARROW_ERRORS:
            continue  # not a text problem: _to_table names it
        values = frame[column].tolist()
        for row, value in enumerate(values):
            detail = _bad_text(value)
            if detail is not None:
                bad_text.setdefault(row, []).append(_BadText(column, detail))
                values[row] = _escaped(value)
        frame[column] = pd.Series(values, dtype=object, index=frame.index)
    return frame, bad_text


def _bad_text(value: Any) -> str | None:
    """Why ``value`` (or text nested in it) cannot be UTF-8 encoded, or None."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            return f"a lone surrogate {value[exc.start]!a} at character {exc.start}"
        return None
    items = _nested(value)
    if items is None:
        return None
    if isinstance(items, Mapping):
        items = [*items.keys(), *items.values()]
    return next((d for d in map(_bad_text, items) if d is not None), None)


def _escaped(value: Any) -> Any:
    """``value`` with lone surrogates written as visible ``\\udxxx`` escapes."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode()
    items = _nested(value)
    if isinstance(items, Mapping):
        return {_escaped(k): _escaped(v) for k, v in items.items()}
    return value if items is None else [_escaped(v) for v in items]


def _nested(value: Any) -> Mapping[Any, Any] | list[Any] | None:
    """The values inside a list, tuple, dict or numpy array cell; None for a scalar."""
    if isinstance(value, Mapping):
        return value
    if isinstance(value, (list, tuple)):
        return list(value)
    if getattr(value, "ndim", 0) and hasattr(value, "tolist"):  # an array, not a numpy scalar
        return list(value.tolist())
    return None


def prepare_requests(
    data: pd.DataFrame | pa.Table,
    spec: RequestSpec,
    *,
    name: str,
    partition_key: str | None,
    workdir: str | os.PathLike[str],
    max_requests_per_batch: int = DEFAULT_MAX_REQUESTS,
    max_bytes_per_batch: int = DEFAULT_MAX_BYTES,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    succeeded: Mapping[str, tuple[str, int]] | None = None,
    keep_columns: Sequence[str] | None = None,
) -> PreparedRequests:
    """Validate rows, render request lines, and write them to chunk files in ``workdir``.

    ``succeeded`` maps custom_id -> (request hash, attempt) of requests already answered in
    an earlier attempt: a row whose request is byte-for-byte the same is not sent again but
    carried (``__carried_from``); only changed or new rows are paid for. ``keep_columns``
    (the input columns collection will copy to results) must all exist: checked here, before
    anything is paid for, rather than at collect.

    Whole-input problems raise :class:`InputError` before any chunk is written: no data
    (None), column names that are not unique strings, a missing key, template or kept column,
    a null, duplicate or non-Unicode key. A row's own problem fails only that row
    (``invalid_input``, naming the column): a null template value, text that is not valid
    Unicode (a lone surrogate), bytes that are not UTF-8, a body that cannot be serialised.
    """
    table, bad_text = _input_table(data, f"for partition {partition_key!r}")
    succeeded = succeeded or {}
    for reserved in (CUSTOM_ID, ERROR_CODE, ERROR_MESSAGE, *HIDDEN_COLUMNS):
        if reserved in table.column_names:
            raise InputError(f"input column {reserved!r} is reserved; rename it")
    index = _index_names(data)
    _require_columns(table, spec.key_columns, "key column", index)
    _require_columns(table, spec.template_columns, "template column", index)
    _check_keep_columns(table, keep_columns, index)
    _check_key_text(bad_text, spec.key_columns)
    custom_ids = _custom_ids(table, spec.key_columns, name, partition_key)
    order = sorted(range(table.num_rows), key=custom_ids.__getitem__)
    renderer = _Renderer(table, spec, max_request_bytes=min(max_request_bytes, max_bytes_per_batch))
    writer = _ChunkWriter(workdir, max_requests_per_batch, max_bytes_per_batch)
    digest = hashlib.sha256(json.dumps(spec.identity(), sort_keys=True).encode())
    valid: list[int] = []
    hashes: list[str] = []
    carried: list[int | None] = []
    invalid: list[tuple[int, str]] = []
    tokens = 0
    with writer:
        for row in order:
            if row in bad_text:  # its text was escaped to be storable: never send it
                invalid.append((row, f"{INVALID_INPUT}: {bad_text[row][0].message}"))
                continue
            line, problem, row_tokens = renderer.render(row, custom_ids[row])
            if problem is not None:
                invalid.append((row, problem))
                continue
            digest.update(line)
            line_hash = hashlib.sha256(line).hexdigest()[:32]
            earlier = succeeded.get(custom_ids[row])
            carried.append(earlier[1] if earlier and earlier[0] == line_hash else None)
            if carried[-1] is None:
                writer.write(line)
                tokens += row_tokens
            valid.append(row)
            hashes.append(line_hash)
    for row, reason in sorted(invalid, key=lambda item: custom_ids[item[0]]):
        digest.update(f"\n{custom_ids[row]}\x1f{reason}".encode())  # invalid rows count too
    snapshot = _with_ids(table, valid, custom_ids)
    snapshot = snapshot.append_column(REQUEST_HASH, pa.array(hashes, pa.string()))
    snapshot = snapshot.append_column(CARRIED_FROM, pa.array(carried, pa.int64()))
    return PreparedRequests(
        valid=snapshot,
        invalid=_invalid_table(table, invalid, custom_ids),
        chunks=writer.chunks,
        fingerprint=digest.hexdigest(),
        estimated_input_tokens=tokens,
        request_bytes=sum(c.bytes for c in writer.chunks),
        invalid_reasons=dict(Counter(reason.split(":")[0] for _, reason in invalid)),
        carried=sum(1 for c in carried if c is not None),
    )


def _require_columns(
    table: pa.Table, columns: Iterable[str], what: str, index: Sequence[str] = ()
) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        hint = ""
        if missing[0] in index:  # the DataFrame's index is dropped, so say where it went
            hint = f"; {missing[0]!r} is the DataFrame's index: reset_index() before returning it"
        raise InputError(
            f"{what} {missing[0]!r} is not in the input; columns are {table.column_names}{hint}"
        )


def _index_names(data: Any) -> list[str]:
    if not isinstance(data, pd.DataFrame):
        return []
    return [str(n) for n in data.index.names if n is not None]


def _check_keep_columns(
    table: pa.Table, keep_columns: Sequence[str] | None, index: Sequence[str]
) -> None:
    if keep_columns is None:
        return
    if isinstance(keep_columns, str) or not isinstance(keep_columns, Iterable):
        raise InputError(f"keep_columns must be a list of column names, not {keep_columns!r}")
    twice = [c for c, n in Counter(keep_columns).items() if n > 1]
    if twice:  # the results table would get two columns of one name
        raise InputError(f"keep_columns lists {twice[0]!r} twice")
    for column in keep_columns:
        if column not in table.column_names:
            _require_columns(table, [column], "keep_columns names", index)


def _check_key_text(bad_text: Mapping[int, list[_BadText]], key_columns: Sequence[str]) -> None:
    """A key that is not valid text cannot be stored, so its row could never be tracked."""
    in_keys = {row: [b for b in bad if b.column in key_columns] for row, bad in bad_text.items()}
    rows = sorted(row for row, bad in in_keys.items() if bad)
    if rows:
        first = in_keys[rows[0]][0]
        raise InputError(
            f"key column {first.column!r} holds text that is not valid Unicode ({first.detail}) "
            f"in {len(rows)} row(s), first rows {rows[:10]}; every row needs a key to be tracked"
        )


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _custom_ids(
    table: pa.Table, key_columns: Sequence[str], name: str, partition_key: str | None
) -> list[str]:
    columns = [table.column(c).to_pylist() for c in key_columns]
    keys: list[str] = []
    null_rows: list[int] = []
    for row, values in enumerate(zip(*columns, strict=True)):
        if any(_is_null(v) for v in values):
            null_rows.append(row)
        keys.append(str(values[0]) if len(values) == 1 else json.dumps([str(v) for v in values]))
    if null_rows:
        raise InputError(
            f"key column(s) {list(key_columns)} are null in {len(null_rows)} row(s), "
            f"first rows {null_rows[:10]}; every row needs a key to be tracked"
        )
    duplicates = [k for k, n in Counter(keys).items() if n > 1]
    if duplicates:
        raise InputError(
            f"{len(duplicates)} duplicate key(s) in {list(key_columns)}: {sorted(duplicates)[:10]}"
        )
    return [make_custom_id(name, partition_key, k) for k in keys]


class _Renderer:
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


class _ChunkWriter:
    """Streams lines into chunk files, starting a new one at either limit."""

    def __init__(self, workdir: str | os.PathLike[str], max_requests: int, max_bytes: int) -> None:
        if max_requests < 1 or max_bytes < 1:
            raise ValueError("max_requests_per_batch and max_bytes_per_batch must be positive")
        self.workdir = os.fspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.chunks: list[LocalChunk] = []
        self._fh: IO[bytes] | None = None
        self._count = self._bytes = 0

    def __enter__(self) -> _ChunkWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._finish()

    def write(self, line: bytes) -> None:
        size = len(line) + 1
        full = self._count >= self.max_requests or self._bytes + size > self.max_bytes
        if self._fh is None or (self._count and full):
            self._finish()
            self._start()
        assert self._fh is not None
        self._fh.write(line + b"\n")
        self._count += 1
        self._bytes += size

    def _start(self) -> None:
        path = os.path.join(self.workdir, f"chunk-{len(self.chunks):05d}.jsonl")
        self._fh = open(path, "wb", buffering=1 << 20)  # noqa: SIM115 - closed in _finish
        self._count = self._bytes = 0

    def _finish(self) -> None:
        if self._fh is None:
            return
        self._fh.close()
        index = len(self.chunks)
        self.chunks.append(LocalChunk(index, self._fh.name, self._count, self._bytes))
        self._fh = None


def _with_ids(table: pa.Table, rows: list[int], custom_ids: list[str]) -> pa.Table:
    taken = table.take(pa.array(rows, type=pa.int64()))
    return taken.append_column(CUSTOM_ID, pa.array([custom_ids[r] for r in rows], pa.string()))


def _invalid_table(table: pa.Table, invalid: list[tuple[int, str]], ids: list[str]) -> pa.Table:
    rows = [r for r, _ in invalid]
    taken = _with_ids(table, rows, ids)
    codes = [reason.split(":", 1)[0] for _, reason in invalid]
    messages = [reason.split(":", 1)[1].strip() for _, reason in invalid]
    taken = taken.append_column(ERROR_CODE, pa.array(codes, pa.string()))
    return taken.append_column(ERROR_MESSAGE, pa.array(messages, pa.string()))
