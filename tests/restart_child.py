"""The child of ``restart_anywhere.py``: runs one step of a pipeline (a submit run, a
sensor tick and the runs it requests, a cancel run, a collect run) through the real code and
kills itself (SIGKILL) at its k-th write point.

A write point is each write to the lake (``BatchStorage.write_bytes``, ``open_write``,
``upload_file``, ``delete``, ``delete_many``; ``write_json`` and ``write_table`` go through
``write_bytes``), counted *before* the write (the kill leaves it undone), and each paid or
state-changing call to the provider (``create_batch``, ``cancel_batch``, ``upload_file``),
counted *after* it returned (the provider did it, the process never recorded it). Killed
before point k is killed after point k-1, so sweeping k over 1..N stops the step at every
place a write could be lost.

Every point reached is appended to ``log_path`` before the kill (one line: the number, the
kind, the path or call), so the test can name what was written last.

Also the one definition of the pipeline that the child and the test build alike. Run as a
script, it is the fork server the test sends cases to (see ``serve``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import pandas as pd
import pyarrow.parquet  # noqa: F401  (imported in the fork server: children start warm)
import s3fs  # noqa: F401

from infron_dagster import (
    Budget,
    InfronResource,
    ModelPrice,
    RequestSpec,
    build_infron_batch_assets,
)
from infron_dagster.client import InfronClient
from infron_dagster.storage import BatchStorage

NAME = "rev"
KEY = "a"
PARTITIONS = dg.StaticPartitionsDefinition([KEY])
ROWS = 6
PER_CHUNK = 3  # 2 chunks
MAX_TOKENS = 16
# One chunk is ~3 x 16 output tokens plus its input share (~60 in all): one fits, two do not.
LIMIT = 100
PRICE = ModelPrice(input_per_million=1.0, output_per_million=4.0)
BUDGET = Budget(max_cost_per_day=10.0, max_cost_per_partition=1.0)


@dataclass
class Case:
    """Where one case's lake, server state and IO live (picklable: sent to the child)."""

    root: str  # storage_root: a folder, or s3://bucket/prefix
    server_dir: str  # the local server's state (embedded, on disk: child and test share it)
    io_dir: str  # the upstream asset's IO manager folder
    storage_options: dict[str, Any] | None = None
    api_style: str = "openai"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Flow:
    pipeline: Any
    upstream: Any
    resources: dict[str, Any]
    defs: dg.Definitions

    @property
    def storage(self) -> BatchStorage:
        return self.pipeline.storage

    @property
    def job(self) -> dg.JobDefinition:
        return self.defs.resolve_implicit_global_asset_job_def()


def build_flow(case: Case) -> Flow:
    """The pipeline under test: 6 rows in 2 chunks, an admission limit one chunk fits, a
    price and a budget (so every submission reserves in the day ledger), openai style
    (its list call is what re-attaches a batch whose create answer was lost)."""

    @dg.asset(name="reviews", partitions_def=PARTITIONS)
    def reviews():
        return pd.DataFrame({"id": range(ROWS), "text": [f"review {i}" for i in range(ROWS)]})

    resource = InfronResource(
        base_url=f"local://{case.server_dir}", api_style=case.api_style, max_retries=2
    )
    pipeline = build_infron_batch_assets(
        name=NAME,
        spec=RequestSpec(
            model="gpt-4o-mini",
            prompt_template="Sentiment of {text}",
            key_columns="id",
            params={"max_tokens": MAX_TOKENS},
        ),
        source="reviews",
        partitions_def=PARTITIONS,
        storage_root=case.root,
        storage_options=case.storage_options,
        max_requests_per_batch=PER_CHUNK,
        max_enqueued_tokens=LIMIT,
        price=PRICE,
        budget=BUDGET,
    )
    resources = {
        "infron": resource,
        "io_manager": dg.FilesystemIOManager(base_dir=case.io_dir),
    }
    defs = dg.Definitions.merge(
        pipeline.definitions, dg.Definitions(assets=[reviews], resources=resources)
    )
    return Flow(pipeline, reviews, resources, defs)


# --- the kill hook ---------------------------------------------------------------------------


class _Points:
    def __init__(self, kill_at: int, log_path: str) -> None:
        self.kill_at, self.count = kill_at, 0
        self.fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def hit(self, kind: str, what: Any) -> None:
        self.count += 1
        os.write(self.fd, f"{self.count}\t{kind}\t{what}\n".encode())
        if self.count == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def _path(path: Any) -> str:
    return str(getattr(path, "path", path))


def install_hooks(kill_at: int, log_path: str) -> _Points:
    """Wrap every lake write (counted before it) and every provider call that changes state
    (counted after it); the ``kill_at``-th point SIGKILLs this process (0: never)."""
    points = _Points(kill_at, log_path)

    def before(name: str, describe):
        real = getattr(BatchStorage, name)

        def wrapped(self, *args, **kwargs):
            points.hit(f"storage.{name}", describe(*args))
            return real(self, *args, **kwargs)

        setattr(BatchStorage, name, wrapped)

    before("write_bytes", lambda path, *_: _path(path))
    before("open_write", lambda path, *_: _path(path))
    before("upload_file", lambda local, dest, *_: _path(dest))
    before("delete", lambda path, *_: _path(path))

    real_many = BatchStorage.delete_many

    def delete_many(self, paths, *args, **kwargs):
        paths = list(paths)
        if paths:  # nothing to delete is no write
            points.hit("storage.delete_many", [_path(p) for p in paths])
        return real_many(self, paths, *args, **kwargs)

    BatchStorage.delete_many = delete_many  # type: ignore[method-assign]

    def after(name: str):
        real = getattr(InfronClient, name)

        def wrapped(self, *args, **kwargs):
            if name == "create_batch":  # the intent is on storage, the call not made yet
                points.hit("client.create_batch<", kwargs.get("idempotency_key"))
            result = real(self, *args, **kwargs)
            shown = getattr(result, "id", result) if name != "upload_file" else result
            points.hit(f"client.{name}" + (">" if name == "create_batch" else ""), shown)
            return result

        setattr(InfronClient, name, wrapped)

    for name in ("create_batch", "cancel_batch", "upload_file"):
        after(name)
    return points


