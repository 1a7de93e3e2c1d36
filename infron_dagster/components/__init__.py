"""Dagster components (YAML) of infron-dagster; see :mod:`.batch_inference` for an example."""

from .batch_inference import (
    InfronBatchInferenceComponent,
    PartitionsModel,
    SourceModel,
    TimeWindowModel,
)
from .resource import InfronResourceComponent

__all__ = [
    "InfronBatchInferenceComponent",
    "InfronResourceComponent",
    "PartitionsModel",
    "SourceModel",
    "TimeWindowModel",
]
