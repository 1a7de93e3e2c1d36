"""The verdict of a pilot batch: did its answers look good enough to send the rest?

A pilot (``pilot_rows``, see :mod:`~infron_dagster.pilot`) is a normal attempt of a few rows.
Once collected, its partition's results and failed tables hold exactly its rows, and the
verdict is read from them (so it is no new truth: it can always be computed again): the share
of sent requests that failed, the share of answers that do not fit the response schema, the
share cut at ``max_tokens``, and the mean output tokens, against the limits the pilot's
manifest recorded when it was sent.

Example::

    verdict = pilot_verdict(storage, "2026-11-24", manifest.pilot["limits"])
    verdict.passed, verdict.summary()
    # -> (False, '14 of 20 requests failed (70% > max_failure_rate 5%)')
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .columns import ERROR_CODE, ERROR_MESSAGE, INVALID_INPUT, INVALID_STRUCTURED_OUTPUT
from .storage import BatchStorage
from .untrusted import printable

__all__ = ["PILOT_STOPPED", "PilotVerdict", "pilot_verdict"]

# The error code of the rows a stopped pilot never sent (not retryable: fix, then rerun)
PILOT_STOPPED = "pilot_stopped"
# Finish reasons of an answer cut at its output limit (OpenAI style, Anthropic style)
_CUT = ("length", "max_tokens")
_SAMPLES = 3
# Codes a provider gives when it failed, not the request (a bad hour, not a bad prompt)
_PROVIDER_CODES = frozenset(
    {"server_error", "rate_limit_exceeded", "timeout", "overloaded_error", "api_error"}
)


@dataclass(frozen=True)
class PilotVerdict:
    """What a collected pilot showed, and whether the rest may be sent.

    Example:
        >>> v = PilotVerdict(passed=True, sent=20, answered=20, mean_output_tokens=12.5,
        ...                  peak_output_tokens=14)
        >>> v.summary()
        '20 of 20 requests answered, mean output tokens 12.5'
    """

    passed: bool
    sent: int  # requests the pilot sent (or carried): answered plus failed
    answered: int
    failed: int = 0
    parse_failures: int = 0  # answers that do not fit the response schema
    cut: int = 0  # answers cut at max_tokens
    mean_output_tokens: float | None = None
    peak_output_tokens: int | None = None
    error_codes: dict[str, int] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)  # "code: message" of a few failures
    reasons: list[str] = field(default_factory=list)  # why it stopped (empty: passed)
    advice: list[str] = field(default_factory=list)  # what to fix

    def summary(self) -> str:
        """One line: why it stopped, or what passed."""
        if self.reasons:
            return "; ".join(self.reasons)
        mean = self.mean_output_tokens
        tokens = f", mean output tokens {mean:.1f}" if mean is not None else ""
        return f"{self.answered} of {self.sent} requests answered{tokens}"

    def message(self, where: str) -> str:
        """The whole story of a stopped pilot: what failed, samples, what to fix."""
        parts = [f"the pilot of {where} stopped: {self.summary()}"]
        if self.error_codes:
            counts = ", ".join(f"{c} x{n}" for c, n in sorted(self.error_codes.items()))
            parts.append(f"error codes: {counts}")
        if self.samples:
            parts.append("samples: " + " | ".join(self.samples))
        parts.append("what to fix: " + " ".join(self.advice))
        return ". ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (kept in the manifest of the attempt that follows the pilot)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PilotVerdict:
        """Parse what :meth:`to_dict` wrote (unknown keys are ignored)."""
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def pilot_verdict(
    storage: BatchStorage, partition_key: str | None, limits: dict[str, Any]
) -> PilotVerdict:
    """The verdict of the collected pilot of ``partition_key``, from its tables.

    ``limits``: what the pilot's manifest recorded: ``max_failure_rate``, ``max_tokens``
    and ``max_output_tokens`` (a limit on the mean output tokens per answer, or None).
    Rows never sent (``invalid_input``) do not count: they are not the prompt's answers.
    """
    results = _read(storage, "results", partition_key, ["completion_tokens", "finish_reason"])
    failed = _read(storage, "failed", partition_key, [ERROR_CODE, ERROR_MESSAGE])
    if failed.num_rows:
        failed = failed.filter(pc.not_equal(failed.column(ERROR_CODE), INVALID_INPUT))
    answered, failures = results.num_rows, failed.num_rows
    sent = answered + failures
    codes = Counter(failed.column(ERROR_CODE).to_pylist()) if failures else Counter()
    mean, peak = _tokens(results)
    cut = _cut(results)
    rate = float(limits.get("max_failure_rate", 0.05))
    verdict: dict[str, Any] = {
        "sent": sent,
        "answered": answered,
        "failed": failures,
        "parse_failures": codes.get(INVALID_STRUCTURED_OUTPUT, 0),
        "cut": cut,
        "mean_output_tokens": mean,
        "peak_output_tokens": peak,
        "error_codes": {str(k): int(v) for k, v in codes.items()},
        "samples": _samples(failed),
    }
    reasons, advice = _judge(verdict, rate, limits)
    return PilotVerdict(passed=not reasons, reasons=reasons, advice=advice, **verdict)


def _judge(v: dict[str, Any], rate: float, limits: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Why the pilot stops (nothing: it passed), and what to fix."""
    sent, reasons, advice = v["sent"], [], []
    if not sent:
        return ["none of the pilot's rows could be sent (every one is invalid_input)"], [
            "fix the input or the template: see the failed table's error_message"
        ]

    def over(count: int) -> bool:
        return count / sent > rate

    if over(v["failed"]):
        reasons.append(
            f"{v['failed']} of {sent} requests failed "
            f"({_pct(v['failed'] / sent)} > max_failure_rate {_pct(rate)})"
        )
        advice += _advice_for(v["error_codes"])
    if v["parse_failures"] and over(v["parse_failures"]):
        reasons.append(f"{v['parse_failures']} of {sent} answers do not fit the response schema")
    if over(v["cut"]):
        limit = limits.get("max_tokens")
        reasons.append(f"{v['cut']} of {v['answered']} answers were cut at max_tokens {limit}")
        advice.append("raise max_tokens in the spec's params, or ask for a shorter answer.")
    cap = limits.get("max_output_tokens")
    mean = v["mean_output_tokens"]
    if cap is not None and mean is not None and mean > float(cap):
        reasons.append(
            f"answers average {mean:.1f} output tokens (> pilot_max_output_tokens {cap})"
        )
        advice.append("ask for a shorter answer, or raise pilot_max_output_tokens.")
    if reasons:
        advice.append(
            "A changed prompt or spec pilots again; to send every row as it is anyway, "
            "materialize the partition with force_resubmit: true."
        )
    return reasons, advice