# --- the steps -------------------------------------------------------------------------------


def submit_run(flow: Flow, instance: dg.DagsterInstance, **kwargs: Any) -> Any:
    """A run of ``rev_batches`` for the partition (the upstream is already materialized)."""
    return flow.job.execute_in_process(
        partition_key=KEY,
        asset_selection=[flow.pipeline.batches_asset.key],
        instance=instance,
        raise_on_error=False,
        **kwargs,
    )


def collect_run(flow: Flow, instance: dg.DagsterInstance) -> Any:
    return flow.job.execute_in_process(
        partition_key=KEY,
        asset_selection=[flow.pipeline.results_key, flow.pipeline.failed_key],
        instance=instance,
        raise_on_error=False,
    )


def cancel_run(flow: Flow, instance: dg.DagsterInstance) -> Any:
    job = flow.defs.resolve_job_def(f"{NAME}_cancel")
    return job.execute_in_process(partition_key=KEY, instance=instance, raise_on_error=False)


def tick_and_run(flow: Flow, instance: dg.DagsterInstance, cursor: str | None = None):
    """One sensor tick and the runs it requests, as one daemon iteration would."""
    context = dg.build_sensor_context(
        instance=instance, definitions=flow.defs, resources=flow.resources, cursor=cursor
    )
    result = flow.pipeline.sensor(context)
    runs = []
    for request in result.run_requests or []:
        runs.append(
            flow.job.execute_in_process(
                partition_key=request.partition_key,
                asset_selection=request.asset_selection,
                tags=request.tags,
                run_config=request.run_config,
                instance=instance,
                raise_on_error=False,
            )
        )
    return result, runs


STEPS = {
    "submit": lambda flow, instance: submit_run(flow, instance),
    "admission": lambda flow, instance: tick_and_run(flow, instance),
    "cancel": lambda flow, instance: cancel_run(flow, instance),
    "collect": lambda flow, instance: collect_run(flow, instance),
}


def run_step(step: str, case: Case, kill_at: int, log_path: str) -> None:
    """The child's body: build the pipeline, hook the writes, run the step."""
    points = install_hooks(kill_at, log_path)
    flow = build_flow(case)
    # An in-memory instance: the library keeps no state in Dagster's (and the test's sensor
    # does not see the killed run, like a run launched by hand).
    STEPS[step](flow, dg.DagsterInstance.ephemeral())
    os.write(points.fd, f"done\t{points.count}\n".encode())


def _warm_up() -> None:
    """Run each step once on a throwaway lake (no hooks yet), so that what Dagster imports
    and builds lazily
    on its first run is in the server before it forks: each child starts warm."""
    import tempfile

    from infron_dagster.local import LocalServerConfig, save_config

    stderr = os.dup(2)
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as quiet:
        os.dup2(quiet.fileno(), 2)  # the warm-up's logs are nobody's business
        try:
            case = Case(root=f"{tmp}/lake", server_dir=f"{tmp}/server", io_dir=f"{tmp}/io")
            os.makedirs(case.server_dir)
            save_config(case.server_dir, LocalServerConfig(0.0, 0.0, 0.0))
            flow = build_flow(case)
            instance = dg.DagsterInstance.ephemeral()
            dg.materialize(
                [flow.upstream], partition_key=KEY, resources=flow.resources, instance=instance
            )
            submit_run(flow, instance)
            tick_and_run(flow, instance)
            collect_run(flow, instance)
            cancel_run(flow, instance)
        finally:
            os.dup2(stderr, 2)
            os.close(stderr)


# --- a fork server: children start with everything imported, in milliseconds ------------------


def fork_server(warm_up: Callable[[], None], run: Callable[[dict[str, Any]], None]) -> None:
    """Read one JSON command a line from stdin; fork a child per command that calls ``run``
    with it (its output to ``<log>.out``); answer ``{"pid"}`` at once and ``{"status"}`` when
    it ended (the negative signal number, or the exit code). Single-threaded, so forking is
    safe; ``warm_up`` runs first, so that each child starts with Dagster imported and built."""
    out = sys.stdout
    warm_up()
    for line in sys.stdin:
        command = json.loads(line)
        log = command["log"]
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                fd = os.open(log + ".out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdout = os.fdopen(1, "w", buffering=1)
                sys.stderr = os.fdopen(2, "w", buffering=1)
                run(command)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        out.write(json.dumps({"status": code}) + "\n")
        out.flush()


def serve() -> None:
    """The fork server of the restart-anywhere cases (``restart_anywhere.ForkServer``)."""

    def run(command: dict[str, Any]) -> None:
        run_step(command["step"], Case(**command["case"]), command["kill_at"], command["log"])

    fork_server(_warm_up, run)


if __name__ == "__main__":
    serve()
