"""Dagster components (YAML) of infron-dagster.

Example ``defs.yaml``:

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

from .batch_inference import (
    InfronBatchInferenceComponent,
    PartitionsModel,
    SourceModel,
    TimeWindowModel,
)

__all__ = [
    "InfronBatchInferenceComponent",
    "PartitionsModel",
    "SourceModel",
    "TimeWindowModel",
]
