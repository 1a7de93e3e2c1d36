"""COLLECT: finished batches -> results and failed Parquet for one partition.

Downloads every output and error file (streaming, into storage, once), parses them, merges
attempts (a row that succeeds in any attempt is a result; otherwise its latest failure
stands), and writes the two hive-partitioned tables atomically. The manifests are marked
collected last: they are the commit point.

Example::

    outcome = collect_partition(client, storage, spec, "2026-11-24")
    outcome.ready, outcome.results.num_rows, outcome.failed.num_rows
    # -> (True, 980, 20)
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .carry_cache import write_answers
from .client import InfronClient
from .columns import (
    BODY_HASH,
    CARRIED_FROM,
    CARRIED_ID,
    CARRIED_PARTITION,
    CUSTOM_ID,
)
from .errors import InfronError
from .history import PartitionHistory, active_attempts, read_carry_columns
from .manifest import ChunkRecord, Manifest, now_iso
from .models import Batch, BatchStatus
from .outcomes import OUTCOME_SCHEMA, outcomes_to_table, read_outcome_table, redact_table
from .pricing import ModelPrice
from .results import DEFAULT_MAX_LINE_BYTES, Outcome, ParseReport
from .row_costs import RowCosts
from .spec import RequestSpec
from .storage import BatchStorage
from .tables import TablesBuilder, TableSummary
from .untrusted import printable, safe_segment

__all__ = [
    "CollectOutcome",
    "active_attempts",
    "collect_partition",
    "poll_manifest",
]

logger = logging.getLogger(__name__)

_MISSING_CODES = {
    BatchStatus.EXPIRED: "batch_expired",
    BatchStatus.CANCELLED: "batch_cancelled",
    BatchStatus.FAILED: "batch_failed",
}


@dataclass
class CollectOutcome:
    """What collecting a partition produced, or why it could not yet.

    The tables are written slice by slice and never held whole: ``results_summary`` and
    ``failed_summary`` hold their schema, row count, token sums and error counts; the
    ``results`` and ``failed`` properties read a table back from storage when asked.

    Example::

        outcome = collect_partition(client, storage, spec, "2026-11-24")
        if not outcome.ready:
            print("still running:", outcome.waiting_on)
        else:
            print(outcome.results_summary.rows, outcome.failed_summary.error_counts)

    (:func:`collect_partition` shows one that runs.)
    """

    ready: bool
    waiting_on: list[str] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    # Earlier attempts, in flight when the base attempt was submitted, whose answers it carries
    sources: list[int] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)  # attempts a cancel stopped
    # The partition's manifests as this collection read them (under the lock, once ready)
    history: PartitionHistory | None = None
    # What ``on_written`` said (the money code: fees it did not trust, and why)
    settled: dict[str, Any] = field(default_factory=dict)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    report: ParseReport = field(default_factory=ParseReport)
    input_rows: int = 0
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    key_redactor: Callable[[str], str] | None = None
    results_summary: TableSummary | None = None
    failed_summary: TableSummary | None = None
    _readers: dict[str, Callable[[], pa.Table]] = field(default_factory=dict, repr=False)

    def redact(self, outcome: Outcome) -> Outcome:
        """An outcome with the API key taken out of its texts (a provider may echo it,
        escaped in ways a byte-level filter on the download cannot see)."""
        if self.key_redactor is not None:
            for name in ("text", "error_message", "error_code"):
                value = getattr(outcome, name)
                if value:
                    setattr(outcome, name, self.key_redactor(value))
        return outcome

    @property
    def results(self) -> pa.Table | None:
        """The results table as written (read back whole: small partitions, tests)."""
        return self._readers["results"]() if "results" in self._readers else None

    @property
    def failed(self) -> pa.Table | None:
        """The failed table as written (read back whole)."""
        return self._readers["failed"]() if "failed" in self._readers else None

    @property
    def error_counts(self) -> dict[str, int]:
        """Failed rows by error code."""
        return dict(self.failed_summary.error_counts) if self.failed_summary else {}

    @property
    def retryable_rows(self) -> int:
        """How many failed rows a retry may fix."""
        return self.failed_summary.sums["retryable"] if self.failed_summary else 0

    @property
    def tokens(self) -> dict[str, int]:
        """Prompt/completion tokens of the results."""
        sums = self.results_summary.sums if self.results_summary else Counter()
        return {name: sums[name] for name in ("prompt_tokens", "completion_tokens")}

    @property
    def cost(self) -> float | None:
        """The sum of what the API reported as cost (fees), when it reports any."""
        costs = [b["cost"] for b in self.batches.values() if b.get("cost") is not None]
        return float(sum(costs)) if costs else None


def poll_manifest(client: InfronClient, manifest: Manifest) -> dict[str, Batch]:
    """The current state of every batch of one attempt."""
    return {bid: client.retrieve_batch(bid) for bid in manifest.batch_ids}


def collect_partition(
    client: InfronClient,
    storage: BatchStorage,
    spec: RequestSpec,
    partition_key: str | None,
    *,
    keep_columns: Sequence[str] | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    price: ModelPrice | None = None,
    history: PartitionHistory | None = None,
    on_written: Callable[[CollectOutcome], dict[str, Any]] | None = None,
) -> CollectOutcome:
    """Collect one partition if every batch of every active attempt is terminal.

    ``history`` is the partition's manifests if the caller read them already (they are
    read again once, under the partition's lock, before anything is written).
    ``on_written(outcome)`` runs once the tables are written and before the manifests are
    marked collected (the commit point): settling the budget there means a run killed in
    between settles again when collected again, never leaves a reservation unsettled.

    Each row's ``cost`` is its tokens at ``price``, else its share of the fees its batch
    reported, else null (see :class:`~infron_dagster.row_costs.RowCosts`).

    Whatever the provider sent, every input row ends in results or failed: a line that
    cannot be read fails its row (``unparseable_result``), a line over ``max_line_bytes``
    fails its row (``result_too_large``), a result file that cannot be fetched for good (a
    refused URL, a 404) fails the rows it held as ``missing_result``. Only a transient
    error (connection, 5xx) stops the run, to be collected again.

    Example:
        >>> import tempfile
        >>> import pandas as pd
        >>> from infron_dagster import (BatchStorage, LocalServerConfig, RequestSpec,
        ...                             embedded_client, prepare_requests)
        >>> instant = LocalServerConfig(validating_seconds=0, in_progress_seconds=0,
        ...                             finalizing_seconds=0)
        >>> client = embedded_client(tempfile.mkdtemp(), config=instant)  # the local server
        >>> storage = BatchStorage(tempfile.mkdtemp(), "reviews")
        >>> spec = RequestSpec(model="gpt-4o-mini", prompt_template="Sentiment of: {text}",
        ...                    key_columns=("id",))
        >>> rows = pd.DataFrame({"id": [1, 2, 3], "text": ["great", "awful", None]})
        >>> prepared = prepare_requests(rows, spec, name="reviews", partition_key="2026-11-24",
        ...                             workdir=tempfile.mkdtemp())
        >>> from infron_dagster import submit_prepared
        >>> _ = submit_prepared(client, storage, prepared, spec=spec, partition_key="2026-11-24")
        >>> outcome = collect_partition(client, storage, spec, "2026-11-24")
        >>> outcome.ready, outcome.results.num_rows, outcome.failed.column("error_code").to_pylist()
        (True, 2, ['invalid_input'])
    """
    history = history or PartitionHistory.load(storage, partition_key)
    attempts = history.active
    if not attempts:
        raise ValueError(f"partition {partition_key!r} has no submitted attempt to collect")
    outcome = CollectOutcome(ready=True, attempts=[m.attempt for m in attempts])
    outcome.history = history
    outcome.cancelled = [m.attempt for m in attempts if m.cancelled]
    outcome.max_line_bytes = max_line_bytes
    outcome.key_redactor = client.redact
    for manifest in attempts:
        if not manifest.settled:
            outcome.ready = False
            outcome.waiting_on.append(f"attempt {manifest.attempt} is not fully submitted")
            continue
        batches = _fetch_attempt(client, storage, manifest)
        if batches is None:
            outcome.ready = False
            outcome.waiting_on.extend(manifest.batch_ids)
            continue
        outcome.batches.update(batches)
    for source in history.waited_on(attempts):
        outcome.sources.append(source.attempt)
        batches = _fetch_attempt(client, storage, source)
        if batches is None:  # carried answers still being paid for: collect them too
            outcome.ready = False
            outcome.waiting_on.extend(source.batch_ids)
            continue
        outcome.batches.update(batches)
    if not outcome.ready:
        return outcome
    # Writing the tables and marking the attempts collected is one step: no submit or retry
    # of this partition may slip in between (it would be marked collected unseen).
    with storage.lock(partition_key):
        outcome.history = history = history.reload()
        now = history.active
        if [m.attempt for m in now] != outcome.attempts or not all(m.settled for m in now):
            outcome.ready = False
            outcome.waiting_on.append("a new attempt was submitted meanwhile")
            return outcome
        # The manifests as they are now: what is marked collected keeps a cancel made since.
        _write_tables(storage, spec, now, outcome, keep_columns, price, on_written)
    return outcome


def _write_tables(
    storage: BatchStorage,
    spec: RequestSpec,
    attempts: list[Manifest],
    outcome: CollectOutcome,
    keep_columns: Sequence[str] | None,
    price: ModelPrice | None,
    on_written: Callable[[CollectOutcome], dict[str, Any]] | None = None,
) -> None:
    """Merge the attempts' outcomes, then join them to the inputs a row group at a time and
    write both tables: memory is set by the outcomes' columns and one slice of the inputs."""
    partition_key, base = attempts[0].partition_key, attempts[0]
    # One chunk per column: a take from many chunks concatenates them all, on every slice
    # (a transient copy of every answer each time, and most of the join's time)
    final = _merge(storage, attempts, outcome)
    with contextlib.suppress(pa.ArrowInvalid):  # past 2**31 vector values: kept in chunks
        final = final.combine_chunks()
    inputs_path = storage.attempt_file("inputs", partition_key, base.attempt)
    invalid = storage.read_table(storage.attempt_file("invalid", partition_key, base.attempt))
    with inputs_path.open("rb") as fh:
        inputs = pq.ParquetFile(fh)
        fees = {b: i["cost"] for b, i in outcome.batches.items() if i.get("cost") is not None}
        history = outcome.history
        assert history is not None
        # earlier attempts' answers are ours too
        own = pa.array(history.own_batch_ids, pa.string())
        costs = RowCosts.from_outcomes(final, fees, price, own_batches=own)
        builder = TablesBuilder(
            inputs.schema_arrow, final, spec=spec, keep_columns=keep_columns, costs=costs
        )
        outcome.input_rows = inputs.metadata.num_rows + invalid.num_rows
        reuse = BODY_HASH in inputs.schema_arrow.names
        answers = _Answers(storage, partition_key, outcome, history.manifests) if reuse else None
        columns = builder.input_columns + ([BODY_HASH] if answers else [])
        batches = inputs.iter_batches(batch_size=SLICE_ROWS, columns=columns)
        results_path = storage.table_path("results", partition_key)
        failed_path = storage.table_path("failed", partition_key)
        with (
            _TableFile(storage, results_path, builder.results_schema) as results,
            _TableFile(storage, failed_path, builder.failed_schema) as failed,
        ):
            where = builder.outcome_rows(inputs.read(columns=[CUSTOM_ID]).column(0))
            start = 0
            for batch in batches:
                rows = pa.Table.from_batches([batch])
                ok, bad = builder.split(rows, where[start : start + rows.num_rows])
                start += rows.num_rows
                results.write(ok)
                failed.write(bad)
                if answers is not None:
                    answers.add(rows, ok)
            failed.write(builder.invalid_rows(invalid, base.attempt))
    if answers is not None:  # before the manifests (the commit point) are marked collected
        answers.write()
    outcome.results_summary, outcome.failed_summary = results.summary, failed.summary
    # Read back under the schema written (Parquet names a list's items "element")
    outcome._readers = {
        "results": lambda: storage.read_table(results_path).cast(results.schema),
        "failed": lambda: storage.read_table(failed_path).cast(failed.schema),
    }
    if on_written is not None:
        outcome.settled = on_written(outcome)
    _mark_collected(storage, [*attempts, *history.waited_on(attempts)], outcome.batches)


