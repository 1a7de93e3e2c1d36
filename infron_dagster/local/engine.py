"""The batch lifecycle: validation on create, status by elapsed time, results once at the end.

A batch record on disk holds what was decided at creation (timing and fault knobs are
snapshotted, so every process reading the folder agrees on the batch's fate) plus, once the
batch is terminal, the `final` outcome. Nothing runs in the background: each read computes
the status from the clock, and the first read that finds a batch terminal writes its files
under the batch's lock.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import LocalServerConfig
from .errors import ApiError
from .mock_model import estimate_prompt_tokens
from .outputs import is_failed, is_lost, iter_requests, run_batch
from .store import Store, new_id

ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/completions")
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
MAX_LISTED_ERRORS = 100


@dataclass(frozen=True)
class State:
    """A batch's status at one instant; `fraction` of its requests finished so far."""

    status: str
    fraction: float = 0.0
    ended_at: float | None = None


@dataclass
class Scan:
    """What validating an input file found."""

    total: int = 0
    prompt_tokens: int = 0
    model: str | None = None
    planned_failed: int = 0
    planned_lost: int = 0
    error_count: int = 0
    errors: list[dict[str, Any]] | None = None


def scan_input(
    path: Path, endpoint: str, *, mixed: bool, config: LocalServerConfig, fault_round: int = 0
) -> Scan:
    """Validate every line of a batch input file and estimate its tokens.

    `mixed` lets each line name any supported url (Infron inline batches); otherwise every
    line's url must equal `endpoint`.
    """
    scan, seen = Scan(errors=[]), set()
    for number, raw in iter_requests(path):
        scan.total += 1
        problem = _check_line(raw, endpoint, mixed, seen)
        if isinstance(problem, tuple):
            _add_error(scan, problem[0], problem[1], number)
            continue
        _count(scan, problem, config, fault_round)
    if scan.total == 0:
        _add_error(scan, "empty_file", "The input file contains no requests.", None)
    return scan


def _check_line(
    raw: bytes, endpoint: str, mixed: bool, seen: set[str]
) -> tuple[str, str] | dict[str, Any]:
    try:
        request = json.loads(raw)
    except (ValueError, RecursionError):
        request = None
    if not isinstance(request, dict):
        return "invalid_json_line", "This line is not a valid JSON object."
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "missing_custom_id", "custom_id must be a non-empty string."
    if custom_id in seen:
        return "duplicate_custom_id", f"The custom_id '{custom_id[:200]}' is not unique."
    seen.add(custom_id)
    if str(request.get("method", "")).upper() != "POST":
        return "invalid_method", "method must be 'POST'."
    url = request.get("url")
    if (url not in ENDPOINTS) if mixed else (url != endpoint):
        return "mismatched_url", f"The url {url!r} does not match the batch endpoint {endpoint!r}."
    if not isinstance(request.get("body"), dict):
        return "missing_body", "body must be a JSON object."
    return request


def _add_error(scan: Scan, code: str, message: str, line: int | None) -> None:
    scan.error_count += 1
    if scan.errors is not None and len(scan.errors) < MAX_LISTED_ERRORS:
        scan.errors.append({"code": code, "message": message, "param": None, "line": line})


def _count(
    scan: Scan, request: dict[str, Any], config: LocalServerConfig, fault_round: int
) -> None:
    body = request["body"]
    scan.prompt_tokens += estimate_prompt_tokens(body)
    if scan.model is None and isinstance(body.get("model"), str):
        scan.model = body["model"]
    if is_lost(request["custom_id"], config.lost_rate, fault_round):
        scan.planned_lost += 1
    elif is_failed(request["custom_id"], config.failure_rate, fault_round):
        scan.planned_failed += 1


def new_record(
    *,
    style: str,
    endpoint: str,
    input_file_id: str,
    completion_window: str,
    metadata: dict[str, str] | None,
    scan: Scan,
    config: LocalServerConfig,
    now: float,
    fault_round: int = 0,
) -> dict[str, Any]:
    """A fresh batch record (internal shape); nothing is written yet.

    ``fault_round`` (how many batches the store held before this one) salts the per-request
    fault draws, so the same request fails independently in a later batch.
    """
    errors = list(scan.errors or [])
    if config.validation_failure:
        errors.insert(
            0,
            {
                "code": "validation_failure",
                "param": None,
                "line": None,
                "message": "The local server is set to fail every batch validation.",
            },
        )
    return {
        "id": new_id("batch_"),
        "style": style,
        "endpoint": endpoint,
        "input_file_id": input_file_id,
        "completion_window": completion_window,
        "metadata": metadata,
        "created_ts": now,
        "timing": {
            "validating": config.validating_seconds,
            "in_progress": config.in_progress_seconds,
            "finalizing": config.finalizing_seconds,
        },
        "faults": {
            "failure_rate": config.failure_rate,
            "lost_rate": config.lost_rate,
            "expire": config.expire,
            "expire_fraction": config.expire_fraction,
            "round": fault_round,
        },
        "model": scan.model,
        "total": scan.total,
        "planned_failed": scan.planned_failed,
        "planned_lost": scan.planned_lost,
        "estimated_prompt_tokens": scan.prompt_tokens,
        "validation_errors": errors,
        "cancel_ts": None,
        "cancel_fraction": None,
        # Request checks decided now, so every process answers the batch the same way.
        "checks": {"infron_max_tokens": config.infron_require_max_tokens},
        "final": None,
    }


