"""What each answered row cost, as a column: so a result can be costed, grouped and summed
like any other value.

A row's cost is its tokens at the pipeline's :class:`~infron_dagster.ModelPrice` (list
price less the batch discount). Without a price, when the provider reports what each batch
cost (Infron's ``fees``), that fee is shared among the batch's rows by their tokens, so the
rows of a batch sum to its fee. With neither, or with a fee that cannot be true (negative,
not finite, absurd per token: see :func:`~infron_dagster.pricing.untrusted_fees`), the cost
is unknown (null).

Example::

    costs = RowCosts.from_outcomes(final, fees={"batch_1": 0.004}, price=None)
    costs(prompt_tokens, completion_tokens, batch_ids)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from .pricing import ModelPrice, untrusted_fees

__all__ = ["RowCosts"]

_NO_COST = pa.scalar(None, pa.float64())


@dataclass(frozen=True)
class RowCosts:
    """Prices rows by their tokens, or shares reported batch fees among them."""

    price: ModelPrice | None
    fees: Mapping[str, float]  # batch id -> what the provider reported it cost
    batch_tokens: Mapping[str, int]  # batch id -> tokens of its rows, to share its fee
    # This partition's own batches: an answer reused from another partition's batch
    # (reuse_answers="pipeline") was paid for there, and costs this partition nothing.
    own_batches: pa.Array | None = None

    @classmethod
    def from_outcomes(
        cls,
        final: pa.Table,
        fees: Mapping[str, float],
        price: ModelPrice | None,
        own_batches: pa.Array | None = None,
    ) -> RowCosts:
        """Fees are shared by the tokens of every outcome of the batch (failed ones too)."""
        if price is not None or not fees or not final.num_rows:
            return cls(price, fees, {}, own_batches)
        tokens = _tokens(final.column("prompt_tokens"), final.column("completion_tokens"))
        grouped = (
            pa.table({"batch_id": final.column("batch_id"), "tokens": tokens})
            .group_by("batch_id")
            .aggregate([("tokens", "sum")])
        )
        ids = grouped.column("batch_id").to_pylist()
        sums = grouped.column("tokens_sum").to_pylist()
        tokens_by_batch = {b: int(t or 0) for b, t in zip(ids, sums, strict=True) if b}
        return cls(price, fees, tokens_by_batch, own_batches)

    def __call__(self, prompt: pa.Array, completion: pa.Array, batch_id: pa.Array) -> pa.Array:
        """The cost of each row (null where neither a price nor a fee tells it)."""
        cost = self._priced(prompt, completion, batch_id)
        if self.own_batches is None:
            return cost
        elsewhere = pc.invert(pc.is_in(batch_id, value_set=self.own_batches))
        return pc.if_else(pc.and_(pc.is_valid(batch_id), elsewhere), pa.scalar(0.0), cost)

    def _priced(self, prompt: pa.Array, completion: pa.Array, batch_id: pa.Array) -> pa.Array:
        known = pc.or_(pc.is_valid(prompt), pc.is_valid(completion))
        if self.price is not None:
            p = self.price
            scale = (1 - p.batch_discount) / 1_000_000
            listed = pc.add(
                pc.multiply(pc.cast(prompt.fill_null(0), pa.float64()), p.input_per_million),
                pc.multiply(pc.cast(completion.fill_null(0), pa.float64()), p.output_per_million),
            )
            return pc.if_else(known, pc.multiply(listed, scale), _NO_COST)
        if not self.fees:
            return pa.nulls(len(prompt), pa.float64())
        return self._shared_fees(_tokens(prompt, completion), batch_id, known)

    def _shared_fees(self, tokens: pa.Array, batch_id: pa.Array, known: pa.Array) -> pa.Array:
        # A fee that cannot be what was billed (negative, infinite, absurd per token) is
        # not shared: those rows' cost is unknown (null), never negative or infinite.
        ids = [
            b
            for b, total in self.batch_tokens.items()
            if b in self.fees
            and total > 0
            and untrusted_fees({b: self.fees[b]}, tokens=total) is None
        ]
        per_token = pa.array([self.fees[b] / self.batch_tokens[b] for b in ids], pa.float64())
        index = pc.index_in(batch_id, value_set=pa.array(ids, pa.string()))
        rate = per_token.take(index)  # null where the batch reported no fee
        share = pc.multiply(pc.cast(tokens, pa.float64()), rate)
        return pc.if_else(known, share, _NO_COST)


def _tokens(prompt: pa.Array, completion: pa.Array) -> pa.Array:
    return pc.add(prompt.fill_null(0), completion.fill_null(0))
