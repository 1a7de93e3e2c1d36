"""The normalised batch object model shared by both wire styles.

Example:
    >>> normalise_status("SUCCESS")
    <BatchStatus.COMPLETED: 'completed'>
    >>> normalise_status("in_progress").is_terminal
    False
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Literal

from .untrusted import check_provider_id, printable

__all__ = ["ApiStyle", "Batch", "BatchStatus", "normalise_status"]

logger = logging.getLogger(__name__)

ApiStyle = Literal["infron", "openai"]


class BatchStatus(str, Enum):
    """Lifecycle of a batch, the same for every wire style.

    Example:
        >>> BatchStatus.EXPIRED.is_terminal
        True
    """

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"

    @property
    def is_terminal(self) -> bool:
        """True once the batch will not change any more."""
        return self in _TERMINAL

    @property
    def has_results(self) -> bool:
        """True for terminal states that may carry finished (paid-for) rows."""
        return self in (BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED)


_TERMINAL = frozenset(
    {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)

_ALIASES: dict[str, BatchStatus] = {
    "validating": BatchStatus.VALIDATING,
    "pending": BatchStatus.VALIDATING,
    "queued": BatchStatus.VALIDATING,
    "submitted": BatchStatus.VALIDATING,
    "created": BatchStatus.VALIDATING,
    "in_progress": BatchStatus.IN_PROGRESS,
    "processing": BatchStatus.IN_PROGRESS,
    "running": BatchStatus.IN_PROGRESS,
    "finalizing": BatchStatus.FINALIZING,
    "completed": BatchStatus.COMPLETED,
    "complete": BatchStatus.COMPLETED,
    "success": BatchStatus.COMPLETED,
    "succeeded": BatchStatus.COMPLETED,
    "ended": BatchStatus.COMPLETED,
    "done": BatchStatus.COMPLETED,
    "failed": BatchStatus.FAILED,
    "failure": BatchStatus.FAILED,
    "error": BatchStatus.FAILED,
    "expired": BatchStatus.EXPIRED,
    "timeout": BatchStatus.EXPIRED,
    "cancelling": BatchStatus.CANCELLING,
    "canceling": BatchStatus.CANCELLING,
    "cancelled": BatchStatus.CANCELLED,
    "canceled": BatchStatus.CANCELLED,
}

_warned_unknown: set[str] = set()


def normalise_status(raw: str | None) -> BatchStatus:
    """Map any provider's status string onto :class:`BatchStatus`.

    An unknown string is non-terminal (``UNKNOWN``) and logged once per process, so a new
    provider status makes the sensor wait instead of crashing or collecting too early.

    Example:
        >>> normalise_status("Processing")
        <BatchStatus.IN_PROGRESS: 'in_progress'>
    """
    text = raw if isinstance(raw, str) else ""
    key = text.strip().lower().replace("-", "_").replace(" ", "_")[:100]
    status = _ALIASES.get(key)
    if status is None:
        if key not in _warned_unknown and len(_warned_unknown) < 100:
            _warned_unknown.add(key)
            logger.warning(
                "Unknown batch status %r: treated as still in progress", printable(raw, 100)
            )
        return BatchStatus.UNKNOWN
    return status


@dataclass(frozen=True)
class Batch:
    """One batch as the client sees it, whatever style the server speaks.

    Example:
        >>> b = Batch(id="batch_1", status=BatchStatus.COMPLETED, api_style="openai")
        >>> b.is_terminal
        True
    """

    id: str
    status: BatchStatus
    api_style: ApiStyle
    raw_status: str = ""
    total_requests: int | None = None
    completed_requests: int | None = None
    failed_requests: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    result_url: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cost: float | None = None
    reported_progress: float | None = None
    created_at: datetime | None = None
    finished_at: datetime | None = None
    errors: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_terminal(self) -> bool:
        """True once the batch will not change any more."""
        return self.status.is_terminal

    @property
    def progress(self) -> float | None:
        """Fraction of requests finished (0..1), when the server says."""
        if not self.total_requests:
            return self.reported_progress
        done = (self.completed_requests or 0) + (self.failed_requests or 0)
        return min(1.0, done / self.total_requests)

    @classmethod
    def from_openai(cls, data: dict[str, Any]) -> Batch:
        """Parse an OpenAI-compatible batch object; ValueError when it is not one.

        Example:
            >>> Batch.from_openai({"id": "batch_1", "status": "completed"}).is_terminal
            True
        """
        counts = _dict(data.get("request_counts"))
        problems: list[str] = []
        errors = _dict(data.get("errors")).get("data")
        finished = (
            data.get("completed_at")
            or data.get("failed_at")
            or data.get("expired_at")
            or data.get("cancelled_at")
        )
        return cls(
            id=check_provider_id(data.get("id"), "batch id"),
            status=normalise_status(data.get("status")),
            api_style="openai",
            raw_status=_text(data.get("status")),
            total_requests=_int(counts.get("total")),
            completed_requests=_int(counts.get("completed")),
            failed_requests=_int(counts.get("failed")),
            output_file_id=_file_id(data.get("output_file_id"), "output_file_id", problems),
            error_file_id=_file_id(data.get("error_file_id"), "error_file_id", problems),
            created_at=_time(data.get("created_at")),
            finished_at=_time(finished),
            errors=(
                *(_describe_error(e) for e in (errors if isinstance(errors, list) else [])),
                *problems,
            ),
            metadata={str(k): printable(v, 600) for k, v in _dict(data.get("metadata")).items()},
            raw=data,
        )

    @classmethod
    def from_infron(cls, data: dict[str, Any]) -> Batch:
        """Parse Infron's own batch object (``batch_id``, upper-case ``status``, ``fees``).

        ``fees`` is a decimal string, ``progress`` a percent string, a time of 0 is unknown.

        Example:
            >>> Batch.from_infron({"batch_id": "b1", "status": "SUCCESS", "fees": "0.12"}).cost
            0.12
        """
        errors = [printable(e) for e in (data.get("error"), data.get("fail_reason")) if e]
        url = data.get("result_url")
        return cls(
            id=check_provider_id(data.get("batch_id") or data.get("id"), "batch id"),
            status=normalise_status(data.get("status")),
            api_style="infron",
            raw_status=_text(data.get("status")),
            total_requests=_int(data.get("total_requests")),
            completed_requests=_int(data.get("completed_count")),
            failed_requests=_int(data.get("failed_count")),
            result_url=url if isinstance(url, str) and url else None,
            prompt_tokens=_int(data.get("prompt_tokens")),
            completion_tokens=_int(data.get("completion_tokens")),
            total_tokens=_int(data.get("total_tokens")),
            cost=_float(data.get("fees")),
            reported_progress=_percent(data.get("progress")),
            created_at=_time(data.get("submit_time")),
            finished_at=_time(data.get("finish_time")),
            errors=tuple(errors),
            raw=data,
        )


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str:
    return printable(value, 200) if value is not None else ""


def _file_id(value: Any, what: str, problems: list[str]) -> str | None:
    """A file id, or None with the reason noted: one odd field must not hide the batch's
    state (its rows then fail as missing_result, naming the reason)."""
    if value is None or value == "":
        return None
    try:
        return check_provider_id(value, what)
    except ValueError as exc:
        problems.append(f"unusable {what}: {exc}")
        return None


def _percent(value: Any) -> float | None:
    """``"42%"`` or ``42`` -> 0.42, ``0.42`` -> 0.42; anything else -> None."""
    if isinstance(value, bool) or value is None:
        return None
    text = str(value).strip()
    try:
        number = float(text.rstrip("%"))
    except ValueError:
        return None
    if not math.isfinite(number):
        return None
    fraction = number / 100 if text.endswith("%") or number > 1 else number
    return min(1.0, max(0.0, fraction))


def _describe_error(err: Any) -> str:
    if not isinstance(err, dict):
        return printable(err)
    line = f" (line {printable(err['line'], 20)})" if err.get("line") is not None else ""
    return printable(f"{err.get('code') or 'error'}: {err.get('message') or ''}{line}")


def _int(value: Any) -> int | None:
    """A count from the wire, or None when it is not a plain whole number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 2**63 else None
    try:
        number = None if value is None else int(str(value).strip())
    except ValueError:
        return None
    return number if number is None or abs(number) < 2**63 else None


def _float(value: Any) -> float | None:
    """A money amount (``"0.0012"``, ``"$0.0012"``, ``0.0012``), or None."""
    if isinstance(value, bool) or value in (None, ""):
        return None
    try:
        number = float(str(value).strip().lstrip("$"))
    except ValueError:
        return None
    return number if math.isfinite(number) else None


# Epoch numbers above these are milliseconds (or microseconds): seconds would be past 5138.
_MILLIS, _MICROS = 1e11, 1e14


def _time(value: Any) -> datetime | None:
    """Epoch seconds, milliseconds or microseconds, or ISO-8601; 0 or garbage -> None."""
    if isinstance(value, bool) or value in (None, "", 0, "0"):
        return None
    if isinstance(value, str) and value.strip().lstrip("-").replace(".", "", 1).isdigit():
        value = float(value)
    if isinstance(value, (int, float)):
        seconds = value / 1e6 if value > _MICROS else value / 1e3 if value > _MILLIS else value
        try:
            return datetime.fromtimestamp(seconds, tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            return None
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