def state_at(record: dict[str, Any], now: float) -> State:
    """The status the batch has at `now`, from its creation time and snapshotted timing.

    Example:
        >>> rec = {"final": None, "cancel_ts": None, "created_ts": 0.0, "validation_errors": [],
        ...        "timing": {"validating": 1, "in_progress": 2, "finalizing": 1},
        ...        "faults": {"expire": False}}
        >>> state_at(rec, 2.0)
        State(status='in_progress', fraction=0.5, ended_at=None)
    """
    final = record["final"]
    if final is not None:
        return State(final["status"], 1.0, final["ended_at"])
    if record["cancel_ts"] is not None:
        return _cancel_state(record, now)
    timing = record["timing"]
    validated = record["created_ts"] + timing["validating"]
    processed = validated + timing["in_progress"]
    if now < validated:
        return State("validating")
    if record["validation_errors"]:
        return State("failed", 0.0, validated)
    if now < processed:
        return State("in_progress", (now - validated) / timing["in_progress"])
    if record["faults"]["expire"]:
        return State("expired", record["faults"]["expire_fraction"], processed)
    if now < processed + timing["finalizing"]:
        return State("finalizing", 1.0)
    return State("completed", 1.0, processed + timing["finalizing"])


def _cancel_state(record: dict[str, Any], now: float) -> State:
    done = record["cancel_ts"] + record["timing"]["finalizing"]
    if now < done:
        return State("cancelling", record["cancel_fraction"])
    return State("cancelled", record["cancel_fraction"], done)


def current(store: Store, batch_id: str, now: float | None = None) -> dict[str, Any]:
    """The batch record, with its results generated if it has just become terminal."""
    now = time.time() if now is None else now
    record = _require(store, batch_id)
    if record["final"] is not None or state_at(record, now).status not in TERMINAL:
        return record
    with store.lock(batch_id):
        # Another process may have finished it while we waited for the lock.
        record = _require(store, batch_id)
        state = state_at(record, now)
        if record["final"] is None and state.status in TERMINAL:
            _finalize(store, record, state)
    return record


def _finalize(store: Store, record: dict[str, Any], state: State) -> None:
    final: dict[str, Any] = {
        "status": state.status,
        "ended_at": state.ended_at,
        "output_file_id": None,
        "error_file_id": None,
        "completed": 0,
        "failed": 0,
        "lost": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
    }
    if state.status != "failed":
        if store.get_file(record["input_file_id"]) is None:
            _fail(record, final, "input_file_deleted", "The input file was deleted.")
        else:
            _run(store, record, state, final)
    record["final"] = final
    store.put_batch(record)


_OUTCOME_FIELDS = (
    "output_file_id",
    "error_file_id",
    "completed",
    "failed",
    "lost",
    "prompt_tokens",
    "completion_tokens",
)


def _run(store: Store, record: dict[str, Any], state: State, final: dict[str, Any]) -> None:
    code = "batch_cancelled" if state.status == "cancelled" else "batch_expired"
    try:
        outcome = run_batch(store, record, state.fraction, code, int(state.ended_at or 0))
    except OSError:
        raise  # the disk: a 500 now, and the next read tries again
    except Exception:
        # A bug must cost this batch, not every later GET and list of every batch.
        traceback.print_exc(file=sys.stderr)
        _fail(record, final, "internal_error", "The local server failed to run this batch.")
        return
    final.update({k: getattr(outcome, k) for k in _OUTCOME_FIELDS})


def _fail(record: dict[str, Any], final: dict[str, Any], code: str, message: str) -> None:
    record["validation_errors"] = [{"code": code, "param": None, "line": None, "message": message}]
    final["status"] = "failed"


def cancel(store: Store, batch_id: str, now: float | None = None) -> tuple[dict[str, Any], State]:
    """Ask to cancel; the batch is `cancelling`, then `cancelled` after finalizing_seconds."""
    now = time.time() if now is None else now
    current(store, batch_id, now)
    with store.lock(batch_id):
        record = _require(store, batch_id)
        state = state_at(record, now)
        if state.status in TERMINAL and state.status != "cancelled":
            raise ApiError(
                400,
                f"Cannot cancel a batch with status '{state.status}'.",
                code="batch_not_cancellable",
            )
        if state.status not in ("cancelling", "cancelled"):
            record["cancel_ts"] = now
            record["cancel_fraction"] = state.fraction
            store.put_batch(record)
            return record, State("cancelling", state.fraction)
    # Already cancelling or cancelled: answer idempotently, with results if now due.
    record = current(store, batch_id, now)
    return record, state_at(record, now)


def enqueued_tokens(store: Store, model: str | None, now: float) -> int:
    """Estimated prompt tokens of the batches for `model` that are not terminal yet."""
    return sum(
        record["estimated_prompt_tokens"]
        for record in store.list_batches()
        if record["model"] == model and state_at(record, now).status not in TERMINAL
    )


def _require(store: Store, batch_id: str) -> dict[str, Any]:
    record = store.get_batch(batch_id)
    if record is None:
        raise ApiError(404, f"No batch found with id '{batch_id[:100]}'.", code="not_found")
    return record
