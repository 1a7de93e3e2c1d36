"""A YAML component for one batch inference pipeline: ``build_infron_batch_assets`` in YAML.

Example (``defs/review_sentiment/defs.yaml``):

.. code-block:: yaml

    type: infron_dagster.components.InfronBatchInferenceComponent
    attributes:
      name: review_sentiment
      model: gpt-4o-mini
      prompt_template: "Sentiment of: {review_text}"
      key_columns: [review_id]
      source: {asset_key: reviews}
      partitions: {daily: {start_date: "2026-11-01"}}
"""

import importlib
from collections.abc import Callable, Mapping
from datetime import date
from typing import Annotated, Any, Literal

import dagster as dg
from dagster.components.resolved.core_models import (
    MultiRunBackfillPolicyModel,
    SingleRunBackfillPolicyModel,
    resolve_backfill_policy,
)
from pydantic import ConfigDict, Field, field_validator, model_validator

from ..assets import InfronBatchPipeline, build_infron_batch_assets
from ..budget import Budget
from ..prepare import DEFAULT_MAX_BYTES, DEFAULT_MAX_REQUESTS
from ..pricing import ModelPrice
from ..results import DEFAULT_MAX_LINE_BYTES
from ..sources import ParquetSource
from ..spec import RequestSpec
from .scaffold import InfronBatchInferenceScaffolder

__all__ = [
    "InfronBatchInferenceComponent",
    "PartitionsModel",
    "SourceModel",
    "TimeWindowModel",
]

Endpoint = Literal["/v1/chat/completions", "/v1/embeddings", "/v1/responses"]
RowBodyFn = Callable[[Mapping[str, Any]], dict[str, Any]]

_TIME_WINDOWS: dict[str, Callable[..., dg.PartitionsDefinition]] = {
    "hourly": dg.HourlyPartitionsDefinition,
    "daily": dg.DailyPartitionsDefinition,
    "weekly": dg.WeeklyPartitionsDefinition,
    "monthly": dg.MonthlyPartitionsDefinition,
}
_PARTITION_KINDS = (*_TIME_WINDOWS, "static", "dynamic")


# --- source ------------------------------------------------------------------------------


