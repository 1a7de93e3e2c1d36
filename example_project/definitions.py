"""The example project's Dagster definitions: ``dagster dev -m example_project.definitions``.

Configuration comes from the environment:

- ``INFRON_API_KEY``: use real Infron (otherwise the embedded local server, no network).
- ``INFRON_BASE_URL`` / ``INFRON_API_STYLE``: point at another OpenAI-compatible batch API.
- ``INFRON_CHAT_MODEL`` / ``INFRON_EMBEDDING_MODEL``: the models; on Infron the chat model
  defaults to its batch name ``openai/gpt-4o-mini-batch``.
- ``INFRON_STORAGE_ROOT``: where results go (``s3://bucket/prefix`` works), default
  ``.infron_data/lake``.
- ``INFRON_LOCAL_IN_PROGRESS_SECONDS``: how long the embedded local server keeps each batch in
  progress (default 90 s: time to watch progress and to cancel; see ``local_server.py``).
"""

import os

import dagster as dg
import pandas as pd

from infron_dagster import (
    Budget,
    InfronResource,
    ModelPrice,
    RequestSpec,
    build_infron_batch_assets,
)
from infron_dagster.resources import default_local_dir

from .data import reviews_for_day
from .local_server import apply_example_config

daily = dg.DailyPartitionsDefinition(start_date="2026-11-01", end_offset=0)
STORAGE_ROOT = os.environ.get("INFRON_STORAGE_ROOT", os.path.abspath(".infron_data/lake"))
SENSOR_INTERVAL = int(os.environ.get("INFRON_SENSOR_INTERVAL_SECONDS", "30"))

ON_INFRON = bool(os.environ.get("INFRON_API_KEY")) and not os.environ.get("INFRON_BASE_URL")
# Infron names its batch models with a "-batch" suffix (billed at 50 % of standard prices).
DEFAULT_CHAT_MODEL = "openai/gpt-4o-mini-batch" if ON_INFRON else "gpt-4o-mini"

SENTIMENT_SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "topic": {"type": "string", "enum": ["quality", "shipping", "sizing", "price", "other"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["sentiment", "topic", "confidence"],
    "additionalProperties": False,
}


@dg.asset(partitions_def=daily, kinds={"pandas"}, group_name="reviews")
def reviews(context: dg.AssetExecutionContext) -> pd.DataFrame:
    """The day's product reviews (generated deterministically for the example)."""
    frame = reviews_for_day(context.partition_key)
    context.add_output_metadata({"dagster/row_count": len(frame)})
    return frame


SENTIMENT_SPEC = RequestSpec(
    model=os.environ.get("INFRON_CHAT_MODEL", DEFAULT_CHAT_MODEL),
    system_prompt="You label product reviews. Answer with JSON only.",
    prompt_template="Product: {product}\nStars: {stars}\nReview: {review_text}",
    key_columns=("review_id",),
    params={"temperature": 0, "max_tokens": 200},
    response_schema=SENTIMENT_SCHEMA,
    schema_name="review_label",
)
# gpt-4o-mini's list prices per million tokens (check your provider's: prices change);
# batch requests cost half. Budget: a day of reviews may not cost more than $0.50.
SENTIMENT_PRICE = ModelPrice(input_per_million=0.15, output_per_million=0.60, batch_discount=0.5)
SENTIMENT_BUDGET = Budget(max_cost_per_partition=0.50, max_cost_per_day=5.00)

review_sentiment = build_infron_batch_assets(
    name="review_sentiment",
    spec=SENTIMENT_SPEC,
    source=reviews,
    partitions_def=daily,
    storage_root=STORAGE_ROOT,
    keep_columns=["review_id", "product", "stars"],
    max_requests_per_batch=100,
    max_failure_rate=0.1,
    price=SENTIMENT_PRICE,
    budget=SENTIMENT_BUDGET,
    group_name="reviews",
    sensor_interval_seconds=SENSOR_INTERVAL,
)

review_embeddings = build_infron_batch_assets(
    name="review_embeddings",
    spec=RequestSpec(
        model=os.environ.get("INFRON_EMBEDDING_MODEL", "text-embedding-3-small"),
        endpoint="/v1/embeddings",
        prompt_template="{review_text}",
        key_columns=("review_id",),
    ),
    source=reviews,
    partitions_def=daily,
    storage_root=STORAGE_ROOT,
    keep_columns=["review_id", "product"],
    max_failure_rate=0.1,
    price=ModelPrice(input_per_million=0.02, output_per_million=0.0),
    group_name="reviews",
    sensor_interval_seconds=SENSOR_INTERVAL,
)


@dg.asset(partitions_def=daily, kinds={"pandas"}, group_name="reviews")
def review_topics(
    context: dg.AssetExecutionContext, review_sentiment_results: pd.DataFrame
) -> pd.DataFrame:
    """Reviews per topic and sentiment for the day, from the labelled results.

    The results load as a DataFrame for the partition: no paths to read by hand.
    """
    counts = (
        review_sentiment_results.groupby(["topic", "sentiment"]).size().rename("reviews")
    ).reset_index()
    context.add_output_metadata(
        {"dagster/row_count": len(counts), "labelled_reviews": len(review_sentiment_results)}
    )
    return counts


def infron_resource() -> InfronResource:
    """Real Infron with a key, otherwise the embedded local server: a small failure rate, and
    batches in progress for ``INFRON_LOCAL_IN_PROGRESS_SECONDS``."""
    style = os.environ.get("INFRON_API_STYLE", "infron")
    if os.environ.get("INFRON_API_KEY"):
        return InfronResource(
            api_key=dg.EnvVar("INFRON_API_KEY"),
            base_url=os.environ.get("INFRON_BASE_URL") or None,
            api_style=style,  # type: ignore[arg-type]
        )
    base_url = os.environ.get("INFRON_BASE_URL") or None
    if base_url is None:
        # Batches that stay in progress long enough to watch, and to cancel (local_server.py).
        apply_example_config(default_local_dir())
    return InfronResource(base_url=base_url, api_style=style)  # type: ignore[arg-type]


# Nightly: load yesterday's reviews and submit their batches; the sensors collect them as they
# finish, so the results (and a failure-rate breach) are there in the morning.
nightly_submit_job = dg.define_asset_job(
    "nightly_submit",
    selection=[reviews, review_sentiment.batches_asset, review_embeddings.batches_asset],
    partitions_def=daily,
    description="Load the day's reviews and submit their batch requests.",
)
nightly_submit = dg.build_schedule_from_partitioned_job(
    nightly_submit_job,
    hour_of_day=2,
    default_status=dg.DefaultScheduleStatus.STOPPED,  # turn it on in the UI: Automation
)

defs = dg.Definitions.merge(
    review_sentiment.definitions,
    review_embeddings.definitions,
    dg.Definitions(
        assets=[reviews, review_topics],
        jobs=[nightly_submit_job],
        schedules=[nightly_submit],
        resources={"infron": infron_resource()},
    ),
)
