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
import itertools
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .columns import (
    BODY_HASH,
    CARRIED_FROM,
    CARRIED_ID,
    CARRIED_PARTITION,
    CUSTOM_ID,
    ERROR_CODE,
    ERROR_MESSAGE,
    HIDDEN_COLUMNS,
    INVALID_INPUT,
    REQUEST_HASH,
)
from .errors import InfronDagsterError
from .render import ColumnRenderer, RenderedSlice, line_buffer, with_newlines
from .reorder import in_order
from .sources import ParquetInput
from .spec import RequestSpec

__all__ = [
    "InputError",
    "LocalChunk",
    "PreparedRequests",
    "make_custom_id",
    "prepare_requests",
    "to_arrow",
]

DEFAULT_MAX_REQUESTS = 50_000
DEFAULT_MAX_BYTES = 200 * 1024 * 1024
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024


class InputError(InfronDagsterError, ValueError):
    """The input as a whole cannot be prepared (a missing column, duplicate keys, ...).

    Example:
        >>> import tempfile
        >>> import pandas as pd
        >>> from infron_dagster import RequestSpec
        >>> spec = RequestSpec(model="gpt-4o-mini", prompt_template="{text}", key_columns=("id",))
        >>> try:
        ...     prepare_requests(pd.DataFrame({"text": ["hi"]}), spec, name="reviews",
        ...                      partition_key=None, workdir=tempfile.mkdtemp())
        ... except InputError as exc:
        ...     print(exc)
        key column 'id' is not in the input; columns are ['text']
    """


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

    ``valid`` (read from the snapshot file ``snapshot_path`` in the workdir, so that memory
    is set by a slice, not the partition) holds every input column plus ``custom_id`` for
    the rows that were rendered; ``invalid`` holds the rest plus ``error_code`` and
    ``error_message``.

    Example (:func:`prepare_requests` runs it)::

        prepared = prepare_requests(rows, spec, name="reviews", partition_key="2026-11-24",
                                    workdir=tempfile.mkdtemp())
        prepared.valid_rows, prepared.invalid.column("error_code").to_pylist()
        # -> (1, ['invalid_input'])
    """

    invalid: pa.Table
    chunks: list[LocalChunk]
    fingerprint: str
    estimated_input_tokens: int
    snapshot_path: str
    valid_rows: int
    request_bytes: int = 0
    invalid_reasons: dict[str, int] = field(default_factory=dict)
    carried: int = 0
    # Of ``carried``: rows whose answer is still being paid for by an in-flight attempt.
    carried_in_flight: int = 0
    # Of ``carried``: rows answered in another partition (reuse_answers="pipeline").
    carried_elsewhere: int = 0
    # Carried rows per source attempt of this partition.
    carried_by_attempt: dict[int, int] = field(default_factory=dict)
    # The in-flight attempts the carried rows wait for ({"attempt", "batch_ids"}; the
    # caller, who knows their batches, fills it in for the manifest).
    waits_on: list[dict[str, Any]] = field(default_factory=list)

    @property
    def valid(self) -> pa.Table:
        """The snapshot of the rows sent or carried, read whole (for small partitions)."""
        return pq.read_table(self.snapshot_path)


def make_custom_id(name: str, partition_key: str | None, key: str) -> str:
    """The stable request id of a row: from (asset, partition, key), never position.

    Example:
        >>> make_custom_id("reviews", "2026-11-24", "r-17")
        'req-1d538177935df22b091b23dcf60b2581'
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
    data: pd.DataFrame | pa.Table | ParquetInput,
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
    in_flight: Mapping[str, tuple[str, int]] | None = None,
    elsewhere: Any = None,
) -> PreparedRequests:
    """Validate rows, render request lines, and write them to chunk files in ``workdir``.

    ``succeeded`` maps custom_id -> (request hash, attempt) of requests already answered in
    an earlier attempt: a row whose request is byte-for-byte the same is not sent again but
    carried (``__carried_from``); only changed or new rows are paid for. ``in_flight`` is
    the same for requests sent by attempts still in flight: an unchanged row waits for the
    answer already paid for (``succeeded`` wins when both match). ``elsewhere`` (an
    :class:`~infron_dagster.reuse.AnswerIndex`) finds the other rows' request bodies answered
    in other partitions: those are carried from there (``__carried_partition``,
    ``__carried_id``), and every row's ``__body_hash`` is kept. ``keep_columns``
    (the input columns collection will copy to results) must all exist: checked here, before
    anything is paid for, rather than at collect.

    Whole-input problems raise :class:`InputError` before any chunk is written: no data
    (None), column names that are not unique strings, a missing key, template or kept column,
    a null, duplicate or non-Unicode key. A row's own problem fails only that row
    (``invalid_input``, naming the column): a null template value, text that is not valid
    Unicode (a lone surrogate), bytes that are not UTF-8, a body that cannot be serialised.

    Memory is set by the slice, not the partition: rows are taken, rendered, hashed and
    written ``SLICE_ROWS`` at a time in ``custom_id`` order, the snapshot of the rows sent
    is a Parquet file in ``workdir`` (a row group per slice), and only the ids are held whole.

    Example:
        >>> import tempfile
        >>> import pandas as pd
        >>> from infron_dagster import RequestSpec
        >>> spec = RequestSpec(model="gpt-4o-mini", prompt_template="Sentiment of: {text}",
        ...                    key_columns=("id",))
        >>> rows = pd.DataFrame({"id": [1, 2], "text": ["great", None]})
        >>> prepared = prepare_requests(rows, spec, name="reviews", partition_key="2026-11-24",
        ...                             workdir=tempfile.mkdtemp())
        >>> prepared.valid_rows, len(prepared.chunks)
        (1, 1)
        >>> prepared.invalid.column("error_code").to_pylist()  # a null template value
        ['invalid_input']
    """
    source = _Source(data, f"for partition {partition_key!r}")
    for reserved in (CUSTOM_ID, ERROR_CODE, ERROR_MESSAGE, *HIDDEN_COLUMNS):
        if reserved in source.column_names:
            raise InputError(f"input column {reserved!r} is reserved; rename it")
    index = _index_names(data)
    _require_columns(source.column_names, spec.key_columns, "key column", index)
    _require_columns(source.column_names, spec.template_columns, "template column", index)
    _check_keep_columns(source.column_names, keep_columns, index)
    keys, key_bad_text = source.key_table(spec.key_columns)
    _check_key_text(key_bad_text, spec.key_columns)
    custom_ids = _custom_ids(keys, spec.key_columns, name, partition_key)
    order = pc.sort_indices(custom_ids).to_numpy()  # requests go out in custom_id order
    _check_unique(custom_ids, order, keys, spec.key_columns)
    del keys
    request_bytes = min(max_request_bytes, max_bytes_per_batch)
    renderer = ColumnRenderer.for_spec(spec, max_request_bytes=request_bytes) or _RowRenderer(
        spec, max_request_bytes=request_bytes
    )
    run = _Run(
        spec, succeeded or {}, source.snapshot_schema(elsewhere is not None), in_flight or {}
    )
    run.elsewhere = elsewhere
    snapshot_path = os.path.join(os.fspath(workdir), "inputs.parquet")
    writer = _ChunkWriter(workdir, max_requests_per_batch, max_bytes_per_batch)
    snapshot = pq.ParquetWriter(snapshot_path, run.snapshot_schema, compression="zstd")
    with writer, snapshot as out, run:
        for rows, part, bad_text in source.slices(order, SLICE_ROWS, workdir):
            ids = custom_ids.take(rows)
            problems = {row: f"{INVALID_INPUT}: {bad[0].message}" for row, bad in bad_text.items()}
            rendered = renderer.render(part, ids, problems)
            run.add(part, ids, rendered, writer, out)
    return run.prepared(writer.chunks, snapshot_path)


