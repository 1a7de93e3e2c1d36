"""MERGE: every attempt's outcomes -> one outcome per row, carried answers included.

Collection (:mod:`~infron_dagster.collect`) downloads the result files; this module reads
them back. An attempt's result lines give one outcome per request it sent (the first
success, else its last line; a request with no line is missing as its batch ended, or never
sent when a cancel stopped its chunk). The attempts of a partition then merge: per row, the
latest success of any attempt, else its latest failure. A row an attempt *carried* (not
sent, because a paid-for answer existed, see :mod:`~infron_dagster.carry`) takes that
answer, read from the attempt or the other partition that paid for it.

With ``reuse_answers="pipeline"``, :class:`CarryCacheWriter` records which requests this
partition's own batches answered, in its carry cache (:mod:`~infron_dagster.carry_cache`).

Example::

    merged = merge_attempts(storage, history.active, outcome)  # in collect_partition
    merged.num_rows, merged.filter(merged.column("ok")).num_rows
    # -> (1000, 980)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .carry_cache import ANSWERED_SCHEMA, write_answers
from .columns import BODY_HASH, CARRIED_FROM, CARRIED_ID, CARRIED_PARTITION, CUSTOM_ID
from .history import PartitionHistory, active_attempts, read_carry_columns
from .manifest import ChunkRecord, Manifest, load_manifests
from .models import BatchStatus
from .outcomes import OUTCOME_SCHEMA, outcomes_to_table, read_outcome_table, redact_table
from .results import DEFAULT_MAX_LINE_BYTES, Outcome, ParseReport
from .storage import BatchStorage
from .untrusted import printable

__all__ = [
    "BATCHES_MARKER_RE",
    "CarryCacheWriter",
    "ResultReading",
    "attempt_outcomes",
    "merge_attempts",
]

logger = logging.getLogger(__name__)

# A downloaded attempt's marker under ``raw/partition=<key>/`` (written by collection)
BATCHES_MARKER_RE = re.compile(r"^attempt=(\d+)/batches\.json$")

_MISSING_CODES = {
    BatchStatus.EXPIRED: "batch_expired",
    BatchStatus.CANCELLED: "batch_cancelled",
    BatchStatus.FAILED: "batch_failed",
}


class ResultReading(Protocol):
    """What reading an attempt's result files needs: a
    :class:`~infron_dagster.collect.CollectOutcome` is one.

    Example::

        attempt_outcomes(storage, manifest, outcome)   # outcome: a CollectOutcome
    """

    batches: dict[str, dict[str, Any]]  # batch id -> its downloaded files, status, errors
    report: ParseReport  # counts what could not be read
    max_line_bytes: int
    key_redactor: Callable[[str], str] | None
    history: PartitionHistory | None


@dataclass
class _Reading:
    """A :class:`ResultReading` of an attempt other than those collected (a source of
    carried answers): its own ``batches.json``, the collection's limits, its own report."""

    batches: dict[str, dict[str, Any]]
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    key_redactor: Callable[[str], str] | None = None
    history: PartitionHistory | None = None
    report: ParseReport = field(default_factory=ParseReport)

    @classmethod
    def of(
        cls,
        storage: BatchStorage,
        source: Manifest,
        parent: ResultReading,
        *,
        history: PartitionHistory | None = None,
        redact: bool = True,
    ) -> _Reading:
        marker = storage.attempt_dir("raw", source.partition_key, source.attempt)
        batches = storage.read_json(marker / "batches.json")
        redactor = parent.key_redactor if redact else None
        return cls(batches, parent.max_line_bytes, redactor, history)


def merge_attempts(
    storage: BatchStorage, attempts: list[Manifest], reading: ResultReading
) -> pa.Table:
    """Per custom_id: the latest success of any attempt, else the latest failure; the
    answers carried from earlier attempts count as the earliest.

    ``attempts``: the active attempts, the base (initial) one first. One row per request,
    with the outcome's columns and the ``attempt`` that answered it.

    Example::

        merged = merge_attempts(storage, history.active, outcome)  # outcome: a CollectOutcome
        merged.column_names[:3], merged.num_rows
        # -> (['custom_id', 'ok', 'text'], 1000)
    """
    tables = [_carried_outcomes(storage, attempts[0], reading)]
    tables += [attempt_outcomes(storage, manifest, reading) for manifest in attempts]
    tables = [t for t in tables if t.num_rows]
    if len(tables) <= 1:  # one attempt, nothing carried: nothing to merge (and no copy)
        return tables[0] if tables else _empty_merged()
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


def attempt_outcomes(
    storage: BatchStorage, manifest: Manifest, collected: ResultReading
) -> pa.Table:
    """One outcome per request an attempt sent: from its result lines (the first success,
    else the last line), or missing as its batch ended; with the attempt's number.

    Example::

        table = attempt_outcomes(storage, manifest, outcome)    # outcome: a CollectOutcome
        table.filter(table.column("ok")).num_rows               # -> 980
    """
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
_ElsewhereGroups = dict[tuple[str | None, int], list[tuple[pa.Array, pa.Array, int]]]


def _group_elsewhere(
    snapshot: pa.Table, ids: pa.Array | None, attempt: int, out: _ElsewhereGroups
) -> None:
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


