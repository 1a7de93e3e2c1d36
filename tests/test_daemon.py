"""The example project under a real ``dagster dev``: webserver, daemon, backfill and sensor.

A backfill of two days of ``reviews`` and ``review_sentiment_batches`` is launched through
the GraphQL API as the UI does; the backfill daemon runs the submit runs, then the sensor
daemon polls the embedded local server and launches one collection run per partition. Nothing
is ticked by hand: if a file appears, a Dagster daemon put it there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from deploy_support import LAUNCH_BACKFILL

from infron_dagster.local import LocalServerConfig, save_config

PROJECT = Path(__file__).resolve().parents[1]
DAYS = ["2026-11-21", "2026-11-22"]  # two partitions: each is a run of its own
ROWS_PER_DAY = 240  # example_project/data.py: reviews_for_day(day, rows=240)
PIPELINE = "review_sentiment"

RUNS_BY_TAG = """
query($filter: RunsFilter) {
  runsOrError(filter: $filter) {
    __typename
    ... on Runs { results { runId status tags { key value } } }
    ... on PythonError { message }
  }
}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dagster_cmd(*args: str) -> list[str]:
    executable = Path(sys.executable).parent / "dagster"
    if executable.exists():
        return [str(executable), *args]
    return [sys.executable, "-m", "dagster", *args]


def _tail(path: Path, lines: int = 80) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"<no log: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Env:
    env: dict[str, str]
    lake: Path
    log: Path


@pytest.fixture
def dagster_env(tmp_path) -> Env:
    home = tmp_path / "dagster_home"
    lake = tmp_path / "lake"
    local_dir = tmp_path / "local_server"
    for folder in (home, lake, local_dir):
        folder.mkdir()
    # Runs leave the queue every second (the default waits longer between dequeues).
    (home / "dagster.yaml").write_text(
        "run_coordinator:\n  module: dagster.core.run_coordinator\n"
        "  class: QueuedRunCoordinator\n  config:\n    dequeue_interval_seconds: 1\n"
        "telemetry:\n  enabled: false\n",
        encoding="utf-8",
    )
    # Fast batches; failures on so that `failed` has rows of its own.
    save_config(
        local_dir,
        LocalServerConfig(
            validating_seconds=0, in_progress_seconds=1, finalizing_seconds=0, failure_rate=0.05
        ),
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"INFRON_API_KEY", "INFRON_BASE_URL", "INFRON_API_STYLE"}
    }
    env.update(
        DAGSTER_HOME=str(home),
        INFRON_STORAGE_ROOT=str(lake),
        INFRON_LOCAL_DATA_DIR=str(local_dir),
        INFRON_SENSOR_INTERVAL_SECONDS="5",
        PYTHONUNBUFFERED="1",
    )
    return Env(env=env, lake=lake, log=tmp_path / "dagster_dev.log")


@pytest.fixture
def dagster_dev(dagster_env: Env) -> Iterator[str]:
    """``dagster dev`` on a free port; yields the base URL; kills the whole process group."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with open(dagster_env.log, "wb") as log:
        proc = subprocess.Popen(
            _dagster_cmd(
                "dev", "-m", "example_project.definitions", "-p", str(port), "-h", "127.0.0.1"
            ),
            cwd=PROJECT,
            env=dagster_env.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dagster dev exited with {proc.returncode}:\n{_tail(dagster_env.log)}")
            try:
                if httpx.get(f"{base}/server_info", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dagster dev did not answer in 90 s:\n{_tail(dagster_env.log)}")
            time.sleep(1)
        yield base
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (dagster dev, its webserver and daemon), SIGKILL after 3 s.

    The test's files live in a temporary folder: nothing needs a graceful shutdown, and
    ``dagster dev`` often takes longer than 15 s to stop its children.
    """
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader so that an empty group reads as gone
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _graphql(base: str, query: str, variables: dict) -> dict:
    response = httpx.post(
        f"{base}/graphql", json={"query": query, "variables": variables}, timeout=30
    )
    response.raise_for_status()
    body = response.json()
    assert not body.get("errors"), body["errors"]
    return body["data"]


