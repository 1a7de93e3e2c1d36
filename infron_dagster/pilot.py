"""PILOT: a few rows first, the rest only once their answers look right.

With ``pilot_rows=N`` the first submission of a prompt sends N rows (the first N by
``custom_id``, a hash: a fair sample that a rerun picks again) as a normal attempt whose
manifest says ``pilot``. The sensor collects it like any attempt, reads a verdict from what
was collected (:mod:`~infron_dagster.pilot_verdict`) and requests the submit run that follows:

- **release** (the verdict passed): a new attempt of every row that carries the pilot's rows
  with their outcomes (never sent again) and sends the others, its estimate and budget check
  calibrated by the pilot's output tokens (:class:`~infron_dagster.pricing.Calibration`);
- **stop** (it failed): a new attempt that carries the pilot's rows and sends nothing: the
  rest fail as ``pilot_stopped`` (not retryable), with the verdict as their message.

``pilot_scope="pipeline"`` (the default) pilots a prompt once for the whole pipeline: while
its pilot runs, other partitions submitted with the same prompt are *held* (their attempt is
written with no batch created, like chunks waiting for admission) and are sent, calibrated,
once it passes, or stopped if it fails. ``"partition"`` pilots each partition's first
submission. A changed prompt or spec (another :func:`prompt_hash`) pilots again.

Example::

    policy = PilotPolicy(rows=200, scope="pipeline", max_failure_rate=0.05)
    plan = plan_pilot(policy, storage, spec, rows, "2026-11-24", SubmitFlags())
    plan.mode, plan.note
    # -> ('pilot', 'pilot: 200 of 12000 rows first; the rest waits for its verdict')
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .admission import Admitted
from .carry import InFlightCarry, carry_attempt, carry_succeeded
from .history import active_attempts
from .manifest import Manifest, load_manifests
from .pilot_book import PilotBook
from .pilot_rows import pilot_sample, stop_rest
from .pilot_verdict import PilotVerdict, pilot_verdict
from .prepare import PreparedRequests
from .pricing import Calibration, max_output_tokens
from .spec import RequestSpec
from .storage import BatchStorage, LockTimeout

__all__ = [
    "PILOT_SCOPES",
    "PilotPlan",
    "PilotPolicy",
    "pilot_hold",
    "pilot_no_retry",
    "plan_pilot",
    "prompt_hash",
]

PILOT_SCOPES = ("pipeline", "partition")
Gate = Callable[[Manifest, bool], None]


@dataclass(frozen=True)
class PilotPolicy:
    """A pipeline's pilot settings (the factory's ``pilot_*`` arguments).

    Example:
        >>> PilotPolicy(rows=200).scope
        'pipeline'
    """

    rows: int
    scope: str = "pipeline"
    max_failure_rate: float = 0.05
    max_output_tokens: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows < 1:
            raise ValueError(f"pilot_rows must be a positive number of rows, not {self.rows!r}")
        if self.scope not in PILOT_SCOPES:
            raise ValueError(f"pilot_scope must be 'pipeline' or 'partition', not {self.scope!r}")
        cap = self.max_output_tokens
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"pilot_max_output_tokens must be a positive integer, not {cap!r}")


def prompt_hash(spec: RequestSpec) -> str:
    """What makes two submissions "the same prompt" for piloting: model, endpoint, template,
    system prompt, params and response schema (a change to any of them pilots again).

    Example:
        >>> a = RequestSpec(model="m", prompt_template="Say {x}")
        >>> prompt_hash(a) == prompt_hash(RequestSpec(model="m", prompt_template="Say {x}!"))
        False
    """
    identity = {
        **spec.identity(),
        "prompt_template": spec.prompt_template,
        "system_prompt": spec.system_prompt,
        "params": dict(spec.params),
        "response_schema": dict(spec.response_schema or {}) or None,
        "schema_name": spec.schema_name,
    }
    raw = json.dumps(identity, sort_keys=True, default=repr).encode()
    return hashlib.sha256(raw).hexdigest()[:24]


@dataclass
class PilotPlan:
    """What one submission does about the pilot: ``off`` (send as usual), ``pilot`` (send
    ``rows``, a sample), ``release`` (send the rest, carrying the pilot), ``stop`` (send
    nothing more) or ``hold`` (write the attempt, create nothing until the pilot passes).

    (:func:`plan_pilot` makes one; ``close`` ends what it holds: the pilot lock.)
    """

    mode: str
    rows: Any
    mark: dict[str, Any] | None = None  # the ``pilot`` of the manifest of a new attempt
    carry: InFlightCarry | None = None  # the pilot's rows, carried as they are
    calibration: Calibration | None = None
    verdict: PilotVerdict | None = None
    note: str = ""  # one line for the log and the metadata
    stop_reason: str = ""  # the error_message of the rows a stop never sends
    hold_reason: str = ""
    record: tuple[str, dict[str, Any]] | None = None  # the prompt's record, before the manifest
    queue: bool = False  # a pilot: queued for the sensor's verdict
    book: PilotBook | None = None
    prompt: str = ""
    _lock: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    def close(self) -> None:
        """Release the pilot lock, if this plan holds it."""
        self._lock.close()

    def gate(self, inner: Gate, storage: BatchStorage, key: str | None) -> Gate:
        """``inner`` (the budget, a dry run), then, for a new attempt, its ``pilot`` mark,
        the queue marker and the prompt's record: all written before its manifest."""

        def check(manifest: Manifest, new_spend: bool) -> None:
            if self.mode == "hold":
                new_spend = False  # nothing is created: the attempt that follows reserves
            inner(manifest, new_spend)  # a dry run stops here, nothing written
            fresh = self.mark is not None and manifest.pilot is None
            if fresh and not storage.exists(storage.manifest_path(key, manifest.attempt)):
                manifest.pilot = dict(self.mark or {})
                if self.book is not None and self.queue:
                    self.book.mark(key, manifest.attempt, self.prompt)
                if self.book is not None and self.record is not None:
                    state, fields = self.record[0], dict(self.record[1])
                    attempt = fields.pop("attempt", manifest.attempt)
                    self.book.write(
                        self.prompt, state, partition_key=key, attempt=attempt, **fields
                    )

        return check

    def admission(self, admission: Any) -> Any:
        """The admission a held attempt sees: none of its chunks is created now."""
        return _Hold(self.hold_reason) if self.mode == "hold" else admission

    def shape(self, prepared: PreparedRequests, workdir: str) -> PreparedRequests:
        """A stop sends nothing: the rows it would have sent fail as ``pilot_stopped``. A
        held attempt is a placeholder that never creates a batch: a fingerprint of its own,
        so the attempt that follows it (its rows, sent or stopped) is never taken for it."""
        if self.mode == "stop":
            return stop_rest(prepared, self.stop_reason, workdir)
        if self.mode == "hold":
            raw = f"held\x1f{prepared.fingerprint}".encode()
            return dataclasses.replace(prepared, fingerprint=hashlib.sha256(raw).hexdigest())
        return prepared

    def metadata(self) -> dict[str, Any]:
        """What the submission's metadata says about the pilot."""
        out: dict[str, Any] = {"pilot/mode": self.mode, "pilot/note": self.note}
        if self.verdict is not None:
            out["pilot/verdict"] = "passed" if self.verdict.passed else "stopped"
            if self.verdict.mean_output_tokens is not None:
                out["pilot/mean_output_tokens"] = round(self.verdict.mean_output_tokens, 1)
        return out


