"""The doctor's checks of the budget entries under ``_ledger/spend``: an entry that cannot be
counted is rebuilt from the ``spend`` record of the manifest that owns it (deleted when none
records it), and the reservations of attempts that created nothing are released. See
:mod:`infron_dagster.doctor` for the whole check.

Example::

    [f.repair for f in check_budget_entries(lake) + check_unpaid(lake)]
    # -> ["rebuilt from the manifest of 'a' attempt 1 (...)", 'released (SpendLedger.release_unpaid)']
"""  # noqa: E501

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from upath import UPath

from .budget import SpendLedger, _unpaid
from .doctor_lake import Finding, Lake, Pipeline
from .manifest import Manifest
from .storage import BatchStorage, encode_partition
from .untrusted import printable

__all__ = ["check_budget_entries", "check_unpaid"]

_SPEND_RE = re.compile(r"^partition=([^/]+)/([^/]+)\.json$")
_BUDGET_ENTRY_RE = re.compile(r"^a(\d+)-[0-9a-f]{20}$")


# --- budget entries --------------------------------------------------------------------------


def _is_amount(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _entry_problem(record: Any) -> str | None:
    """Why a budget entry's record cannot be counted as written; None when it can.

    Example:
        >>> _entry_problem({"partition_key": "a", "attempt": 1, "worst_cost": -2.0})
        'worst_cost -2.0 is not a finite amount >= 0'
    """
    if isinstance(record, Exception):
        return f"unreadable ({type(record).__name__}: {printable(record, 120)})"
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a budget entry"
    attempt, key = record.get("attempt"), record.get("partition_key")
    if isinstance(attempt, bool) or not isinstance(attempt, int):
        return "no attempt: not a budget entry"
    if not (key is None or isinstance(key, str)):
        return "no partition_key: not a budget entry"
    if not _is_amount(record.get("worst_cost")):
        return f"worst_cost {record.get('worst_cost')!r} is not a finite amount >= 0"
    actual = record.get("actual_cost")
    if actual is not None and not _is_amount(actual):
        return f"actual_cost {actual!r} is not a finite amount >= 0"
    return None


def _parse_entry(data: bytes | Exception) -> Any:
    if isinstance(data, Exception):
        return data
    try:
        return json.loads(data)  # Python reads NaN and Infinity: checked as amounts after
    except (ValueError, UnicodeDecodeError) as exc:
        return exc


def _budget_entries(pipeline: Pipeline) -> list[tuple[str, str, UPath, Any, float]]:
    """Every budget entry: (day, entry name, path, record or exception, mtime)."""
    ledger = BatchStorage(str(pipeline.storage.base), "_ledger", _options(pipeline.storage))
    folder = ledger.base / "spend"
    listed = {n: t for n, t in ledger.list_files(folder).items() if _SPEND_RE.match(n)}
    raw = ledger.read_many(folder / n for n in listed)
    out = []
    for name in sorted(listed):
        match = _SPEND_RE.match(name)
        assert match is not None
        data = raw[str(folder / name)]
        if isinstance(data, FileNotFoundError):
            continue
        out.append(
            (match.group(1), match.group(2), folder / name, _parse_entry(data), listed[name])
        )
    return out


def _options(storage: BatchStorage) -> dict[str, Any]:
    return dict(getattr(storage.root, "storage_options", {}) or {})


def _owner(pipeline: Pipeline, day: str, entry: str) -> Manifest | None:
    """The manifest whose ``spend`` record names this entry."""
    for attempts in pipeline.manifests.values():
        for manifest in attempts.values():
            spend = manifest.spend or {}
            if spend.get("entry") == entry and spend.get("day") == day:
                return manifest
    return None


def check_budget_entries(lake: Lake) -> list[Finding]:
    """Budget entries that cannot be counted as written (unreadable, foreign, a cost that
    is negative or not finite). Repair: rebuilt from the ``spend`` record of the manifest
    that owns it; deleted when no manifest records it and it is older than the grace
    (nothing was sent under it); reported when the owner may be a damaged manifest.

    Example::

        [f.repair for f in check_budget_entries(lake)]
        # -> ["rebuilt from the manifest of 'a' attempt 1 (worst case 0.0012, not settled)"]
    """
    findings = []
    for pipeline in lake.pipelines:
        for day, entry, path, record, mtime in _budget_entries(pipeline):
            problem = _entry_problem(record)
            if problem is not None:
                findings.append(_repair_entry(lake, pipeline, day, entry, path, problem, mtime))
    return findings


def _repair_entry(
    lake: Lake, pipeline: Pipeline, day: str, entry: str, path: UPath, problem: str, mtime: float
) -> Finding:
    finding = Finding(str(path), f"budget entry {problem}")
    owner = _owner(pipeline, day, entry)
    worst = (owner.spend or {}).get("worst_cost") if owner else None
    if owner is not None and _is_amount(worst):
        finding.repair = (
            f"rebuilt from the manifest of {printable(owner.partition_key, 60)!r} attempt "
            f"{owner.attempt} (worst case {worst:.6g}; the actual cost is settled again when "
            "the partition is collected)"
        )
        action: Callable[[], None] = lambda: _write_entry(pipeline, day, path, owner)  # noqa: E731
    elif owner is None and _entry_owner_damaged(pipeline, entry):
        finding.remedy = (
            "the manifest that may own it is unreadable: restore that manifest (then run the "
            "doctor again), or delete this entry if its attempt created no batch"
        )
        return finding
    elif owner is None and time.time() - mtime >= lake.grace_seconds:
        finding.repair = "deleted: no manifest records it, so nothing was sent under it"
        action = lambda: _ledger_store(pipeline).delete(path)  # noqa: E731
    else:
        finding.remedy = (
            "its manifest records no usable worst case (or it was written moments ago): "
            "restore the entry, or delete it if its attempt created no batch"
        )
        return finding
    if lake.repair:
        with _ledger_store(pipeline).lock(day):
            action()
        finding.repaired = True
    return finding


def _ledger_store(pipeline: Pipeline) -> BatchStorage:
    return BatchStorage(str(pipeline.storage.base), "_ledger", _options(pipeline.storage))


def _entry_owner_damaged(pipeline: Pipeline, entry: str) -> bool:
    """Whether an unreadable manifest could be the one that owns ``entry``."""
    return bool(pipeline.damaged) and _BUDGET_ENTRY_RE.match(entry) is not None


def _write_entry(pipeline: Pipeline, day: str, path: UPath, owner: Manifest) -> None:
    """An entry as its manifest's ``spend`` record says it was reserved (not settled: it
    counts the worst case until the partition's next collection settles it)."""
    record = {
        "partition_key": owner.partition_key,
        "attempt": owner.attempt,
        "worst_cost": float((owner.spend or {})["worst_cost"]),
        "actual_cost": None,
        "over_budget_allowed": None,
        "reserved_at": owner.created_at,
        "rebuilt_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rebuilt_from": "manifest (infron-dagster doctor)",
    }
    _ledger_store(pipeline).write_json(path, record)


def check_unpaid(lake: Lake) -> list[Finding]:
    """Reservations of attempts that created nothing and never will (no manifest after the
    grace, cancelled, abandoned, nothing to send, replaced): they count against the day's
    budget for nothing. Repair: :meth:`SpendLedger.release_unpaid` for their days.

    Example::

        [f.repair for f in check_unpaid(lake)]
        # -> ['released (SpendLedger.release_unpaid)']
    """
    findings = []
    for pipeline in lake.pipelines:
        unpaid = _unpaid_entries(lake, pipeline)
        after: dict[str, Any] = {}
        if lake.repair and unpaid:
            SpendLedger(pipeline.storage).release_unpaid(
                grace_seconds=lake.grace_seconds, days=sorted({day for day, *_ in unpaid})
            )
            after = {str(p): r for _, _, p, r, _ in _budget_entries(pipeline)}
        for _, path, record, why in unpaid:
            finding = Finding(
                str(path),
                f"reservation of {printable(record.get('partition_key'), 60)!r} attempt "
                f"{record.get('attempt')} ({record.get('worst_cost')}) holds budget although "
                f"{why}",
                repair="released (SpendLedger.release_unpaid)",
            )
            if lake.repair:
                now = after.get(str(path))
                finding.repaired = not (isinstance(now, dict) and now.get("actual_cost") is None)
                if not finding.repaired:
                    finding.remedy = (
                        "a run holds the partition now: run the doctor again when it ends"
                    )
            findings.append(finding)
    return findings


def _unpaid_entries(lake: Lake, pipeline: Pipeline) -> list[tuple[str, UPath, dict[str, Any], str]]:
    out = []
    for day, _, path, record, _ in _budget_entries(pipeline):
        if _entry_problem(record) is not None:
            continue
        if record.get("actual_cost") is not None or record.get("released"):
            continue
        key, attempt = record["partition_key"], record["attempt"]
        if encode_partition(key) in pipeline.damaged:
            continue
        manifest = pipeline.manifest(key, attempt)
        data = manifest.to_dict() if manifest else FileNotFoundError(str(path))
        why = _unpaid(day, path, record, data, lake.grace_seconds)
        if why is not None:
            out.append((day, path, record, why))
    return out