# Rows rendered, hashed and written at a time: memory is set by this, not by the partition.
SLICE_ROWS = 16_384


class _Run:
    """What one prepare accumulates over its slices: the fingerprint, the invalid rows,
    token and carry counts. Lines and snapshot rows are written out slice by slice."""

    def __init__(
        self,
        spec: RequestSpec,
        succeeded: Mapping[str, tuple[str, int]],
        schema: pa.Schema,
        in_flight: Mapping[str, tuple[str, int]],
    ) -> None:
        self.succeeded, self.in_flight = succeeded, in_flight
        self.carried_in_flight = self.carried_elsewhere = 0
        self.carried_by_attempt: Counter[int] = Counter()
        self.elsewhere: Any = None
        self.digest = hashlib.sha256(json.dumps(spec.identity(), sort_keys=True).encode())
        self.snapshot_schema = schema
        self.invalid: list[pa.Table] = []
        self.invalid_reasons: list[tuple[str, str]] = []  # (custom_id, reason), in id order
        self.tokens = self.valid_rows = self.carried = 0
        # One thread, so that its tasks run in order: the fingerprint is a running hash.
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="infron-prepare")
        self._background: list[Future[None]] = []

    def add(
        self,
        part: pa.Table,
        ids: pa.Array,
        rendered: RenderedSlice,
        writer: _ChunkWriter,
        snapshot: pq.ParquetWriter,
    ) -> None:
        """Hash, carry, write and snapshot one rendered slice."""
        data, offsets = line_buffer(rendered.lines)
        # The fingerprint is a hash of the lines one after the other: one call over the
        # slice's buffer, in a thread (hashlib lets go of the GIL) while lines are hashed here.
        whole = data[offsets[0] : offsets[-1]]
        self._background.append(self._hasher.submit(self.digest.update, whole))
        kept_ids = ids.take(pa.array(rendered.rows, pa.int64()))
        hashes, carried = self._hash_lines(data, offsets, kept_ids)
        if self.elsewhere is not None:
            bodies, partitions, sources = self._carry_elsewhere(data, offsets, carried)
        sent = np.fromiter((c is None for c in carried), bool, len(carried))
        lines = rendered.lines if sent.all() else rendered.lines.filter(pa.array(sent))
        if len(lines):
            writer.write_block(*line_buffer(with_newlines(lines)))
        self.tokens += int(rendered.tokens[sent].sum())
        self.carried += int(len(carried) - sent.sum())
        self.valid_rows += len(rendered.rows)
        taken = part.take(pa.array(rendered.rows, pa.int64())).append_column(CUSTOM_ID, kept_ids)
        taken = taken.append_column(REQUEST_HASH, pa.array(hashes, pa.string()))
        taken = taken.append_column(CARRIED_FROM, pa.array(carried, pa.int64()))
        if self.elsewhere is not None:
            taken = taken.append_column(BODY_HASH, pa.array(bodies, pa.string()))
            taken = taken.append_column(CARRIED_PARTITION, pa.array(partitions, pa.string()))
            taken = taken.append_column(CARRIED_ID, pa.array(sources, pa.string()))
        # Parquet encoding lets go of the GIL too: in the same (ordered) thread
        self._background.append(
            self._hasher.submit(snapshot.write_table, taken.cast(self.snapshot_schema))
        )
        if rendered.problems:
            self._add_invalid(part, ids, rendered.problems)
        self._wait_for_background(keep=2)

    def __enter__(self) -> _Run:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        """Finish the background work (even after an error: it writes to open files)."""
        try:
            self._wait_for_background(keep=0)
        except Exception:
            if kind is None:  # else the error that stopped the run is the one to see
                raise
        finally:
            for task in self._background:
                task.cancel()
            self._hasher.shutdown(wait=True)

    def _wait_for_background(self, keep: int) -> None:
        """Let at most ``keep`` tasks (one slice) wait in the background thread: each holds
        a slice's lines or rows in memory. Errors of the background work raise here."""
        while len(self._background) > keep:
            self._background.pop(0).result()

    def _hash_lines(
        self, data: memoryview, offsets: np.ndarray, ids: pa.Array
    ) -> tuple[list[str], list[int | None]]:
        """Each line's request hash, and the attempt it is carried from (None: sent)."""
        sha256 = hashlib.sha256
        whole = bytes(data[offsets[0] : offsets[-1]])  # slicing bytes is cheaper than a view
        bounds = (offsets - offsets[0]).tolist()
        hashes = [sha256(whole[a:b]).hexdigest()[:32] for a, b in itertools.pairwise(bounds)]
        if not self.succeeded and not self.in_flight:
            return hashes, [None] * len(hashes)
        carried: list[int | None] = []
        for custom_id, line_hash in zip(ids.to_pylist(), hashes, strict=True):
            earlier = self.succeeded.get(custom_id)
            source = earlier[1] if earlier and earlier[0] == line_hash else None
            if source is None:
                running = self.in_flight.get(custom_id)
                if running and running[0] == line_hash:
                    source = running[1]
                    self.carried_in_flight += 1
            if source is not None:
                self.carried_by_attempt[source] += 1
            carried.append(source)
        return hashes, carried

    def _carry_elsewhere(
        self, data: memoryview, offsets: np.ndarray, carried: list[int | None]
    ) -> tuple[list[str], list[str | None], list[str | None]]:
        """Each line's body hash; lines not carried already whose body was answered in
        another partition are carried from there (``carried`` is updated in place)."""
        from .reuse import body_hashes

        whole = bytes(data[offsets[0] : offsets[-1]])
        bodies = body_hashes(whole, (offsets - offsets[0]).tolist())
        partitions: list[str | None] = [None] * len(bodies)
        sources: list[str | None] = [None] * len(bodies)
        todo = [i for i, c in enumerate(carried) if c is None]
        for i, found in zip(todo, self.elsewhere.find([bodies[i] for i in todo]), strict=True):
            if found is not None:
                partitions[i], carried[i], sources[i] = found
                self.carried_elsewhere += 1
        return bodies, partitions, sources

    def _add_invalid(self, part: pa.Table, ids: pa.Array, problems: dict[int, str]) -> None:
        rows = sorted(problems)  # slice order is custom_id order
        taken = part.take(pa.array(rows, pa.int64())).append_column(
            CUSTOM_ID, ids.take(pa.array(rows, pa.int64()))
        )
        reasons = [problems[r] for r in rows]
        codes = [reason.split(":", 1)[0] for reason in reasons]
        messages = [reason.split(":", 1)[1].strip() for reason in reasons]
        taken = taken.append_column(ERROR_CODE, pa.array(codes, pa.string()))
        self.invalid.append(taken.append_column(ERROR_MESSAGE, pa.array(messages, pa.string())))
        self.invalid_reasons += zip(taken.column(CUSTOM_ID).to_pylist(), reasons, strict=True)

    def prepared(self, chunks: list[LocalChunk], snapshot_path: str) -> PreparedRequests:
        """The outcome, once every slice is in (and the run's context has ended)."""
        for custom_id, reason in self.invalid_reasons:
            self.digest.update(f"\n{custom_id}\x1f{reason}".encode())  # invalid rows count too
        schema = _invalid_schema(self.snapshot_schema)
        invalid = pa.concat_tables([t.cast(schema) for t in self.invalid] or [schema.empty_table()])
        return PreparedRequests(
            invalid=invalid,
            chunks=chunks,
            fingerprint=self.digest.hexdigest(),
            estimated_input_tokens=self.tokens,
            snapshot_path=snapshot_path,
            valid_rows=self.valid_rows,
            request_bytes=sum(c.bytes for c in chunks),
            invalid_reasons=dict(Counter(r.split(":")[0] for _, r in self.invalid_reasons)),
            carried=self.carried,
            carried_in_flight=self.carried_in_flight,
            carried_elsewhere=self.carried_elsewhere,
            carried_by_attempt=dict(self.carried_by_attempt),
        )