@dataclass
class _Hold:
    """An admission that admits nothing: a held attempt waits for the pilot's verdict."""

    reason: str

    def admit(self, manifest: Manifest) -> Admitted:
        return Admitted(
            chunks=[],
            pending_chunks=len(manifest.chunks),
            pending_requests=sum(c.requests for c in manifest.chunks),
            reason=self.reason,
        )

    def settle(self, manifest: Manifest, created_any: bool = True) -> None:
        pass  # nothing was reserved


def plan_pilot(
    policy: PilotPolicy | None,
    storage: BatchStorage,
    spec: RequestSpec,
    rows: Any,
    key: str | None,
    *,
    kind: str,
    force: bool,
    dry_run: bool,
) -> PilotPlan:
    """Decide what this submission does about the pilot (see :class:`PilotPlan`); in
    pipeline scope a plan that sends a pilot holds the pilot lock until ``close``."""
    if policy is None or kind != "initial":
        return PilotPlan("off", rows)
    prompt = prompt_hash(spec)
    direct = PilotPlan("off", rows, mark={"role": "direct", "prompt": prompt}, prompt=prompt)
    if force:  # a person sends every row as it is (the way past a stopped pilot)
        return direct
    book = PilotBook(storage)
    manifests = load_manifests(storage, key)
    active = active_attempts(manifests)
    latest = active[0] if active else None
    mark = (latest.pilot or {}) if latest is not None else {}
    if latest is not None and mark.get("prompt") == prompt:
        plan = _follow(policy, storage, book, spec, rows, key, latest, prompt)
        if plan is not None:
            return plan
        if mark.get("role") != "held":
            return direct  # this partition went with this prompt already
    if policy.scope == "partition":
        if latest is not None and mark.get("prompt") in (None, prompt):
            return direct  # not the partition's first submission with this prompt
        return _pilot(policy, storage, spec, rows, key, prompt, book) or direct
    record = book.record(prompt)
    if record is not None and record["state"] == "passed":
        return direct
    plan = PilotPlan("off", rows)
    if not dry_run:
        plan._lock.enter_context(book.lock())
        record = book.record(prompt)  # again, under the lock
    try:
        locked = not dry_run
        decided = _decide(policy, storage, book, spec, rows, key, prompt, record, direct, locked)
    except BaseException:
        plan.close()
        raise
    if decided.mode == "pilot":
        decided._lock = plan._lock  # held until the pilot's manifest and record are written
    else:
        plan.close()
    return decided


