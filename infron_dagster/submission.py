"""SUBMIT, the use case: one partition's rows prepared and sent as one attempt, without Dagster.

The ``<name>_batches`` asset hands this module the partition's rows, a client factory, the
pipeline's :class:`PipelineSettings` and the run's :class:`SubmitFlags`; what it decides:

- which rows need sending: unchanged rows already answered are carried (their paid-for
  answers reused), rows of an attempt still in flight wait for it (policy ``"carry"``), or
  the running batches are cancelled first and every row is sent again (policy ``"cancel"``);
- what a retry sends: only the retryable failed rows of the collected partition;
- with ``pilot_rows``, whether it sends a pilot sample, the rest after a pilot (calibrated),
  nothing more after a stopped pilot, or holds while another partition's pilot runs
  (:mod:`~infron_dagster.pilot`);
- whether the budget lets it pay, and what a dry run would send.

It returns a :class:`SubmissionReport` (what the asset shows as metadata) and raises
:class:`SubmitRefused` when it refuses before any paid call.

Example::

    report = submit_partition(settings, InfronResource().get_client, rows, "2026-11-24",
                              SubmitFlags(), run_id="manual")
    report.summary()
    # -> 'attempt 1 holds these requests: nothing to send'
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .admission import AdmissionControl
from .budget import BudgetExceeded
from .cancel import cancel_partition
from .carry import CarryIndex, InFlightCarry, carry_attempt, carry_in_flight, carry_succeeded
from .client import InfronClient
from .columns import CUSTOM_ID, HIDDEN_COLUMNS
from .errors import SubmitRefused
from .history import active_attempts
from .manifest import Manifest, load_manifests
from .pilot import PilotPlan, PilotPolicy, plan_pilot
from .prepare import PreparedRequests, prepare_requests
from .pricing import CostEstimate
from .provider import mock_for, mock_note, provider_of
from .retry_queue import DEFAULT_BACKOFF_SECONDS
from .reuse import revert_source
from .spec import RequestSpec
from .spend import DryRunStop, SpendControl
from .storage import BatchStorage
from .submit import SubmitOutcome, submit_prepared

__all__ = [
    "PipelineSettings",
    "SubmissionReport",
    "SubmitFlags",
    "retry_rows",
    "submit_partition",
    "submit_rows",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineSettings:
    """What ``build_infron_batch_assets`` was given, as its submit, collect and metadata
    code reads it (``asset_options``, ``pool`` and ``resource_key`` are for the assets).

    Example::

        settings = PipelineSettings("reviews", spec, BatchStorage("/lake", "reviews"),
                                    keep_columns=None, max_requests=50_000,
                                    max_bytes=200_000_000, max_attempts=3,
                                    max_failure_rate=0.05, resource_key="infron",
                                    max_line_bytes=1 << 20, asset_options={}, pool=None,
                                    spend=SpendControl(storage, spec, None, None))
    """

    name: str
    spec: RequestSpec
    storage: BatchStorage
    keep_columns: Sequence[str] | None
    max_requests: int
    max_bytes: int
    max_attempts: int
    max_failure_rate: float
    resource_key: str
    max_line_bytes: int
    asset_options: dict[str, Any]
    pool: str | None
    spend: SpendControl
    on_changed_input_in_flight: str = "carry"
    reuse_answers: str = "partition"
    admission: AdmissionControl | None = None
    # The sensor retries retryable failed rows itself, after these delays (see retry_queue)
    auto_retry: bool = False
    auto_retry_backoff: tuple[float, ...] = DEFAULT_BACKOFF_SECONDS
    # A pilot batch before the rest (pilot_rows; see pilot.py)
    pilot: PilotPolicy | None = None


@dataclass(frozen=True)
class SubmitFlags:
    """The run's choices (the fields of the asset's ``SubmitConfig``, as plain flags).

    Example:
        >>> SubmitFlags(retry_failed=True).kind
        'retry'
    """

    force_resubmit: bool = False
    retry_failed: bool = False
    resubmit_uncertain: bool = False
    dry_run: bool = False
    allow_over_budget: bool = False

    @property
    def kind(self) -> str:
        """The attempt this run makes: ``"retry"`` or ``"initial"``."""
        return "retry" if self.retry_failed else "initial"


@dataclass(frozen=True)
class SubmissionReport:
    """One partition's submission, or what a dry run found it would be.

    Example::

        report = submit_rows(settings, client_factory, rows, "a", "initial", SubmitFlags(),
                             run_id="manual")
        report.manifest.attempt, report.carried, len(report.outcome.created)
        # -> (1, 0, 2)
    """

    estimate: CostEstimate
    carried: int
    manifest: Manifest  # the attempt's manifest (a dry run's is never written)
    would_pay: bool  # a dry run: whether a real run would create (and pay for) batches
    outcome: SubmitOutcome | None = None  # None for a dry run stopped before writing
    dry_run: bool = False
    cancelled: list[str] = field(default_factory=list)  # running batches cancelled first
    elsewhere: int = 0  # carried rows answered in other partitions
    budget_refusal: str = ""  # a dry run: why the budget would refuse a real run
    pilot: dict[str, Any] = field(default_factory=dict)  # what the pilot did (metadata)
    # Why answers on record were not reused: the local mock server gave them (provider.py)
    not_reused: str = ""

    @property
    def pilot_note(self) -> str:
        """One line on the pilot: what this submission did about it ("" without one)."""
        return str(self.pilot.get("pilot/note", ""))

    @property
    def pilot_stopped(self) -> bool:
        """Whether this submission sent nothing more because a pilot stopped."""
        return self.pilot.get("pilot/mode") == "stop"

    def summary(self) -> str:
        """One line for a dry run's log: what a real run would send and cost."""
        pilot = f" ({self.pilot_note})" if self.pilot_note else ""
        if self.outcome is not None:
            return f"attempt {self.manifest.attempt} holds these requests: nothing to send"
        cost = self.estimate.metadata().get("estimate/cost_worst_case_usd")
        money = f", worst case {cost}" if cost is not None else ""
        sent = self.estimate.requests if self.would_pay else 0
        chunks = len(self.manifest.chunks)
        return f"would send {sent} requests in {chunks} batch(es){money}{pilot}"


