"""SUBMIT: prepared chunks -> batches, recorded in a manifest, never paid for twice.

Under the partition's lock: an attempt whose rendered requests have the same fingerprint is
reused; otherwise the intent (manifest, state ``submitting``) is written before any paid call
and updated after each batch is created, so a crash leaves a record to resume from.

Example::

    outcome = submit_prepared(client, storage, prepared, spec=spec, partition_key="p1")
    outcome.manifest.batch_ids, outcome.reused
    # -> (['batch_abc'], False)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa

from .admission import AdmissionControl, is_limit_refusal
from .client import InfronClient
from .columns import CARRIED_FROM
from .errors import InfronDagsterError, InfronError
from .inflight import mark_in_flight
from .manifest import ChunkRecord, Manifest, load_manifests, now_iso
from .models import Batch
from .prepare import PreparedRequests
from .pricing import max_output_tokens
from .provider import LOCAL, provider_of
from .reattach import reattach_orphans, uncertain_wait
from .reuse import (
    is_active,
    latest_initial,
    partial_retry,
    refuse_mock_retry,
    reusable,
    revivable,
)
from .spec import RequestSpec
from .storage import BatchStorage

__all__ = [
    "SubmitIncomplete",
    "SubmitOutcome",
    "load_manifests",
    "submit_prepared",
]

logger = logging.getLogger(__name__)

# How long after a create call was started a batch missing from the provider's list is taken
# as never created (openai style). A server may still be creating it when the client gave up.
# Read here at call time (by the sensor too) and passed to :mod:`~infron_dagster.reattach`.
REATTACH_GRACE_SECONDS = 600


class SubmitIncomplete(InfronDagsterError, RuntimeError):
    """The API refused a chunk part-way; what was created is on record and a re-run resumes.

    Example::

        try:
            submit_prepared(client, storage, prepared, spec=spec, partition_key="p")
        except SubmitIncomplete as exc:
            print(exc.created, exc.total)
    """

    def __init__(self, manifest: Manifest, error: InfronError | str) -> None:
        self.created = len(manifest.batch_ids)
        self.total = len(manifest.chunks)
        self.error = error
        uncertain = [c.index for c in manifest.chunks if c.uncertain and not c.batch_id]
        if not uncertain:
            advice = (
                "materializing the partition again resumes with the remaining chunks and pays "
                "for none twice."
            )
        elif manifest.api_style == "openai":
            advice = (
                f"chunk(s) {uncertain} may have been created although the call failed, and the "
                "provider does not list them yet. Materialize the partition again in a few "
                "minutes: a batch that exists is re-attached by its metadata, and one that "
                f"still is not listed after {REATTACH_GRACE_SECONDS // 60} minutes is sent."
            )
        else:
            advice = (
                f"chunk(s) {uncertain} may have been created although the call failed, and "
                "this API cannot be asked. Check the provider's dashboard; run the partition "
                "again with `resubmit_uncertain: true` only if those batches do not exist."
            )
        super().__init__(
            f"partition {manifest.partition_key!r} attempt {manifest.attempt}: "
            f"{self.created} of {self.total} batch(es) created, then: {error}. "
            f"The manifest records what exists; {advice}"
        )


# Called before a submission writes or pays: (the attempt's manifest, whether it adds spend).
Gate = Callable[[Manifest, bool], None]


@dataclass
class SubmitOutcome:
    """What a submission did: the manifest, and which batches were created or reused.

    Example::

        outcome = submit_prepared(client, storage, prepared, spec=spec, partition_key="a")
        outcome.manifest.attempt, outcome.created, outcome.reused
        # -> (1, ['batch_22d1...'], False)

    (:func:`submit_prepared` shows one that runs.)
    """

    manifest: Manifest
    created: list[str] = field(default_factory=list)
    reattached: list[str] = field(default_factory=list)
    reused: bool = False
    # Admission control: chunks left without a batch (they wait in the manifest for a
    # later run the sensor requests), their requests, and why.
    pending_chunks: int = 0
    pending_requests: int = 0
    pending_reason: str = ""
    sent_alone: bool = False  # a chunk bigger than the whole limit, sent with nothing else
    # What the attempt waits for that only time settles (a create call that ended
    # ambiguously, openai style): the run ends, the sensor requests the next one.
    waiting_for: str = ""
    cancelled: bool = False  # the attempt was cancelled: nothing of it is created any more


def submit_prepared(
    client: InfronClient,
    storage: BatchStorage,
    prepared: PreparedRequests,
    *,
    spec: RequestSpec,
    partition_key: str | None,
    kind: str = "initial",
    force: bool = False,
    run_id: str | None = None,
    resubmit_uncertain: bool = False,
    gate: Gate | None = None,
    admission: AdmissionControl | None = None,
    dry_run: bool = False,
) -> SubmitOutcome:
    """Create (or reuse) the batches for one partition's prepared requests.

    ``resubmit_uncertain`` sends again the chunks whose earlier create call failed
    ambiguously (only needed in infron style, which has no list call to check).
    ``gate(manifest, new_spend)`` is called under the partition's lock before anything is
    written or sent (``new_spend`` is False when the attempt's batches were already paid
    for or reserved); it may raise to stop the submission: a budget, a dry run.
    ``admission`` creates only the chunks that fit under its enqueued-token limit; the rest
    stay pending in the manifest (``outcome.pending_chunks``) for a later run to resume.
    ``dry_run`` takes no lock (a dry run writes no file at all); its gate must stop it.

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
        >>> outcome = submit_prepared(client, storage, prepared, spec=spec,
        ...                           partition_key="2026-11-24")
        >>> outcome.manifest.attempt, len(outcome.created), outcome.reused
        (1, 1, False)
        >>> again = submit_prepared(client, storage, prepared, spec=spec,
        ...                         partition_key="2026-11-24")
        >>> again.reused, again.created  # the same requests are never paid for twice
        (True, [])
    """
    with contextlib.nullcontext() if dry_run else storage.lock(partition_key):
        manifests = load_manifests(storage, partition_key)
        # Where the client sends matters only to attempts the local mock server answered.
        mock = any(m.provider == LOCAL for m in manifests)
        provider = provider_of(client.base_url) if mock else None
        if kind == "retry":
            refuse_mock_retry(manifests, provider)
        match = None if force else reusable(manifests, prepared.fingerprint, kind, provider)
        if match is not None and not match.fully_submitted and is_active(manifests, match):
            _pass(gate, match, False)
            return _resume(client, storage, match, resubmit_uncertain, admission)
        if match is not None and (kind == "retry" or match is latest_initial(manifests)):
            partial = partial_retry(manifests, match)
            if partial is not None:  # a retry whose create failed part-way: finish it
                _pass(gate, partial, False)
                return _resume(client, storage, partial, resubmit_uncertain, admission)
            return SubmitOutcome(manifest=match, reused=True)
        _warn_if_superseding(manifests, kind)
        manifest = _new_manifest(storage, manifests, prepared, spec, partition_key, kind, run_id)
        manifest.provider = provider_of(client.base_url)
        revive = match is not None and revivable(manifests, match)
        _pass(gate, manifest, not revive)
        if revive:
            return _revive(storage, prepared, manifest, match)
        _stage(storage, prepared, manifest)
        local = {c.index: c.path for c in prepared.chunks}
        outcome = SubmitOutcome(manifest)
        return _create_batches(client, storage, manifest, local, outcome, admission)


def _pass(gate: Gate | None, manifest: Manifest, new_spend: bool) -> None:
    if gate is not None:
        gate(manifest, new_spend)


def _warn_if_superseding(manifests: list[Manifest], kind: str) -> None:
    uncollected = [m.attempt for m in manifests if m.state in ("submitting", "submitted")]
    if kind == "initial" and uncollected:
        logger.warning(
            "attempt(s) %s are still in flight and are replaced by a new attempt: rows whose "
            "requests did not change wait for those answers (unless on_changed_input_in_flight"
            "='cancel'); answers to the changed rows will not be collected",
            uncollected,
        )


def _revive(
    storage: BatchStorage, prepared: PreparedRequests, manifest: Manifest, match: Manifest
) -> SubmitOutcome:
    """Input went back to what an older attempt sent: a new attempt over its paid batches."""
    manifest.chunks = [ChunkRecord(**vars(chunk)) for chunk in match.chunks]
    manifest.state, manifest.submitted_at = "submitted", now_iso()
    key, attempt = manifest.partition_key, manifest.attempt
    # The old chunks hold every row, so none of them is carried in this attempt.
    snapshot = prepared.valid
    if CARRIED_FROM in snapshot.column_names:
        index = snapshot.column_names.index(CARRIED_FROM)
        nulls = pa.nulls(snapshot.num_rows, pa.int64())
        snapshot = snapshot.set_column(index, CARRIED_FROM, nulls)
    manifest.carried_count, manifest.waits_on = 0, []
    storage.write_table(storage.attempt_file("inputs", key, attempt), snapshot)
    storage.write_table(storage.attempt_file("invalid", key, attempt), prepared.invalid)
    manifest.api_style, manifest.provider = match.api_style, match.provider
    mark_in_flight(storage, key, attempt)  # the sensor's index, before the manifest exists
    _save(storage, manifest)
    return SubmitOutcome(manifest=manifest, reused=True)


def _new_manifest(
    storage: BatchStorage,
    manifests: list[Manifest],
    prepared: PreparedRequests,
    spec: RequestSpec,
    partition_key: str | None,
    kind: str,
    run_id: str | None,
) -> Manifest:
    attempt = max((m.attempt for m in manifests), default=0) + 1
    initial = [m for m in manifests if m.kind == "initial"]
    base = initial[-1].attempt if kind == "retry" and initial else attempt
    requests_dir = storage.relative(storage.attempt_dir("requests", partition_key, attempt))
    # Enqueued tokens of a chunk: its share (by bytes) of the input estimate plus its output
    # limit; what admission control counts.
    total_bytes = sum(c.bytes for c in prepared.chunks) or 1
    output = max_output_tokens(spec)
    chunks = [
        ChunkRecord(
            index=c.index,
            path=f"{requests_dir}/{os.path.basename(c.path)}",
            requests=c.requests,
            bytes=c.bytes,
            estimated_tokens=-(-prepared.estimated_input_tokens * c.bytes // total_bytes)
            + c.requests * output,
        )
        for c in prepared.chunks
    ]
    manifest = Manifest(
        name=storage.name,
        partition_key=partition_key,
        attempt=attempt,
        fingerprint=prepared.fingerprint,
        api_style="",
        endpoint=spec.endpoint,
        model=spec.model,
        kind="retry" if kind == "retry" else "initial",
        base_attempt=base,
        row_count=prepared.valid_rows + prepared.invalid.num_rows,
        invalid_count=prepared.invalid.num_rows,
        carried_count=prepared.carried,
        waits_on=list(prepared.waits_on),
        estimated_input_tokens=prepared.estimated_input_tokens,
        chunks=chunks,
        run_id=run_id,
    )
    for chunk in manifest.chunks:
        chunk.idempotency_key = _chunk_key(manifest, chunk.index)
    return manifest


def _chunk_key(manifest: Manifest, index: int) -> str:
    """The identity of one chunk of one attempt, as ASCII for headers and metadata.

    A hash, not the raw partition key: ``Zürich`` cannot go into an HTTP header, and a long
    key would overflow a provider's 512-character metadata values. The attempt's creation
    time and fingerprint are in it, so attempt 1 of a wiped lake never re-attaches the
    batches of the old lake's attempt 1.
    """
    raw = "\x1f".join(
        [
            manifest.name,
            manifest.partition_key or "",
            str(manifest.attempt),
            str(index),
            manifest.created_at,
            manifest.fingerprint,
        ]
    )
    return "idk-" + hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def _stage(storage: BatchStorage, prepared: PreparedRequests, manifest: Manifest) -> None:
    """Write inputs, invalid rows and request files, then the intent: all before paying."""
    key, attempt = manifest.partition_key, manifest.attempt
    # The snapshot is a Parquet file already: streamed up, never read whole into memory.
    storage.upload_file(prepared.snapshot_path, storage.attempt_file("inputs", key, attempt))
    storage.write_table(storage.attempt_file("invalid", key, attempt), prepared.invalid)
    for chunk, record in zip(prepared.chunks, manifest.chunks, strict=True):
        storage.upload_file(chunk.path, storage.resolve(record.path))
    if not manifest.chunks:
        manifest.state = "submitted"
        manifest.submitted_at = now_iso()
    mark_in_flight(storage, key, attempt)  # the sensor's index, before the manifest exists
    storage.write_json(storage.manifest_path(key, attempt), manifest.to_dict())


def _resume(
    client: InfronClient,
    storage: BatchStorage,
    manifest: Manifest,
    resubmit_uncertain: bool,
    admission: AdmissionControl | None = None,
) -> SubmitOutcome:
    """Finish an attempt a crashed run left half-submitted (or whose chunks waited for
    admission), re-attaching orphan batches."""
    outcome = SubmitOutcome(manifest=manifest)
    if manifest.cancelled:
        outcome.cancelled = outcome.reused = True
        logger.info(
            "partition %r attempt %d was cancelled: none of its unsent chunks is sent",
            manifest.partition_key,
            manifest.attempt,
        )
        return outcome
    if client.api_style == "openai":
        outcome.reattached += reattach_orphans(client, manifest, REATTACH_GRACE_SECONDS)
        _save(storage, manifest)
    if not resubmit_uncertain and any(c.uncertain and not c.batch_id for c in manifest.chunks):
        if client.api_style == "openai":  # the provider's list settles it in time
            outcome.waiting_for = uncertain_wait(manifest, REATTACH_GRACE_SECONDS)
            return outcome
        raise SubmitIncomplete(manifest, "an earlier create call ended ambiguously")
    with tempfile.TemporaryDirectory(prefix="infron-resume-") as tmp:
        local = _Downloads(storage, manifest, tmp)
        return _create_batches(client, storage, manifest, local, outcome, admission)


class _Downloads(dict):  # type: ignore[type-arg]
    """The request files of a resumed attempt, downloaded when first needed: a chunk that
    still waits for admission control is not downloaded by a run that cannot send it."""

    def __init__(self, storage: BatchStorage, manifest: Manifest, folder: str) -> None:
        super().__init__()
        self._storage, self._chunks, self._folder = storage, manifest.chunks, folder

    def __missing__(self, index: int) -> str:
        chunk = next(c for c in self._chunks if c.index == index)
        path = os.path.join(self._folder, f"chunk-{index:05d}.jsonl")
        self._storage.download_file(self._storage.resolve(chunk.path), path)
        self[index] = path
        return path


def _create_batches(
    client: InfronClient,
    storage: BatchStorage,
    manifest: Manifest,
    local_paths: dict[int, str],
    outcome: SubmitOutcome,
    admission: AdmissionControl | None = None,
) -> SubmitOutcome:
    manifest.api_style = manifest.api_style or client.api_style
    if admission is None:
        return _create_admitted(client, storage, manifest, local_paths, outcome, None)
    admitted = admission.admit(manifest)
    outcome.pending_reason, outcome.sent_alone = admitted.reason, admitted.oversize
    try:
        _create_admitted(client, storage, manifest, local_paths, outcome, set(admitted.chunks))
    finally:  # reservations of chunks not created are dropped (uncertain ones are kept)
        admission.settle(manifest, created_any=bool(outcome.created or outcome.reattached))
    pending = [c for c in manifest.chunks if not c.batch_id]
    if pending:
        outcome.pending_chunks = len(pending)
        outcome.pending_requests = sum(c.requests for c in pending)
        logger.info(
            "partition %r attempt %d: %d chunk(s) wait for admission (%s)",
            manifest.partition_key,
            manifest.attempt,
            len(pending),
            outcome.pending_reason,
        )
    return outcome


def _create_admitted(
    client: InfronClient,
    storage: BatchStorage,
    manifest: Manifest,
    local_paths: dict[int, str],
    outcome: SubmitOutcome,
    admitted: set[int] | None,
) -> SubmitOutcome:
    """Create the batches of the chunks without one (only ``admitted`` ones, if given)."""
    for chunk in manifest.chunks:
        if chunk.batch_id or (admitted is not None and chunk.index not in admitted):
            continue
        try:
            batch = _create_one(client, storage, manifest, chunk, local_paths[chunk.index])
        except InfronError as exc:
            limited = admitted is not None
            if _create_failed(client, storage, manifest, chunk, outcome, exc, limited):
                break
            continue
        chunk.batch_id, chunk.status, chunk.uncertain = batch.id, batch.status.value, False
        outcome.created.append(batch.id)
        _save(storage, manifest)
        logger.info(
            "created batch %s for chunk %d (%d requests)", batch.id, chunk.index, chunk.requests
        )
    if not manifest.fully_submitted:
        _save(storage, manifest)  # chunks wait for admission: the attempt stays submitting
        return outcome
    manifest.state = "submitted"
    manifest.submitted_at = manifest.submitted_at or now_iso()
    _save(storage, manifest)
    outcome.manifest = manifest
    return outcome


def _create_one(
    client: InfronClient,
    storage: BatchStorage,
    manifest: Manifest,
    chunk: ChunkRecord,
    local_path: str,
) -> Batch:
    """Upload one chunk and create its batch, the intent recorded before the paid call;
    InfronError when the create fails (SubmitIncomplete when the upload does)."""
    metadata = {
        "infron_dagster_key": chunk.idempotency_key,
        "fingerprint": manifest.fingerprint[:16],
    }
    try:
        # Uploading costs nothing and creates no batch: its failure is not ambiguous.
        file_id = _upload(client, local_path)
    except InfronError as exc:
        raise SubmitIncomplete(manifest, exc) from exc
    # The intent, on storage before the paid call: a crash from here on (kill -9, a
    # lost answer) leaves the chunk uncertain, never "not sent".
    chunk.uncertain, chunk.create_started_at = True, now_iso()
    _save(storage, manifest)
    return client.create_batch(
        None if file_id else local_path,
        input_file_id=file_id,
        endpoint=manifest.endpoint,
        metadata=metadata,
        idempotency_key=chunk.idempotency_key,
    )


def _create_failed(
    client: InfronClient,
    storage: BatchStorage,
    manifest: Manifest,
    chunk: ChunkRecord,
    outcome: SubmitOutcome,
    exc: InfronError,
    limited: bool,
) -> bool:
    """Record a failed create call; True when no further chunk is created in this run (it
    waits for admission or for time), False to go on; SubmitIncomplete when it must stop.
    ``limited``: the run creates only what admission control admitted."""
    chunk.uncertain = exc.ambiguous
    if limited and not exc.ambiguous and is_limit_refusal(exc):
        # The provider's queue is fuller than our ledger knows (another client of
        # the account): the chunk waits as pending, like one that did not fit.
        _save(storage, manifest)
        outcome.pending_reason = f"the provider refused the create: {exc}"
        logger.warning("chunk %d waits: %s", chunk.index, exc)
        return True
    if exc.ambiguous and client.api_style == "openai":
        outcome.reattached += reattach_orphans(client, manifest, REATTACH_GRACE_SECONDS)
    _save(storage, manifest)  # what was created so far stays on record
    if not chunk.batch_id and exc.ambiguous and client.api_style == "openai":
        # Only time settles it (the provider lists the batch, or the grace ends):
        # no run fails for that; the sensor requests the run that resumes.
        outcome.waiting_for = uncertain_wait(manifest, REATTACH_GRACE_SECONDS)
        logger.warning("chunk %d: %s (%s)", chunk.index, outcome.waiting_for, exc)
        return True
    if not chunk.batch_id:
        raise SubmitIncomplete(manifest, exc) from exc
    return False


def _upload(client: InfronClient, path: str) -> str | None:
    return client.upload_file(path) if client.api_style == "openai" else None


def _save(storage: BatchStorage, manifest: Manifest) -> None:
    storage.write_json(
        storage.manifest_path(manifest.partition_key, manifest.attempt), manifest.to_dict()
    )
