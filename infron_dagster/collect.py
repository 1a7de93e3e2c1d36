"""COLLECT: finished batches -> results and failed Parquet for one partition.

Downloads every output and error file (streaming, into storage, once), parses them, merges
attempts (a row that succeeds in any attempt is a result; otherwise its latest failure
stands), and writes the two hive-partitioned tables atomically. The manifests are marked
collected last: they are the commit point.

Example:
    >>> outcome = collect_partition(client, storage, spec, "2026-11-24")
    >>> outcome.ready, outcome.results.num_rows, outcome.failed.num_rows
    (True, 980, 20)
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .client import InfronClient
from .errors import InfronError
from .manifest import Manifest, now_iso
from .models import Batch, BatchStatus
from .prepare import CARRIED_FROM, CUSTOM_ID
from .results import DEFAULT_MAX_LINE_BYTES, Outcome, ParseReport, read_outcomes
from .spec import RequestSpec
from .storage import BatchStorage
from .submit import load_manifests
from .tables import FinalOutcome, build_tables
from .untrusted import printable, safe_segment

__all__ = ["CollectOutcome", "active_attempts", "collect_partition", "poll_manifest"]

logger = logging.getLogger(__name__)

_MISSING_CODES = {
    BatchStatus.EXPIRED: "batch_expired",
    BatchStatus.CANCELLED: "batch_cancelled",
    BatchStatus.FAILED: "batch_failed",
}


@dataclass
class CollectOutcome:
    """What collecting a partition produced, or why it could not yet."""

    ready: bool
    waiting_on: list[str] = field(default_factory=list)
    results: pa.Table | None = None
    failed: pa.Table | None = None
    attempts: list[int] = field(default_factory=list)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    report: ParseReport = field(default_factory=ParseReport)
    input_rows: int = 0
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    key_redactor: Callable[[str], str] | None = None

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
    def error_counts(self) -> dict[str, int]:
        """Failed rows by error code."""
        if self.failed is None or not self.failed.num_rows:
            return {}
        return dict(Counter(self.failed.column("error_code").to_pylist()))

    @property
    def tokens(self) -> dict[str, int]:
        """Prompt/completion tokens of the results."""
        if self.results is None or not self.results.num_rows:
            return {"prompt_tokens": 0, "completion_tokens": 0}
        return {
            name: int(pc.sum(self.results.column(name)).as_py() or 0)
            for name in ("prompt_tokens", "completion_tokens")
        }

    @property
    def cost(self) -> float | None:
        """The sum of what the API reported as cost (fees), when it reports any."""
        costs = [b["cost"] for b in self.batches.values() if b.get("cost") is not None]
        return float(sum(costs)) if costs else None


def active_attempts(manifests: Sequence[Manifest]) -> list[Manifest]:
    """The latest initial attempt and its retries: what the partition's tables reflect."""
    initial = [m for m in manifests if m.kind == "initial" and m.state != "abandoned"]
    if not initial:
        return []
    base = initial[-1].attempt
    return [m for m in manifests if m.base_attempt == base and m.state != "abandoned"]


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
) -> CollectOutcome:
    """Collect one partition if every batch of every active attempt is terminal.

    Whatever the provider sent, every input row ends in results or failed: a line that
    cannot be read fails its row (``unparseable_result``), a line over ``max_line_bytes``
    fails its row (``result_too_large``), a result file that cannot be fetched for good (a
    refused URL, a 404) fails the rows it held as ``missing_result``. Only a transient
    error (connection, 5xx) stops the run, to be collected again.
    """
    attempts = active_attempts(load_manifests(storage, partition_key))
    if not attempts:
        raise ValueError(f"partition {partition_key!r} has no submitted attempt to collect")
    outcome = CollectOutcome(ready=True, attempts=[m.attempt for m in attempts])
    outcome.max_line_bytes = max_line_bytes
    outcome.key_redactor = client.redact
    for manifest in attempts:
        if not manifest.fully_submitted:
            outcome.ready = False
            outcome.waiting_on.append(f"attempt {manifest.attempt} is not fully submitted")
            continue
        batches = _fetch_attempt(client, storage, manifest)
        if batches is None:
            outcome.ready = False
            outcome.waiting_on.extend(manifest.batch_ids)
            continue
        outcome.batches.update(batches)
    if not outcome.ready:
        return outcome
    # Writing the tables and marking the attempts collected is one step: no submit or retry
    # of this partition may slip in between (it would be marked collected unseen).
    with storage.lock(partition_key):
        now = active_attempts(load_manifests(storage, partition_key))
        if [m.attempt for m in now] != outcome.attempts:
            outcome.ready = False
            outcome.waiting_on.append("a new attempt was submitted meanwhile")
            return outcome
        _write_tables(storage, spec, attempts, outcome, keep_columns)
    return outcome


