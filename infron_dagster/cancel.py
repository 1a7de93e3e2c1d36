"""CANCEL: stop a partition's in-flight batches (the use case; no Dagster here).

``cancel_partition`` asks the API to cancel every batch of the partition's active attempts
(the latest initial attempt and its retries) that are not collected yet and not finished,
and marks those attempts cancelled in their manifests, under the partition's lock: no run
creates any of their chunks afterwards (chunks waiting for admission, or left unsent by a
crash, are never sent). The sensor then sees the batches end as ``cancelled`` and collects
them as usual, keeping the rows that finished (paid for) and failing the others as
``batch_cancelled`` (retryable), the rows of never-sent chunks included.
``build_cancel_job`` (``cancel_job.py``, the Dagster side) wraps it in the ``<name>_cancel``
job, partitioned like the pipeline, so the launchpad lets you pick the partition(s).

Cancelling is idempotent: a batch that already finished is skipped, one being cancelled is
left alone, and a batch whose cancel call fails does not stop the others (the run fails at
the end, naming it, and running the job again retries it).

Example::

    with InfronResource().get_client() as client:
        outcome = cancel_partition(client, storage, "2026-11-24")
    outcome.cancelled_ids, outcome.message
    # -> (['batch_abc'], "partition '2026-11-24': cancelled 1 batch(es) ...")
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .client import InfronClient
from .history import active_attempts
from .manifest import ChunkRecord, Manifest, load_manifests, now_iso
from .models import Batch, BatchStatus
from .storage import BatchStorage
from .untrusted import printable

__all__ = ["BatchCancel", "CancelOutcome", "cancel_partition"]

CancelAction = Literal["cancelled", "already_cancelling", "already_finished", "failed"]


@dataclass(frozen=True)
class BatchCancel:
    """What cancelling one batch did.

    ``action`` is ``cancelled`` (the API accepted the cancel), ``already_cancelling`` (a
    cancel was asked before; nothing sent), ``already_finished`` (terminal: skipped) or
    ``failed`` (``error`` says why). ``status`` is the batch's status afterwards, when known.

    Example:
        >>> BatchCancel("batch_abc", 1, "already_finished", "completed").ok
        True
    """

    batch_id: str
    attempt: int
    action: CancelAction
    status: str | None = None
    error: str | None = None
    finished_requests: int | None = None
    total_requests: int | None = None

    @property
    def ok(self) -> bool:
        """True unless the batch may still be running because its cancel failed."""
        return self.action != "failed"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for run metadata)."""
        row: dict[str, Any] = {"batch_id": self.batch_id, "attempt": self.attempt}
        row |= {"action": self.action, "status": self.status}
        if self.error:
            row["error"] = self.error
        if self.total_requests is not None:
            row["finished_requests"] = self.finished_requests
            row["total_requests"] = self.total_requests
        return row


