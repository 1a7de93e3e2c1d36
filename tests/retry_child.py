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
script, it is the fork server ``test_retry_queue.py`` sends cases to (``lake_child.serve``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import lake_child as lc
from harness import Pipeline

PARTS, ROWS, write_inputs = lc.PARTS, lc.ROWS, lc.write_inputs
MAX_ATTEMPTS = 3


def build(root: Path, **factory: Any) -> Pipeline:
    """The pipeline of every case (``lake_child.build_pipeline``): auto_retry with no
    backoff, 3 attempts."""
    options = {
        "auto_retry": True,
        "auto_retry_backoff_seconds": (0.0,),
        "max_attempts": MAX_ATTEMPTS,
    }
    return lc.build_pipeline(root, **{**options, **factory})


def collect_run(flow: Pipeline, instance: dg.DagsterInstance) -> None:
    request = dg.RunRequest(partition_key="a", asset_selection=flow.collect_keys)
    flow.run(instance, request)


STEPS = {
    "collect": collect_run,
    "retry": lambda flow, instance: flow.tick(instance),
    "drop": lambda flow, instance: flow.tick(instance),
}


if __name__ == "__main__":
    lc.serve(build, STEPS, failure_rate=0.5)