def _advice_for(codes: dict[str, int]) -> list[str]:
    out = []
    if INVALID_STRUCTURED_OUTPUT in codes:
        out.append(
            "the answers do not fit response_schema: say in the prompt what to return, or "
            "loosen the schema."
        )
    if any(c in _PROVIDER_CODES or c.startswith("batch_") for c in codes):
        out.append(
            "the provider failed requests (server errors, limits, expiry): if it was a bad "
            "hour, send again once it is over."
        )
    if any(c not in _PROVIDER_CODES and c != INVALID_STRUCTURED_OUTPUT for c in codes):
        out.append(
            "requests were refused: check the model, the params and the rendered prompt "
            "(a dry run shows what would be sent)."
        )
    return out


def _read(
    storage: BatchStorage, kind: str, partition_key: str | None, columns: list[str]
) -> pa.Table:
    path = storage.table_path(kind, partition_key)
    if not storage.exists(path):
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    table = storage.read_table(path)
    present = [c for c in columns if c in table.column_names]
    return table.select(present)


def _tokens(results: pa.Table) -> tuple[float | None, int | None]:
    if "completion_tokens" not in results.column_names or not results.num_rows:
        return None, None
    column = results.column("completion_tokens")
    if column.null_count == len(column):
        return None, None
    mean = pc.mean(column).as_py()
    peak = pc.max(column).as_py()
    return (float(mean), int(peak)) if mean is not None and math.isfinite(mean) else (None, None)


def _cut(results: pa.Table) -> int:
    if "finish_reason" not in results.column_names or not results.num_rows:
        return 0
    reasons = results.column("finish_reason").cast(pa.string())
    return int(pc.sum(pc.is_in(reasons, pa.array(_CUT))).as_py() or 0)


def _samples(failed: pa.Table) -> list[str]:
    """A few failures, one per error code first: ``code: message``."""
    if not failed.num_rows:
        return []
    rows = failed.slice(0, 200).to_pylist()
    seen: set[str] = set()
    picked = []
    for row in rows:
        code = str(row.get(ERROR_CODE))
        if code not in seen:
            seen.add(code)
            picked.append(row)
    picked += [r for r in rows if r not in picked]
    return [
        f"{printable(str(r.get(ERROR_CODE)), 60)}: {printable(str(r.get(ERROR_MESSAGE)), 160)}"
        for r in picked[:_SAMPLES]
    ]


def _pct(share: float) -> str:
    return f"{100 * share:.0f}%"
