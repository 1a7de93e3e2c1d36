"""The example project as its users run it: nightly, on a schedule."""

from __future__ import annotations

import importlib
import sys
from datetime import datetime, timezone

import dagster as dg


def _example(monkeypatch, tmp_path):
    monkeypatch.setenv("INFRON_LOCAL_DATA_DIR", str(tmp_path / "local"))
    monkeypatch.setenv("INFRON_STORAGE_ROOT", str(tmp_path / "lake"))
    monkeypatch.delenv("INFRON_API_KEY", raising=False)
    module = sys.modules.get("example_project.definitions")
    if module is not None:
        return importlib.reload(module)
    return importlib.import_module("example_project.definitions")


def test_the_nightly_schedule_submits_yesterdays_partition(monkeypatch, tmp_path):
    example = _example(monkeypatch, tmp_path)
    schedule = example.defs.resolve_schedule_def("nightly_submit_schedule")
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED  # on by choice
    tick = datetime(2026, 11, 26, 2, 0, tzinfo=timezone.utc)
    result = schedule.evaluate_tick(dg.build_schedule_context(scheduled_execution_time=tick))
    [request] = result.run_requests
    assert request.partition_key == "2026-11-25"
    job = example.defs.resolve_job_def("nightly_submit")
    selected = {key.to_user_string() for key in job.asset_layer.selected_asset_keys}
    assert selected == {"reviews", "review_sentiment_batches", "review_embeddings_batches"}
