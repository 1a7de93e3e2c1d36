"""Dagster components (YAML) of infron-dagster; see :mod:`.batch_inference` for an example."""

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
