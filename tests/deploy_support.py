"""A throwaway PostgreSQL server and Dagster instances on it, for the deployment tests.

PostgreSQL 15's ``initdb`` and ``pg_ctl`` refuse to run as root, so as root they run as the
``postgres`` user (``runuser``) in a folder that user owns. The server listens on a free
loopback port with durability off (``fsync=off``): it lives for one test module.
When the server binaries are missing and we are root with apt, they are installed
(Debian's ``postgresql`` package), so a fresh machine runs the suite; when the server still
cannot start, the caller fails the test with the reason: nothing is skipped.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PG_USER = "dagster"
PG_PASSWORD = "dagster-test"  # trust auth ignores it; given to show the EnvVar in dagster.yaml

# What the UI sends to launch a partition backfill (both deployment tests use it).
LAUNCH_BACKFILL = """
mutation($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on Error { message }
  }
}
"""


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server could not be found, installed or started; the message says why."""


@dataclass
class Postgres:
    """A running server: connect as ``dagster`` on ``127.0.0.1:port``."""

    port: int
    folder: str

    def dsn(self, db: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={PG_USER} dbname={db}"

    def create_database(self, name: str) -> str:
        """A new empty database (one per test: nothing shared by accident)."""
        import psycopg2

        conn = psycopg2.connect(self.dsn())
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return name

    def query(self, db: str, sql: str) -> list[tuple]:
        import psycopg2

        with contextlib.closing(psycopg2.connect(self.dsn(db))) as conn, conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bindir() -> str | None:
    """The newest installed PostgreSQL server's bin folder (Debian layout, or pg_config)."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2] or 0)
    )
    for folder in reversed(candidates):
        if os.path.exists(os.path.join(folder, "initdb")):
            return folder
    found = shutil.which("initdb")
    return os.path.dirname(found) if found else None


def _install() -> None:
    """Install Debian's PostgreSQL server (root with apt only); errors say what failed."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise PostgresUnavailable(
            "PostgreSQL server binaries (initdb, pg_ctl) not found; install PostgreSQL "
            "(Debian: apt-get install postgresql) to run the deployment tests"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "postgresql"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise PostgresUnavailable(
                f"installing PostgreSQL failed ({' '.join(command)}): {done.stderr[-2000:]}"
            )


def _as_server_user(command: list[str]) -> list[str]:
    """Run as ``postgres`` when we are root (initdb refuses root), else as ourselves."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _run(command: list[str], what: str, log: str | None = None) -> None:
    done = subprocess.run(
        _as_server_user(command), capture_output=True, text=True, timeout=120, cwd="/"
    )
    if done.returncode != 0:
        tail = Path(log).read_text(errors="replace")[-3000:] if log and os.path.exists(log) else ""
        raise PostgresUnavailable(
            f"{what} failed with exit code {done.returncode}:\n{done.stdout}{done.stderr}{tail}"
        )


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    """Start PostgreSQL in a temporary folder on a free loopback port; stop and remove it."""
    bindir = _bindir()
    if bindir is None:
        _install()
        bindir = _bindir()
        if bindir is None:
            raise PostgresUnavailable("PostgreSQL was installed but initdb is still not found")
    # Not under pytest's tmp_path: its parents are private to root, and the server runs as
    # the postgres user.
    folder = tempfile.mkdtemp(prefix="infron-pg-")
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    data, log, port = os.path.join(folder, "data"), os.path.join(folder, "server.log"), free_port()
    options = (
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    )
    ctl = os.path.join(bindir, "pg_ctl")
    started = False
    try:
        _run(
            [
                os.path.join(bindir, "initdb"),
                "-D",
                data,
                "-U",
                PG_USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            "initdb",
        )
        _run([ctl, "-D", data, "-o", options, "-l", log, "-w", "-t", "60", "start"], "pg_ctl", log)
        started = True
        yield Postgres(port, folder)
    finally:
        if started:
            subprocess.run(
                _as_server_user([ctl, "-D", data, "-m", "immediate", "stop"]),
                capture_output=True,
                timeout=60,
                cwd="/",
            )
        shutil.rmtree(folder, ignore_errors=True)


def write_instance(home: Path, postgres: Postgres, db: str) -> None:
    """``dagster.yaml``: run, event log and schedule storage in PostgreSQL; short intervals.

    The password comes from the environment (``DAGSTER_PG_PASSWORD``), as a secret would.
    """
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(
        f"""\
storage:
  postgres:
    postgres_db:
      username: {PG_USER}
      password:
        env: DAGSTER_PG_PASSWORD
      hostname: 127.0.0.1
      db_name: {db}
      port: {postgres.port}
      # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; dagster-postgres ships psycopg2.
      scheme: postgresql+psycopg2
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1
telemetry:
  enabled: false
""",
        encoding="utf-8",
    )


def wait_until(predicate, timeout: float, what: str, interval: float = 1.0) -> None:
    """Poll ``predicate`` until it is true; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(interval)
