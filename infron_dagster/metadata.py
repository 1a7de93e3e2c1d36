"""What the Dagster UI shows: the metadata of ``<name>_batches`` and of the collected tables.

The submit asset shows a :class:`SubmissionReport` (rows, carried rows and why, chunks,
batches, the estimate, admission's pending chunks); the collect assets show the partition's
outcome (rows per outcome, error codes, tokens, money against the estimate, the columns).

Example::

    yield dg.MaterializeResult(metadata=submission_metadata(report, resource))
    yield dg.MaterializeResult(asset_key=results_key,
                               metadata=results_metadata(settings, key, outcome))
"""

from __future__ import annotations

from typing import Any

import dagster as dg
import pyarrow as pa

from .collect import CollectOutcome
from .resources import InfronResource
from .spend import cost_by_attempt
from .status import STATUS, collection_status, submission_status
from .storage import BatchStorage
from .submission import PipelineSettings, SubmissionReport
from .untrusted import printable

__all__ = [
    "column_schema",
    "dry_run_error_metadata",
    "estimate_metadata",
    "failed_metadata",
    "id_metadata",
    "news",
    "results_metadata",
    "submission_metadata",
    "table_metadata",
]


def submission_metadata(report: SubmissionReport, resource: InfronResource) -> dict[str, Any]:
    """The ``<name>_batches`` metadata of one partition's submission (or dry run): its
    ``status`` first, then what is news (a counter at zero, a flag left off, a value said
    twice are left out: see :func:`news`).

    Example::

        submission_metadata(report, resource)["carried_why"]
        # -> '40 unchanged row(s) already answered in a collected attempt: ...'
    """
    m = report.manifest
    invalid = {"valid_rows": m.row_count - m.invalid_count, "invalid_rows": m.invalid_count}
    common = {
        "dagster/row_count": m.row_count,
        **(invalid if m.invalid_count else {}),
        "carried_rows": report.carried,
        **_carry_metadata(report),
        "chunks": len(m.chunks),
        "attempt": m.attempt,
        "attempt_kind": m.kind,
        "api_style": m.api_style or resource.api_style,
        "local_server": resource.is_local,
        # Answers the local mock server gave, not reused against a real API (submission.py)
        "mock_answers_not_reused": getattr(report, "not_reused", ""),
        "fingerprint": m.fingerprint[:16],
        **estimate_metadata(report),
        **id_metadata("cancelled_in_flight_batch", report.cancelled),
        **(getattr(report, "pilot", None) or {}),  # the pilot's part (pilot.py), if any
    }
    if report.dry_run:
        refusal = report.budget_refusal
        verdict = {"budget_would_refuse": refusal} if refusal else {}
        dry = {"dry_run": True, "would_pay": report.would_pay, **verdict, **common}
        return news(dry, keep=("would_pay",))
    assert report.outcome is not None
    return news(
        {
            STATUS: submission_status(report),
            **common,
            **id_metadata("batch", m.batch_ids),
            "batches_created": len(report.outcome.created),
            "batches_reattached": len(report.outcome.reattached),
            "reused_existing_batches": report.outcome.reused,
            **_admission_metadata(report),
        }
    )


def estimate_metadata(report: SubmissionReport) -> dict[str, Any]:
    """The estimate of what this submission sends, money in dollars, with its basis; an
    expected value equal to the worst case is said once (the worst case), and a submission
    that sends nothing has no estimate.

    Example::

        estimate_metadata(report)
        # -> {'estimate/requests': 20, 'estimate/input_tokens': 180,
        #     'estimate/output_tokens_worst_case': 20480, 'estimate/output_basis':
        #     'max_tokens 1024 (nothing collected yet)', 'estimate/cost_worst_case_usd': 0.0061}
    """
    if not report.estimate.requests:
        return {}
    values = dict(report.estimate.metadata())
    for expected, worst in (
        ("estimate/output_tokens_expected", "estimate/output_tokens_worst_case"),
        ("estimate/cost_expected_usd", "estimate/cost_worst_case_usd"),
    ):
        if expected in values and values.get(expected) == values.get(worst):
            del values[expected]
    return values