# Input rows joined and written at a time.
SLICE_ROWS = 32_768


class _Answers:
    """The requests this partition's own batches answered (reuse_answers="pipeline"): by
    body hash, for other partitions to carry instead of paying again (see ``reuse``)."""

    def __init__(
        self,
        storage: BatchStorage,
        partition_key: str | None,
        parent: CollectOutcome,
        manifests: list[Manifest],
    ) -> None:
        self.storage, self.partition_key, self.parent = storage, partition_key, parent
        self.manifests = manifests
        self.own = pa.array(sorted({b for m in self.manifests for b in m.batch_ids}), pa.string())
        self.parts: list[pa.Table] = []

    def add(self, inputs: pa.Table, results: pa.Table) -> None:
        # Answers carried from another partition live there: its own file lists them.
        mine = results.filter(pc.is_in(results.column("batch_id"), value_set=self.own))
        position = pc.index_in(mine.column(CUSTOM_ID), value_set=inputs.column(CUSTOM_ID))
        self.parts.append(
            pa.table(
                {
                    "body_hash": inputs.column(BODY_HASH).take(position),
                    "custom_id": mine.column(CUSTOM_ID),
                    "attempt": mine.column("attempt"),
                }
            )
        )

    def write(self) -> None:
        """Add them to the partition's answers file. Earlier entries stay while their
        attempt's result files exist (a question no longer asked here was still answered);
        an attempt with result files but not in the file (an unreadable or old-layout file,
        an attempt replaced while in flight) is read from its result files once."""
        schema = _ANSWERED
        table = pa.concat_tables([p.cast(schema) for p in self.parts] or [schema.empty_table()])
        table = table.filter(table.column("body_hash").is_valid())
        raw = self.storage.list_files(self.storage.partition_dir("raw", self.partition_key))
        downloaded = {int(m.group(1)) for n in raw if (m := _MARKER_RE.match(n))}
        write_answers(
            self.storage,
            self.partition_key,
            table,
            complete=[m.attempt for m in active_attempts(self.manifests)],
            attempts=sorted(downloaded & {m.attempt for m in self.manifests}),
            rebuild=self._rebuild,
        )

    def _rebuild(self, attempt: int) -> pa.Table | None:
        """What attempt ``attempt`` itself sent and was answered, from its result files."""
        manifest = next(m for m in self.manifests if m.attempt == attempt)
        try:
            with self.storage.attempt_file("inputs", self.partition_key, attempt).open("rb") as fh:
                names = pq.ParquetFile(fh).schema_arrow.names
                if BODY_HASH not in names:  # sent before pipeline reuse: no body hashes
                    return _ANSWERED.empty_table()
                fh.seek(0)
                wanted = [CUSTOM_ID, BODY_HASH] + ([CARRIED_FROM] if CARRIED_FROM in names else [])
                snapshot = pq.read_table(fh, columns=wanted)
            if CARRIED_FROM in snapshot.column_names:  # carried rows were answered elsewhere
                snapshot = snapshot.filter(snapshot.column(CARRIED_FROM).is_null())
            marker = self.storage.attempt_dir("raw", self.partition_key, attempt) / "batches.json"
            scratch = CollectOutcome(ready=True, batches=self.storage.read_json(marker))
            scratch.max_line_bytes = self.parent.max_line_bytes
            outcomes = _attempt_outcomes(self.storage, manifest, scratch)
        except Exception as exc:  # tried again at the next collection
            logger.warning(
                "answers of partition %r attempt %d cannot be read back: %s",
                self.partition_key,
                attempt,
                printable(str(exc), 200),
            )
            return None
        ids = outcomes.filter(outcomes.column("ok")).column(CUSTOM_ID)
        position = pc.index_in(ids, value_set=snapshot.column(CUSTOM_ID))
        valid = position.is_valid()
        found = pc.filter(ids, valid)
        return pa.table(
            {
                "body_hash": snapshot.column(BODY_HASH).take(pc.filter(position, valid)),
                "custom_id": found,
                "attempt": pa.array([attempt] * len(found), pa.int64()),
            },
            schema=_ANSWERED,
        )


