"""Tests of the normalised batch model (infron_dagster.models): statuses and both parsers."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timezone

import pytest

from infron_dagster.models import Batch, BatchStatus, normalise_status

S = BatchStatus

# Every status the design documents, per style, with the enum it must map to.
OPENAI_STATUSES = {
    "validating": S.VALIDATING,
    "failed": S.FAILED,
    "in_progress": S.IN_PROGRESS,
    "finalizing": S.FINALIZING,
    "completed": S.COMPLETED,
    "expired": S.EXPIRED,
    "cancelling": S.CANCELLING,
    "cancelled": S.CANCELLED,
}
# "SUCCESS" is Infron's one documented value; the others are the ones the design says to expect
# (plus those the local emulator of Infron answers: CANCELLING, EXPIRED).
INFRON_STATUSES = {
    "SUCCESS": S.COMPLETED,
    "PENDING": S.VALIDATING,
    "PROCESSING": S.IN_PROGRESS,
    "FAILED": S.FAILED,
    "CANCELLED": S.CANCELLED,
    "CANCELLING": S.CANCELLING,
    "EXPIRED": S.EXPIRED,
}
TERMINAL = {S.COMPLETED, S.FAILED, S.EXPIRED, S.CANCELLED}
UTC = timezone.utc


def _case_variants(raw: str) -> list[str]:
    return sorted({raw, raw.lower(), raw.upper(), raw.title(), f"  {raw}  "})


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (variant, expected)
        for raw, expected in {**OPENAI_STATUSES, **INFRON_STATUSES}.items()
        for variant in _case_variants(raw)
    ],
)
def test_every_documented_status_normalises_case_insensitively(
    raw: str, expected: BatchStatus
) -> None:
    status = normalise_status(raw)
    assert status is expected
    assert status.is_terminal == (expected in TERMINAL)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("Canceled", S.CANCELLED), ("canceling", S.CANCELLING), ("in-progress", S.IN_PROGRESS)],
)
def test_american_spelling_and_hyphens_normalise(raw: str, expected: BatchStatus) -> None:
    assert normalise_status(raw) is expected


def test_has_results_only_for_terminal_states_that_may_hold_paid_rows() -> None:
    with_rows = {s for s in BatchStatus if s.has_results}
    assert with_rows == {S.COMPLETED, S.EXPIRED, S.CANCELLED}


def test_unknown_status_is_unknown_non_terminal_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A fresh string every run: the "logged once" memory is per process.
    raw = f"Quantum-Superposed-{uuid.uuid4().hex}"
    caplog.set_level(logging.DEBUG, logger="infron_dagster.models")

    first = normalise_status(raw)
    second = normalise_status(raw.lower())  # the same status, other case: still one warning

    assert first is second is S.UNKNOWN
    assert not first.is_terminal and not first.has_results
    warnings = [r for r in caplog.records if raw.lower() in r.getMessage().lower()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING


@pytest.mark.parametrize("raw", [None, "", "   "])
def test_missing_status_is_unknown_not_a_crash(raw: str | None) -> None:
    assert normalise_status(raw) is S.UNKNOWN


def test_unknown_status_in_a_batch_object_keeps_the_batch_waiting() -> None:
    raw = f"brand_new_{uuid.uuid4().hex}"
    batch = Batch.from_openai({"id": "batch_x", "status": raw})
    assert batch.status is S.UNKNOWN and not batch.is_terminal
    assert batch.raw_status == raw


# -- Infron's own batch object ---------------------------------------------------------------

INFRON_OBJECT = {
    "batch_id": "batch_inf_1",
    "status": "SUCCESS",
    "progress": "100%",
    "total_requests": 40,
    "completed_count": 37,
    "failed_count": "3",
    "prompt_tokens": 1200,
    "completion_tokens": 800,
    "total_tokens": 2000,
    "fees": "0.0123",
    "submit_time": "2026-11-24T10:15:30Z",
    "finish_time": "2026-11-24T11:00:05.250000+00:00",
    "error": None,
    "fail_reason": None,
    "result_url": "https://llm.onerouter.pro/v1/files/res_1/content",
}


def test_from_infron_parses_every_field() -> None:
    batch = Batch.from_infron(INFRON_OBJECT)

    assert batch.id == "batch_inf_1"
    assert batch.api_style == "infron"
    assert batch.status is S.COMPLETED and batch.raw_status == "SUCCESS"
    assert (batch.total_requests, batch.completed_requests, batch.failed_requests) == (40, 37, 3)
    assert (batch.prompt_tokens, batch.completion_tokens, batch.total_tokens) == (1200, 800, 2000)
    assert batch.cost == pytest.approx(0.0123)
    assert batch.created_at == datetime(2026, 11, 24, 10, 15, 30, tzinfo=UTC)
    assert batch.finished_at == datetime(2026, 11, 24, 11, 0, 5, 250000, tzinfo=UTC)
    assert batch.result_url == INFRON_OBJECT["result_url"]
    assert batch.output_file_id is None and batch.error_file_id is None
    assert batch.errors == ()
    assert batch.progress == 1.0
    assert batch.raw == INFRON_OBJECT


def test_from_infron_naive_time_is_utc_and_fees_may_carry_a_dollar_sign() -> None:
    batch = Batch.from_infron(
        {**INFRON_OBJECT, "submit_time": "2026-11-24 10:15:30", "fees": "$1.50"}
    )
    assert batch.created_at == datetime(2026, 11, 24, 10, 15, 30, tzinfo=UTC)
    assert batch.cost == pytest.approx(1.5)


@pytest.mark.parametrize("fees", [None, "", "n/a"])
def test_from_infron_missing_or_odd_fees_is_no_cost(fees: str | None) -> None:
    assert Batch.from_infron({**INFRON_OBJECT, "fees": fees}).cost is None


def test_from_infron_failed_batch_carries_error_and_fail_reason() -> None:
    batch = Batch.from_infron(
        {
            **INFRON_OBJECT,
            "status": "failed",
            "error": "invalid_json_line",
            "fail_reason": "line 3: This line is not a valid JSON object.",
            "finish_time": None,
            "result_url": None,
        }
    )
    assert batch.status is S.FAILED and batch.is_terminal
    assert batch.errors == ("invalid_json_line", "line 3: This line is not a valid JSON object.")
    assert batch.finished_at is None and batch.result_url is None


def test_from_infron_in_progress_reports_fractional_progress() -> None:
    batch = Batch.from_infron(
        {
            "batch_id": "b",
            "status": "processing",
            "total_requests": 8,
            "completed_count": 3,
            "failed_count": 1,
        }
    )
    assert batch.status is S.IN_PROGRESS and not batch.is_terminal
    assert batch.progress == 0.5


# -- the OpenAI batch object -----------------------------------------------------------------

OPENAI_OBJECT = {
    "id": "batch_oa_1",
    "object": "batch",
    "endpoint": "/v1/chat/completions",
    "errors": {
        "object": "list",
        "data": [
            {"code": "invalid_json_line", "message": "Not JSON.", "param": None, "line": 3},
            {"code": "empty_file", "message": "No requests.", "param": None, "line": None},
        ],
    },
    "input_file_id": "file-in",
    "completion_window": "24h",
    "status": "expired",
    "output_file_id": "file-out",
    "error_file_id": "file-err",
    "created_at": 1764000000,
    "in_progress_at": 1764000010,
    "expires_at": 1764086400,
    "completed_at": None,
    "failed_at": None,
    "expired_at": 1764086400,
    "cancelled_at": None,
    "request_counts": {"total": 10, "completed": 6, "failed": 4},
    "metadata": {"partition": "2026-11-24", "infron_dagster_key": "k1"},
}


def test_from_openai_parses_counts_errors_metadata_and_unix_times() -> None:
    batch = Batch.from_openai(OPENAI_OBJECT)

    assert batch.id == "batch_oa_1" and batch.api_style == "openai"
    assert batch.status is S.EXPIRED and batch.raw_status == "expired"
    assert batch.is_terminal and batch.status.has_results
    assert (batch.total_requests, batch.completed_requests, batch.failed_requests) == (10, 6, 4)
    assert (batch.output_file_id, batch.error_file_id) == ("file-out", "file-err")
    assert batch.errors == ("invalid_json_line: Not JSON. (line 3)", "empty_file: No requests.")
    assert batch.metadata == {"partition": "2026-11-24", "infron_dagster_key": "k1"}
    assert batch.created_at == datetime.fromtimestamp(1764000000, tz=UTC)
    assert batch.created_at.tzinfo is not None
    assert batch.finished_at == datetime.fromtimestamp(1764086400, tz=UTC)
    assert batch.result_url is None and batch.cost is None


@pytest.mark.parametrize("ended", ["completed_at", "failed_at", "cancelled_at"])
def test_from_openai_finished_at_comes_from_whichever_end_time_is_set(ended: str) -> None:
    data = {**OPENAI_OBJECT, "expired_at": None, ended: 1764003600}
    assert Batch.from_openai(data).finished_at == datetime.fromtimestamp(1764003600, tz=UTC)


def test_from_openai_minimal_object_has_no_counts_errors_or_metadata() -> None:
    batch = Batch.from_openai(
        {"id": "batch_min", "status": "validating", "errors": None, "metadata": None}
    )
    assert batch.status is S.VALIDATING and not batch.is_terminal
    assert batch.total_requests is None and batch.progress is None
    assert batch.errors == () and batch.metadata == {}
    assert batch.created_at is None and batch.finished_at is None


def test_batch_equality_ignores_the_raw_payload() -> None:
    one = Batch.from_openai(OPENAI_OBJECT)
    other = Batch.from_openai({**OPENAI_OBJECT, "object": "something-else"})
    assert one == other
    assert "raw=" not in repr(one)
