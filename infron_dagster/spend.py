"""Money around one submission: estimate it, stop it (dry run, budget) before anything is
written or sent, and settle what it actually cost once it is collected.

Example:
    >>> control = SpendControl(storage, spec, price=ModelPrice(0.15, 0.60),
    ...                        budget=Budget(max_cost_per_day=10.0))
    >>> estimate = control.estimate(prepared)
    >>> gate = control.gate(estimate, "2026-11-26", dry_run=False, allow_over_budget=False)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .budget import Budget, SpendLedger
from .manifest import Manifest
from .prepare import PreparedRequests
from .pricing import CostEstimate, ModelPrice, estimate_cost
from .spec import RequestSpec
from .storage import BatchStorage
from .submit import Gate

__all__ = ["DryRunStop", "SpendControl"]


class DryRunStop(Exception):
    """Raised by a dry run's gate: the submission stops before writing or sending anything."""

    def __init__(self, manifest: Manifest, new_spend: bool) -> None:
        super().__init__("dry run: nothing written, nothing sent")
        self.manifest = manifest
        self.new_spend = new_spend


@dataclass(frozen=True)
class SpendControl:
    """The price and budget of one pipeline, applied to its submissions."""

    storage: BatchStorage
    spec: RequestSpec
    price: ModelPrice | None = None
    budget: Budget | None = None

    def __post_init__(self) -> None:
        if self.budget is not None and self.price is None:
            raise ValueError("a Budget needs a ModelPrice: give price=ModelPrice(...) too")

    def estimate(self, prepared: PreparedRequests) -> CostEstimate:
        """What sending ``prepared`` would cost (carried and invalid rows are not sent)."""
        return estimate_cost(
            self.spec,
            self.storage,
            requests=sum(chunk.requests for chunk in prepared.chunks),
            input_tokens=prepared.estimated_input_tokens,
            price=self.price,
        )

    def gate(
        self,
        estimate: CostEstimate,
        partition_key: str | None,
        *,
        dry_run: bool,
        allow_over_budget: bool,
    ) -> Gate:
        """The check :func:`submit_prepared` runs before it writes or pays."""

        def check(manifest: Manifest, new_spend: bool) -> None:
            if dry_run:
                raise DryRunStop(manifest, new_spend)
            if not new_spend or self.price is None:
                return
            reservation = SpendLedger(self.storage).reserve(
                partition_key,
                manifest.attempt,
                estimate.worst_cost or 0.0,
                self.budget or Budget(),
                allow_over_budget=allow_over_budget,
            )
            manifest.spend = {
                "day": reservation.day,
                "entry": reservation.entry,
                "expected_cost": estimate.expected_cost,
                "worst_cost": estimate.worst_cost,
            }

        return check

    def settle(
        self,
        attempts: Sequence[Manifest],
        cost_by_attempt: dict[int, float],
        batches: dict[str, dict[str, Any]],
        partial: frozenset[int] = frozenset(),
    ) -> None:
        """Record each collected attempt's actual cost in the ledger.

        An attempt's cost is the fees its batches reported when every one reported them
        (what was billed), else the sum of its rows' ``cost`` column. An attempt in
        ``partial`` (one whose answers were only partly kept, such as an attempt in flight
        that a newer one waited on) keeps its reserved worst case unless its fees are known:
        its kept rows alone would understate what it was billed.
        """
        if self.price is None:
            return  # no price, no ledger entries to settle
        ledger = SpendLedger(self.storage)
        for manifest in attempts:
            actual = _reported_fees(manifest, batches)
            if actual is None and manifest.attempt in partial:
                continue
            if actual is None:
                actual = cost_by_attempt.get(manifest.attempt, 0.0)
            if manifest.spend and manifest.spend.get("entry"):
                ledger.settle(manifest.spend["day"], manifest.spend["entry"], actual)


def _reported_fees(manifest: Manifest, batches: dict[str, dict[str, Any]]) -> float | None:
    fees = [batches.get(batch_id, {}).get("cost") for batch_id in manifest.batch_ids]
    if not fees or any(fee is None for fee in fees):
        return None
    return float(sum(fees))