_ANSWERED = pa.schema(
    [("body_hash", pa.string()), ("custom_id", pa.string()), ("attempt", pa.int64())]
)
_MARKER_RE = re.compile(r"^attempt=(\d+)/batches\.json$")


class _TableFile:
    """One Parquet table written a row group at a time; it appears whole or not at all.

    A row group is encoded and compressed on a thread of its own while the next slice is
    joined (both release the GIL); one at a time, so memory holds at most one slice more.
    """

    def __init__(self, storage: BatchStorage, path: Any, schema: pa.Schema) -> None:
        self.storage, self.path, self.schema = storage, path, schema
        self.summary = TableSummary(schema)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="infron-parquet")
        self._pending: Future[None] | None = None

    def __enter__(self) -> _TableFile:
        self._file = self.storage.open_write(self.path)
        self._writer = pq.ParquetWriter(self._file.__enter__(), self.schema, compression="zstd")
        return self

    def write(self, part: pa.Table) -> None:
        if part.num_rows:
            self.summary.add(part)
            self._wait()
            self._pending = self._pool.submit(self._writer.write_table, part)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # the writer's error, if any, is raised here

    def __exit__(self, *exc: Any) -> None:
        try:
            try:
                self._wait()
            finally:
                self._pool.shutdown(wait=True)
                self._writer.close()  # also after an error: its finalizer would write later
        except BaseException as error:  # the file must not appear: it is not whole
            self._file.__exit__(type(error), error, error.__traceback__)
            raise
        self._file.__exit__(*exc)