def _decide(
    policy: PilotPolicy,
    storage: BatchStorage,
    book: PilotBook,
    spec: RequestSpec,
    rows: Any,
    key: str | None,
    prompt: str,
    record: dict[str, Any] | None,
    direct: PilotPlan,
    locked: bool,
) -> PilotPlan:
    """Pipeline scope, this partition not in the pilot yet: go, stop, wait or pilot
    (``locked``: this submission holds the pilot lock)."""
    state = record["state"] if record is not None else None
    if state == "passed":
        return direct
    if state == "stopped":
        return _stop(rows, key, prompt, None, None, str(record.get("message", "")), book, False)
    alive = state == "pending" and _alive(storage, record, locked)
    if alive and record.get("partition_key") != key:
        where = f"partition {record.get('partition_key')!r} (attempt {record.get('attempt')})"
        return PilotPlan(
            "hold",
            rows,
            mark={"role": "held", "prompt": prompt, "waits_for": _pointer(record)},
            note=f"pilot: held until the pilot of {where} passes",
            hold_reason=f"waits for the pilot of {where}: sent once it passes",
            prompt=prompt,
        )
    return _pilot(policy, storage, spec, rows, key, prompt, book, pipeline=True) or direct


def _follow(
    policy: PilotPolicy,
    storage: BatchStorage,
    book: PilotBook,
    spec: RequestSpec,
    rows: Any,
    key: str | None,
    latest: Manifest,
    prompt: str,
) -> PilotPlan | None:
    """The next step of a partition already in the pilot of this prompt (None: decide as
    for a partition that is not)."""
    mark, pipeline = latest.pilot or {}, policy.scope == "pipeline"
    role = mark.get("role")
    if role == "pilot" and latest.state == "collected" and latest.cancelled:
        message = (
            f"partition {key!r} was cancelled during its pilot (attempt {latest.attempt}): "
            "the rest was never sent; to send it, materialize the partition with "
            "force_resubmit: true"
        )
        return _stop(rows, key, prompt, latest, None, message, book, False, storage)
    if role == "pilot" and latest.state == "collected":
        verdict = pilot_verdict(storage, key, mark.get("limits") or {})
        if verdict.passed:
            return _release(rows, key, prompt, latest, verdict, book, pipeline, storage)
        where = f"partition {key!r} (attempt {latest.attempt})"
        message = verdict.message(where)
        return _stop(rows, key, prompt, latest, verdict, message, book, pipeline, storage)
    if role == "pilot":  # in flight, or cancelled: the same sample again is reused
        return _pilot(policy, storage, spec, rows, key, prompt, book, pipeline=pipeline)
    if role == "stopped":
        source = None
        if mark.get("pilot_attempt") is not None:
            by_attempt = {m.attempt: m for m in load_manifests(storage, key)}
            source = by_attempt.get(int(mark["pilot_attempt"]))
        verdict = PilotVerdict.from_dict(mark["verdict"]) if mark.get("verdict") else None
        message = str(mark.get("message", ""))
        return _stop(rows, key, prompt, source, verdict, message, book, False, storage)
    if role == "held" and not latest.settled and pipeline:
        record = book.record(prompt)
        if record is not None and record["state"] == "passed":
            calibration = _calibration(record.get("calibration"))
            basis = f" ({calibration.basis})" if calibration else ""
            return PilotPlan(
                "release",
                rows,
                mark={"role": "direct", "prompt": prompt},
                calibration=calibration,
                note=f"pilot passed: the held rows are sent{basis}",
                prompt=prompt,
            )
        if record is not None and record["state"] == "stopped":
            message = str(record.get("message", ""))
            return _stop(rows, key, prompt, None, None, message, book, False)
        return None  # pending (it is held again) or lost: decided afresh
    return None


