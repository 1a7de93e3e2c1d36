"""The child of the kill cases of ``test_retry_queue.py``: runs one step of an ``auto_retry``
pipeline through the real code and SIGKILLs itself at its k-th write point, counted as
``restart_child.install_hooks`` counts them (each lake write or delete before it, each paid
call to the provider after it returned, the create also before it).

The steps, from the states ``test_retry_queue.py`` prepares:

- ``collect``: the collection of attempt 1 (its batches ended with retryable failures),
  which writes the retry marker before its commit point;
- ``retry``: one daemon iteration on a collected partition whose marker is due: the tick
  that requests the automatic retry, then that run (attempt 2);
- ``drop``: one daemon iteration once attempt 2 ended: the tick that deletes the marker of
  attempt 1 and requests the collection of attempt 2, then that run.

Also the one definition of the pipeline that the child and the test build alike. Run as a
script, it is the fork server ``test_retry_queue.py`` sends cases to (see ``serve``).
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
MAX_ATTEMPTS = 3


def write_inputs(folder: Path) -> None:
    """6 rows of ``a`` (ids 0-5) and of ``b`` (100-105), one Parquet file each."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, key in enumerate(PARTS.get_partition_keys()):
        ids = list(range(n * 100, n * 100 + ROWS))
        table = pa.table({"id": ids, "text": [f"review {i}" for i in ids]})
        pq.write_table(table, folder / f"{key}.parquet")


def build(root: Path, **factory: Any) -> Pipeline:
    """The pipeline of every case: ``root`` holds its lake, server state (``local``) and
    inputs; openai style, 2 chunks of 3, auto_retry with no backoff, 3 attempts."""
    resource = InfronResource(
        base_url=f"local://{root / 'local'}", api_style="openai", max_retries=2
    )
    options = {
        "source": ParquetSource(str(root / "inputs" / "{partition_key}.parquet")),
        "max_requests_per_batch": 3,
        "auto_retry": True,
        "auto_retry_backoff_seconds": (0.0,),
        "max_attempts": MAX_ATTEMPTS,
        **factory,
    }
    return Pipeline.build(root, resource, PARTS, **options)


def collect_run(flow: Pipeline, instance: dg.DagsterInstance) -> None:
    request = dg.RunRequest(partition_key="a", asset_selection=flow.collect_keys)
    flow.run(instance, request)


STEPS = {
    "collect": collect_run,
    "retry": lambda flow, instance: flow.tick(instance),
    "drop": lambda flow, instance: flow.tick(instance),
}


def run_step(step: str, root: str, kill_at: int, log_path: str) -> None:
    """The child's body: build the pipeline, hook the writes, run the step."""
    points = rc.install_hooks(kill_at, log_path)
    flow = build(Path(root))
    # In memory: the test's sensor does not see the killed run (as after a lost worker)
    STEPS[step](flow, dg.DagsterInstance.ephemeral())
    os.write(points.fd, f"done\t{points.count}\n".encode())


def _warm_up() -> None:
    """A submit, a collection and a retry on a throwaway lake (no hooks), so what Dagster
    builds lazily on a first run is in the server before it forks."""
    import tempfile

    from conftest import make_local_dir

    stderr = os.dup(2)
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as quiet:
        os.dup2(quiet.fileno(), 2)
        try:
            root = Path(tmp)
            write_inputs(root / "inputs")
            make_local_dir(str(root / "local"), failure_rate=0.5)
            flow = build(root)
            instance = dg.DagsterInstance.ephemeral()
            flow.submit(instance, "a")
            for _ in range(2):
                flow.tick(instance)
        finally:
            os.dup2(stderr, 2)
            os.close(stderr)


def serve() -> None:
    """The fork server ``test_retry_queue.py`` sends its kill cases to (``rc.fork_server``)."""

    def run(command: dict[str, Any]) -> None:
        run_step(command["step"], command["case"]["root"], command["kill_at"], command["log"])

    rc.fork_server(_warm_up, run)


if __name__ == "__main__":
    serve()