def _fetch_attempt(
    client: InfronClient, storage: BatchStorage, manifest: Manifest
) -> dict[str, dict[str, Any]] | None:
    """Download an attempt's result files once; None while a batch is still running."""
    raw = storage.attempt_dir("raw", manifest.partition_key, manifest.attempt)
    marker = raw / "batches.json"
    try:  # downloaded by an earlier collection: one read, not a lookup and a read
        return storage.read_json(storage.fresh(marker))
    except FileNotFoundError:
        pass
    batches = poll_manifest(client, manifest)
    if not all(b.is_terminal for b in batches.values()):
        return None
    info: dict[str, dict[str, Any]] = {}
    for batch_id, batch in batches.items():
        files, problems = _download_files(client, storage, raw / safe_segment(batch_id), batch)
        info[batch_id] = _batch_info(batch, files, problems)
    storage.write_json(marker, info)
    return info


# A result file refused this many times (a 403 or 404 that outlives a few collection runs)
# is given up: its rows fail as missing_result rather than block the partition for good.
MAX_DOWNLOAD_REFUSALS = 3


def _download_files(
    client: InfronClient, storage: BatchStorage, folder: Any, batch: Batch
) -> tuple[list[str], list[str]]:
    """Store a batch's result files; a file refused for good is a problem, not a crash.

    A transient error (connection, 5xx) and the first refusals of a file (a pre-signed link
    not valid yet, a 404 from an eventually consistent store) stop the run, so the next
    collection downloads again instead of failing paid-for rows. A URL that is refused on
    sight (not http(s)) is a problem at once.
    """
    files, problems = [], []
    for result_file in client.result_files(batch):
        path = folder / result_file.name
        try:
            with storage.open_write(path) as fh:
                client.download(result_file, fh)
        except InfronError as exc:
            if exc.retryable or _refused_again(storage, folder, result_file.name, exc):
                raise
            problems.append(f"{result_file.kind} file could not be downloaded: {exc}")
            logger.warning("batch %s: %s", printable(batch.id, 80), problems[-1])
            continue
        files.append(storage.relative(path))
    return files, problems