def submit_partition(
    s: PipelineSettings,
    connect: Callable[[], InfronClient],
    rows: Any,
    key: str | None,
    flags: SubmitFlags,
    run_id: str,
) -> SubmissionReport:
    """Submit one partition: ``rows`` (ignored by a retry, which reads the partition's
    retryable failed rows) as its own attempt, manifest and batches. ``connect`` opens a
    client (e.g. ``InfronResource.get_client``), only once the rows are prepared.

    Example::

        submit_partition(settings, resource.get_client, None, "a",
                         SubmitFlags(retry_failed=True), run_id="manual").manifest.kind
        # -> 'retry'
    """
    if flags.retry_failed:
        rows = retry_rows(s, key)
    return submit_rows(s, connect, rows, key, flags.kind, flags, run_id)


def submit_rows(
    s: PipelineSettings,
    connect: Callable[[], InfronClient],
    rows: Any,
    key: str | None,
    kind: str,
    flags: SubmitFlags,
    run_id: str,
) -> SubmissionReport:
    """Prepare ``rows`` (carrying what is answered or in flight), gate them on the budget,
    and create the attempt's batches; a dry run stops before anything is written.

    Example::

        report = submit_rows(settings, resource.get_client, rows, "a", "initial",
                             SubmitFlags(dry_run=True), run_id="manual")
        report.would_pay, report.summary()
        # -> (True, 'would send 120 requests in 1 batch(es), worst case 0.0132')
    """
    plan = plan_pilot(
        s.pilot,
        s.storage,
        s.spec,
        rows,
        key,
        kind=kind,
        force=flags.force_resubmit,
        dry_run=flags.dry_run,
    )
    try:
        return _submit_planned(s, connect, key, kind, flags, run_id, plan)
    finally:
        plan.close()  # the pilot lock, held while a pilot is written