def news(values: dict[str, Any], keep: tuple[str, ...] = ()) -> dict[str, Any]:
    """``values`` without what says nothing: a zero counter, a False flag, an empty text
    (Dagster's own ``dagster/...`` keys, such as a row count of 0, always stay).

    Example:
        >>> news({"batches_created": 0, "reused_existing_batches": False, "chunks": 3})
        {'chunks': 3}
    """
    return {
        k: v
        for k, v in values.items()
        if k in keep
        or k.startswith("dagster/")
        or not (v is False or v == "" or (type(v) is int and v == 0))
    }


def id_metadata(name: str, ids: list[str]) -> dict[str, Any]:
    """One id as text under ``<name>_id``, several as a JSON list under ``<name>_ids``
    (a one-item JSON list says less than the id itself), none: nothing.

    Example:
        >>> id_metadata("batch", ["batch_1"]), id_metadata("batch", [])
        ({'batch_id': 'batch_1'}, {})
    """
    if len(ids) == 1:
        return {f"{name}_id": ids[0]}
    return {f"{name}_ids": dg.MetadataValue.json(ids)} if ids else {}


def dry_run_error_metadata(why: str) -> dict[str, Any]:
    """What a dry run observes when a real run would fail (not a failed partition).

    Example:
        >>> dry_run_error_metadata("InputError: no rows")["would_pay"]
        False
    """
    return {"dry_run": True, "would_pay": False, "dry_run_error": why}


def _admission_metadata(report: SubmissionReport) -> dict[str, Any]:
    """Chunks waiting for admission control (created later by a run the sensor asks)."""
    outcome = report.outcome
    found: dict[str, Any] = {}
    if outcome is not None and outcome.waiting_for:
        found["waiting_for"] = outcome.waiting_for
    if outcome is not None and outcome.cancelled:
        found["cancelled"] = "this attempt was cancelled: none of its unsent chunks is sent"
    if outcome is None or not (outcome.pending_chunks or outcome.sent_alone):
        return found
    why = [outcome.pending_reason] if outcome.pending_reason else []
    if outcome.sent_alone:
        why.insert(0, "a chunk bigger than max_enqueued_tokens was sent alone")
    return {
        **found,
        "pending_chunks": outcome.pending_chunks,
        "pending_requests": outcome.pending_requests,
        "pending_why": "; ".join(why),
    }


def _carry_metadata(report: SubmissionReport) -> dict[str, Any]:
    """How many carried rows wait for batches still running, and why none is sent."""
    waits = report.manifest.waits_on or []
    in_flight = sum(int(w.get("rows", 0)) for w in waits)
    pilot = in_flight if (report.pilot or {}).get("pilot/mode") in ("release", "stop") else 0
    return {
        "carried_from_in_flight": in_flight - pilot,
        "carried_from_pilot": pilot,
        "carried_from_other_partitions": report.elsewhere,
        "carried_why": "; ".join(_carried_why(report, waits, in_flight)),
    }


def _carried_why(report: SubmissionReport, waits: list[Any], in_flight: int) -> list[str]:
    why = []
    collected = report.carried - in_flight - report.elsewhere
    if collected > 0:
        why.append(
            f"{collected} unchanged row(s) already answered in a collected "
            "attempt: their paid-for answers are reused"
        )
    if report.elsewhere:
        why.append(
            f"{report.elsewhere} row(s) whose exact request was answered in another "
            "partition (reuse_answers='pipeline'): read from there"
        )
    # A pilot's release or stop names the (collected) pilot it carries rows from in waits_on,
    # so that the pilot's failed rows are carried too: those rows are not in flight.
    after_pilot = (report.pilot or {}).get("pilot/mode") in ("release", "stop")
    for w in waits:
        if after_pilot:
            why.append(
                f"{w.get('rows', 0)} row(s) answered or failed in the pilot (attempt "
                f"{w['attempt']}): carried as they are, never sent again"
            )
            continue
        why.append(
            f"{w.get('rows', 0)} unchanged row(s) sent by attempt {w['attempt']}, still in "
            f"flight: they wait for its {len(w['batch_ids'])} batch(es), collected with "
            "this attempt"
        )
    if report.cancelled:
        why.append(
            f"policy 'cancel': {len(report.cancelled)} running batch(es) cancelled first, "
            "every row sent again"
        )
    return why