@dataclass
class CancelOutcome:
    """Everything one cancel of one partition did, and a plain sentence saying it.

    Example:
        >>> outcome = CancelOutcome(partition_key="a", submitted=False)
        >>> outcome.nothing_in_flight, outcome.message
        (True, "partition 'a' was never submitted: nothing to cancel")
    """

    partition_key: str | None
    submitted: bool = True
    attempts: list[int] = field(default_factory=list)
    collected_attempts: list[int] = field(default_factory=list)
    batches: list[BatchCancel] = field(default_factory=list)
    # Attempts this call marked cancelled in their manifests (nothing of them is sent later).
    marked: list[int] = field(default_factory=list)
    unsent_chunks: dict[int, int] = field(default_factory=dict)
    uncertain_chunks: dict[int, int] = field(default_factory=dict)

    def ids(self, *actions: CancelAction) -> list[str]:
        """Ids of the batches whose action is one of ``actions``."""
        return [b.batch_id for b in self.batches if b.action in actions]

    @property
    def cancelled_ids(self) -> list[str]:
        """Batches this call cancelled."""
        return self.ids("cancelled")

    @property
    def failed(self) -> list[BatchCancel]:
        """Batches whose cancel failed: they may still be running."""
        return [b for b in self.batches if not b.ok]

    @property
    def nothing_in_flight(self) -> bool:
        """True when no batch was running (or being cancelled) and no chunk waited to be
        sent when asked."""
        running = self.ids("cancelled", "already_cancelling", "failed")
        return not running and not self.unsent_chunks

    @property
    def message(self) -> str:
        """One plain sentence for the run log."""
        where = f"partition {printable(self.partition_key or '-', 100)!r}"
        if not self.submitted:
            return f"{where} was never submitted: nothing to cancel"
        if not self.attempts and not self.batches and not self.collected_attempts:
            return f"{where} has no active attempt (all were abandoned): nothing to cancel"
        if not self.attempts and not self.batches:
            return (
                f"{where} has nothing in flight: attempt(s) {self.collected_attempts} "
                "are already collected; nothing to cancel"
            )
        parts = []
        if self.cancelled_ids:
            parts.append(f"cancelled {len(self.cancelled_ids)} batch(es)")
        if self.ids("already_cancelling"):
            parts.append(f"{len(self.ids('already_cancelling'))} already being cancelled")
        if self.ids("already_finished"):
            parts.append(f"{len(self.ids('already_finished'))} already finished (skipped)")
        if self.failed:
            parts.append(f"{len(self.failed)} could not be cancelled")
        if self.nothing_in_flight:
            done = f" ({', '.join(parts)})" if parts else ""
            text = f"{where} has nothing in flight{done}; nothing to cancel"
        else:
            text = f"{where}: {', '.join(parts) or 'no batch was running'}"
            if self.ids("cancelled", "already_cancelling"):
                text += "; the sensor collects the finished rows and fails the rest as retryable"
        if self.unsent_chunks:
            text += (
                f"; chunks not sent yet ({_per_attempt(self.unsent_chunks)}) will never be "
                "sent: their rows fail as batch_cancelled (retryable), nothing paid"
            )
        if self.marked:
            text += f"; attempt(s) {self.marked} marked cancelled"
        if self.uncertain_chunks:
            text += (
                f"; chunks whose create call failed ambiguously "
                f"({_per_attempt(self.uncertain_chunks)}) may have batches that are not on "
                "record: check the provider's dashboard and cancel them there"
            )
        return text


def _per_attempt(counts: dict[int, int]) -> str:
    return ", ".join(f"attempt {a}: {n}" for a, n in sorted(counts.items()))


def cancel_partition(
    client: InfronClient,
    storage: BatchStorage,
    partition_key: str | None,
    *,
    on_batch: Callable[[BatchCancel], None] | None = None,
    holding_lock: bool = False,
    lock_wait_seconds: float = 600.0,
) -> CancelOutcome:
    """Cancel every unfinished batch of the partition's active, uncollected attempts, and
    mark those attempts cancelled so that nothing of them is ever created afterwards.

    The batches that exist are cancelled first (spending stops at once); then, under the
    partition's lock (a submission running now finishes its create calls first; pass
    ``holding_lock`` when the caller holds it), the attempts are marked cancelled in their
    manifests, and what was created meanwhile is cancelled too.
    Never raises for one batch: each failure is recorded in the outcome and the next batch is
    tried (check ``outcome.failed``). ``on_batch`` is called after each batch, for logging.

    Example::

        outcome = cancel_partition(client, storage, "2026-11-24", on_batch=print)
        [b.action for b in outcome.batches]
        # -> ['cancelled', 'already_finished']
    """
    manifests = load_manifests(storage, partition_key)
    outcome = CancelOutcome(partition_key, submitted=bool(manifests))
    if not manifests:
        return outcome
    seen: set[str] = set()
    _cancel_rounds(client, storage, outcome, manifests, seen, on_batch)
    if holding_lock:
        manifests = _mark_cancelled(storage, outcome)
    else:
        with storage.lock(partition_key, wait_seconds=lock_wait_seconds):
            manifests = _mark_cancelled(storage, outcome)
    _cancel_rounds(client, storage, outcome, manifests, seen, on_batch)
    return outcome


def _cancel_rounds(
    client: InfronClient,
    storage: BatchStorage,
    outcome: CancelOutcome,
    manifests: list[Manifest],
    seen: set[str],
    on_batch: Callable[[BatchCancel], None] | None,
) -> None:
    """Cancel the batches not handled yet, reading the manifests again after each round."""
    while True:  # each round handles at least one new batch: it ends with the submissions
        pending = _pending(outcome, active_attempts(manifests), seen)
        if not pending:
            return
        for attempt, batch_id in pending:
            seen.add(batch_id)
            result = _cancel_one(client, batch_id, attempt)
            outcome.batches.append(result)
            if on_batch is not None:
                on_batch(result)
        manifests = load_manifests(storage, outcome.partition_key)


