"""Money around one submission: estimate it, stop it (dry run, budget) before anything is
written or sent, and settle what it actually cost once it is collected.

Example::

    control = SpendControl(storage, spec, price=ModelPrice(0.15, 0.60),
                           budget=Budget(max_cost_per_day=10.0))
    estimate = control.estimate(prepared)
    gate = control.gate(estimate, "2026-11-26", dry_run=False, allow_over_budget=False)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .budget import Budget, SpendLedger
from .collect import CollectOutcome
from .manifest import Manifest
from .prepare import PreparedRequests
from .pricing import Calibration, CostEstimate, ModelPrice, estimate_cost, untrusted_fees
from .spec import RequestSpec
from .storage import BatchStorage
from .submit import Gate
from .untrusted import printable

__all__ = ["DryRunStop", "SpendControl", "cost_by_attempt", "settle_collected"]

logger = logging.getLogger(__name__)


class DryRunStop(Exception):
    """Raised by a dry run's gate: the submission stops before writing or sending anything."""

    def __init__(self, manifest: Manifest, new_spend: bool, budget_refusal: str = "") -> None:
        super().__init__("dry run: nothing written, nothing sent")
        self.manifest = manifest
        # A real run would create (and pay for) batches: a new attempt, or chunks of the
        # attempt that still wait for admission or were left unsent.
        self.new_spend = new_spend or not manifest.settled
        self.budget_refusal = budget_refusal  # why the budget would refuse it, if it would


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

    def estimate(
        self, prepared: PreparedRequests, calibration: Calibration | None = None
    ) -> CostEstimate:
        """What sending ``prepared`` would cost (carried and invalid rows are not sent);
        ``calibration``: the output tokens a pilot batch observed."""
        return estimate_cost(
            self.spec,
            self.storage,
            requests=sum(chunk.requests for chunk in prepared.chunks),
            input_tokens=prepared.estimated_input_tokens,
            price=self.price,
            calibration=calibration,
        )

    def gate(
        self,
        estimate: CostEstimate,
        partition_key: str | None,
        *,
        dry_run: bool,
        allow_over_budget: bool,
    ) -> Gate:
        """The check :func:`submit_prepared` runs before it writes or pays. It reserves
        the worst case, or after a pilot what the pilot's answers calibrate
        (:attr:`~infron_dagster.pricing.CostEstimate.budget_cost`)."""

        def check(manifest: Manifest, new_spend: bool) -> None:
            if dry_run:
                refusal = ""
                if new_spend and self.price is not None and not allow_over_budget:
                    refusal = SpendLedger(self.storage).would_refuse(
                        partition_key,
                        manifest.attempt,
                        estimate.budget_cost or 0.0,
                        self.budget or Budget(),
                    )
                raise DryRunStop(manifest, new_spend, refusal)
            if not new_spend or self.price is None:
                return
            reservation = SpendLedger(self.storage).reserve(
                partition_key,
                manifest.attempt,
                estimate.budget_cost or 0.0,
                self.budget or Budget(),
                allow_over_budget=allow_over_budget,
            )
            manifest.spend = {
                "day": reservation.day,
                "entry": reservation.entry,
                "expected_cost": estimate.expected_cost,
                # what was reserved: the worst case, or the bound a pilot calibrated
                "worst_cost": estimate.budget_cost,
                "basis": estimate.output_basis,  # shown beside the actual cost once collected
            }

        return check

    def settle(
        self,
        attempts: Sequence[Manifest],
        cost_by_attempt: dict[int, float],
        batches: dict[str, dict[str, Any]],
        partial: frozenset[int] = frozenset(),
    ) -> dict[str, Any]:
        """Record each collected attempt's actual cost in the ledger; return, as metadata,
        why reported fees were not trusted (``{}`` when they all were, or none was reported).

        An attempt's cost is the fees its batches reported when every one reported them
        (what was billed), else the sum of its rows' ``cost`` column. An attempt in
        ``partial`` (one whose answers were only partly kept, such as an attempt in flight
        that a newer one waited on) keeps its reserved worst case unless its fees are known:
        its kept rows alone would understate what it was billed. Fees that cannot be what
        was billed (negative, not finite, more than 100x the attempt's worst-case estimate:
        :func:`~infron_dagster.pricing.untrusted_fees`) count as not reported: the ledger
        keeps the estimate, and ``cost_reported_untrusted`` says why.
        """
        ledger = SpendLedger(self.storage) if self.price is not None else None
        doubts: list[str] = []
        for manifest in attempts:
            actual, doubt = self._reported_fees(manifest, batches)
            if doubt is not None:
                keeps = (
                    "the rows' cost is unknown (no price)"
                    if ledger is None
                    else "the ledger keeps its reserved worst case"
                    if manifest.attempt in partial
                    else "the ledger keeps the rows' cost at the pipeline's price"
                )
                doubts.append(f"attempt {manifest.attempt}: {doubt}: not trusted; {keeps}")
                logger.warning(
                    "partition %r: %s", printable(manifest.partition_key, 100), doubts[-1]
                )
            if ledger is None or not (manifest.spend and manifest.spend.get("entry")):
                continue
            if actual is None and manifest.attempt in partial:
                continue
            if actual is None:
                actual = cost_by_attempt.get(manifest.attempt, 0.0)
            ledger.settle(
                manifest.spend["day"],
                manifest.spend["entry"],
                actual,
                reservation={
                    "partition_key": manifest.partition_key,
                    "attempt": manifest.attempt,
                    "worst_cost": manifest.spend.get("worst_cost"),
                },
            )
        return {"cost_reported_untrusted": "; ".join(doubts)} if doubts else {}

    def _reported_fees(
        self, manifest: Manifest, batches: dict[str, dict[str, Any]]
    ) -> tuple[float | None, str | None]:
        """What the attempt's batches reported they cost (None unless every one did), and
        why that cannot be what was billed (None when it can)."""
        reported = {b: batches.get(b, {}).get("cost") for b in manifest.batch_ids}
        known = {b: fee for b, fee in reported.items() if fee is not None}
        worst = (manifest.spend or {}).get("worst_cost") if self.price is not None else None
        requests = sum(c.requests for c in manifest.chunks if c.batch_id in known)
        doubt = untrusted_fees(known, worst_cost=worst, requests=requests) if known else None
        if doubt is not None or not reported or len(known) < len(reported):
            return None, doubt
        return float(sum(known.values())), None