def _refused_again(storage: BatchStorage, folder: Any, name: str, exc: InfronError) -> bool:
    """Count a refusal on storage; True while the file deserves another try later."""
    if exc.status_code is None:
        return False  # refused by us (a foreign scheme, a malformed URL): it will not change
    marker = folder / "refusals.json"
    counts = storage.read_json(marker) if storage.exists(marker) else {}
    counts[name] = int(counts.get(name, 0)) + 1
    storage.write_json(marker, counts)
    return counts[name] < MAX_DOWNLOAD_REFUSALS


def _batch_info(batch: Batch, files: list[str], problems: list[str]) -> dict[str, Any]:
    return {
        "status": batch.status.value,
        "raw_status": batch.raw_status,
        "files": files,
        "errors": [*batch.errors, *problems],
        "cost": batch.cost,
        "total_requests": batch.total_requests,
        "completed_requests": batch.completed_requests,
        "failed_requests": batch.failed_requests,
    }


def _merge(storage: BatchStorage, attempts: list[Manifest], outcome: CollectOutcome) -> pa.Table:
    """Per custom_id: the latest success of any attempt, else the latest failure; the
    answers carried from earlier attempts count as the earliest."""
    tables = [_carried(storage, attempts[0], outcome)]
    tables += [_attempt_outcomes(storage, manifest, outcome) for manifest in attempts]
    tables = [t for t in tables if t.num_rows]
    if len(tables) <= 1:  # one attempt, nothing carried: nothing to merge (and no copy)
        return tables[0] if tables else _empty_final()
    tables = [
        t.append_column("order", pa.array([i] * t.num_rows, pa.int64()))
        for i, t in enumerate(tables)
    ]
    merged = pa.concat_tables(tables)
    order = merged.column("order")
    # Successes first, then failures; within each, the latest first
    rank = pc.if_else(merged.column("ok"), pc.negate(order), pc.subtract(1 << 40, order))
    return _first_per_id(merged.append_column("rank", rank), "rank").drop_columns(["order", "rank"])