def _submit_planned(
    s: PipelineSettings,
    connect: Callable[[], InfronClient],
    key: str | None,
    kind: str,
    flags: SubmitFlags,
    run_id: str,
    plan: PilotPlan,
) -> SubmissionReport:
    carry = kind == "initial" and not flags.force_resubmit
    pilot = plan.metadata() if plan.mode != "off" or plan.note else {}
    # The client first: where it sends decides which answers on record may be reused.
    with connect() as client, tempfile.TemporaryDirectory(prefix="infron-prepare-") as workdir:
        reuse = _Reuse(provider_of(client.base_url))
        prepared = _prepare(s, plan.rows, key, carry, workdir, plan.carry, reuse)
        prepared = plan.shape(prepared, workdir)
        estimate = s.spend.estimate(prepared, plan.calibration)
        gate = s.spend.gate(
            estimate, key, dry_run=flags.dry_run, allow_over_budget=flags.allow_over_budget
        )
        gate = plan.gate(gate, s.storage, key)
        cancelled: list[str] = []
        if kind == "initial" and s.on_changed_input_in_flight == "cancel":
            gate = _cancel_first(gate, client, s.storage, key, cancelled)
        try:
            outcome = submit_prepared(
                client,
                s.storage,
                prepared,
                spec=s.spec,
                partition_key=key,
                kind=kind,
                force=flags.force_resubmit,
                run_id=run_id,
                resubmit_uncertain=flags.resubmit_uncertain,
                gate=gate,
                admission=plan.admission(s.admission),
                dry_run=flags.dry_run,
            )
        except DryRunStop as stop:
            return _dry_run_report(estimate, prepared, stop, pilot, reuse.note)
        except BudgetExceeded as exc:
            raise SubmitRefused(str(exc), details=estimate.metadata()) from exc
    if reuse.note:
        logger.warning("partition %r: %s", key, reuse.note)
    return SubmissionReport(
        estimate,
        prepared.carried,
        outcome.manifest,
        False,
        outcome,
        dry_run=flags.dry_run,
        cancelled=cancelled,
        elsewhere=prepared.carried_elsewhere,
        pilot=pilot,
        not_reused=reuse.note,
    )


@dataclass
class _Reuse:
    """Where this submission sends (``provider``), and the answers on record it did not
    reuse because the local mock server gave them (the note says so)."""

    provider: str
    mock_attempts: set[int] = field(default_factory=set)
    mock_partitions: int = 0

    @property
    def note(self) -> str:
        if not (self.mock_attempts or self.mock_partitions):
            return ""
        return mock_note(self.provider, self.mock_attempts, self.mock_partitions)

    def look(self, manifests: Sequence[Manifest], fingerprint: str) -> None:
        """Note the mock attempts a real submission would otherwise reuse or carry from:
        the partition's active ones, and those that hold these exact requests unless a
        real attempt holds them too (that one is reused)."""
        wanted = {m.attempt for m in active_attempts(manifests)}
        same = [m for m in manifests if m.fingerprint == fingerprint]
        if all(mock_for(m.provider, self.provider) for m in same):
            wanted |= {m.attempt for m in same}
        for m in manifests:
            if m.attempt in wanted and mock_for(m.provider, self.provider):
                self.mock_attempts.add(m.attempt)


def _prepare(
    s: PipelineSettings,
    rows: Any,
    key: str | None,
    carry: bool,
    workdir: str,
    pilot: InFlightCarry | None = None,
    reuse: _Reuse | None = None,
) -> PreparedRequests:
    """The rows rendered into chunk files, what is answered or in flight carried (the
    rows waiting for an attempt in flight are named in ``waits_on``); ``pilot``: the rows a
    collected pilot sent, carried with their outcomes, failed or not. ``reuse``: where
    the rows go; answers the local mock server gave are not carried to a real API."""
    provider = reuse.provider if reuse is not None else None
    succeeded = carry_succeeded(s.storage, key, provider) if carry else {}
    # Unchanged rows of an attempt still in flight wait for the answers already paid for.
    wait = carry and s.on_changed_input_in_flight == "carry"
    running = carry_in_flight(s.storage, key, provider) if wait else InFlightCarry()
    if carry and pilot is not None:
        mock = {a for a, m in pilot.attempts.items() if mock_for(m.provider, provider)}
        kept = {c: v for c, v in pilot.requests.items() if v[1] not in mock}
        running = InFlightCarry(
            {**running.requests, **kept},
            {**running.attempts, **{a: m for a, m in pilot.attempts.items() if a not in mock}},
        )
    # Pipeline reuse: other partitions' answers by body hash (an empty index still records
    # this partition's body hashes, so its own answers can serve the others later).
    elsewhere = None
    if s.reuse_answers == "pipeline":
        elsewhere = CarryIndex.load(s.storage, key, provider) if carry else CarryIndex(s.storage)

    def prepare(running: InFlightCarry, folder: str) -> PreparedRequests:
        prepared = prepare_requests(
            rows,
            s.spec,
            name=s.name,
            partition_key=key,
            workdir=folder,
            max_requests_per_batch=s.max_requests,
            max_bytes_per_batch=s.max_bytes,
            succeeded=succeeded,
            keep_columns=s.keep_columns,  # a typo is named before any money is spent
            in_flight=running.requests,
            elsewhere=elsewhere,
        )
        prepared.waits_on = running.waits_on(
            {a: n for a, n in prepared.carried_by_attempt.items() if a in running.attempts}
        )
        return prepared

    prepared = prepare(running, workdir)
    if not carry:
        return prepared
    manifests = load_manifests(s.storage, key)
    if reuse is not None:
        reuse.look(manifests, prepared.fingerprint)
        reuse.mock_partitions = len(elsewhere.mock) if elsewhere is not None else 0
    # Input that went back to an older attempt some of whose chunks were never created:
    # the rows of its created chunks were paid for; they are carried (the newer attempts'
    # carry wins: what they sent is newer), and only what no attempt sent is sent.
    source = revert_source(manifests, prepared.fingerprint, "initial", provider)
    if source is None or source.attempt in running.attempts:
        return prepared
    paid = carry_attempt(s.storage, key, source)
    # Rows whose answer is in the collected results are carried from there already.
    paid.requests = {c: v for c, v in paid.requests.items() if succeeded.get(c, ("",))[0] != v[0]}
    if not paid.requests:
        return prepared
    both = InFlightCarry(
        {**paid.requests, **running.requests}, {**paid.attempts, **running.attempts}
    )
    again = os.path.join(workdir, "revert")
    os.makedirs(again)
    return prepare(both, again)


