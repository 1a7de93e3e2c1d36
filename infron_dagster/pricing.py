"""What a submission will cost, before it is sent: prices (user input) and estimates.

Prices change and differ by provider, so there is no built-in price list: a pipeline that
wants money figures is given a :class:`ModelPrice` for the model it uses. Token counts before
the run are estimates: input tokens from the rendered request text (about 4 characters per
token, the rule of thumb for English text with OpenAI-style tokenizers; CJK text and code
count more tokens per character), output tokens as the mean this pipeline observed in its
collected partitions, else the request's ``max_tokens`` (the worst case either way). Once a
pilot batch (``pilot_rows``) was answered, its observed output tokens (a :class:`Calibration`)
set both the expected output of the rest and the output the budget reserves for it.

Example:
    >>> price = ModelPrice(input_per_million=0.15, output_per_million=0.60)
    >>> round(price.cost(input_tokens=1_000_000, output_tokens=100_000), 4)
    0.105
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from .infron_style import DEFAULT_INFRON_MAX_TOKENS
from .spec import RequestSpec
from .storage import BatchStorage
from .untrusted import printable

__all__ = [
    "Calibration",
    "CostEstimate",
    "ModelPrice",
    "estimate_cost",
    "max_output_tokens",
    "untrusted_fees",
]

_OUTPUT_LIMIT_PARAMS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_SAMPLED_PARTITIONS = 5  # recent collected partitions read for the observed output mean
# The budget of rows sent after a pilot reserves this many times the longest answer the pilot
# saw, per row (never more than max_tokens): the sum of many answers stays far below it.
PILOT_HEADROOM = 1.5

# A reported fee is what was billed only if it could be: never negative or infinite, never
# more than this many times the worst case estimated before sending (prices change and
# estimates err, but not by two orders of magnitude)...
ABSURD_OVER_WORST_CASE = 100.0
# ...and, with no estimate (no ModelPrice), never more than this per token (1,000,000 per
# million tokens: over a thousand times the dearest model's list price in dollars, over
# ten times in yen) or per request.
ABSURD_PER_TOKEN = 1.0
ABSURD_PER_REQUEST = 10_000.0


@dataclass(frozen=True)
class ModelPrice:
    """List prices per million tokens and the share a batch takes off them.

    ``batch_discount=0.5`` means batch requests cost half the list price (what OpenAI and
    most providers offer); ``0`` means no discount.

    Example:
        >>> price = ModelPrice(input_per_million=2.5, output_per_million=10.0, batch_discount=0.5)
        >>> price.cost(input_tokens=1_000_000, output_tokens=0)  # half of the $2.50 list price
        1.25
    """

    input_per_million: float
    output_per_million: float
    batch_discount: float = 0.5

    def __post_init__(self) -> None:
        values = (self.input_per_million, self.output_per_million)
        if any(not math.isfinite(v) or v < 0 for v in values):
            raise ValueError("ModelPrice: prices per million tokens must be finite and >= 0")
        if not 0 <= self.batch_discount < 1:
            raise ValueError("ModelPrice: batch_discount must be in [0, 1), e.g. 0.5 for half")

    def cost(self, input_tokens: float, output_tokens: float) -> float:
        """The batch price of these tokens.

        Example:
            >>> ModelPrice(1.0, 2.0, batch_discount=0.0).cost(1_000_000, 500_000)
            2.0
        """
        listed = input_tokens * self.input_per_million + output_tokens * self.output_per_million
        return listed / 1_000_000 * (1 - self.batch_discount)


@dataclass(frozen=True)
class Calibration:
    """Output tokens a pilot batch observed: what the estimate and the budget check of the
    rows sent after it assume, instead of ``max_tokens`` for every row.

    Example:
        >>> c = Calibration(rows=200, mean_output_tokens=41.5, peak_output_tokens=90)
        >>> c.basis, c.budget_tokens(limit=4096)
        ('pilot of 200 rows, mean output tokens 41.5', 135)
    """

    rows: int
    mean_output_tokens: float
    peak_output_tokens: int

    @property
    def basis(self) -> str:
        """What the estimate rests on, for its metadata."""
        return f"pilot of {self.rows} rows, mean output tokens {self.mean_output_tokens:.1f}"

    def budget_tokens(self, limit: int) -> int:
        """The output tokens per request the budget reserves: :data:`PILOT_HEADROOM` times
        the longest answer seen, at least the mean, at most ``limit``."""
        bound = max(math.ceil(PILOT_HEADROOM * self.peak_output_tokens), 1)
        return min(limit, max(bound, math.ceil(self.mean_output_tokens)))


@dataclass(frozen=True)
class CostEstimate:
    """Tokens and money a submission would spend: expected and worst case.

    Example:
        >>> CostEstimate(requests=10, input_tokens=500, expected_output_tokens=300,
        ...              max_output_tokens=2000, output_basis="max_tokens").worst_cost is None
        True
    """

    requests: int
    input_tokens: int
    expected_output_tokens: int
    max_output_tokens: int
    output_basis: str
    price: ModelPrice | None = None
    # After a pilot: the output tokens the budget reserves (None: the worst case)
    budget_output_tokens: int | None = None

    @property
    def expected_cost(self) -> float | None:
        """Input estimate plus the expected output, priced; None without a price."""
        if self.price is None:
            return None
        return self.price.cost(self.input_tokens, self.expected_output_tokens)

    @property
    def worst_cost(self) -> float | None:
        """Input estimate plus every request using its whole output limit; None without a
        price."""
        if self.price is None:
            return None
        return self.price.cost(self.input_tokens, self.max_output_tokens)

    @property
    def budget_cost(self) -> float | None:
        """What the budget reserves: the worst case, or after a pilot the input estimate
        plus the output its answers calibrate (see :class:`Calibration`); None without a
        price."""
        if self.price is None:
            return None
        if self.budget_output_tokens is None:
            return self.worst_cost
        return self.price.cost(self.input_tokens, self.budget_output_tokens)

    def metadata(self) -> dict[str, Any]:
        """The estimate as Dagster metadata, rounded for people; money keys say their unit."""
        out: dict[str, Any] = {
            "estimate/requests": self.requests,
            "estimate/input_tokens": self.input_tokens,
            "estimate/output_tokens_expected": self.expected_output_tokens,
            "estimate/output_tokens_worst_case": self.max_output_tokens,
            "estimate/output_basis": self.output_basis,
        }
        if self.budget_output_tokens is not None:
            out["estimate/output_tokens_budgeted"] = self.budget_output_tokens
        if self.price is not None:
            out["estimate/cost_expected_usd"] = round(self.expected_cost or 0.0, 6)
            out["estimate/cost_worst_case_usd"] = round(self.worst_cost or 0.0, 6)
            if self.budget_output_tokens is not None:
                out["estimate/cost_budgeted_usd"] = round(self.budget_cost or 0.0, 6)
        return out


def max_output_tokens(spec: RequestSpec) -> int:
    """The output limit of one request: the one the spec sends, else what the wire sends.

    Embeddings produce no output tokens. Without an explicit limit a chat request is sent to
    Infron with ``max_tokens`` = :data:`DEFAULT_INFRON_MAX_TOKENS`, and that is the worst
    case assumed for the OpenAI style too (whose models may allow more: set ``max_tokens``
    to make the worst case exact).
    """
    if spec.endpoint == "/v1/embeddings":
        return 0
    for name in _OUTPUT_LIMIT_PARAMS:
        value = spec.params.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return DEFAULT_INFRON_MAX_TOKENS


def observed_output_mean(storage: BatchStorage) -> tuple[float, int] | None:
    """Mean completion tokens per answered row in the latest collected partitions, with the
    number of rows it is taken from; None when nothing was collected yet."""
    root = storage.table_root("results")
    if not storage.exists(root):
        return None
    folders = sorted(p for p in root.iterdir() if p.name.startswith("partition="))
    total = rows = 0
    for folder in folders[-_SAMPLED_PARTITIONS:]:
        for file in folder.glob("*.parquet"):
            with file.open("rb") as f:
                table = pq.read_table(f, columns=["completion_tokens"])
            column = table.column("completion_tokens")
            total += int(pc.sum(column).as_py() or 0)
            rows += len(column) - column.null_count
    return (total / rows, rows) if rows else None


def estimate_cost(
    spec: RequestSpec,
    storage: BatchStorage,
    *,
    requests: int,
    input_tokens: int,
    price: ModelPrice | None,
    calibration: Calibration | None = None,
) -> CostEstimate:
    """Estimate what sending ``requests`` requests of ``input_tokens`` tokens costs.

    ``calibration`` (a pilot's observed output tokens) sets the expected output and what
    the budget reserves; without it the expected output is the mean observed in recent
    collected partitions, else ``max_tokens``.

    Example:
        >>> import tempfile
        >>> from infron_dagster import BatchStorage, RequestSpec
        >>> spec = RequestSpec(model="gpt-4o-mini", prompt_template="Sentiment of: {text}",
        ...                    params={"max_tokens": 50})
        >>> estimate = estimate_cost(spec, BatchStorage(tempfile.mkdtemp(), "reviews"),
        ...                          requests=100, input_tokens=12_000,
        ...                          price=ModelPrice(0.15, 0.60))
        >>> estimate.max_output_tokens, estimate.worst_cost >= estimate.expected_cost
        (5000, True)
    """
    limit = max_output_tokens(spec)
    if calibration is not None and limit:
        return CostEstimate(
            requests=requests,
            input_tokens=input_tokens,
            expected_output_tokens=round(min(calibration.mean_output_tokens, limit) * requests),
            max_output_tokens=limit * requests,
            output_basis=calibration.basis,
            price=price,
            budget_output_tokens=calibration.budget_tokens(limit) * requests,
        )
    observed = observed_output_mean(storage) if limit else None
    if observed is not None:
        mean, rows = observed
        expected = round(min(mean, limit) * requests)
        basis = f"observed mean {mean:.1f} tokens over {rows} collected rows"
    else:
        expected = limit * requests
        basis = "no output" if not limit else f"max_tokens {limit} (nothing collected yet)"
    return CostEstimate(
        requests=requests,
        input_tokens=input_tokens,
        expected_output_tokens=expected,
        max_output_tokens=limit * requests,
        output_basis=basis,
        price=price,
    )


def untrusted_fees(
    fees: dict[str, Any],
    *,
    worst_cost: float | None = None,
    tokens: int | None = None,
    requests: int | None = None,
) -> str | None:
    """Why the fees a provider reported for some batches cannot be what it billed, or None.

    A fee is not trusted when it is not a number, negative or not finite; the fees of an
    attempt are not trusted together when their sum is not finite or is absurd: more than
    :data:`ABSURD_OVER_WORST_CASE` times ``worst_cost`` (the estimate made before sending),
    or, without an estimate, more than :data:`ABSURD_PER_TOKEN` per token or
    :data:`ABSURD_PER_REQUEST` per request.

    Example:
        >>> untrusted_fees({"b1": -1.0})
        'batch b1 reported a fee of -1, which is negative'
        >>> untrusted_fees({"b1": 0.02, "b2": 0.03}, worst_cost=0.1) is None
        True
    """
    total = 0.0
    for batch_id, fee in fees.items():
        where = f"batch {printable(str(batch_id), 80)} reported a fee of"
        if isinstance(fee, bool) or not isinstance(fee, (int, float)):
            return f"{where} {printable(repr(fee), 40)}, which is not a number"
        if not math.isfinite(fee):
            return f"{where} {fee!r}, which is not a finite amount"
        if fee < 0:
            return f"{where} {fee:g}, which is negative"
        total += fee
    if not math.isfinite(total):
        return "the reported fees sum to more than a number holds (not a finite amount)"
    if worst_cost is not None and math.isfinite(worst_cost) and worst_cost >= 0:
        if total > ABSURD_OVER_WORST_CASE * worst_cost:
            return (
                f"the reported fees ({total:.6g}) are more than {ABSURD_OVER_WORST_CASE:g}x "
                f"the worst-case estimate ({worst_cost:.6g})"
            )
        return None
    if tokens and total > ABSURD_PER_TOKEN * tokens:
        return f"the reported fees ({total:.6g}) are more than {ABSURD_PER_TOKEN:g} per token"
    if requests and total > ABSURD_PER_REQUEST * requests:
        return f"the reported fees ({total:.6g}) are more than {ABSURD_PER_REQUEST:g} per request"
    return None
