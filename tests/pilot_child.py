"""The child of ``test_pilot_kills.py``: runs one step of a pipeline-scope pilot through the
real code and SIGKILLs itself at its k-th write point, counted as
``restart_child.install_hooks`` counts them (each lake write or delete before it, each paid
call to the provider after it returned, the create also before it).

The steps, from the states ``test_pilot_kills.py`` prepares:

- ``pilot_submit``: the first submission of ``a`` (the pilot: its queue marker, the
  prompt's ``pending`` record, its manifest, its batch);
- ``pilot_collect``: one daemon iteration once the pilot's batch ended: the tick that
  requests its collection, then that run (the marker written again, the commit point);
- ``release``: one daemon iteration after a passed pilot: the tick that requests the release
  run, then that run (the ``passed`` record, the release attempt, its batches);
- ``stop``: the same after a pilot that failed: the tick and the stop run (the ``stopped``
  record, the rest failed as ``pilot_stopped``).

Also the one definition of the pipeline that the child and the test build alike. Run as a
script, it is the fork server ``test_pilot_kills.py`` sends cases to (see ``serve``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import restart_child as rc
from harness import Pipeline

from infron_dagster import InfronResource, ParquetSource

PARTS = dg.StaticPartitionsDefinition(["a", "b"])
ROWS = 6
PILOT = 2
MAX_TOKENS = 16


def write_inputs(folder: Path) -> None:
    """6 rows of ``a`` (ids 0-5) and of ``b`` (100-105), one Parquet file each."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, key in enumerate(PARTS.get_partition_keys()):
        ids = list(range(n * 100, n * 100 + ROWS))
        table = pa.table({"id": ids, "text": [f"review {i}" for i in ids]})
        pq.write_table(table, folder / f"{key}.parquet")


def build(root: Path, **factory: Any) -> Pipeline:
    """The pipeline of every case: ``root`` holds its lake, server state (``local``) and
    inputs; openai style (a create whose answer was lost is found again by listing), a
    pipeline-scope pilot of 2 rows that passes unless more than 90 % of them fail, the rest
    of a partition (4 rows) in 2 chunks of 3."""
    resource = InfronResource(
        base_url=f"local://{root / 'local'}", api_style="openai", max_retries=2
    )
    options = {
        "source": ParquetSource(str(root / "inputs" / "{partition_key}.parquet")),
        "max_requests_per_batch": 3,
        "pilot_rows": PILOT,
        "pilot_scope": "pipeline",
        "max_failure_rate": 0.9,
        **factory,
    }
    return Pipeline.build(root, resource, PARTS, params={"max_tokens": MAX_TOKENS}, **options)


def submit_run(flow: Pipeline, instance: dg.DagsterInstance) -> Any:
    """A person's materialization of ``a`` (not raising: a killed case reruns it)."""
    return flow.submit(instance, "a", raise_on_error=False)


STEPS = {
    "pilot_submit": submit_run,
    "pilot_collect": lambda flow, instance: flow.tick(instance),
    "release": lambda flow, instance: flow.tick(instance),
    "stop": lambda flow, instance: flow.tick(instance),
}


def run_step(step: str, root: str, kill_at: int, log_path: str) -> None:
    """The child's body: build the pipeline, hook the writes, run the step."""
    points = rc.install_hooks(kill_at, log_path)
    flow = build(Path(root))
    # In memory: the test's sensor does not see the killed run (as after a lost worker)
    STEPS[step](flow, dg.DagsterInstance.ephemeral())
    os.write(points.fd, f"done\t{points.count}\n".encode())


def _warm_up() -> None:
    """A pilot, its collection and its release on a throwaway lake (no hooks), so what
    Dagster builds lazily on a first run is in the server before it forks."""
    import tempfile

    from conftest import make_local_dir

    stderr = os.dup(2)
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as quiet:
        os.dup2(quiet.fileno(), 2)
        try:
            root = Path(tmp)
            write_inputs(root / "inputs")
            make_local_dir(str(root / "local"))
            flow = build(root)
            instance = dg.DagsterInstance.ephemeral()
            flow.submit(instance, "a")
            for _ in range(2):
                flow.tick(instance)
        finally:
            os.dup2(stderr, 2)
            os.close(stderr)


def serve() -> None:
    """The fork server ``test_pilot_kills.py`` sends its kill cases to (``rc.fork_server``)."""

    def run(command: dict[str, Any]) -> None:
        run_step(command["step"], command["case"]["root"], command["kill_at"], command["log"])

    rc.fork_server(_warm_up, run)


if __name__ == "__main__":
    serve()