# --- collect -----------------------------------------------------------------------------


def table_metadata(storage: BatchStorage, kind: str) -> dict[str, Any]:
    """Where the whole table lives: a hive-partitioned Parquet dataset, one folder per
    partition (``partition=<key>``), readable as one table by DuckDB, pyarrow or Spark.

    Example::

        table_metadata(BatchStorage("/lake", "reviews"), "results")
        # -> {'dagster/table_name': '/lake/reviews/results'}
    """
    return {"dagster/table_name": str(storage.table_root(kind))}


def results_metadata(
    s: PipelineSettings, key: str | None, outcome: CollectOutcome
) -> dict[str, Any]:
    """The ``<name>_results`` metadata of a collected partition: its status, rows, tokens,
    and money (the actual cost beside the estimate and its basis).

    Example::

        results_metadata(settings, "a", outcome)["status"]
        # -> 'collected: 118 of 120 rows succeeded, 2 failed (2 retryable)'
    """
    # Summaries made while the tables were written: nothing is read back whole.
    results, failed = outcome.results_summary, outcome.failed_summary
    assert results is not None and failed is not None
    money = _money_metadata(s, outcome)
    return news(
        {
            **_common(outcome),
            "dagster/row_count": results.rows,
            "failed": failed.rows,
            "dagster/uri": str(s.storage.table_path("results", key)),
            **outcome.tokens,
            **money,
            "dagster/column_schema": column_schema(results.schema),
            "summary": dg.MetadataValue.md(_summary_md(key, outcome, money)),
        }
    )


def failed_metadata(
    s: PipelineSettings, key: str | None, outcome: CollectOutcome
) -> dict[str, Any]:
    """The ``<name>_failed`` metadata of a collected partition: its status, rows and error
    codes.

    Example::

        failed_metadata(settings, "a", outcome)["error_codes"].value
        # -> {'batch_expired': 2}
    """
    results, failed = outcome.results_summary, outcome.failed_summary
    assert results is not None and failed is not None
    return news(
        {
            **_common(outcome),
            "dagster/row_count": failed.rows,
            "succeeded": results.rows,
            "dagster/uri": str(s.storage.table_path("failed", key)),
            "dagster/column_schema": column_schema(failed.schema),
            **_error_codes(outcome),
            "retryable": outcome.retryable_rows,
            # what the sensor will do about the retryable rows (auto_retry), if anything
            **{k: v for k, v in outcome.settled.items() if k == "auto_retry"},
        }
    )


def _error_codes(outcome: CollectOutcome) -> dict[str, Any]:
    codes = outcome.error_counts
    return {"error_codes": dg.MetadataValue.json(codes)} if codes else {}


def _common(outcome: CollectOutcome) -> dict[str, Any]:
    """What both tables of a collected partition show: the status, the attempts, and the
    result lines that could not be used (each only when there were some)."""
    attempts = outcome.attempts
    return {
        STATUS: collection_status(outcome),
        **(
            {"attempts": ", ".join(map(str, attempts))}
            if len(attempts) > 1
            else {"attempt": attempts[0] if attempts else 0}
        ),
        "input_rows": outcome.input_rows,
        "unparseable_lines": outcome.report.unparseable,
        "oversized_lines": outcome.report.too_large,
        "duplicate_lines": outcome.report.duplicates,
        "unknown_custom_ids": outcome.report.unknown_ids,
        "cancelled_attempts": ", ".join(map(str, outcome.cancelled)),
    }


