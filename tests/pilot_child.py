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
script, it is the fork server ``test_pilot_kills.py`` sends cases to (``lake_child.serve``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import lake_child as lc
from harness import Pipeline

PARTS, ROWS, write_inputs = lc.PARTS, lc.ROWS, lc.write_inputs
PILOT = 2
MAX_TOKENS = 16


def build(root: Path, **factory: Any) -> Pipeline:
    """The pipeline of every case (``lake_child.build_pipeline``): a pipeline-scope pilot of
    2 rows that passes unless more than 90 % of them fail; the rest of a partition (4 rows)
    in 2 chunks of 3."""
    options = {"pilot_rows": PILOT, "pilot_scope": "pipeline", "max_failure_rate": 0.9}
    return lc.build_pipeline(root, params={"max_tokens": MAX_TOKENS}, **{**options, **factory})


def submit_run(flow: Pipeline, instance: dg.DagsterInstance) -> Any:
    """A person's materialization of ``a`` (not raising: a killed case reruns it)."""
    return flow.submit(instance, "a", raise_on_error=False)


STEPS = {
    "pilot_submit": submit_run,
    "pilot_collect": lambda flow, instance: flow.tick(instance),
    "release": lambda flow, instance: flow.tick(instance),
    "stop": lambda flow, instance: flow.tick(instance),
}


if __name__ == "__main__":
    lc.serve(build, STEPS)