def _first_per_id(table: pa.Table, key: str) -> pa.Table:
    """For each custom_id, its row with the smallest ``key``."""
    if not table.num_rows or pc.count_distinct(table.column(CUSTOM_ID)).as_py() == len(table):
        return table  # each id once (the usual case): nothing to choose, no sort
    table = table.take(pc.sort_indices(table, [(CUSTOM_ID, "ascending"), (key, "ascending")]))
    ids = table.column(CUSTOM_ID).combine_chunks()
    first = np.ones(len(ids), bool)
    if len(ids) > 1:
        first[1:] = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1)).to_numpy(
            zero_copy_only=False
        )
    return table.filter(pa.array(first))


def _attempt_outcomes(
    storage: BatchStorage, manifest: Manifest, collected: CollectOutcome
) -> pa.Table:
    """One outcome per request an attempt sent: from its result lines (the first success,
    else the last line), or missing as its batch ended; with the attempt's number."""
    sent, _ = _sent_and_carried(storage, manifest, collected.history)
    report = collected.report
    parts, seq = [], 0
    for batch_id in manifest.batch_ids:
        for rel in collected.batches[batch_id]["files"]:
            with storage.resolve(rel).open("rb") as fh:
                table = read_outcome_table(
                    fh, report, batch_id, first_seq=seq, max_line_bytes=collected.max_line_bytes
                )
            if table.num_rows:  # the next file's lines come after this file's
                seq = int(pc.max(table.column("seq")).as_py()) + 1
            parts.append(redact_table(table, collected.key_redactor))
    lines = pa.concat_tables(parts) if parts else OUTCOME_SCHEMA.empty_table()
    # Each line's request (one hash pass settles unknown, duplicate and missing ids)
    position = pc.index_in(lines.column(CUSTOM_ID), value_set=sent)
    if position.null_count:
        known = position.is_valid()
        _count_unknown(lines.filter(pc.invert(known)), report)
        lines, position = lines.filter(known), position.filter(known)
    lines_per_request = np.bincount(_numpy(position), minlength=len(sent))
    picked = lines
    if lines.num_rows > np.count_nonzero(lines_per_request):
        # The first success stands; otherwise the last line (a duplicate never beats a success)
        seq = lines.column("seq")
        rank = pc.if_else(lines.column("ok"), seq, pc.subtract(1 << 40, seq))
        picked = _first_per_id(lines.append_column("rank", rank), "rank").drop_columns(["rank"])
        _count_duplicates(lines, picked, report)
    absent = np.flatnonzero(lines_per_request == 0)
    missing = _missing_outcomes(manifest, sent, absent, collected.batches)
    table = pa.concat_tables([picked, missing]).drop_columns(["seq"])
    return table.append_column("attempt", pa.array([manifest.attempt] * table.num_rows, pa.int64()))


def _count_unknown(lines: pa.Table, report: ParseReport) -> None:
    report.unknown_ids += lines.num_rows
    for custom_id in lines.column(CUSTOM_ID).slice(0, 5).to_pylist():
        report.note(f"unknown custom_id {custom_id}")


def _count_duplicates(lines: pa.Table, picked: pa.Table, report: ParseReport) -> None:
    extra = lines.num_rows - picked.num_rows
    if not extra:
        return
    report.duplicates += extra
    counts = pc.value_counts(lines.column(CUSTOM_ID))
    twice = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    for custom_id in twice.slice(0, 5).to_pylist():
        report.note(f"duplicate custom_id {custom_id}")