def _dry_run_report(
    estimate: CostEstimate,
    prepared: PreparedRequests,
    stop: DryRunStop,
    pilot: dict[str, Any],
    not_reused: str = "",
) -> SubmissionReport:
    # A held attempt creates nothing until its pilot passes; a stopped one never does
    pays = stop.new_spend and pilot.get("pilot/mode") not in ("hold", "stop")
    return SubmissionReport(
        estimate,
        prepared.carried,
        stop.manifest,
        pays,
        dry_run=True,
        budget_refusal=stop.budget_refusal,
        pilot=pilot,
        not_reused=not_reused,
    )


def _cancel_first(
    gate: Any, client: InfronClient, storage: BatchStorage, key: str | None, cancelled: list[str]
) -> Any:
    """The gate, then (policy ``cancel``) the partition's running batches are cancelled just
    before a new attempt that pays is written: never for a dry run, a refused budget, a
    reused or revived attempt."""

    def check(manifest: Any, new_spend: bool) -> None:
        gate(manifest, new_spend)
        new = not storage.exists(storage.manifest_path(key, manifest.attempt))
        if new and new_spend:
            outcome = cancel_partition(client, storage, key, holding_lock=True)
            cancelled.extend(outcome.cancelled_ids)

    return check


def retry_rows(s: PipelineSettings, key: str | None) -> pa.Table:
    """The input rows of the partition's retryable failed rows, for a retry attempt.

    Refused (:class:`SubmitRefused`) when the partition was never submitted, its latest
    attempt is not collected, it used up ``max_attempts``, or nothing is retryable; a retry
    whose create failed part-way is resumed with the same rows instead.

    Example::

        retry_rows(settings, "2026-11-24").num_rows
        # -> 3
    """
    attempts = active_attempts(load_manifests(s.storage, key))
    if not attempts:
        raise SubmitRefused(
            f"partition {key!r} of {s.name} has never been submitted; nothing to retry"
        )
    _check_retry_allowed(s, key, attempts)
    failed = s.storage.read_table(s.storage.table_path("failed", key))
    retry_ids = pc.filter(failed.column(CUSTOM_ID), failed.column("retryable"))
    inputs = s.storage.read_table(s.storage.attempt_file("inputs", key, attempts[0].attempt))
    rows = inputs.filter(pc.is_in(inputs.column(CUSTOM_ID), value_set=retry_ids))
    if not rows.num_rows:
        raise SubmitRefused(f"partition {key!r} of {s.name} has no retryable failed rows")
    return rows.drop_columns([CUSTOM_ID, *(c for c in HIDDEN_COLUMNS if c in rows.column_names)])


def _check_retry_allowed(s: PipelineSettings, key: str | None, attempts: list[Manifest]) -> None:
    latest = attempts[-1]
    # A retry whose create failed part-way is resumed with the same rows, not refused.
    resuming = latest.kind == "retry" and not latest.fully_submitted
    if latest.state != "collected" and not resuming:
        raise SubmitRefused(
            f"attempt {latest.attempt} of partition {key!r} is not collected yet; "
            "retry once the sensor has collected it"
        )
    if len(attempts) >= s.max_attempts and not resuming:
        raise SubmitRefused(
            f"partition {key!r} already had {len(attempts)} of max_attempts={s.max_attempts}"
        )
