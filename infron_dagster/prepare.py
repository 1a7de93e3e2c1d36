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
    cannot give a column a type that breaks reading the whole hive table.
    """
    return _no_null_types(_to_table(data))


def _no_null_types(table: pa.Table) -> pa.Table:
    for i, column in enumerate(table.schema):
        if pa.types.is_null(column.type):
            table = table.set_column(i, column.name, table.column(i).cast(pa.string()))
    return table


def _to_table(data: pd.DataFrame | pa.Table) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if not isinstance(data, pd.DataFrame):
        raise InputError(f"expected a pandas DataFrame or pyarrow Table, got {type(data).__name__}")
    frame = data.reset_index(drop=True)
    frame.columns = [str(c) for c in frame.columns]
    try:
        return pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        for column in frame.columns:
            try:
                pa.array(frame[column])
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
                raise InputError(f"column {column!r} cannot be stored as Parquet: {exc}") from None
        raise


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
) -> PreparedRequests:
    """Validate rows, render request lines, and write them to chunk files in ``workdir``.

    ``succeeded`` maps custom_id -> (request hash, attempt) of requests already answered in
    an earlier attempt: a row whose request is byte-for-byte the same is not sent again but
    carried (``__carried_from``); only changed or new rows are paid for.
    """
    table = to_arrow(data)
    succeeded = succeeded or {}
    for reserved in (CUSTOM_ID, ERROR_CODE, ERROR_MESSAGE, *HIDDEN_COLUMNS):
        if reserved in table.column_names:
            raise InputError(f"input column {reserved!r} is reserved; rename it")
    _require_columns(table, spec.key_columns, "key column")
    _require_columns(table, spec.template_columns, "template column")
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


def _require_columns(table: pa.Table, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise InputError(
            f"{what} {missing[0]!r} is not in the input; columns are {table.column_names}"
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
        line = text.encode()
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
