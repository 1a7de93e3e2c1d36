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
from .storage import BatchStorage
from .submission import PipelineSettings, SubmissionReport

__all__ = [
    "column_schema",
    "dry_run_error_metadata",
    "failed_metadata",
    "results_metadata",
    "submission_metadata",
    "table_metadata",
]


def submission_metadata(report: SubmissionReport, resource: InfronResource) -> dict[str, Any]:
    """The ``<name>_batches`` metadata of one partition's submission (or dry run).

    Example::

        submission_metadata(report, resource)["carried_why"]
        # -> '40 unchanged row(s) already answered in a collected attempt: ...'
    """
    m = report.manifest
    common = {
        "dagster/row_count": m.row_count,
        "valid_rows": m.row_count - m.invalid_count,
        "invalid_rows": m.invalid_count,
        "carried_rows": report.carried,
        **_carry_metadata(report),
        "chunks": len(m.chunks),
        "attempt": m.attempt,
        "attempt_kind": m.kind,
        "api_style": m.api_style or resource.api_style,
        "local_server": resource.is_local,
        "estimated_input_tokens": report.estimate.input_tokens,
        "fingerprint": m.fingerprint[:16],
        **report.estimate.metadata(),
    }
    if report.cancelled:
        common["cancelled_in_flight_batches"] = dg.MetadataValue.json(report.cancelled)
    if report.dry_run:
        refusal = report.budget_refusal
        verdict = {"budget_would_refuse": refusal} if refusal else {}
        return {"dry_run": True, "would_pay": report.would_pay, **verdict, **common}
    assert report.outcome is not None
    return {
        **common,
        "batch_ids": dg.MetadataValue.json(m.batch_ids),
        "batches_created": len(report.outcome.created),
        "batches_reattached": len(report.outcome.reattached),
        "reused_existing_batches": report.outcome.reused,
        **_admission_metadata(report),
    }


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
    return {
        "carried_from_in_flight": in_flight,
        "carried_from_other_partitions": report.elsewhere,
        "carried_why": "; ".join(_carried_why(report, waits, in_flight)) or "nothing carried",
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
    for w in waits:
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
    """The ``<name>_results`` metadata of a collected partition: rows, tokens, money.

    Example::

        results_metadata(settings, "a", outcome)["succeeded"]
        # -> 118
    """
    # Summaries made while the tables were written: nothing is read back whole.
    results = outcome.results_summary
    assert results is not None
    return {
        **_common(outcome),
        "dagster/row_count": results.rows,
        "dagster/uri": str(s.storage.table_path("results", key)),
        "table_root": str(s.storage.table_root("results")),
        **outcome.tokens,
        **_money_metadata(s, outcome),
        "dagster/column_schema": column_schema(results.schema),
        "summary": dg.MetadataValue.md(_summary_md(key, outcome)),
    }


def failed_metadata(
    s: PipelineSettings, key: str | None, outcome: CollectOutcome
) -> dict[str, Any]:
    """The ``<name>_failed`` metadata of a collected partition: rows and error codes.

    Example::

        failed_metadata(settings, "a", outcome)["error_codes"].value
        # -> {'batch_expired': 2}
    """
    failed = outcome.failed_summary
    assert failed is not None
    return {
        **_common(outcome),
        "dagster/row_count": failed.rows,
        "dagster/uri": str(s.storage.table_path("failed", key)),
        "dagster/column_schema": column_schema(failed.schema),
        "error_codes": dg.MetadataValue.json(outcome.error_counts),
        "retryable": outcome.retryable_rows,
        # what the sensor will do about the retryable rows (auto_retry), if anything
        **{k: v for k, v in outcome.settled.items() if k == "auto_retry"},
    }


def _common(outcome: CollectOutcome) -> dict[str, Any]:
    """What both tables of a collected partition show."""
    results, failed = outcome.results_summary, outcome.failed_summary
    assert results is not None and failed is not None
    common: dict[str, Any] = {
        "attempts": dg.MetadataValue.json(outcome.attempts),
        "input_rows": outcome.input_rows,
        "succeeded": results.rows,
        "failed": failed.rows,
        "unparseable_lines": outcome.report.unparseable,
        "oversized_lines": outcome.report.too_large,
        "duplicate_lines": outcome.report.duplicates,
        "unknown_custom_ids": outcome.report.unknown_ids,
    }
    if outcome.cancelled:  # what the partition's page says: stopped, not finished
        common["state"] = "cancelled"
        common["cancelled_attempts"] = dg.MetadataValue.json(outcome.cancelled)
    return common


def _money_metadata(s: PipelineSettings, outcome: CollectOutcome) -> dict[str, Any]:
    """What the partition cost (settled in the budget ledger) next to what was estimated."""
    wanted = {*outcome.attempts, *outcome.sources}  # the in-flight sources were paid for too
    assert outcome.history is not None  # the manifests as collection wrote them
    attempts = [m for m in outcome.history.manifests if m.attempt in wanted]
    by_attempt = cost_by_attempt(outcome)
    # the ledger was settled before the commit point; what it did not trust, and why
    untrusted = {k: v for k, v in outcome.settled.items() if k == "cost_reported_untrusted"}
    reported = None if untrusted else outcome.cost  # fees that cannot be billed are not shown
    money: dict[str, Any] = dict(untrusted)  # {"cost_reported_untrusted": why} or {}
    if s.spend.price is not None or reported is not None:  # the rows' cost column is known
        money["cost"] = round(sum(by_attempt.values()), 6)
    if reported is not None:
        money["cost_reported_by_provider"] = round(reported, 6)
        tokens = sum(outcome.tokens.values())
        if tokens:  # what the provider billed per token for this model: check your price
            money["observed_price_per_million_tokens"] = round(reported / tokens * 1e6, 4)
            money["model"] = s.spec.model
    estimates = [(m.spend or {}).get("expected_cost") for m in attempts]
    if estimates and all(e is not None for e in estimates):
        money["cost_estimated"] = round(sum(estimates), 6)
    return money


def column_schema(schema: pa.Schema) -> dg.TableSchema:
    """The table's columns and Arrow types (structured-output fields included), for the UI.

    Example:
        >>> [c.type for c in column_schema(pa.schema([("id", pa.int64())])).columns]
        ['int64']
    """
    return dg.TableSchema(columns=[dg.TableColumn(f.name, str(f.type)) for f in schema])


def _summary_md(key: str | None, outcome: CollectOutcome) -> str:
    lines = [
        f"**Partition** `{key or '-'}` — attempts {outcome.attempts}",
        "",
        "| outcome | rows |",
        "|---|---|",
        f"| succeeded | {outcome.results_summary.rows if outcome.results_summary else 0} |",
    ]
    lines += [f"| failed: {code} | {n} |" for code, n in sorted(outcome.error_counts.items())]
    return "\n".join(lines)
