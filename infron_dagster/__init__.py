"""infron-dagster: LLM batch inference in Dagster, through Infron's Batch API or any
OpenAI-compatible batch API, at batch prices, without held workers or paying twice.

Example:
    >>> import dagster as dg
    >>> from infron_dagster import InfronResource, RequestSpec, build_infron_batch_assets
    >>> pipeline = build_infron_batch_assets(
    ...     name="review_sentiment",
    ...     spec=RequestSpec(model="gpt-4o-mini", prompt_template="Sentiment of: {text}",
    ...                      key_columns=("review_id",)),
    ...     source=dg.AssetKey("reviews"),
    ...     partitions_def=dg.DailyPartitionsDefinition(start_date="2026-11-01"),
    ... )
    >>> infron = InfronResource(api_key=dg.EnvVar("INFRON_API_KEY"))
    >>> defs = dg.Definitions.merge(
    ...     pipeline.definitions, dg.Definitions(resources={"infron": infron})
    ... )
"""

from .assets import CollectConfig, InfronBatchPipeline, SubmitConfig, build_infron_batch_assets
from .budget import Budget, BudgetExceeded, SpendLedger
from .client import (
    DEFAULT_BASE_URL,
    DEFAULT_INFRON_MAX_TOKENS,
    InfronClient,
    ResultFile,
    RetryPolicy,
)
from .collect import CollectOutcome, collect_partition
from .components import InfronBatchInferenceComponent, InfronResourceComponent
from .errors import (
    InfronAuthError,
    InfronBadRequestError,
    InfronConnectionError,
    InfronError,
    InfronInsufficientCreditsError,
    InfronNotFoundError,
    InfronProtocolError,
    InfronRateLimitError,
    InfronServerError,
)
from .manifest import ChunkRecord, Manifest
from .models import ApiStyle, Batch, BatchStatus, normalise_status
from .prepare import InputError, PreparedRequests, make_custom_id, prepare_requests
from .pricing import CostEstimate, ModelPrice, estimate_cost
from .resources import InfronResource
from .results import DEFAULT_MAX_LINE_BYTES
from .sensor import build_infron_batch_sensor
from .sources import ParquetInput, ParquetSource
from .spec import RequestSpec
from .storage import BatchStorage
from .submit import SubmitIncomplete, SubmitOutcome, submit_prepared

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_INFRON_MAX_TOKENS",
    "DEFAULT_MAX_LINE_BYTES",
    "ApiStyle",
    "Batch",
    "BatchStatus",
    "BatchStorage",
    "Budget",
    "BudgetExceeded",
    "ChunkRecord",
    "CollectConfig",
    "CollectOutcome",
    "CostEstimate",
    "InfronAuthError",
    "InfronBadRequestError",
    "InfronBatchInferenceComponent",
    "InfronBatchPipeline",
    "InfronClient",
    "InfronConnectionError",
    "InfronError",
    "InfronInsufficientCreditsError",
    "InfronNotFoundError",
    "InfronProtocolError",
    "InfronRateLimitError",
    "InfronResource",
    "InfronResourceComponent",
    "InfronServerError",
    "InputError",
    "Manifest",
    "ModelPrice",
    "ParquetInput",
    "ParquetSource",
    "PreparedRequests",
    "RequestSpec",
    "ResultFile",
    "RetryPolicy",
    "SpendLedger",
    "SubmitConfig",
    "SubmitIncomplete",
    "SubmitOutcome",
    "build_infron_batch_assets",
    "build_infron_batch_sensor",
    "collect_partition",
    "estimate_cost",
    "make_custom_id",
    "normalise_status",
    "prepare_requests",
    "submit_prepared",
]