def _invalid_schema(snapshot: pa.Schema) -> pa.Schema:
    fields = [f for f in snapshot if f.name not in HIDDEN_COLUMNS]
    fields += [pa.field(ERROR_CODE, pa.string()), pa.field(ERROR_MESSAGE, pa.string())]
    return pa.schema(fields, metadata=snapshot.metadata)


class _Source:
    """The input, taken a slice at a time: a pandas DataFrame converts only the rows taken
    (under the type the whole frame gives each column), a pyarrow Table is taken as is."""

    def __init__(self, data: pd.DataFrame | pa.Table | ParquetInput | None, which: str) -> None:
        self.frame: pd.DataFrame | None = None
        self.parquet: ParquetInput | None = None
        self.bad_text: dict[int, list[_BadText]] = {}
        if isinstance(data, ParquetInput):  # read a row group at a time, never whole
            _check_column_names(data.schema.names)
            self.parquet = data
            self.schema = _no_null_types(data.schema.empty_table()).schema
            return
        if isinstance(data, pd.DataFrame):
            frame = data.reset_index(drop=True)  # copy-on-write: no data is copied
            _check_column_names(list(frame.columns))
            frame.columns = [str(c) for c in frame.columns]
            schema = _frame_schema(frame)
            if schema is not None:
                self.frame, self.schema = frame, schema
                return
        # A table, or a frame whose types only a whole conversion can settle (or name)
        self.table, self.bad_text = _input_table(data, which)
        self.schema = self.table.schema

    @property
    def column_names(self) -> list[str]:
        return list(self.schema.names)

    def snapshot_schema(self, bodies: bool = False) -> pa.Schema:
        """The schema of the snapshot of the rows sent: the input's plus the bookkeeping
        (``bodies``: with the body hashes and cross-partition sources, for pipeline reuse)."""
        extra = [
            pa.field(CUSTOM_ID, pa.string()),
            pa.field(REQUEST_HASH, pa.string()),
            pa.field(CARRIED_FROM, pa.int64()),
        ]
        if bodies:
            extra += [
                pa.field(BODY_HASH, pa.string()),
                pa.field(CARRIED_PARTITION, pa.string()),
                pa.field(CARRIED_ID, pa.string()),
            ]
        return pa.schema([*self.schema, *extra], metadata=self.schema.metadata)

    def key_table(self, key_columns: Sequence[str]) -> tuple[pa.Table, dict[int, list[_BadText]]]:
        """The key columns of every row (what custom_ids are made of)."""
        if self.parquet is not None:
            self._keys = _no_null_types(self.parquet.read(list(key_columns)))
            return self._keys, {}
        if self.frame is None:
            bad = {r: [b for b in v if b.column in key_columns] for r, v in self.bad_text.items()}
            return self.table.select(list(key_columns)), bad
        return _input_table(self.frame[list(key_columns)], "")

    def slices(
        self, order: np.ndarray, slice_rows: int, workdir: str | os.PathLike[str]
    ) -> Iterator[tuple[pa.Array, pa.Table, dict[int, list[_BadText]]]]:
        """The rows in ``order``, a slice at a time: their positions, the rows, and those
        whose text had to be escaped (by place in the slice)."""
        if self.parquet is not None:
            for positions, part in in_order(self.parquet, order, slice_rows, workdir):
                rows = pa.array(positions)
                part = _no_null_types(part)
                self._check_same_keys(rows, part)
                yield rows, part, {}
            return
        for start in range(0, len(order), slice_rows):
            rows = pa.array(order[start : start + slice_rows])
            yield rows, *self.take(rows)

    def _check_same_keys(self, rows: pa.Array, part: pa.Table) -> None:
        """The files are read twice (keys for the ids, then the rows): a row whose key
        changed in between would go out under another row's custom_id."""
        expected = self._keys.take(rows)
        got = part.select(expected.column_names)
        # Arrow's equality holds NaN unequal to itself: then compare the keys' texts (what
        # custom_ids are made of), as the first read made them
        names = expected.column_names
        if not got.equals(expected) and _key_texts(got, names) != _key_texts(expected, names):
            raise InputError(
                "the Parquet input changed while it was read (a row's key differs between the "
                "two reads); nothing was sent: run again once the files are written"
            )

    def take(self, rows: pa.Array) -> tuple[pa.Table, dict[int, list[_BadText]]]:
        """The rows at ``rows`` (positions), and those whose text had to be escaped."""
        if self.frame is None:
            taken = self.table.take(rows)
            if not self.bad_text:
                return taken, {}
            bad = self.bad_text
            return taken, {i: bad[r] for i, r in enumerate(rows.to_pylist()) if r in bad}
        part, bad_text = _to_table(self.frame.take(rows.to_numpy()))
        part = _no_null_types(part)
        if not part.schema.equals(self.schema, check_metadata=False):
            try:
                part = part.cast(self.schema)
            except _ARROW_ERRORS as exc:
                raise InputError(
                    f"the input's rows do not share one type per column: {exc}"
                ) from None
        return part, bad_text