def _pilot(
    policy: PilotPolicy,
    storage: BatchStorage,
    spec: RequestSpec,
    rows: Any,
    key: str | None,
    prompt: str,
    book: PilotBook,
    *,
    pipeline: bool = False,
) -> PilotPlan | None:
    """Send a sample of ``policy.rows`` rows (None when the partition is no bigger and the
    scope is the partition: a pilot would be the whole of it)."""
    sample, picked, total = pilot_sample(rows, spec, storage.name, key, policy.rows)
    if picked >= total and not pipeline:
        return None
    limits = {
        "max_failure_rate": policy.max_failure_rate,
        "max_output_tokens": policy.max_output_tokens,
        "max_tokens": max_output_tokens(spec),
    }
    mark = {"role": "pilot", "prompt": prompt, "rows": picked, "of": total, "limits": limits}
    return PilotPlan(
        "pilot",
        sample,
        mark=mark,
        note=f"pilot: {picked} of {total} rows first; the rest waits for its verdict",
        record=("pending", {}) if pipeline else None,
        queue=True,
        book=book,
        prompt=prompt,
    )


def _release(
    rows: Any,
    key: str | None,
    prompt: str,
    pilot: Manifest,
    verdict: PilotVerdict,
    book: PilotBook,
    pipeline: bool,
    storage: BatchStorage,
) -> PilotPlan:
    calibration = None
    if verdict.mean_output_tokens is not None and verdict.peak_output_tokens is not None:
        calibration = Calibration(
            verdict.answered, verdict.mean_output_tokens, verdict.peak_output_tokens
        )
    mark = {
        "role": "release",
        "prompt": prompt,
        "pilot_attempt": pilot.attempt,
        "verdict": verdict.to_dict(),
    }
    fields = {"attempt": pilot.attempt, "summary": verdict.summary()}
    if calibration is not None:
        fields["calibration"] = dataclasses.asdict(calibration)
    basis = f"; estimate from the {calibration.basis}" if calibration else ""
    return PilotPlan(
        "release",
        rows,
        mark=mark,
        carry=_pilot_carry(storage, key, pilot),
        calibration=calibration,
        verdict=verdict,
        note=f"pilot passed ({verdict.summary()}): sending the rest{basis}",
        record=("passed", fields) if pipeline else None,
        book=book,
        prompt=prompt,
    )


