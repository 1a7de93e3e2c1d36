"""The example project as its users run it: nightly on a schedule, `make dev`, `make demo`."""

from __future__ import annotations

import dataclasses
import importlib
import sys
from datetime import datetime, timezone

import dagster as dg
import pytest
from conftest import dagster_instance


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


def test_make_dev_keeps_batches_in_progress_and_updates_an_older_config(monkeypatch, tmp_path):
    """`make dev` batches stay in progress long enough to watch and cancel: 90 s by default,
    INFRON_LOCAL_IN_PROGRESS_SECONDS otherwise, also in a folder an older version configured
    (3 s); a config someone else wrote into the folder is theirs and stays."""
    from infron_dagster.local import LocalServerConfig, load_config, save_config

    local = tmp_path / "local"
    older = LocalServerConfig(
        validating_seconds=1, in_progress_seconds=3, finalizing_seconds=1, failure_rate=0.04
    )
    save_config(local, older)  # what `make dev` saved on first use before this version
    monkeypatch.delenv("INFRON_LOCAL_IN_PROGRESS_SECONDS", raising=False)
    example = _example(monkeypatch, tmp_path)
    assert load_config(local).in_progress_seconds == 90
    monkeypatch.setenv("INFRON_LOCAL_IN_PROGRESS_SECONDS", "20")
    example.infron_resource()
    assert load_config(local).in_progress_seconds == 20
    monkeypatch.delenv("INFRON_LOCAL_IN_PROGRESS_SECONDS")
    example.infron_resource()
    assert load_config(local) == dataclasses.replace(older, in_progress_seconds=90)
    theirs = LocalServerConfig(in_progress_seconds=300, failure_rate=0.15)
    save_config(local, theirs)
    example.infron_resource()
    assert load_config(local) == theirs


def _demo(monkeypatch, tmp_path, in_progress_seconds):
    """The example on a local server whose batches stay in progress that long, and the demo's
    submit and watch steps for one partition of review_sentiment."""
    from infron_dagster.local import LocalServerConfig, save_config

    config = LocalServerConfig(
        validating_seconds=0, in_progress_seconds=in_progress_seconds, finalizing_seconds=0
    )
    save_config(tmp_path / "local", config)  # not the example's: it stays
    example = _example(monkeypatch, tmp_path)
    demo = importlib.import_module("example_project.demo")
    pipeline = example.review_sentiment
    resources = {"infron": example.infron_resource()}

    def submit(instance, day):
        result = dg.materialize(
            [example.reviews, pipeline.batches_asset],
            partition_key=day,
            instance=instance,
            resources=resources,
            run_config=demo.QUIET,
        )
        assert result.success

    def watch(instance, day):
        demo._Watch(
            dg, instance, example, [pipeline], resources, cancel=(pipeline.name, day)
        ).until_done(timeout=60)

    return demo, pipeline, submit, watch


def test_the_demo_cancels_a_partition_in_flight(monkeypatch, tmp_path, capsys):
    """The demo's cancel step: the real cancel job stops a partition in flight, and once
    collected the partition shows its rows failed as batch_cancelled."""
    demo, pipeline, submit, watch = _demo(monkeypatch, tmp_path, in_progress_seconds=600)
    monkeypatch.setattr(demo, "CANCEL_AT_PERCENT", 0.0)  # at the first look: no race
    with dagster_instance() as instance:
        submit(instance, "2026-11-23")
        watch(instance, "2026-11-23")
    out = capsys.readouterr().out
    assert "cancelling review_sentiment 2026-11-23" in out
    assert "in failed as batch_cancelled (retryable)" in out, out
    failed = pipeline.storage.read_table(pipeline.storage.table_path("failed", "2026-11-23"))
    assert "batch_cancelled" in failed.column("error_code").to_pylist()


def test_the_demo_stops_loudly_when_its_partition_ended_before_the_cancel(monkeypatch, tmp_path):
    """A partition that ended before the demo could cancel it stops the demo with a message,
    instead of going on to a summary in which nothing was cancelled."""
    demo, pipeline, submit, watch = _demo(monkeypatch, tmp_path, in_progress_seconds=0)
    with dagster_instance() as instance:
        submit(instance, "2026-11-24")
        with pytest.raises(SystemExit, match="nothing was cancelled"):
            watch(instance, "2026-11-24")
    with pytest.raises(SystemExit, match="the cancel did nothing"):
        demo._show_cancelled(pipeline, "2026-11-24")