def _frame_schema(frame: pd.DataFrame) -> pa.Schema | None:
    """The Arrow schema of the whole frame (all-null columns as text), without converting it;
    None when only converting it can tell (mixed types, which the conversion names)."""
    try:
        schema = pa.Schema.from_pandas(frame, preserve_index=False)
    except (*_ARROW_ERRORS, UnicodeEncodeError, TypeError, ValueError):
        return None
    for i, field_ in enumerate(schema):
        if pa.types.is_null(field_.type):
            schema = schema.set(i, field_.with_type(pa.string()))
    return schema


def _require_columns(
    names: Sequence[str], columns: Iterable[str], what: str, index: Sequence[str] = ()
) -> None:
    missing = [c for c in columns if c not in names]
    if missing:
        hint = ""
        if missing[0] in index:  # the DataFrame's index is dropped, so say where it went
            hint = f"; {missing[0]!r} is the DataFrame's index: reset_index() before returning it"
        raise InputError(
            f"{what} {missing[0]!r} is not in the input; columns are {list(names)}{hint}"
        )


def _index_names(data: Any) -> list[str]:
    if not isinstance(data, pd.DataFrame):
        return []
    return [str(n) for n in data.index.names if n is not None]


def _check_keep_columns(
    names: Sequence[str], keep_columns: Sequence[str] | None, index: Sequence[str]
) -> None:
    if keep_columns is None:
        return
    if isinstance(keep_columns, str) or not isinstance(keep_columns, Iterable):
        raise InputError(f"keep_columns must be a list of column names, not {keep_columns!r}")
    twice = [c for c, n in Counter(keep_columns).items() if n > 1]
    if twice:  # the results table would get two columns of one name
        raise InputError(f"keep_columns lists {twice[0]!r} twice")
    for column in keep_columns:
        if column not in names:
            _require_columns(names, [column], "keep_columns names", index)


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
    keys: pa.Table, key_columns: Sequence[str], name: str, partition_key: str | None
) -> pa.Array:
    """Each row's custom_id (see make_custom_id), made a slice at a time: memory holds the
    ids as Arrow text (~40 bytes a row), never a Python string per row."""
    _check_key_nulls(keys, key_columns)
    prefix = f"{name}\x1f{partition_key or ''}\x1f".encode()
    sha256 = hashlib.sha256
    parts = []
    for start in range(0, max(keys.num_rows, 1), SLICE_ROWS):
        texts = _key_texts(keys.slice(start, SLICE_ROWS), key_columns)
        ids = ["req-" + sha256(prefix + k.encode()).hexdigest()[:32] for k in texts]
        parts.append(pa.array(ids, pa.string()))
    return pa.concat_arrays(parts)


