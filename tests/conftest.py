"""Shared fixtures: a local server folder with instant timing, a served local server,
and moto's S3 server. Everything is real: real HTTP, real files, real Dagster instances."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from infron_dagster.local import LocalServerConfig, save_config
from infron_dagster.local.process import serve_in_subprocess
from infron_dagster.resources import InfronResource

INSTANT = {"validating_seconds": 0.0, "in_progress_seconds": 0.0, "finalizing_seconds": 0.0}


def make_local_dir(path: str, **knobs: object) -> str:
    """A local-server state folder whose config (saved on disk) is instant plus ``knobs``."""
    os.makedirs(path, exist_ok=True)
    save_config(path, LocalServerConfig(**{**INSTANT, **knobs}))
    return path


@pytest.fixture
def local_dir(tmp_path) -> str:
    """An instant, fault-free local server folder."""
    return make_local_dir(str(tmp_path / "local"))


# The wire contract of each area (submit, collect's result shapes, poll, cancel, the client)
# runs in both styles; behaviour that is lake logic runs in one, to keep the suite fast.
BOTH_STYLES = pytest.mark.parametrize("api_style", ["infron", "openai"])


@pytest.fixture
def api_style() -> str:
    """The wire style of a test: infron, unless the test is marked ``BOTH_STYLES``."""
    return "infron"


@pytest.fixture
def resource(local_dir, api_style) -> InfronResource:
    """An InfronResource on the embedded local server, in the parametrised style."""
    return InfronResource(base_url=f"local://{local_dir}", api_style=api_style, max_retries=3)


@pytest.fixture
def infron_resource(local_dir) -> InfronResource:
    """For tests where the wire style does not matter: one style only, to keep the suite fast."""
    return InfronResource(base_url=f"local://{local_dir}", api_style="infron", max_retries=3)


def dagster_instance():
    """Dagster's in-memory instance: what ``dg.materialize`` runs on when given none.

    Runs and events live in an in-memory SQLite and steps capture no compute logs. Every run of
    these tests happens in this process, so nothing needs the instance on disk; a temporary
    SQLite instance (``dg.instance_for_test``) spent a third of a test's CPU creating a database
    per run and connecting per event. The deployment tests (``dagster dev``, the daemon,
    PostgreSQL, ``dg``) run on real on-disk instances.
    """
    import dagster as dg

    return dg.DagsterInstance.ephemeral()


@pytest.fixture(scope="module")
def instance():
    """One Dagster instance per module: the library keeps no state in it."""
    with dagster_instance() as inst:
        yield inst


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Served:
    base_url: str
    data_dir: str
    api_key: str


@pytest.fixture
def served_local(tmp_path) -> Iterator[Served]:
    """``infron-local serve`` as a real process on a free port, with an API key."""
    data_dir = str(tmp_path / "served")
    key = "sk-test-served-123456"
    instant = [
        "--validating-seconds",
        "0",
        "--in-progress-seconds",
        "0",
        "--finalizing-seconds",
        "0",
    ]
    with serve_in_subprocess(data_dir, "--api-key", key, *instant) as base_url:
        yield Served(base_url, data_dir, key)


@dataclass
class S3:
    endpoint_url: str
    bucket: str

    @property
    def storage_options(self) -> dict[str, object]:
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"},
        }


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[S3]:
    """moto's S3 server as a real HTTP endpoint on a free port, with one bucket."""
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.1)
    import s3fs

    # No region here: s3fs would send it as a LocationConstraint, which us-east-1 refuses.
    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": url})
    fs.mkdir("lake")
    try:
        yield S3(url, "lake")
    finally:
        proc.terminate()  # moto's server may hold on to a keep-alive thread: then kill it
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# -- a scripted HTTP server, for answers the local emulator cannot give ---------------------


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Scripted:
    """A tiny real HTTP server: answers each path from a script, records every request."""

    base: str
    script: dict[str, list[Answer | Callable[[str | None], Answer]]]
    seen: list[tuple[str, str, str | None]] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture
