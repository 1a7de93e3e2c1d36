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
from .cancel import BatchCancel, CancelOutcome, cancel_partition
from .cancel_job import build_cancel_job
from .checks import build_collect_checks
from .client import (
    DEFAULT_BASE_URL,
    DEFAULT_INFRON_MAX_TOKENS,
    InfronClient,
    ResultFile,
    RetryPolicy,
)
from .collect import CollectOutcome, collect_partition
from .components import InfronBatchInferenceComponent, InfronResourceComponent
from .doctor import DoctorReport, Finding, check_lake
from .errors import (
    InfronAuthError,
    InfronBadRequestError,
    InfronConnectionError,
    InfronDagsterError,
    InfronError,
    InfronInsufficientCreditsError,
    InfronNotFoundError,
    InfronProtocolError,
    InfronRateLimitError,
    InfronServerError,
)
from .keys import make_custom_id
from .local import LocalServerConfig, create_app
from .local.embedded import embedded_client
from .manifest import ChunkRecord, Manifest
from .models import ApiStyle, Batch, BatchStatus, normalise_status
from .prepare import PreparedRequests, prepare_requests
from .pricing import CostEstimate, ModelPrice, estimate_cost
from .resources import InfronResource
from .results import DEFAULT_MAX_LINE_BYTES
from .sensor import build_infron_batch_sensor
from .sources import ParquetInput, ParquetSource
from .spec import RequestSpec
from .storage import BatchStorage, LockTimeout
from .submit import SubmitIncomplete, SubmitOutcome, submit_prepared
from .table_loader import InfronTableIOManager, MissingPartitionError, read_batch_table
from .validate import InputError

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_INFRON_MAX_TOKENS",
    "DEFAULT_MAX_LINE_BYTES",
    "ApiStyle",
    "Batch",
    "BatchCancel",
    "BatchStatus",
    "BatchStorage",
    "Budget",
    "BudgetExceeded",
    "CancelOutcome",
    "ChunkRecord",
    "CollectConfig",
    "CollectOutcome",
    "CostEstimate",
    "DoctorReport",
    "Finding",
    "InfronAuthError",
    "InfronBadRequestError",
    "InfronBatchInferenceComponent",
    "InfronBatchPipeline",
    "InfronClient",
    "InfronConnectionError",
    "InfronDagsterError",
    "InfronError",
    "InfronInsufficientCreditsError",
    "InfronNotFoundError",
    "InfronProtocolError",
    "InfronRateLimitError",
    "InfronResource",
    "InfronResourceComponent",
    "InfronServerError",
    "InfronTableIOManager",
    "InputError",
    "LocalServerConfig",
    "LockTimeout",
    "Manifest",
    "MissingPartitionError",
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
    "build_cancel_job",
    "build_collect_checks",
    "build_infron_batch_assets",
    "build_infron_batch_sensor",
    "cancel_partition",
    "check_lake",
    "collect_partition",
    "create_app",
    "embedded_client",
    "estimate_cost",
    "make_custom_id",
    "normalise_status",
    "prepare_requests",
    "read_batch_table",
    "submit_prepared",
]