def settle_collected(control: SpendControl, outcome: CollectOutcome) -> dict[str, Any]:
    """Settle what a collection's attempts cost (its rows' ``cost``, or the fees reported),
    before the collection marks them collected; returns what was not trusted, and why.

    Example::

        collect_partition(client, storage, spec, "a",
                          on_written=lambda outcome: settle_collected(control, outcome))
    """
    assert outcome.history is not None
    wanted = {*outcome.attempts, *outcome.sources}  # the in-flight sources were paid for too
    attempts = [m for m in outcome.history.manifests if m.attempt in wanted]
    # A waited-on source attempt's other answers were dropped: its kept rows understate it
    partial = frozenset(set(outcome.sources) - set(outcome.attempts))
    return control.settle(attempts, cost_by_attempt(outcome), outcome.batches, partial)


def cost_by_attempt(outcome: CollectOutcome) -> dict[int, float]:
    """The rows' ``cost`` summed by attempt, results and failed together."""
    assert outcome.results_summary is not None and outcome.failed_summary is not None
    by_attempt = dict(outcome.results_summary.cost_by_attempt)
    for attempt, cost in outcome.failed_summary.cost_by_attempt.items():
        by_attempt[attempt] = by_attempt.get(attempt, 0.0) + cost
    return by_attempt
