"""The upstream asset the component reads: a day of product reviews."""

import dagster as dg
import pandas as pd

from ..data import reviews_for_day


@dg.asset(
    partitions_def=dg.DailyPartitionsDefinition(start_date="2026-11-01", end_offset=0),
    kinds={"pandas"},
    group_name="reviews",
)
def reviews(context: dg.AssetExecutionContext) -> pd.DataFrame:
    """The day's product reviews (generated deterministically for the example)."""
    return reviews_for_day(context.partition_key)