def scripted() -> Iterator[Callable[[dict[str, list[Any]]], Scripted]]:
    """Real http.server instances on free ports. Used where the local emulator cannot answer
    as needed (a foreign result host, redirects, 402/403/408/409, Retry-After alone, an error
    body that echoes the key): faking the server is the only way to get those answers."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(script: dict[str, list[Any]]) -> Scripted:
        holder: list[Scripted] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                me = holder[0]
                path = self.path.split("?")[0]
                me.seen.append((self.command, path, self.headers.get("Authorization")))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                queue = me.script.get(path) or [Answer(404, b'{"error": {"message": "nope"}}')]
                answer = queue.pop(0) if len(queue) > 1 else queue[0]
                if callable(answer):
                    answer = answer(self.headers.get("Authorization"))
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        holder.append(Scripted(f"http://127.0.0.1:{server.server_address[1]}", script))
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return holder[0]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def json_answer(obj: Any, status: int = 200, **headers: str) -> Answer:
    return Answer(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **headers})


# -- the review pipeline most Dagster-level tests build -------------------------------------------


class Clock:
    """A settable clock standing in for ``time.time`` inside the local server's app and
    engine, so a test moves batches through their states without waiting."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    @classmethod
    def install(cls, monkeypatch: pytest.MonkeyPatch, now: float | None = None) -> Clock:
        import infron_dagster.local.app as app_module
        import infron_dagster.local.engine as engine_module

        fake = cls(now)
        monkeypatch.setattr(app_module, "time", fake)
        monkeypatch.setattr(engine_module, "time", fake)
        return fake


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The local server's clock, settable (starts at the real time)."""
    return Clock.install(monkeypatch)


def tick_and_run(sensor: Any, defs: Any, resources: dict[str, Any], instance: Any) -> list[Any]:
    """One sensor tick, and the runs it requests executed in process, as the daemon would."""
    import dagster as dg

    context = dg.build_sensor_context(instance=instance, definitions=defs, resources=resources)
    result = sensor(context)
    assert isinstance(result, dg.SensorResult)
    job = defs.resolve_implicit_global_asset_job_def()
    return [
        job.execute_in_process(
            partition_key=request.partition_key,
            asset_selection=request.asset_selection,
            tags=request.tags,
            run_config=request.run_config,
            instance=instance,
        )
        for request in result.run_requests
    ]


def review_pipeline(tmp_path, resource: InfronResource, partitions_def: Any, **kw: Any) -> Any:
    """``harness.Pipeline.build``: ``rows`` reviews per partition, 7 requests per batch, the
    lake and IO under tmp_path (imported here lazily: unit tests need no Dagster)."""
    from harness import Pipeline

    return Pipeline.build(tmp_path, resource, partitions_def, **kw)


# -- tiers: unit, emulator, dagster, deploy (`make test-fast` runs the first two) ------------

DEPLOY_FILES = {
    "test_daemon.py",
    "test_deploy_postgres.py",
    "test_dg_cli.py",
    "test_example_project.py",
    "test_restart_submit_local.py",
    "test_restart_submit_s3.py",
    "test_restart_later_local.py",
    "test_restart_later_s3.py",
}
_EMULATOR_FIXTURES = {"local_dir", "resource", "infron_resource", "served_local", "scripted"}


def _tier(item: pytest.Item) -> str:
    """A test's tier from what it needs: real processes and services (deploy), Dagster
    machinery (dagster), the local server or other real servers (emulator), nothing (unit)."""
    module = getattr(item, "module", None)
    name = os.path.basename(str(item.fspath))
    if name in DEPLOY_FILES:
        return "deploy"
    imported = set(vars(module)) if module is not None else set()
    if {"dg", "dagster"} & imported:
        return "dagster"
    fixtures = set(getattr(item, "fixturenames", ()))
    servers = {"moto_s3", *_EMULATOR_FIXTURES}
    if fixtures & servers or any(n in imported for n in ("create_app", "Store", "InfronClient")):
        return "emulator"
    return "unit"


# xdist (`--dist loadfile --no-loadscope-reorder`, see the Makefile) hands out whole files in
# this order: the files that take longest (measured with --durations=0) first, so that `make
# test` does not end waiting for one of them started last. (The kill-point cases of
# restart_anywhere.py, 130 s in all, are spread over four files for the same reason.)
SLOW_FIRST = (
    "test_daemon.py",
    "test_deploy_postgres.py",
    "test_dg_cli.py",
    "test_restart_submit_local.py",
    "test_restart_later_local.py",
    "test_admission.py",
    "test_pilot_kills.py",
    "test_restart_later_s3.py",
    "test_retry_queue.py",
    "test_restart_submit_s3.py",
    "test_control_state.py",
    "test_crash_submit.py",
    "test_client.py",
    "test_storage_lock.py",
    "test_local_server_hostile.py",
    "test_pilot.py",
    "test_pipeline.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(_tier(item))

    def rank(item: pytest.Item) -> int:
        name = os.path.basename(str(item.fspath))
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the order within a file is kept
