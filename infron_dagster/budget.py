"""A hard budget: a submission whose worst case would cross a limit is refused before any
paid call, and what each submission may spend is written to a ledger on storage.

The ledger keeps one small JSON entry per paid submission (``<base>/_ledger/spend/
partition=<UTC day>/<entry>.json``), reserved at its worst-case cost under the day's lock
(an ``flock`` on local disk, a conditional-write lock on object storage), so two runs
submitting at once cannot both slip under the daily limit. Collection settles an entry to
what was actually spent.

Example:
    >>> budget = Budget(max_cost_per_partition=5.0, max_cost_per_day=50.0)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .storage import BatchStorage
from .untrusted import printable

__all__ = ["Budget", "BudgetExceeded", "SpendLedger"]


@dataclass(frozen=True)
class Budget:
    """Money limits of one pipeline, in the currency of its :class:`ModelPrice`.

    Example:
        >>> Budget(max_cost_per_day=20.0)  # per UTC day, across the pipeline's partitions
    """

    max_cost_per_partition: float | None = None
    max_cost_per_day: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_cost_per_partition", "max_cost_per_day"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"Budget: {name} must be a finite amount >= 0, not {value!r}")


class BudgetExceeded(RuntimeError):
    """A submission was refused before any paid call because its worst case crosses a limit."""


@dataclass(frozen=True)
class Reservation:
    """What one submission may spend, as recorded in the ledger."""

    day: str
    entry: str
    worst_cost: float


class SpendLedger:
    """The day-by-day record of what a pipeline's submissions may spend and did spend.

    Example:
        >>> ledger = SpendLedger(storage)
        >>> ledger.spent_on("2026-11-26")
        0.0
    """

    def __init__(self, storage: BatchStorage) -> None:
        options = dict(getattr(storage.root, "storage_options", {}) or {})
        self._store = BatchStorage(str(storage.base), "_ledger", options)

    @staticmethod
    def today() -> str:
        """The ledger's day: UTC, so every machine of a deployment agrees on it."""
        return datetime.now(timezone.utc).date().isoformat()

    def spent_on(self, day: str) -> float:
        """Reserved worst cases not yet settled, plus settled actual costs, of ``day``."""
        folder = self._store.fresh(self._store.partition_dir("spend", day))
        if not self._store.exists(folder):
            return 0.0
        return sum(_entry_cost(self._store.read_json(p)) for p in folder.glob("*.json"))

    def reserve(
        self,
        partition_key: str | None,
        attempt: int,
        worst_cost: float,
        budget: Budget,
        *,
        allow_over_budget: bool = False,
    ) -> Reservation:
        """Check ``worst_cost`` against the budget and record it, atomically for the day.

        Raises :class:`BudgetExceeded` (and records nothing) when a limit would be crossed,
        unless ``allow_over_budget``.
        """
        day = self.today()
        entry = _entry_name(partition_key, attempt)
        with self._store.lock(day):
            spent = self.spent_on(day)
            if not allow_over_budget:
                _check(partition_key, worst_cost, spent, day, budget)
            record = {
                "partition_key": partition_key,
                "attempt": attempt,
                "worst_cost": worst_cost,
                "actual_cost": None,
                "over_budget_allowed": allow_over_budget,
                "reserved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            self._store.write_json(self._entry_path(day, entry), record)
        return Reservation(day, entry, worst_cost)

    def settle(self, day: str, entry: str, actual_cost: float) -> None:
        """Replace an entry's reserved worst case by what the attempt actually cost."""
        path = self._entry_path(day, entry)
        with self._store.lock(day):
            if not self._store.exists(path):
                return  # reserved by an older version, or cleaned up: nothing to settle
            record = self._store.read_json(path)
            record["actual_cost"] = actual_cost
            self._store.write_json(path, record)

    def _entry_path(self, day: str, entry: str) -> Any:
        return self._store.partition_dir("spend", day) / f"{entry}.json"


def _entry_name(partition_key: str | None, attempt: int) -> str:
    """One entry per (partition, attempt); a hash, so any partition key makes a safe name."""
    raw = f"{partition_key!r}\x1f{attempt}".encode()
    return f"a{attempt}-{hashlib.sha256(raw).hexdigest()[:20]}"


def _entry_cost(record: dict[str, Any]) -> float:
    actual = record.get("actual_cost")
    value = actual if actual is not None else record.get("worst_cost", 0.0)
    return float(value) if isinstance(value, (int, float)) else 0.0


def _check(
    partition_key: str | None, worst: float, spent: float, day: str, budget: Budget
) -> None:
    where = f"partition {printable(partition_key, 100)!r}"
    per_partition = budget.max_cost_per_partition
    if per_partition is not None and worst > per_partition:
        raise BudgetExceeded(
            f"{where}: worst-case cost {worst:.4f} is over max_cost_per_partition "
            f"{per_partition:.4f} (already spent on {day} UTC: {spent:.4f}); nothing was sent. "
            "Lower max_tokens or the rows, raise the limit, or run once with "
            "allow_over_budget=True"
        )
    per_day = budget.max_cost_per_day
    if per_day is not None and spent + worst > per_day:
        raise BudgetExceeded(
            f"{where}: worst-case cost {worst:.4f} on top of {spent:.4f} already spent on "
            f"{day} UTC is over max_cost_per_day {per_day:.4f}; nothing was sent. "
            "Run it tomorrow, raise the limit, or run once with allow_over_budget=True"
        )