def _check_unique(
    ids: pa.Array, order: np.ndarray, keys: pa.Table, key_columns: Sequence[str]
) -> None:
    """Refuse a key found in two rows, naming the keys (not their hashes). On the ids in
    sorted order (``order``): equal ids are neighbours, no hash table of every id."""
    ordered = ids.take(pa.array(order))
    if len(ordered) < 2:
        return
    same = pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1))
    if not pc.any(same).as_py():
        return
    twice = np.flatnonzero(same.to_numpy(zero_copy_only=False))
    rows = pa.array(np.union1d(order[twice], order[twice + 1]))
    duplicates = sorted(set(_key_texts(keys.take(rows), key_columns)))
    raise InputError(
        f"{len(duplicates)} duplicate key(s) in {list(key_columns)}: {duplicates[:10]}"
    )


def _check_key_nulls(keys: pa.Table, key_columns: Sequence[str]) -> None:
    null = None
    for column in key_columns:
        values = keys.column(column)
        missing = values.is_null()
        if pa.types.is_floating(values.type):
            missing = pc.or_kleene(missing, pc.is_nan(values))
        null = missing if null is None else pc.or_(null, missing)
    assert null is not None
    if pc.any(null).as_py():
        rows = np.flatnonzero(null.to_numpy(zero_copy_only=False)).tolist()
        raise InputError(
            f"key column(s) {list(key_columns)} are null in {len(rows)} row(s), "
            f"first rows {rows[:10]}; every row needs a key to be tracked"
        )