def _stop(
    rows: Any,
    key: str | None,
    prompt: str,
    pilot: Manifest | None,
    verdict: PilotVerdict | None,
    message: str,
    book: PilotBook,
    pipeline: bool,
    storage: BatchStorage | None = None,
) -> PilotPlan:
    message = message or "the pilot of this prompt stopped"
    mark: dict[str, Any] = {"role": "stopped", "prompt": prompt, "message": message}
    if pilot is not None:
        mark["pilot_attempt"] = pilot.attempt
    if verdict is not None:
        mark["verdict"] = verdict.to_dict()
    carry = None
    if pilot is not None and storage is not None:
        carry = _pilot_carry(storage, key, pilot)
    fields = {"attempt": pilot.attempt if pilot else None, "message": message}
    return PilotPlan(
        "stop",
        rows,
        mark=mark,
        carry=carry,
        verdict=verdict,
        note=message,
        stop_reason=message,
        record=("stopped", fields) if pipeline else None,
        book=book,
        prompt=prompt,
    )


def _pilot_carry(storage: BatchStorage, key: str | None, pilot: Manifest) -> InFlightCarry:
    """The pilot's rows that failed, carried with their failure (its answered rows are
    carried as any answered row is): none of its rows is sent again."""
    carry = carry_attempt(storage, key, pilot)
    answered = carry_succeeded(storage, key)
    carry.requests = {c: v for c, v in carry.requests.items() if c not in answered}
    if not carry.requests:
        carry.attempts = {}
    return carry


def _calibration(data: Any) -> Calibration | None:
    try:
        return Calibration(
            int(data["rows"]), float(data["mean_output_tokens"]), int(data["peak_output_tokens"])
        )
    except (TypeError, KeyError, ValueError):
        return None


def _pointer(record: dict[str, Any]) -> dict[str, Any]:
    return {"partition_key": record.get("partition_key"), "attempt": record.get("attempt")}


def _alive(storage: BatchStorage, record: dict[str, Any], locked: bool = False) -> bool:
    """Whether the pending pilot a record points to may still pass: its manifest is its
    partition's latest initial attempt and not cancelled (or not written yet by the run
    that still holds the pilot lock; ``locked``: the caller holds it, so none does)."""
    key, attempt = record.get("partition_key"), record.get("attempt")
    if key is not None and not isinstance(key, str):
        return False
    manifests = load_manifests(storage, key)
    active = active_attempts(manifests)
    latest = active[0] if active else None
    if latest is not None and latest.attempt == attempt:
        return (latest.pilot or {}).get("role") == "pilot" and not latest.cancelled
    if any(m.attempt == attempt for m in manifests) or locked:
        return False  # replaced by a newer attempt, or its run died before its manifest
    try:  # no manifest: alive only while the run that writes it holds the lock
        with PilotBook(storage).lock(wait_seconds=0):
            return False
    except LockTimeout:
        return True


def pilot_no_retry(history: Any) -> str:
    """Why a collection's retryable failed rows are not retried automatically: its attempt
    is a pilot (its verdict decides what follows) or follows a stopped one (nothing more
    is sent); "" when they may be. ``history``: the partition's
    :class:`~infron_dagster.history.PartitionHistory`."""
    active = history.active if history is not None else []
    role = (active[0].pilot or {}).get("role") if active else None
    if role == "pilot":
        return "they are a pilot's: its verdict decides what is sent next"
    if role == "stopped":
        return "the pilot stopped: nothing more is sent"
    return ""


def pilot_hold(storage: BatchStorage, manifest: Manifest, memo: dict[str, bool]) -> str | None:
    """Why the sensor must not resume ``manifest`` yet: it is held for a pilot that is
    still pending (None: resume it, the run decides). ``memo`` caches, per prompt, whether
    its pilot is pending (one tick's reads)."""
    mark = manifest.pilot or {}
    if mark.get("role") != "held":
        return None
    prompt = str(mark.get("prompt", ""))
    book = PilotBook(storage)
    if prompt not in memo:
        record = book.record(prompt)
        memo[prompt] = bool(
            record is not None and record["state"] == "pending" and _alive(storage, record)
        )
    if not memo[prompt]:
        return None
    where = mark.get("waits_for") or {}
    return f"waits for the pilot of partition {where.get('partition_key')!r}"
