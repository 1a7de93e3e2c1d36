"""Run-config compatibility: the launchpad schemas are pinned, and a removed field is still
accepted (with a deprecation warning) for one minor version, so saved launchpad configs and
schedules keep launching.

Changing a pinned schema on purpose: add the old field back as a deprecated, ignored,
optional field (see ``CollectConfig``), then update the pins here.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import dagster_instance

from infron_dagster import (
    CollectConfig,
    InfronResource,
    RequestSpec,
    SubmitConfig,
    build_infron_batch_assets,
)

# field -> (annotation, default): what saved run configs rely on.
SUBMIT_SCHEMA = {
    "force_resubmit": ("bool", False),
    "retry_failed": ("bool", False),
    "resubmit_uncertain": ("bool", False),
    "dry_run": ("bool", False),
    "allow_over_budget": ("bool", False),
}
COLLECT_SCHEMA = {
    "wait_seconds": ("float", 0.0),
    "poll_interval_seconds": ("float", 5.0),
    # Deprecated (removed from use in 0.1): accepted and ignored until 0.2.0.
    "max_run_retries": ("int | None", None),
    "retry_after_seconds": ("int | None", None),
}
OLD_COLLECT_CONFIG = {"max_run_retries": 48, "retry_after_seconds": 300}
# A launchpad config saved before 0.1 removed the two fields (their old defaults).
SAVED_COLLECT_CONFIG = {"wait_seconds": 60.0, "poll_interval_seconds": 5.0, **OLD_COLLECT_CONFIG}


def schema(config: type[dg.Config]) -> dict[str, tuple[str, Any]]:
    def name(annotation: Any) -> str:
        return annotation.__name__ if isinstance(annotation, type) else str(annotation)

    return {
        field: (name(info.annotation), info.default) for field, info in config.model_fields.items()
    }


def test_submit_config_schema_is_pinned():
    assert schema(SubmitConfig) == SUBMIT_SCHEMA


def test_collect_config_schema_is_pinned():
    assert schema(CollectConfig) == COLLECT_SCHEMA


def test_dagster_config_schema_keeps_every_field_optional():
    """A run config written for any earlier version validates: no field became required."""
    for config in (SubmitConfig, CollectConfig):
        fields = config.to_config_schema().as_field().config_type.fields
        assert set(fields) == set(config.model_fields)
        assert not [f for f, field in fields.items() if field.is_required], config.__name__


def test_deprecated_collect_fields_warn_only_when_set():
    with pytest.warns(FutureWarning, match="max_run_retries and retry_after_seconds"):
        config = CollectConfig(**OLD_COLLECT_CONFIG)
    assert config.wait_seconds == 0.0
    with pytest.warns(FutureWarning, match="retry_after_seconds is deprecated"):
        CollectConfig(retry_after_seconds=60)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CollectConfig(wait_seconds=1.0)


def test_a_saved_run_config_with_removed_fields_still_launches(tmp_path, infron_resource, caplog):
    """Submit, then collect with a run config saved before the fields were removed."""

    @dg.asset(name="reviews")
    def reviews() -> pd.DataFrame:
        return pd.DataFrame({"id": range(5), "text": [f"review {i}" for i in range(5)]})

    pipeline = build_infron_batch_assets(
        name="compat",
        spec=RequestSpec(model="gpt-4o-mini", prompt_template="Say {text}", key_columns=("id",)),
        source="reviews",
        storage_root=str(tmp_path / "lake"),
    )
    resources = {
        "infron": infron_resource,
        "io_manager": dg.FilesystemIOManager(base_dir=str(tmp_path / "io")),
    }
    with dagster_instance() as instance:
        submitted = dg.materialize(
            [reviews, pipeline.batches_asset],
            instance=instance,
            resources=resources,
            run_config={"ops": {"compat_batches": {"config": {"force_resubmit": False}}}},
        )
        assert submitted.success
        with pytest.warns(FutureWarning, match="max_run_retries"):
            collected = dg.materialize(
                pipeline.collect_definitions,
                instance=instance,
                resources=resources,
                run_config={"ops": {"compat_collect": {"config": SAVED_COLLECT_CONFIG}}},
            )
        assert collected.success
    warned = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert any("max_run_retries and retry_after_seconds are deprecated" in m for m in warned)
    results = pq.read_table(str(pipeline.storage.table_path("results", None)))
    assert sorted(results.column("id").to_pylist()) == list(range(5))


def test_infron_resource_fields_are_pinned():
    """The resource's fields are part of saved configs too (dg.yaml, launchpad)."""
    assert list(InfronResource.model_fields) == [
        "api_key",
        "base_url",
        "api_style",
        "timeout_seconds",
        "max_retries",
        "retry_budget_seconds",
        "local_data_dir",
    ]