def _money_metadata(s: PipelineSettings, outcome: CollectOutcome) -> dict[str, Any]:
    """What the partition cost in dollars (settled in the budget ledger), next to what was
    estimated before sending and the estimate's basis."""
    wanted = {*outcome.attempts, *outcome.sources}  # the in-flight sources were paid for too
    assert outcome.history is not None  # the manifests as collection wrote them
    attempts = [m for m in outcome.history.manifests if m.attempt in wanted]
    by_attempt = cost_by_attempt(outcome)
    # the ledger was settled before the commit point; what it did not trust, and why
    untrusted = {k: v for k, v in outcome.settled.items() if k == "cost_reported_untrusted"}
    reported = None if untrusted else outcome.cost  # fees that cannot be billed are not shown
    money: dict[str, Any] = dict(untrusted)  # {"cost_reported_untrusted": why} or {}
    if s.spend.price is not None or reported is not None:  # the rows' cost column is known
        money["cost_usd"] = _usd(sum(by_attempt.values()))
    spends = [m.spend or {} for m in attempts]
    estimates = [spend.get("expected_cost") for spend in spends]
    if estimates and all(e is not None for e in estimates):
        money["cost_estimated_usd"] = _usd(sum(estimates))
        bases = [str(spend["basis"]) for spend in spends if spend.get("basis")]
        if bases:  # what the expected output tokens were taken from, attempt by attempt
            money["cost_estimate_basis"] = printable("; ".join(dict.fromkeys(bases)), 500)
    if reported is not None:
        money["cost_reported_by_provider_usd"] = _usd(reported)
        tokens = sum(outcome.tokens.values())
        if tokens:  # what the provider billed per token for this model: check your price
            money["observed_price_per_million_tokens_usd"] = round(reported / tokens * 1e6, 4)
            money["model"] = s.spec.model
    return money


def _usd(amount: float) -> dg.MetadataValue:
    """Dollars, to a millionth (a request can cost less than a cent)."""
    return dg.MetadataValue.float(round(float(amount), 6))


def column_schema(schema: pa.Schema) -> dg.TableSchema:
    """The table's columns and Arrow types (structured-output fields included), for the UI.

    Example:
        >>> [c.type for c in column_schema(pa.schema([("id", pa.int64())])).columns]
        ['int64']
    """
    return dg.TableSchema(columns=[dg.TableColumn(f.name, str(f.type)) for f in schema])


def _summary_md(key: str | None, outcome: CollectOutcome, money: dict[str, Any]) -> str:
    """The partition on one card: its rows by outcome, then what it cost beside the
    estimate and the estimate's basis."""
    attempts = outcome.attempts
    which = f"attempt{'s' if len(attempts) > 1 else ''} {', '.join(map(str, attempts))}"
    lines = [
        f"**Partition** `{printable(key or '-', 100)}` — {which}",
        "",
        "| outcome | rows |",
        "|---|---|",
        f"| succeeded | {outcome.results_summary.rows if outcome.results_summary else 0} |",
    ]
    lines += [f"| failed: {code} | {n} |" for code, n in sorted(outcome.error_counts.items())]
    cost, estimated = money.get("cost_usd"), money.get("cost_estimated_usd")
    if cost is not None or estimated is not None:
        lines += ["", "| money | $ |", "|---|---|"]
    if cost is not None:
        lines.append(f"| cost | {cost.value:.6f} |")
    if estimated is not None:
        basis = str(money.get("cost_estimate_basis", "")).replace("|", "/")
        label = f"estimated ({basis})" if basis else "estimated"
        lines.append(f"| {label} | {estimated.value:.6f} |")
    return "\n".join(lines)