def _launch_backfill(base: str, log: Path) -> str:
    params = {
        "partitionNames": DAYS,
        "assetSelection": [{"path": ["reviews"]}, {"path": [f"{PIPELINE}_batches"]}],
        "fromFailure": False,
    }
    # The code location may still be loading just after the server answers: retry briefly.
    deadline = time.monotonic() + 60
    while True:
        result = _graphql(base, LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
        if result["__typename"] == "LaunchBackfillSuccess":
            return result["backfillId"]
        if time.monotonic() > deadline:
            pytest.fail(f"backfill not launched: {result}\n{_tail(log)}")
        time.sleep(2)


def _collection_runs(base: str) -> list[dict]:
    data = _graphql(
        base,
        RUNS_BY_TAG,
        {"filter": {"tags": [{"key": "infron/pipeline", "value": PIPELINE}]}},
    )["runsOrError"]
    assert data["__typename"] == "Runs", data
    return data["results"]


def _table_path(lake: Path, kind: str, day: str) -> Path:
    return lake / PIPELINE / kind / f"partition={day}" / "part-0.parquet"


def test_backfill_then_sensor_collects_every_partition(dagster_env: Env, dagster_dev: str):
    base, lake, log = dagster_dev, dagster_env.lake, dagster_env.log
    _launch_backfill(base, log)

    expected = [_table_path(lake, kind, day) for day in DAYS for kind in ("results", "failed")]
    deadline = time.monotonic() + 150
    runs: list[dict] = []
    while True:
        missing = [p for p in expected if not p.exists()]
        if not missing:
            runs = _collection_runs(base)
            if len(runs) >= len(DAYS) and all(
                r["status"] in {"SUCCESS", "FAILURE", "CANCELED"} for r in runs
            ):
                break
        if time.monotonic() > deadline:
            pytest.fail(
                f"timed out: missing {[str(p.relative_to(lake)) for p in missing]}, "
                f"collection runs {[(r['runId'], r['status']) for r in runs]}\n"
                f"--- dagster dev log tail ---\n{_tail(log)}"
            )
        time.sleep(2)

    for day in DAYS:
        results = pq.read_table(_table_path(lake, "results", day))
        failed = pq.read_table(_table_path(lake, "failed", day))
        assert results.num_rows + failed.num_rows == ROWS_PER_DAY, (day, results, failed)
        ok_ids = set(results.column("custom_id").to_pylist())
        bad_ids = set(failed.column("custom_id").to_pylist())
        assert len(ok_ids) == results.num_rows and len(bad_ids) == failed.num_rows, day
        assert not ok_ids & bad_ids, day
        assert failed.num_rows > 0, f"{day}: expected some failures at failure_rate=0.05"
        assert failed.column("error_code").null_count == 0, day

    statuses = [r["status"] for r in runs]
    assert len(runs) == len(DAYS) and statuses == ["SUCCESS"] * len(DAYS), (
        f"{[(r['runId'], r['status']) for r in runs]}\n{_tail(log)}"
    )
    partitions = sorted(
        tag["value"] for r in runs for tag in r["tags"] if tag["key"] == "dagster/partition"
    )
    assert partitions == DAYS
    run_keys = sorted(
        tag["value"] for r in runs for tag in r["tags"] if tag["key"] == "dagster/run_key"
    )
    assert all(key.startswith(f"{PIPELINE}:") for key in run_keys), run_keys


def test_definitions_validate(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n", encoding="utf-8")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"INFRON_API_KEY", "INFRON_BASE_URL", "INFRON_API_STYLE"}
    }
    env.update(
        DAGSTER_HOME=str(home),
        INFRON_STORAGE_ROOT=str(tmp_path / "lake"),
        INFRON_LOCAL_DATA_DIR=str(tmp_path / "local_server"),
    )
    proc = subprocess.run(
        _dagster_cmd("definitions", "validate", "-m", "example_project.definitions"),
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