class SourceModel(dg.Model):
    """YAML shape of ``source``: ``{asset_key: reviews}`` or ``{parquet: ..., storage_options:
    {...}}``. A bare string is an asset key."""

    asset_key: str | None = Field(
        default=None,
        description="Upstream asset whose partition (a DataFrame or Arrow table) is the input; "
        "'a/b' for a multi-part key.",
        examples=["reviews"],
    )
    parquet: str | None = Field(
        default=None,
        description="Parquet file, folder or glob; {partition_key} is replaced per partition.",
        examples=["s3://lake/reviews/date={partition_key}/*.parquet"],
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for `parquet`, e.g. S3 credentials."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> "SourceModel":
        if (self.asset_key is None) == (self.parquet is None):
            raise ValueError("source: give exactly one of `asset_key` and `parquet`")
        if self.storage_options and self.parquet is None:
            raise ValueError("source: `storage_options` applies to `parquet` only")
        return self


def _resolve_source(
    context: dg.ResolutionContext, value: SourceModel | str
) -> dg.AssetKey | ParquetSource:
    if isinstance(value, str):
        return dg.AssetKey.from_user_string(value)
    value = SourceModel.model_validate(context.resolve_value(value.model_dump()))
    if value.parquet is not None:
        return ParquetSource(value.parquet, dict(value.storage_options))
    return dg.AssetKey.from_user_string(str(value.asset_key))


# --- partitions --------------------------------------------------------------------------


class TimeWindowModel(dg.Model):
    """Arguments of a Dagster time-window partitions definition (daily, hourly, ...)."""

    start_date: str = Field(examples=["2026-11-01"])
    end_date: str | None = None
    timezone: str | None = None
    end_offset: int | None = None
    minute_offset: int | None = None
    hour_offset: int | None = Field(default=None, description="daily, weekly, monthly")
    day_offset: int | None = Field(default=None, description="weekly, monthly")

    @field_validator("start_date", "end_date", mode="before")
    @classmethod
    def _iso_date(cls, value: Any) -> Any:
        """YAML reads an unquoted 2026-11-01 as a date: accept it."""
        return value.isoformat() if isinstance(value, date) else value


class PartitionsModel(dg.Model):
    """YAML shape of ``partitions``: exactly one of ``hourly``, ``daily``, ``weekly``,
    ``monthly`` (``{start_date: ...}``), ``static`` (a list of keys) or ``dynamic`` (a name)."""

    hourly: TimeWindowModel | None = None
    daily: TimeWindowModel | None = None
    weekly: TimeWindowModel | None = None
    monthly: TimeWindowModel | None = None
    static: list[str] | None = Field(default=None, examples=[["us", "eu"]])
    dynamic: str | None = Field(default=None, description="Name of a dynamic partitions set.")

    @model_validator(mode="after")
    def _exactly_one(self) -> "PartitionsModel":
        chosen = [kind for kind in _PARTITION_KINDS if getattr(self, kind) is not None]
        if len(chosen) != 1:
            raise ValueError(
                f"partitions: give exactly one of {', '.join(_PARTITION_KINDS)}; "
                f"got {', '.join(chosen) or 'none'}"
            )
        return self


def _resolve_partitions(
    context: dg.ResolutionContext, value: PartitionsModel | str | None
) -> dg.PartitionsDefinition | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise ValueError(f"partitions must be a mapping such as {{daily: ...}}, not {value!r}")
    raw = context.resolve_value(value.model_dump(exclude_none=True))
    value = PartitionsModel.model_validate(raw)
    if value.static is not None:
        return dg.StaticPartitionsDefinition(list(value.static))
    if value.dynamic is not None:
        return dg.DynamicPartitionsDefinition(name=value.dynamic)
    kind = next(kind for kind in _TIME_WINDOWS if getattr(value, kind) is not None)
    return _TIME_WINDOWS[kind](**getattr(value, kind).model_dump(exclude_none=True))


# --- money -------------------------------------------------------------------------------


class PriceModel(dg.Model):
    """YAML shape of ``price``: list prices per million tokens of the pipeline's model."""

    input_per_million: float
    output_per_million: float
    batch_discount: float = Field(default=0.5, description="0.5: batch costs half the list")


class BudgetModel(dg.Model):
    """YAML shape of ``budget``: refuse a submission whose worst case crosses a limit."""

    max_cost_per_partition: float | None = None
    max_cost_per_day: float | None = Field(default=None, description="Per UTC day.")


def _build_from(shape: type[dg.Model], target: Callable[..., Any]) -> Callable[..., Any]:
    """A resolver: the YAML mapping (templates resolved) validated by ``shape``, then built."""

    def resolve(context: dg.ResolutionContext, value: dg.Model | None) -> Any:
        if value is None:
            return None
        raw = shape.model_validate(context.resolve_value(value.model_dump()))
        return target(**raw.model_dump())

    return resolve


# --- body_fn -----------------------------------------------------------------------------


def _resolve_body_fn(context: dg.ResolutionContext, value: str | None) -> RowBodyFn | None:
    """``package.module:function`` (or ``package.module.function``) -> the callable."""
    if value is None:
        return None
    module_name, _, attr = value.partition(":") if ":" in value else value.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"body_fn must be 'package.module:function', not {value!r}")
    fn = getattr(importlib.import_module(module_name), attr)
    if not callable(fn):
        raise ValueError(f"body_fn {value!r} is not callable")
    return fn


# --- the component -----------------------------------------------------------------------