def _numpy(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    return array.to_numpy(zero_copy_only=False)


def _missing_outcomes(
    manifest: Manifest, sent: pa.Array, absent: np.ndarray, batches: dict[str, Any]
) -> pa.Table:
    """The requests (at ``absent`` in ``sent``, chunk after chunk) with no line in any
    result file of their (terminal) batch."""
    ends = np.cumsum([chunk.requests for chunk in manifest.chunks])
    chunk_of = np.searchsorted(ends, absent, side="right")
    ids = sent.take(pa.array(absent, pa.int64())).to_pylist()
    outcomes = [
        _missing(custom_id, manifest.chunks[c].batch_id or "", batches)
        if manifest.chunks[c].batch_id
        else _never_sent(custom_id, manifest.chunks[c])
        for custom_id, c in zip(ids, chunk_of.tolist(), strict=True)
    ]
    return outcomes_to_table(outcomes, [0] * len(outcomes), None)


def _sent_and_carried(
    storage: BatchStorage, manifest: Manifest, history: PartitionHistory | None = None
) -> tuple[pa.Array, dict[int, pa.Array]]:
    """The custom_ids an attempt sent (in chunk order), and those it carried, by source."""
    snapshot = _carry_columns(storage, manifest.partition_key, manifest.attempt, history)
    ids = snapshot.column(CUSTOM_ID).combine_chunks()
    if CARRIED_FROM not in snapshot.column_names:
        return ids, {}
    source = snapshot.column(CARRIED_FROM).combine_chunks()
    sent = pc.filter(ids, source.is_null())
    if CARRIED_PARTITION in snapshot.column_names:  # answers of other partitions: not here
        elsewhere = snapshot.column(CARRIED_PARTITION).combine_chunks().is_valid()
        source = pc.if_else(elsewhere, pa.scalar(None, pa.int64()), source)
    carried = {}
    for attempt in pc.unique(source.drop_null()).to_pylist():
        carried[attempt] = pc.filter(ids, pc.equal(source, attempt).fill_null(False))
    return sent, carried


def _carry_columns(
    storage: BatchStorage,
    partition_key: str | None,
    attempt: int,
    history: PartitionHistory | None = None,
) -> pa.Table:
    """An attempt's snapshot, only its custom_ids and where its carried rows come from."""
    if history is not None and history.partition_key == partition_key:
        return history.carry_columns(attempt)
    return read_carry_columns(storage, partition_key, attempt)


# (partition, attempt) of another partition -> [(its custom_ids, ours, our attempt)]
_Elsewhere = dict[tuple[str | None, int], list[tuple[pa.Array, pa.Array, int]]]


def _elsewhere(snapshot: pa.Table, ids: pa.Array | None, attempt: int, out: _Elsewhere) -> None:
    """Add the rows of ``snapshot`` (those in ``ids``, else all) carried from another
    partition to ``out``, as rows of ``attempt`` here."""
    if CARRIED_PARTITION not in snapshot.column_names:
        return
    mine = snapshot.column(CARRIED_PARTITION).is_valid()
    if ids is not None:
        mine = pc.and_(mine, pc.is_in(snapshot.column(CUSTOM_ID), value_set=ids))
    rows = snapshot.filter(mine)
    keys = zip(
        rows.column(CARRIED_PARTITION).to_pylist(),
        rows.column(CARRIED_FROM).to_pylist(),
        strict=True,
    )
    groups: dict[tuple[str | None, int], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    for key, positions in groups.items():
        taken = rows.take(pa.array(positions, pa.int64()))
        out.setdefault(key, []).append(
            (
                taken.column(CARRIED_ID).combine_chunks(),
                taken.column(CUSTOM_ID).combine_chunks(),
                attempt,
            )
        )


def _carried_elsewhere(
    storage: BatchStorage, groups: _Elsewhere, parent: CollectOutcome
) -> list[pa.Table]:
    """The answers reused from other partitions' attempts, under this partition's ids.

    A source that cannot be read any more (its files deleted) carries nothing: its rows fail
    as missing_result (retryable), never vanish."""
    parts = []
    for (partition, attempt), wanted in groups.items():
        try:
            path = storage.manifest_path(partition, attempt)
            source = Manifest.from_dict(storage.read_json(path))
            marker = storage.attempt_dir("raw", partition, attempt) / "batches.json"
            scratch = CollectOutcome(ready=True, batches=storage.read_json(marker))
            scratch.max_line_bytes = parent.max_line_bytes
            scratch.key_redactor = parent.key_redactor
            earlier = _attempt_outcomes(storage, source, scratch)
        except FileNotFoundError as exc:
            logger.warning("answers of %r attempt %d are gone: %s", partition, attempt, exc)
            continue
        earlier = earlier.filter(earlier.column("ok"))
        for theirs, ours, our_attempt in wanted:
            # One answer may serve several of our rows (the same body twice here)
            position = pc.index_in(theirs, value_set=earlier.column(CUSTOM_ID))
            valid = position.is_valid()
            found = earlier.take(pc.filter(position, valid))
            found = found.set_column(
                found.column_names.index(CUSTOM_ID), CUSTOM_ID, pc.filter(ours, valid)
            )
            column = found.column_names.index("attempt")
            found = found.set_column(
                column, "attempt", pa.array([our_attempt] * found.num_rows, pa.int64())
            )
            parts.append(found)
    return parts


def _carried(storage: BatchStorage, base: Manifest, parent: CollectOutcome) -> pa.Table:
    """The paid-for answers a new attempt reused from earlier attempts, read from their files
    (and from other partitions' attempts, with reuse_answers="pipeline")."""
    history = parent.history or PartitionHistory.load(storage, base.partition_key)
    _, carried = _sent_and_carried(storage, base, history)
    elsewhere: _Elsewhere = {}
    own = _carry_columns(storage, base.partition_key, base.attempt, history)
    _elsewhere(own, None, base.attempt, elsewhere)
    by_attempt = history.by_attempt
    # A row carried from an attempt that was in flight keeps that attempt's outcome, failed
    # or not (it was sent there, and only there); from a collected attempt, only successes
    # were carried.
    waited = {int(w["attempt"]) for w in base.waits_on}
    parts = [_empty_final()]
    for attempt, ids in carried.items():
        source = by_attempt[attempt]
        marker = storage.attempt_dir("raw", source.partition_key, attempt) / "batches.json"
        scratch = CollectOutcome(ready=True, batches=storage.read_json(marker))
        scratch.max_line_bytes = parent.max_line_bytes
        scratch.key_redactor = parent.key_redactor
        scratch.history = history
        earlier = _attempt_outcomes(storage, source, scratch)
        mine = pc.is_in(earlier.column(CUSTOM_ID), value_set=ids)
        if attempt not in waited:
            mine = pc.and_(mine, earlier.column("ok"))
        parts.append(earlier.filter(mine))
        # Rows that attempt itself carried from another partition: read from there.
        source_columns = _carry_columns(storage, base.partition_key, attempt, history)
        _elsewhere(source_columns, ids, attempt, elsewhere)
    parts += _carried_elsewhere(storage, elsewhere, parent)
    return pa.concat_tables(parts)


def _empty_final() -> pa.Table:
    schema = OUTCOME_SCHEMA.remove(OUTCOME_SCHEMA.get_field_index("seq"))
    return schema.append(pa.field("attempt", pa.int64())).empty_table()


def _never_sent(custom_id: str, chunk: ChunkRecord) -> Outcome:
    """A request of a chunk that a cancel stopped before its batch was created."""
    message = "the attempt was cancelled before this request was sent (nothing was paid)"
    if chunk.uncertain:
        message = (
            "the attempt was cancelled after a create call for this request's chunk ended "
            "ambiguously: a batch may exist that is not on record (check the provider)"
        )
    return Outcome(custom_id, ok=False, error_code="batch_cancelled", error_message=message)


def _missing(custom_id: str, batch_id: str | None, batches: dict[str, dict[str, Any]]) -> Outcome:
    """A request with no line in any result file of its (terminal) batch."""
    info = batches.get(batch_id or "", {})
    code = _MISSING_CODES.get(BatchStatus(info.get("status", "unknown")))
    if code is None:
        message = "the batch completed without a result line for this request"
        if info.get("errors"):
            message += ": " + "; ".join(info["errors"])
        return Outcome(
            custom_id,
            ok=False,
            error_code="missing_result",
            error_message=message,
            batch_id=batch_id,
        )
    reason = "; ".join(info.get("errors") or []) or f"batch ended {info.get('status')}"
    return Outcome(custom_id, ok=False, error_code=code, error_message=reason, batch_id=batch_id)


def _mark_collected(
    storage: BatchStorage, attempts: list[Manifest], batches: dict[str, dict[str, Any]]
) -> None:
    stamp = now_iso()
    for manifest in attempts:
        for chunk in manifest.chunks:
            if chunk.batch_id in batches:
                chunk.status = batches[chunk.batch_id]["status"]
        if manifest.state != "collected":
            manifest.state = "collected"
            manifest.collected_at = stamp
        storage.write_json(
            storage.manifest_path(manifest.partition_key, manifest.attempt), manifest.to_dict()
        )
