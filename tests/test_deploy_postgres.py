"""The production shape: a PostgreSQL-backed Dagster instance, the lake on S3, an HTTP API.

Real PostgreSQL 15 (started here), moto's S3 server, ``infron-local`` served over HTTP with an
API key, and Dagster's own processes: ``dagster-daemon`` and ``dagster-webserver`` for the
backfill test; two "machines" (separate working directories, ``DAGSTER_HOME`` and temp
folders, sharing only the database and the lake) for the hidden-state test. The code
location (``deploy_defs.py``) reads everything from the environment, credentials included.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from deploy_support import (
    LAUNCH_BACKFILL,
    PG_PASSWORD,
    Postgres,
    PostgresUnavailable,
    free_port,
    postgres_server,
    wait_until,
    write_instance,
)

from infron_dagster.local.process import serve_in_subprocess

HERE = Path(__file__).resolve().parent
DEFS = str(HERE / "deploy_defs.py")
PARTITIONS = ["p1", "p2", "p3"]
ROWS = 30  # per partition: 5 batches of 7 requests at most, with failures
API_KEY = "sk-deploy-test-0123456789"


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    try:
        with postgres_server() as server:
            yield server
    except PostgresUnavailable as exc:
        pytest.fail(f"PostgreSQL could not start, so the deployment tests cannot run: {exc}")


@pytest.fixture(scope="module")
def provider(tmp_path_factory) -> Iterator[str]:
    """``infron-local serve`` with a key; batches take a second; 10 % of requests fail."""
    flags = [
        "--api-key",
        API_KEY,
        "--validating-seconds",
        "0",
        "--in-progress-seconds",
        "1",
        "--finalizing-seconds",
        "0",
        "--failure-rate",
        "0.1",
    ]
    with serve_in_subprocess(tmp_path_factory.mktemp("provider"), *flags) as base_url:
        yield base_url


@dataclass
class Lake:
    root: str  # s3://lake/<prefix>
    fs: s3fs.S3FileSystem

    def table(self, kind: str, partition: str) -> pa.Table | None:
        path = f"{self.root[5:]}/rev/{kind}/partition={partition}/part-0.parquet"
        self.fs.invalidate_cache()
        if not self.fs.exists(path):
            return None
        return pq.read_table(io.BytesIO(self.fs.cat_file(path)))

    def keys(self, folder: str) -> list[str]:
        self.fs.invalidate_cache()
        return self.fs.find(f"{self.root[5:]}/rev/{folder}")


@pytest.fixture
def lake(moto_s3) -> Lake:
    """A fresh prefix in the bucket with each partition's input rows as Parquet."""
    fs = s3fs.S3FileSystem(
        key="testing",
        secret="testing",
        client_kwargs={"endpoint_url": moto_s3.endpoint_url},
        skip_instance_cache=True,
    )
    root = f"s3://lake/deploy-{uuid.uuid4().hex[:10]}"
    for partition in PARTITIONS:
        rows = pa.table(
            {"id": list(range(ROWS)), "text": [f"{partition} #{i}" for i in range(ROWS)]}
        )
        sink = io.BytesIO()
        pq.write_table(rows, sink)
        fs.pipe_file(f"{root[5:]}/input/{partition}.parquet", sink.getvalue())
    return Lake(root, fs)