def _key_texts(keys: pa.Table, key_columns: Sequence[str]) -> list[str]:
    """Each row's key as the text its custom_id is derived from (see make_custom_id)."""
    columns = [_texts(keys.column(c)) for c in key_columns]
    if len(columns) == 1:
        return columns[0]
    return [json.dumps(list(values)) for values in zip(*columns, strict=True)]


def _texts(values: pa.ChunkedArray) -> list[str]:
    """``str()`` of each value (Arrow casts integers to the same text, faster)."""
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        return values.to_pylist()
    if pa.types.is_integer(values.type):
        return values.cast(pa.string()).to_pylist()
    return [str(v) for v in values.to_pylist()]


class _RowRenderer:
    """The per-row renderer over a slice, for what :class:`ColumnRenderer` cannot render
    (``body_fn``, format specs and conversions in the template)."""

    def __init__(self, spec: RequestSpec, *, max_request_bytes: int) -> None:
        self.spec, self.max_bytes = spec, max_request_bytes

    def render(
        self, rows: pa.Table, custom_ids: pa.Array, problems: dict[int, str]
    ) -> RenderedSlice:
        renderer = _Renderer(rows, self.spec, max_request_bytes=self.max_bytes)
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

    def write_block(self, data: memoryview, offsets: np.ndarray) -> None:
        """Write consecutive lines at once: ``data[offsets[i]:offsets[i + 1]]`` is line i
        with its newline. Chunks split exactly where :meth:`write` would split them."""
        count, i = len(offsets) - 1, 0
        while i < count:
            if self._fh is None:
                self._start()
            assert self._fh is not None
            room = min(self.max_requests - self._count, count - i)
            byte_limit = offsets[i] + self.max_bytes - self._bytes
            fit = min(room, int(np.searchsorted(offsets, byte_limit, side="right")) - 1 - i)
            if fit <= 0:
                if self._count:
                    self._finish()
                    continue
                fit = 1  # one line over the byte limit still goes, alone
            end = i + fit
            self._fh.write(data[offsets[i] : offsets[end]])
            self._count += fit
            self._bytes += int(offsets[end] - offsets[i])
            i = end

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