def _write_tables(
    storage: BatchStorage,
    spec: RequestSpec,
    attempts: list[Manifest],
    outcome: CollectOutcome,
    keep_columns: Sequence[str] | None,
) -> None:
    partition_key, base = attempts[0].partition_key, attempts[0]
    final = _merge(storage, attempts, outcome)
    inputs = storage.read_table(storage.attempt_file("inputs", partition_key, base.attempt))
    invalid = storage.read_table(storage.attempt_file("invalid", partition_key, base.attempt))
    outcome.input_rows = inputs.num_rows + invalid.num_rows
    outcome.results, outcome.failed = build_tables(
        inputs, invalid, final, spec=spec, keep_columns=keep_columns, invalid_attempt=base.attempt
    )
    storage.write_table(storage.table_path("results", partition_key), outcome.results)
    storage.write_table(storage.table_path("failed", partition_key), outcome.failed)
    _mark_collected(storage, attempts, outcome.batches)


def _fetch_attempt(
    client: InfronClient, storage: BatchStorage, manifest: Manifest
) -> dict[str, dict[str, Any]] | None:
    """Download an attempt's result files once; None while a batch is still running."""
    raw = storage.attempt_dir("raw", manifest.partition_key, manifest.attempt)
    marker = raw / "batches.json"
    if storage.exists(marker):
        return storage.read_json(marker)
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


def _merge(
    storage: BatchStorage, attempts: list[Manifest], outcome: CollectOutcome
) -> dict[str, FinalOutcome]:
    """Per custom_id: the latest success of any attempt, else the latest failure."""
    final = _carried(storage, attempts[0], outcome)
    for manifest in attempts:
        for custom_id, result in _attempt_outcomes(storage, manifest, outcome).items():
            current = final.get(custom_id)
            if result is None:
                continue
            if current is None or result.ok or not current.outcome.ok:
                final[custom_id] = FinalOutcome(result, manifest.attempt)
    return final


def _attempt_outcomes(
    storage: BatchStorage, manifest: Manifest, collected: CollectOutcome
) -> dict[str, Outcome | None]:
    id_list, _ = _sent_and_carried(storage, manifest)
    by_id: dict[str, Outcome | None] = dict.fromkeys(id_list)
    batch_of = _batch_membership(manifest, id_list)
    report = collected.report
    for batch_id in manifest.batch_ids:
        for rel in collected.batches[batch_id]["files"]:
            with storage.resolve(rel).open("rb") as fh:
                lines = read_outcomes(fh, report, batch_id, max_line_bytes=collected.max_line_bytes)
                for result in map(collected.redact, lines):
                    _record(by_id, result, report)
    for custom_id, result in by_id.items():
        if result is None:
            by_id[custom_id] = _missing(custom_id, batch_of.get(custom_id), collected.batches)
    return by_id


def _sent_and_carried(
    storage: BatchStorage, manifest: Manifest
) -> tuple[list[str], dict[int, list[str]]]:
    """The custom_ids an attempt sent (in chunk order), and those it carried, by source."""
    snapshot = storage.read_table(
        storage.attempt_file("inputs", manifest.partition_key, manifest.attempt)
    )
    ids = snapshot.column(CUSTOM_ID).to_pylist()
    if CARRIED_FROM not in snapshot.column_names:
        return ids, {}
    sent: list[str] = []
    carried: dict[int, list[str]] = {}
    for custom_id, source in zip(ids, snapshot.column(CARRIED_FROM).to_pylist(), strict=True):
        if source is None:
            sent.append(custom_id)
        else:
            carried.setdefault(source, []).append(custom_id)
    return sent, carried


def _carried(
    storage: BatchStorage, base: Manifest, parent: CollectOutcome
) -> dict[str, FinalOutcome]:
    """The paid-for answers a new attempt reused from earlier attempts, read from their files."""
    _, carried = _sent_and_carried(storage, base)
    if not carried:
        return {}
    by_attempt = {m.attempt: m for m in load_manifests(storage, base.partition_key)}
    final: dict[str, FinalOutcome] = {}
    for attempt, ids in carried.items():
        source = by_attempt[attempt]
        marker = storage.attempt_dir("raw", source.partition_key, attempt) / "batches.json"
        scratch = CollectOutcome(ready=True, batches=storage.read_json(marker))
        scratch.max_line_bytes = parent.max_line_bytes
        scratch.key_redactor = parent.key_redactor
        outcomes = _attempt_outcomes(storage, source, scratch)
        for custom_id in ids:
            earlier = outcomes.get(custom_id)
            if earlier is not None and earlier.ok:
                final[custom_id] = FinalOutcome(earlier, attempt)
    return final


def _record(by_id: dict[str, Outcome | None], result: Outcome, report: ParseReport) -> None:
    if result.custom_id not in by_id:
        report.unknown_ids += 1
        report.note(f"unknown custom_id {result.custom_id}")
        return
    current = by_id[result.custom_id]
    if current is not None:
        report.duplicates += 1
        report.note(f"duplicate custom_id {result.custom_id}")
        if current.ok:
            return  # never let a duplicate error line overwrite a paid-for success
    by_id[result.custom_id] = result


def _batch_membership(manifest: Manifest, ids_in_order: list[str]) -> dict[str, str]:
    """custom_id -> batch id: chunks are consecutive slices of the custom_id-sorted inputs."""
    membership: dict[str, str] = {}
    start = 0
    for chunk in manifest.chunks:
        for custom_id in ids_in_order[start : start + chunk.requests]:
            membership[custom_id] = chunk.batch_id or ""
        start += chunk.requests
    return membership


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