@dataclass
class Machine:
    """One host's view: its own working directory, DAGSTER_HOME and temp folder."""

    cwd: Path
    home: Path
    tmp: Path
    env: dict[str, str]
    log: Path

    def dagster(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [str(Path(sys.executable).parent / "dagster"), *args, "-f", DEFS],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        with open(self.log, "a", encoding="utf-8") as fh:
            fh.write(f"$ dagster {' '.join(args)}\n{done.stdout}\n{done.stderr}\n")
        return done


def machine(
    base: Path, name: str, postgres: Postgres, db: str, lake: Lake, moto_url: str, provider: str
) -> Machine:
    cwd, home, tmp = base / name / "cwd", base / name / "home", base / name / "tmp"
    for folder in (cwd, tmp):
        folder.mkdir(parents=True)
    write_instance(home, postgres, db)
    # Only what a pod would be given: nothing of the test process's own INFRON/AWS settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFRON_", "AWS_"))}
    env.update(
        DAGSTER_HOME=str(home),
        DAGSTER_PG_PASSWORD=PG_PASSWORD,
        TMPDIR=str(tmp),
        INFRON_STORAGE_ROOT=lake.root,
        INFRON_BASE_URL=provider,
        INFRON_API_KEY=API_KEY,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=moto_url,
        PYTHONUNBUFFERED="1",
    )
    return Machine(cwd, home, tmp, env, base / name / "commands.log")


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<no log: {exc}>"


def accounted(lake: Lake, partition: str) -> tuple[int, int]:
    """(results, failed) rows of a collected partition; every row in exactly one table."""
    results, failed = lake.table("results", partition), lake.table("failed", partition)
    assert results is not None and failed is not None, partition
    ok, bad = (
        set(results.column("custom_id").to_pylist()),
        set(failed.column("custom_id").to_pylist()),
    )
    assert len(ok) == results.num_rows and len(bad) == failed.num_rows and not ok & bad
    assert results.num_rows + failed.num_rows == ROWS, (
        partition,
        results.num_rows,
        failed.num_rows,
    )
    return results.num_rows, failed.num_rows


# -- 1. daemon + webserver on PostgreSQL, a backfill launched through GraphQL ----------------


@contextlib.contextmanager
def started(command: list[str], node: Machine, log: Path) -> Iterator[subprocess.Popen]:
    """A long-running Dagster process in its own process group; SIGTERM, then SIGKILL."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=node.cwd,
            env=node.env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def graphql(base: str, query: str, variables: dict) -> dict:
    response = httpx.post(
        f"{base}/graphql", json={"query": query, "variables": variables}, timeout=30
    )
    assert response.status_code == 200, response.text[:2000]
    body = response.json()
    assert not body.get("errors"), body["errors"]
    return body["data"]


FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}


def collect_everything(
    lake: Lake, daemon: subprocess.Popen, logs, postgres: Postgres, db: str
) -> None:
    """Wait until every partition's tables are on S3 (only the daemon's runs put them there)
    and every run (a submit and a collect per partition) has finished."""

    def collected() -> bool:
        assert daemon.poll() is None, logs()
        if not all(lake.table("failed", p) is not None for p in PARTITIONS):
            return False
        statuses = [status for (status,) in postgres.query(db, "SELECT status FROM runs")]
        return len(statuses) >= 2 * len(PARTITIONS) and set(statuses) <= FINISHED

    try:
        wait_until(collected, 240, "the sensor did not collect every partition", 2)
    except TimeoutError as exc:
        pytest.fail(f"{exc}: {lake.keys('')}\n{logs()}")


def test_a_backfill_on_postgres_and_s3_is_collected_by_the_daemon(
    tmp_path, postgres, provider, lake, moto_s3
):
    db = postgres.create_database("backfill")
    node = machine(tmp_path, "host", postgres, db, lake, moto_s3.endpoint_url, provider)
    bin_dir = Path(sys.executable).parent
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    daemon_log, web_log = tmp_path / "daemon.log", tmp_path / "webserver.log"
    web = [str(bin_dir / "dagster-webserver"), "-f", DEFS, "-h", "127.0.0.1", "-p", str(port)]
    daemon = [str(bin_dir / "dagster-daemon"), "run", "-f", DEFS]
    logs = lambda: f"--- daemon ---\n{_tail(daemon_log)}\n--- webserver ---\n{_tail(web_log)}"  # noqa: E731
    with started(web, node, web_log) as web_proc:

        def server_up() -> bool:
            assert web_proc.poll() is None, logs()
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{base}/server_info", timeout=2).status_code == 200
            return False

        wait_until(server_up, 120, "the webserver did not answer")
        params = {
            "partitionNames": PARTITIONS,
            "assetSelection": [{"path": ["rev_batches"]}],
            "fromFailure": False,
        }
        launched: dict = {}

        def launch() -> bool:  # the code location may still be loading
            answer = graphql(base, LAUNCH_BACKFILL, {"params": params})
            launched.update(answer["launchPartitionBackfill"])
            return launched["__typename"] == "LaunchBackfillSuccess"

        wait_until(launch, 60, f"backfill not launched: {launched}", interval=2)
        # The daemon starts after the launch: its backfill loop runs every 30 s, and its
        # first pass then sees the backfill at once.
        with started(daemon, node, daemon_log) as daemon_proc:
            collect_everything(lake, daemon_proc, logs, postgres, db)
    totals = [accounted(lake, p) for p in PARTITIONS]
    assert sum(bad for _, bad in totals) > 0, "10 % of requests fail: `failed` has rows"
    # The runs, their partitions and the sensor's ticks are in PostgreSQL, not on this host.
    runs = postgres.query(db, "SELECT status, run_body FROM runs")
    assert [status for status, _ in runs] == ["SUCCESS"] * 2 * len(PARTITIONS), runs
    collect_runs = [body for _, body in runs if '"infron/pipeline"' in body]
    assert len(collect_runs) == len(PARTITIONS)
    ticks = postgres.query(db, "SELECT count(*) FROM job_ticks")[0][0]
    assert ticks > 0
    assert lake.keys("locks") == []  # every partition lock on S3 was released


# -- 2. no hidden single-machine state: submit on one host, collect on another ---------------


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def dagster_only(home: Path) -> list[str]:
    """Files in a DAGSTER_HOME that Dagster itself did not put there (its config and the
    compute logs of the local compute log manager)."""
    return [
        path
        for path in files_under(home)
        if path != "dagster.yaml"
        and not (path.startswith("storage/") and path.endswith((".out", ".err", ".complete")))
    ]


def test_submit_on_one_host_and_collect_on_another(tmp_path, postgres, provider, lake, moto_s3):
    db = postgres.create_database("two_hosts")
    a, b = (
        machine(tmp_path, name, postgres, db, lake, moto_s3.endpoint_url, provider)
        for name in ("host_a", "host_b")
    )
    submitted = a.dagster("asset", "materialize", "--select", "rev_batches", "--partition", "p2")
    assert submitted.returncode == 0, _tail(a.log)
    # Host B's sensor sees host A's batches: it reads the lake, not A's disk or memory.
    preview = b.dagster("sensor", "preview", "rev_sensor")
    assert preview.returncode == 0, _tail(b.log)
    seen = ("returning run requests for 1 run(s)", "1 partition in flight: p2")  # done, or not yet
    assert any(text in preview.stdout for text in seen), _tail(b.log)
    time.sleep(1.5)  # the provider finishes a batch a second after it is created
    collected = b.dagster(
        "asset", "materialize", "--select", "rev_results,rev_failed", "--partition", "p2"
    )
    assert collected.returncode == 0, _tail(b.log)
    accounted(lake, "p2")

    for host in (a, b):
        assert files_under(host.cwd) == [], f"state left in the working directory of {host.cwd}"
        assert files_under(host.tmp) == [], f"temp files outlived their step: {host.tmp}"
        assert dagster_only(host.home) == [], f"library state in {host.home}"
    assert lake.keys("locks") == []  # the S3 lock was released by each run
    # Both hosts' runs are in the one database the instance shares.
    runs = postgres.query(db, "SELECT status FROM runs")
    assert sorted(status for (status,) in runs) == ["SUCCESS", "SUCCESS"], runs