@dg.scaffold_with(InfronBatchInferenceScaffolder)
class InfronBatchInferenceComponent(dg.Component, dg.Resolvable, dg.Model):
    """LLM batch inference over an upstream asset or Parquet table, one partition at a time.

    Defines ``<name>_batches`` (submit), ``<name>_results`` and ``<name>_failed`` (collect, with
    the ``completeness`` and ``failure_rate`` checks), the sensor ``<name>_sensor`` and the job
    ``<name>_retry``: the same as :func:`infron_dagster.build_infron_batch_assets`.

    The assets need an :class:`~infron_dagster.InfronResource` under ``resource_key``
    (``infron``), supplied elsewhere as with other integrations, e.g. ``defs/resources.py``::

        @dg.definitions
        def resources() -> dg.Definitions:
            return dg.Definitions(
                resources={"infron": InfronResource(api_key=dg.EnvVar("INFRON_API_KEY"))}
            )

    ``prompt_template`` and ``system_prompt`` are taken literally (no Jinja): ``{column}``
    placeholders and ``{{``/``}}`` literal braces as in :class:`~infron_dagster.RequestSpec`.
    Other strings may use templates such as ``{{ env.INFRON_STORAGE_ROOT }}``.

    Example ``defs.yaml``:

    .. code-block:: yaml

        type: infron_dagster.components.InfronBatchInferenceComponent
        attributes:
          name: review_sentiment
          model: gpt-4o-mini
          system_prompt: You label product reviews. Answer with JSON only.
          prompt_template: "Product: {product}\\nReview: {review_text}"
          key_columns: [review_id]
          params: {temperature: 0}
          response_schema:
            type: object
            properties: {sentiment: {type: string, enum: [positive, neutral, negative]}}
            required: [sentiment]
          source:
            parquet: "s3://lake/reviews/date={partition_key}/*.parquet"
            storage_options: {anon: false}
          partitions: {daily: {start_date: "2026-11-01"}}
          storage_root: s3://lake/llm
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    name: str = Field(description="Prefix of every definition: <name>_batches, ...")
    # Stored as `llm_model`: a field called `model` would shadow Resolvable.model().
    llm_model: str = Field(alias="model", description="Model id sent in each request body.")
    endpoint: Endpoint = "/v1/chat/completions"
    prompt_template: Annotated[
        str | None,
        dg.Resolver.passthrough(description="{column} placeholders; give this or body_fn."),
    ] = None
    body_fn: Annotated[
        RowBodyFn | None,
        dg.Resolver(
            _resolve_body_fn,
            model_field_type=str | None,
            description="'package.module:function' taking a row and returning a request body.",
        ),
    ] = None
    system_prompt: Annotated[str | None, dg.Resolver.passthrough()] = None
    key_columns: list[str] | str = Field(
        default_factory=lambda: ["id"],
        description="Columns that identify a row for good; custom_id derives from them.",
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Extra request body fields, e.g. temperature."
    )
    response_schema: dict[str, Any] | None = Field(
        default=None, description="JSON schema of an object: structured output, typed columns."
    )
    schema_name: str = "result"
    source: Annotated[
        dg.AssetKey | ParquetSource,
        dg.Resolver(
            _resolve_source,
            model_field_type=SourceModel,
            description="{asset_key: ...} or {parquet: ..., storage_options: {...}}.",
        ),
    ]
    partitions: Annotated[
        dg.PartitionsDefinition | None,
        dg.Resolver(
            _resolve_partitions,
            model_field_type=PartitionsModel | None,
            description="{daily: {start_date: ...}}, {static: [...]}, ...; none: unpartitioned.",
        ),
    ] = None
    storage_root: str = Field(
        default=".infron_data/lake", description="Folder or s3://bucket/prefix for all output."
    )
    storage_options: dict[str, Any] | None = None
    keep_columns: list[str] | None = Field(
        default=None, description="Input columns copied to results/failed (default: all)."
    )
    max_requests_per_batch: int = DEFAULT_MAX_REQUESTS
    max_bytes_per_batch: int = DEFAULT_MAX_BYTES
    max_attempts: int = 3
    max_failure_rate: float = 0.05
    max_result_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    owners: list[str] | None = None
    tags: dict[str, str] | None = None
    block_on_failure_rate: bool = Field(
        default=False, description="Make the failure_rate check blocking for downstream assets."
    )
    automation_condition: Annotated[
        dg.AutomationCondition | None,
        dg.Resolver.default(
            model_field_type=str | None,
            description="When to submit, e.g. \"{{ automation_condition.on_cron('0 2 * * *') }}\".",
        ),
    ] = None
    backfill_policy: Annotated[
        dg.BackfillPolicy | None,
        dg.Resolver(
            resolve_backfill_policy,
            model_field_type=SingleRunBackfillPolicyModel | MultiRunBackfillPolicyModel | None,
            description="{type: single_run} submits a backfill's range in one run.",
        ),
    ] = None
    pool: str | None = Field(
        default=None, description="Dagster concurrency pool of the submit and collect runs."
    )
    price: Annotated[
        ModelPrice | None,
        dg.Resolver(
            _build_from(PriceModel, ModelPrice),
            model_field_type=PriceModel | None,
            description="Prices of `model`: estimates and costs in money.",
        ),
    ] = None
    budget: Annotated[
        Budget | None,
        dg.Resolver(
            _build_from(BudgetModel, Budget),
            model_field_type=BudgetModel | None,
            description="Money limits; a submission over them is refused unsent.",
        ),
    ] = None
    on_changed_input_in_flight: Literal["carry", "cancel"] = Field(
        default="carry",
        description="Changed input while batches run: carry (unchanged rows wait for the "
        "answers already paid for, only changed rows are sent) or cancel (cancel the running "
        "batches first, send every row).",
    )
    reuse_answers: Literal["partition", "pipeline"] = Field(
        default="partition",
        description="pipeline: a request whose exact body was answered in any partition is "
        "carried from there, not paid again; partition (default): only a partition's own.",
    )
    max_enqueued_tokens: int | None = Field(
        default=None,
        description="Admission control: at most this many estimated tokens (input plus output "
        "limit) in created, unfinished batches, shared by the pipelines of the storage root; "
        "chunks that do not fit wait, and the sensor submits them when capacity frees.",
    )
    auto_retry: bool = Field(
        default=False,
        description="The sensor retries a collected partition's retryable failed rows by "
        "itself, after auto_retry_backoff_seconds, up to max_attempts (no retry job to launch).",
    )
    auto_retry_backoff_seconds: list[float] = Field(
        default_factory=lambda: [600.0, 1800.0],
        description="Seconds to wait before attempt 2, attempt 3, ... (the last repeats).",
    )
    pilot_rows: int | None = Field(
        default=None,
        description="Send this many rows of a new prompt first; the rest goes once their "
        "answers pass (failure rate within max_failure_rate), estimated from their output "
        "tokens; a failed pilot sends nothing more (the rest fail as pilot_stopped).",
    )
    pilot_scope: Literal["pipeline", "partition"] = Field(
        default="pipeline",
        description="pipeline: one pilot per prompt, other partitions wait for its verdict; "
        "partition: each partition's first submission pilots.",
    )
    pilot_max_output_tokens: int | None = Field(
        default=None,
        description="Stop the pilot when its answers average more output tokens than this.",
    )
    resource_key: str = "infron"
    group_name: str | None = None
    sensor_interval_seconds: int = 30
    sensor_default_status: Literal["running", "stopped"] = "running"

    @model_validator(mode="after")
    def _check(self) -> "InfronBatchInferenceComponent":
        self.request_spec()  # RequestSpec's own checks: one of prompt_template/body_fn, ...
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 0 <= self.max_failure_rate <= 1:
            raise ValueError("max_failure_rate must be between 0 and 1")
        return self

    @classmethod
    def get_spec(cls) -> dg.ComponentTypeSpec:
        return dg.ComponentTypeSpec(
            tags=["infron", "llm", "batch"], produces=["asset", "asset_check", "sensor", "job"]
        )

    def request_spec(self) -> RequestSpec:
        """What to ask the model for each row."""
        return RequestSpec(
            model=self.llm_model,
            prompt_template=self.prompt_template,
            system_prompt=self.system_prompt,
            endpoint=self.endpoint,
            key_columns=self.key_columns,
            params=self.params,
            response_schema=self.response_schema,
            schema_name=self.schema_name,
            body_fn=self.body_fn,
        )

    def build_pipeline(self) -> InfronBatchPipeline:
        """The pipeline object (assets, sensor, job, storage) this component defines."""
        return build_infron_batch_assets(
            name=self.name,
            spec=self.request_spec(),
            source=self.source,
            partitions_def=self.partitions,
            storage_root=self.storage_root,
            storage_options=self.storage_options,
            keep_columns=self.keep_columns,
            max_requests_per_batch=self.max_requests_per_batch,
            max_bytes_per_batch=self.max_bytes_per_batch,
            max_attempts=self.max_attempts,
            max_failure_rate=self.max_failure_rate,
            max_result_line_bytes=self.max_result_line_bytes,
            resource_key=self.resource_key,
            group_name=self.group_name,
            owners=self.owners,
            tags=self.tags,
            automation_condition=self.automation_condition,
            backfill_policy=self.backfill_policy,
            pool=self.pool,
            price=self.price,
            budget=self.budget,
            block_on_failure_rate=self.block_on_failure_rate,
            sensor_interval_seconds=self.sensor_interval_seconds,
            sensor_default_status=dg.DefaultSensorStatus(self.sensor_default_status.upper()),
            on_changed_input_in_flight=self.on_changed_input_in_flight,
            reuse_answers=self.reuse_answers,
            max_enqueued_tokens=self.max_enqueued_tokens,
            auto_retry=self.auto_retry,
            auto_retry_backoff_seconds=self.auto_retry_backoff_seconds,
            pilot_rows=self.pilot_rows,
            pilot_scope=self.pilot_scope,
            pilot_max_output_tokens=self.pilot_max_output_tokens,
        )

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return self.build_pipeline().definitions
