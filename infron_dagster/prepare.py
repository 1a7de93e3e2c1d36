"""PREPARE: input rows -> validated, rendered request JSONL chunks.

Pure data code: no Dagster, no HTTP. Valid rows render into OpenAI-style batch lines in
``custom_id`` order (so the fingerprint does not depend on row order); invalid rows are set
aside with a reason and never sent.

The steps, each in its module: :mod:`validate` (the input as a whole: columns, names, text),
:mod:`input_slices` (the rows, a slice at a time), :mod:`keys` (row keys -> ``custom_id``),
:mod:`render` (rows -> request lines), :mod:`chunks` (lines -> chunk files); this module
runs them and builds the :class:`PreparedRequests` (fingerprint, snapshot, carried rows).

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
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .chunks import ChunkWriter, LocalChunk
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
from .input_slices import InputSlices
from .keys import check_unique_keys, row_custom_ids
from .render import ColumnRenderer, RenderedSlice, RowRenderer, line_buffer, with_newlines
from .sources import ParquetInput
from .spec import RequestSpec
from .validate import check_columns, check_key_text, index_names

__all__ = ["PreparedRequests", "prepare_requests"]

DEFAULT_MAX_REQUESTS = 50_000
DEFAULT_MAX_BYTES = 200 * 1024 * 1024
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024


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
    :class:`~infron_dagster.carry.CarryIndex`) finds the other rows' request bodies answered
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
    source = InputSlices(data, f"for partition {partition_key!r}")
    check_columns(source.column_names, spec, keep_columns, index_names(data))
    keys, key_bad_text = source.key_table(spec.key_columns)
    check_key_text(key_bad_text, spec.key_columns)
    custom_ids = row_custom_ids(keys, spec.key_columns, name, partition_key)
    order = pc.sort_indices(custom_ids).to_numpy()  # requests go out in custom_id order
    check_unique_keys(custom_ids, order, keys, spec.key_columns)
    del keys
    request_bytes = min(max_request_bytes, max_bytes_per_batch)
    renderer = ColumnRenderer.for_spec(spec, max_request_bytes=request_bytes) or RowRenderer(
        spec, max_request_bytes=request_bytes
    )
    builder = _PreparedBuilder(
        spec, succeeded or {}, source.snapshot_schema(elsewhere is not None), in_flight or {}
    )
    builder.elsewhere = elsewhere
    snapshot_path = os.path.join(os.fspath(workdir), "inputs.parquet")
    writer = ChunkWriter(workdir, max_requests_per_batch, max_bytes_per_batch)
    snapshot = pq.ParquetWriter(snapshot_path, builder.snapshot_schema, compression="zstd")
    with writer, snapshot as out, builder:
        for rows, part, bad_text in source.slices(order, SLICE_ROWS, workdir):
            ids = custom_ids.take(rows)
            problems = {row: f"{INVALID_INPUT}: {bad[0].message}" for row, bad in bad_text.items()}
            rendered = renderer.render(part, ids, problems)
            builder.add(part, ids, rendered, writer, out)
    return builder.prepared(writer.chunks, snapshot_path)


# Rows rendered, hashed and written at a time: memory is set by this, not by the partition.
SLICE_ROWS = 16_384


class _PreparedBuilder:
    """Builds one partition's :class:`PreparedRequests` from its rendered slices: hashes
    each line (fingerprint, request hashes), carries the rows already answered, writes the
    lines sent to the chunks and every rendered row to the snapshot, and keeps the invalid
    rows, token and carry counts. A context manager: its background writes end with it."""

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
        writer: ChunkWriter,
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

    def __enter__(self) -> _PreparedBuilder:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        """Finish the background work (even after an error: it writes to open files)."""
        try:
            self._wait_for_background(keep=0)
        except Exception:
            if kind is None:  # else the error that stopped prepare is the one to see
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
        from .carry_cache import body_hashes

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
        """The outcome, once every slice is in (and the builder's context has ended)."""
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