def _mark_cancelled(storage: BatchStorage, outcome: CancelOutcome) -> list[Manifest]:
    """Mark the active, uncollected attempts cancelled (caller holds the partition lock)."""
    manifests = load_manifests(storage, outcome.partition_key)
    stamp = now_iso()
    for manifest in active_attempts(manifests):
        if manifest.state == "collected" or manifest.cancelled:
            continue
        manifest.cancelled_at = stamp
        path = storage.manifest_path(manifest.partition_key, manifest.attempt)
        storage.write_json(path, manifest.to_dict())
        outcome.marked.append(manifest.attempt)
    return manifests


def _pending(
    outcome: CancelOutcome, attempts: Sequence[Manifest], seen: set[str]
) -> list[tuple[int, str]]:
    """The (attempt, batch id) not handled yet; updates the outcome's view of the attempts."""
    live = [m for m in attempts if m.state != "collected"]
    outcome.collected_attempts = [m.attempt for m in attempts if m.state == "collected"]
    outcome.attempts = [m.attempt for m in live]
    # Chunks this cancel stops (an attempt cancelled by an earlier call is not news)
    stopping = [m for m in live if not m.cancelled or m.attempt in outcome.marked]
    unsent = {m.attempt: [c for c in m.chunks if not c.batch_id] for m in stopping}
    outcome.unsent_chunks = {a: n for a, cs in unsent.items() if (n := _count(cs, False))}
    outcome.uncertain_chunks = {a: n for a, cs in unsent.items() if (n := _count(cs, True))}
    # With the batches of earlier in-flight attempts whose answers they carry (waits_on).
    mine = [(m.attempt, bid) for m in live for bid in m.batch_ids]
    waits = [w for m in live for w in m.waits_on]
    waiting = [(int(w["attempt"]), str(bid)) for w in waits for bid in w["batch_ids"]]
    pending: dict[str, int] = {}
    for attempt, batch_id in [*mine, *waiting]:
        if batch_id not in seen:
            pending.setdefault(batch_id, attempt)
    return [(attempt, batch_id) for batch_id, attempt in pending.items()]


def _count(chunks: Sequence[ChunkRecord], uncertain: bool) -> int:
    return sum(1 for c in chunks if c.uncertain == uncertain)


def _cancel_one(client: InfronClient, batch_id: str, attempt: int) -> BatchCancel:
    """Cancel one batch unless it is finished or being cancelled; never raises."""
    try:
        before: Batch | None = client.retrieve_batch(batch_id)
    except Exception:  # the cancel call below still decides; its error is the one reported
        before = None
    if before is not None and (skipped := _already(before, batch_id, attempt)) is not None:
        return skipped
    try:
        after = client.cancel_batch(batch_id)
    except Exception as exc:
        # A batch that finished between the two calls cannot be cancelled, and need not be.
        try:
            now = client.retrieve_batch(batch_id)
        except Exception:
            now = None
        if now is not None and (skipped := _already(now, batch_id, attempt)) is not None:
            return skipped
        error = f"{type(exc).__name__}: {printable(exc)}"
        status = now.status.value if now is not None else None
        return BatchCancel(batch_id, attempt, "failed", status, error)
    return _with_counts(BatchCancel(batch_id, attempt, "cancelled", after.status.value), after)


def _already(batch: Batch, batch_id: str, attempt: int) -> BatchCancel | None:
    if batch.is_terminal:
        action: CancelAction = "already_finished"
    elif batch.status is BatchStatus.CANCELLING:
        action = "already_cancelling"
    else:
        return None
    return _with_counts(BatchCancel(batch_id, attempt, action, batch.status.value), batch)


def _with_counts(result: BatchCancel, batch: Batch) -> BatchCancel:
    if not batch.total_requests:
        return result
    done = (batch.completed_requests or 0) + (batch.failed_requests or 0)
    return BatchCancel(
        result.batch_id,
        result.attempt,
        result.action,
        result.status,
        result.error,
        finished_requests=done,
        total_requests=batch.total_requests,
    )
