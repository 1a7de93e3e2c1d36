"""What the kill-case children on one lake root share (``retry_child.py``, ``pilot_child.py``):
the inputs, the pipeline's common options, the step runner, the warm-up and the fork server.

A case is a folder ``root`` holding the lake, the embedded local server's state
(``root/local``, on disk: child and test share it) and the inputs (``root/inputs``, one Parquet
file per partition). The child runs one step of the pipeline with
``restart_child.install_hooks`` counting its write points, and SIGKILLs itself at the k-th.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import restart_child as rc
from conftest import make_local_dir
from harness import Pipeline

from infron_dagster import InfronResource, ParquetSource

PARTS = dg.StaticPartitionsDefinition(["a", "b"])
ROWS = 6

Steps = dict[str, Callable[[Pipeline, dg.DagsterInstance], Any]]


def write_inputs(folder: Path) -> None:
    """6 rows of ``a`` (ids 0-5) and of ``b`` (100-105), one Parquet file each."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, key in enumerate(PARTS.get_partition_keys()):
        ids = list(range(n * 100, n * 100 + ROWS))
        table = pa.table({"id": ids, "text": [f"review {i}" for i in ids]})
        pq.write_table(table, folder / f"{key}.parquet")


def build_pipeline(root: Path, **options: Any) -> Pipeline:
    """The pipeline on ``root``: openai style (a create whose answer was lost is found again
    by listing), a partition's rows in chunks of 3, then ``options`` (factory options and
    ``Pipeline.build``'s own)."""
    resource = InfronResource(
        base_url=f"local://{root / 'local'}", api_style="openai", max_retries=2
    )
    options = {
        "source": ParquetSource(str(root / "inputs" / "{partition_key}.parquet")),
        "max_requests_per_batch": 3,
        **options,
    }
    return Pipeline.build(root, resource, PARTS, **options)


def run_step(
    build: Callable[[Path], Pipeline], steps: Steps, step: str, root: str, kill_at: int, log: str
) -> None:
    """The child's body: build the pipeline, hook the writes, run the step."""
    points = rc.install_hooks(kill_at, log)
    flow = build(Path(root))
    # In memory: the test's sensor does not see the killed run (as after a lost worker)
    steps[step](flow, dg.DagsterInstance.ephemeral())
    os.write(points.fd, f"done\t{points.count}\n".encode())


def warm_up(build: Callable[[Path], Pipeline], **server_knobs: Any) -> None:
    """A submit and two daemon iterations on a throwaway lake (no hooks), so what Dagster
    builds lazily on a first run is in the fork server before it forks."""
    stderr = os.dup(2)
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as quiet:
        os.dup2(quiet.fileno(), 2)  # the warm-up's logs are nobody's business
        try:
            root = Path(tmp)
            write_inputs(root / "inputs")
            make_local_dir(str(root / "local"), **server_knobs)
            flow = build(root)
            instance = dg.DagsterInstance.ephemeral()
            flow.submit(instance, "a")
            for _ in range(2):
                flow.tick(instance)
        finally:
            os.dup2(stderr, 2)
            os.close(stderr)


def serve(build: Callable[[Path], Pipeline], steps: Steps, **server_knobs: Any) -> None:
    """The fork server (``restart_child.fork_server``) of a test's kill cases; a command's
    case is ``{"root": ...}``."""

    def run(command: dict[str, Any]) -> None:
        case = command["case"]
        run_step(build, steps, command["step"], case["root"], command["kill_at"], command["log"])

    rc.fork_server(lambda: warm_up(build, **server_knobs), run)
