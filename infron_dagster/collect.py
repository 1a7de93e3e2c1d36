"""COLLECT: finished batches -> results and failed Parquet for one partition.

Downloads every output and error file (streaming, into storage, once), merges attempts (a
row that succeeds in any attempt is a result; otherwise its latest failure stands; see
:mod:`~infron_dagster.merge`), and writes the two hive-partitioned tables atomically. The
manifests are marked collected last: they are the commit point.

Example::

    outcome = collect_partition(client, storage, spec, "2026-11-24")
    outcome.ready, outcome.results.num_rows, outcome.failed.num_rows
    # -> (True, 980, 20)
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .client import InfronClient
from .columns import BODY_HASH, CUSTOM_ID
from .errors import InfronError
from .history import PartitionHistory, active_attempts
from .manifest import Manifest, now_iso
from .merge import CarryCacheWriter, merge_attempts
from .models import Batch
from .pilot_book import PilotBook
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
    final = merge_attempts(storage, attempts, outcome)
    with contextlib.suppress(pa.ArrowInvalid):  # past 2**31 vector values: kept in chunks
        final = final.combine_chunks()
    inputs_path = storage.attempt_file("inputs", partition_key, base.attempt)
    invalid = storage.read_table(storage.attempt_file("invalid", partition_key, base.attempt))
    history = outcome.history
    assert history is not None
    with inputs_path.open("rb") as fh:
        inputs = pq.ParquetFile(fh)
        builder = _builder(inputs, final, outcome, spec, keep_columns, price)
        outcome.input_rows = inputs.metadata.num_rows + invalid.num_rows
        answers = None
        if BODY_HASH in inputs.schema_arrow.names:
            answers = CarryCacheWriter(storage, partition_key, outcome, history.manifests)
        invalid_rows = builder.invalid_rows(invalid, base.attempt)
        results, failed = _write_slices(
            storage, partition_key, inputs, builder, answers, invalid_rows
        )
    if answers is not None:  # before the manifests (the commit point) are marked collected
        answers.write()
    outcome.results_summary, outcome.failed_summary = results.summary, failed.summary
    # Read back under the schema written (Parquet names a list's items "element")
    outcome._readers = {
        "results": lambda: storage.read_table(results.path).cast(results.schema),
        "failed": lambda: storage.read_table(failed.path).cast(failed.schema),
    }
    if on_written is not None:
        outcome.settled = on_written(outcome)
    _queue_pilot(storage, base)
    _mark_collected(storage, [*attempts, *history.waited_on(attempts)], outcome.batches)


def _queue_pilot(storage: BatchStorage, base: Manifest) -> None:
    """A pilot's collection puts it (back) in the pilot queue before its commit point: the
    sensor reads its verdict next, even if the queue lost it since it was sent."""
    mark = base.pilot or {}
    if mark.get("role") == "pilot" and isinstance(mark.get("prompt"), str):
        PilotBook(storage).mark(base.partition_key, base.attempt, mark["prompt"])


def _builder(
    inputs: pq.ParquetFile,
    final: pa.Table,
    outcome: CollectOutcome,
    spec: RequestSpec,
    keep_columns: Sequence[str] | None,
    price: ModelPrice | None,
) -> TablesBuilder:
    """The join of the merged outcomes to the inputs, with each row's cost."""
    fees = {b: i["cost"] for b, i in outcome.batches.items() if i.get("cost") is not None}
    assert outcome.history is not None
    # earlier attempts' answers are ours too
    own = pa.array(outcome.history.own_batch_ids, pa.string())
    costs = RowCosts.from_outcomes(final, fees, price, own_batches=own)
    return TablesBuilder(
        inputs.schema_arrow, final, spec=spec, keep_columns=keep_columns, costs=costs
    )


def _write_slices(
    storage: BatchStorage,
    partition_key: str | None,
    inputs: pq.ParquetFile,
    builder: TablesBuilder,
    answers: CarryCacheWriter | None,
    invalid_rows: pa.Table,
) -> tuple[_TableFile, _TableFile]:
    """Join and write the results and failed tables a slice of the inputs at a time (the
    rows that could not be rendered last); the written files."""
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
        failed.write(invalid_rows)
    return results, failed


# Input rows joined and written at a time.
SLICE_ROWS = 32_768


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