def _carried_from_elsewhere(
    storage: BatchStorage, groups: _ElsewhereGroups, parent: ResultReading
) -> list[pa.Table]:
    """The answers reused from other partitions' attempts, under this partition's ids.

    A source that cannot be read any more (its files deleted) carries nothing: its rows fail
    as missing_result (retryable), never vanish."""
    parts = []
    for (partition, attempt), wanted in groups.items():
        try:
            path = storage.manifest_path(partition, attempt)
            source = Manifest.from_dict(storage.read_json(path))
            earlier = attempt_outcomes(storage, source, _Reading.of(storage, source, parent))
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


def _carried_outcomes(storage: BatchStorage, base: Manifest, parent: ResultReading) -> pa.Table:
    """The paid-for answers a new attempt reused from earlier attempts, read from their files
    (and from other partitions' attempts, with reuse_answers="pipeline")."""
    history = parent.history or PartitionHistory.load(storage, base.partition_key)
    _, carried = _sent_and_carried(storage, base, history)
    elsewhere: _ElsewhereGroups = {}
    own = _carry_columns(storage, base.partition_key, base.attempt, history)
    _group_elsewhere(own, None, base.attempt, elsewhere)
    by_attempt = history.by_attempt
    # A row carried from an attempt that was in flight keeps that attempt's outcome, failed
    # or not (it was sent there, and only there); from a collected attempt, only successes
    # were carried.
    waited = {int(w["attempt"]) for w in base.waits_on}
    parts = [_empty_merged()]
    for attempt, ids in carried.items():
        source = by_attempt[attempt]
        reading = _Reading.of(storage, source, parent, history=history)
        earlier = attempt_outcomes(storage, source, reading)
        mine = pc.is_in(earlier.column(CUSTOM_ID), value_set=ids)
        if attempt not in waited:
            mine = pc.and_(mine, earlier.column("ok"))
        parts.append(earlier.filter(mine))
        # Rows that attempt itself carried from another partition: read from there.
        source_columns = _carry_columns(storage, base.partition_key, attempt, history)
        _group_elsewhere(source_columns, ids, attempt, elsewhere)
    parts += _carried_from_elsewhere(storage, elsewhere, parent)
    return pa.concat_tables(parts)


def _empty_merged() -> pa.Table:
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


class CarryCacheWriter:
    """Records, slice by slice, the requests this partition's own batches answered, then
    writes them to its carry cache (``reuse_answers="pipeline"``): by body hash, for other
    partitions to carry instead of paying again (see :mod:`~infron_dagster.carry_cache`).

    ``manifests``: the partition's manifests (read from storage when not given).

    Example::

        writer = CarryCacheWriter(storage, "2026-11-24", outcome, history.manifests)
        for inputs, results in slices:        # the input slice, the results written for it
            writer.add(inputs, results)
        writer.write()                        # before the manifests are marked collected
    """

    def __init__(
        self,
        storage: BatchStorage,
        partition_key: str | None,
        parent: ResultReading,
        manifests: list[Manifest] | None = None,
    ) -> None:
        self.storage, self.partition_key, self.parent = storage, partition_key, parent
        if manifests is None:
            manifests = load_manifests(storage, partition_key)
        self.manifests = manifests
        self.own = pa.array(sorted({b for m in self.manifests for b in m.batch_ids}), pa.string())
        self.parts: list[pa.Table] = []

    def add(self, inputs: pa.Table, results: pa.Table) -> None:
        """Note the results of one input slice that this partition's batches answered."""
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
        schema = ANSWERED_SCHEMA
        table = pa.concat_tables([p.cast(schema) for p in self.parts] or [schema.empty_table()])
        table = table.filter(table.column("body_hash").is_valid())
        raw = self.storage.list_files(self.storage.partition_dir("raw", self.partition_key))
        downloaded = {int(m.group(1)) for n in raw if (m := BATCHES_MARKER_RE.match(n))}
        write_answers(
            self.storage,
            self.partition_key,
            table,
            complete=[m.attempt for m in active_attempts(self.manifests)],
            attempts=sorted(downloaded & {m.attempt for m in self.manifests}),
            rebuild=self._rebuild,
        )

    def _rebuild(self, attempt: int) -> pa.Table | None:
        """What attempt ``attempt`` itself sent and was answered, from its result files;
        None when they cannot be read now (tried again at the next collection)."""
        manifest = next(m for m in self.manifests if m.attempt == attempt)
        try:
            snapshot = _sent_body_hashes(self.storage, self.partition_key, attempt)
            if snapshot is None:  # sent before pipeline reuse: no body hashes
                return ANSWERED_SCHEMA.empty_table()
            reading = _Reading.of(self.storage, manifest, self.parent, redact=False)
            outcomes = attempt_outcomes(self.storage, manifest, reading)
        except Exception as exc:
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
            schema=ANSWERED_SCHEMA,
        )


def _sent_body_hashes(
    storage: BatchStorage, partition_key: str | None, attempt: int
) -> pa.Table | None:
    """The custom_ids and body hashes of the rows an attempt sent itself (carried rows
    were answered elsewhere); None for a snapshot written before pipeline reuse."""
    with storage.attempt_file("inputs", partition_key, attempt).open("rb") as fh:
        names = pq.ParquetFile(fh).schema_arrow.names
        if BODY_HASH not in names:
            return None
        fh.seek(0)
        wanted = [CUSTOM_ID, BODY_HASH] + ([CARRIED_FROM] if CARRIED_FROM in names else [])
        snapshot = pq.read_table(fh, columns=wanted)
    if CARRIED_FROM in snapshot.column_names:
        snapshot = snapshot.filter(snapshot.column(CARRIED_FROM).is_null())
    return snapshot
