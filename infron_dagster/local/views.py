"""Rendering a batch record as the OpenAI batch object or as Infron's batch object."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

from .engine import TERMINAL, State

# Mock prices in dollars per token, halved for batch: what `fees` reports (a small chat
# model's and a small embedding model's list prices).
PROMPT_PRICE = 0.15 / 1_000_000
COMPLETION_PRICE = 0.60 / 1_000_000
EMBEDDING_PRICE = 0.02 / 1_000_000
BATCH_DISCOUNT = 0.5

_INFRON_STATUS = {
    "validating": "PENDING",
    "in_progress": "PROCESSING",
    "finalizing": "PROCESSING",
    "cancelling": "CANCELLING",
    "completed": "SUCCESS",
    "failed": "FAILED",
    "expired": "EXPIRED",
    "cancelled": "CANCELLED",
}


def request_counts(record: dict[str, Any], state: State) -> dict[str, int]:
    """`{"total", "completed", "failed"}`: final numbers, or the share finished so far."""
    total = record["total"]
    final = record["final"]
    if final is not None:
        return {"total": total, "completed": final["completed"], "failed": final["failed"]}
    if state.status in TERMINAL:
        return {"total": total, "completed": 0, "failed": 0}
    planned_ok = total - record["planned_failed"] - record["planned_lost"]
    return {
        "total": total,
        "completed": math.floor(planned_ok * state.fraction),
        "failed": math.floor(record["planned_failed"] * state.fraction),
    }


def openai_view(record: dict[str, Any], state: State) -> dict[str, Any]:
    """The OpenAI batch object.

    Besides the documented fields it carries `model` and, once terminal, `usage`
    (as recent OpenAI batch objects do).
    """
    final = record["final"] or {}
    return {
        "id": record["id"],
        "object": "batch",
        "endpoint": record["endpoint"],
        "model": record["model"],
        "errors": _errors(record, state),
        "input_file_id": record["input_file_id"],
        "completion_window": record["completion_window"],
        "status": state.status,
        "output_file_id": final.get("output_file_id"),
        "error_file_id": final.get("error_file_id"),
        **_timestamps(record, state),
        "request_counts": request_counts(record, state),
        "usage": _usage(final) if final else None,
        "metadata": record["metadata"],
    }


def infron_view(
    record: dict[str, Any], state: State, base_url: str, download_token: str | None
) -> dict[str, Any]:
    """Infron's batch object; `result_url` points at the combined result file."""
    final = record["final"] or {}
    counts = request_counts(record, state)
    prompt, completion = final.get("prompt_tokens", 0), final.get("completion_tokens", 0)
    input_price = EMBEDDING_PRICE if record.get("endpoint") == "/v1/embeddings" else PROMPT_PRICE
    fees = (prompt * input_price + completion * COMPLETION_PRICE) * BATCH_DISCOUNT
    return {
        "batch_id": record["id"],
        "status": _INFRON_STATUS[state.status],
        "progress": _progress(counts, state),
        "total_requests": counts["total"],
        "completed_count": counts["completed"],
        "failed_count": counts["failed"],
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "fees": f"{fees:.6f}",
        "submit_time": _iso(record["created_ts"]),
        "finish_time": _iso(state.ended_at),
        **_infron_error(record, state),
        "result_url": _result_url(final.get("output_file_id"), base_url, download_token),
    }


def _errors(record: dict[str, Any], state: State) -> dict[str, Any] | None:
    if state.status != "failed" or not record["validation_errors"]:
        return None
    return {"object": "list", "data": record["validation_errors"]}


def _timestamps(record: dict[str, Any], state: State) -> dict[str, int | None]:
    created, timing, status = record["created_ts"], record["timing"], state.status
    validated = created + timing["validating"]
    processed = validated + timing["in_progress"]
    cancel_ts = record["cancel_ts"]
    started = status in ("in_progress", "finalizing", "completed", "expired") or (
        cancel_ts is not None and cancel_ts >= validated
    )
    return {
        "created_at": int(created),
        "in_progress_at": int(validated) if started else None,
        "expires_at": int(created + _window_seconds(record["completion_window"])),
        "finalizing_at": int(processed) if status in ("finalizing", "completed") else None,
        "completed_at": _when(state, "completed"),
        "failed_at": _when(state, "failed"),
        "expired_at": _when(state, "expired"),
        "cancelling_at": int(cancel_ts) if cancel_ts is not None else None,
        "cancelled_at": _when(state, "cancelled"),
    }


def _when(state: State, status: str) -> int | None:
    if state.status != status or state.ended_at is None:
        return None
    return int(state.ended_at)


def _window_seconds(window: str) -> int:
    # "24h" is the only window OpenAI offers; anything unparseable counts as that.
    try:
        return int(window.rstrip("h")) * 3600
    except (AttributeError, ValueError):
        return 24 * 3600


def _usage(final: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = final["prompt_tokens"], final["completion_tokens"]
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def _progress(counts: dict[str, int], state: State) -> str:
    if state.status in ("completed", "expired", "cancelled"):
        return "100%"
    if not counts["total"]:
        return "0%"
    done = counts["completed"] + counts["failed"]
    return f"{math.floor(100 * done / counts['total'])}%"


def _infron_error(record: dict[str, Any], state: State) -> dict[str, str | None]:
    if state.status == "failed":
        errors = record["validation_errors"]
        reason = "; ".join(
            (f"line {e['line']}: " if e["line"] else "") + e["message"] for e in errors[:5]
        )
        return {"error": errors[0]["code"] if errors else "failed", "fail_reason": reason}
    if state.status == "expired":
        return {
            "error": "batch_expired",
            "fail_reason": "The batch expired before every request finished.",
        }
    return {"error": None, "fail_reason": None}


def _result_url(file_id: str | None, base_url: str, token: str | None) -> str | None:
    if file_id is None:
        return None
    # The token lets a plain GET (no Authorization header) fetch it, like a presigned URL.
    query = f"?token={token}" if token else ""
    return f"{base_url}/v1/files/{file_id}/content{query}"


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
