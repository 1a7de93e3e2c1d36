"""Restart anywhere, for the pilot (issue 18): kill -9 at each write point of a pilot's state
(the pilot book under ``<name>/_pilots/``, the ``pilot`` marks of the manifests), then let the
sensor run unattended; the partition converges, nothing is paid twice, nothing is sent after
a stop beyond the pilot, and the pilot book is left with nothing queued.

Each case starts from a copy of a prepared lake and server (``pilot_child.build``: the
embedded local server in openai style, its state on disk; 6 rows of ``a`` from a
ParquetSource, a pipeline-scope pilot of 2 rows, the rest in 2 chunks of 3; the server fails
one pilot row and one other, so the release carries a failed pilot row), runs one step in
a child process (``pilot_child.py``, the write points counted as ``restart_child.py`` counts
them: each lake write or delete before it, each paid provider call after it returned, the
create also before it) that SIGKILLs itself at its k-th write point, and then, in this
process, ticks the sensor and runs what it requests (each run_key once, as the daemon would,
in an instance that never saw the killed run) until ``a``'s latest attempt is collected with
the expected role and nothing is queued in the pilot book. Then:

- every input row is in results or failed exactly once (a failed row with its error code;
  after a stop, the rest as ``pilot_stopped``);
- the server was sent no request twice (the release never sends the pilot's rows again,
  answered or failed), holds no batch that no manifest records (a paid orphan), and after a
  stop holds the pilot's rows only;
- the partition has one pilot attempt and one attempt that follows it (released or stopped);
  the prompt's record in the pilot book says the verdict and no pilot is queued;
- no in-flight marker is left.

The steps (``STEPS``: each one's write points on local disk, in order, checked in every case,
so that a new write point in the library shows here as a mismatch naming it):

- ``pilot_submit``: ``a``'s first submission (the pilot), from a fresh lake: every point;
- ``pilot_collect``: once the pilot's batch ended, one daemon iteration (the tick that
  requests the collection, then that run): every point;
- ``release``: once the pilot is collected and passed, one daemon iteration (the tick, then
  the release run): the points in ``RELEASE_KILLS`` (before and after the ``passed``
  record, before the intent, each batch created and not recorded, before the last manifest
  write), not all 20, to stay fast;
- ``stop``: the same after a pilot whose every request failed (the server's failure_rate 1):
  the points in ``STOP_KILLS`` (before and after the ``stopped`` record, before each
  manifest write).

Each step also runs once to its end (the control, k = N + 1). Not swept here: a partition
held for the pilot (``b`` submitted while ``a`` pilots; ``test_pilot.py`` covers it without
kills), to keep the file near 30 s.

What the test stands in for, besides the daemon: a pilot submission killed before its
manifest leaves the lake with no record of the attempt (its queue marker and ``pending``
record at most, which the sensor drops once no run holds the locks): only Dagster's run
retry (or the user) starts it again, so the test reruns it once, as ``restart_anywhere``
does. Time: the resume backoff is 0, and the re-attach grace of an ambiguous openai create
(10 minutes) is ``restart_anywhere.GRACE_SECONDS`` (the case killed right before the pilot's
create call waits through it).
"""

from __future__ import annotations

import collections
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pilot_child as pc
import pytest
import restart_anywhere
from conftest import dagster_instance, make_local_dir
from harness import Pipeline

import infron_dagster.resume as resume_module
import infron_dagster.submit as submit_module
from infron_dagster.columns import CUSTOM_ID
from infron_dagster.history import PartitionHistory
from infron_dagster.local.store import Store
from infron_dagster.pilot_book import PilotBook

ROWS, PILOT = pc.ROWS, pc.PILOT

# The write points of each step, in order (``<`` before the call, ``>`` after it returned).
STEPS = {
    "pilot_submit": [
        "write pilots/queue",  # 1: the pilot queued for the sensor's verdict
        "write pilots/prompts",  # 2: the prompt's record: pending (others wait for it)
        "upload inputs",  # 3
        "write invalid",  # 4
        "upload requests",  # 5: the pilot's one chunk
        "write inflight",  # 6
        "write manifests",  # 7: the intent (marked pilot), nothing sent
        "client upload_file",  # 8
        "write manifests",  # 9: the create started (uncertain)
        "client create_batch<",  # 10: the create call is about to go
        "client create_batch>",  # 11: the pilot's batch created, not recorded
        "write manifests",  # 12: its batch id
        "write manifests",  # 13: submitted
    ],
    "pilot_collect": [
        "write inflight",  # 1: the tick: the in-flight index
        "open raw",  # 2: the collection run: the pilot's output file
        "open raw",  # 3: its error file (a pilot row failed)
        "write raw",  # 4: the batches' final states
        "open results",  # 5
        "open failed",  # 6
        "write pilots/queue",  # 7: queued again, before the commit point
        "write manifests",  # 8: collected (the commit point)
    ],
    "release": [
        "delete inflight",  # 1: the tick: the collected pilot's marker
        "delete inflight",  # 2
        "write pilots/prompts",  # 3: the release run: the prompt's record, passed
        "upload inputs",  # 4
        "write invalid",  # 5
        "upload requests",  # 6
        "upload requests",  # 7
        "write inflight",  # 8
        "write manifests",  # 9: the release's intent (it carries the pilot's rows)
        "client upload_file",  # 10
        "write manifests",  # 11
        "client create_batch<",  # 12
        "client create_batch>",  # 13: chunk 0 created, not recorded
        "write manifests",  # 14
        "client upload_file",  # 15
        "write manifests",  # 16
        "client create_batch<",  # 17
        "client create_batch>",  # 18: chunk 1 created, not recorded
        "write manifests",  # 19
        "write manifests",  # 20: submitted
    ],
    "stop": [
        "delete inflight",  # 1: the tick: the collected pilot's marker
        "delete inflight",  # 2
        "write pilots/prompts",  # 3: the stop run: the prompt's record, stopped
        "upload inputs",  # 4
        "write invalid",  # 5
        "write inflight",  # 6
        "write manifests",  # 7: the stop's intent (the rest pilot_stopped, nothing sent)
        "write manifests",  # 8
    ],
}
# The points swept of the two longer steps (each k: killed before its write point).
RELEASE_KILLS = (3, 4, 9, 13, 18, 20)
STOP_KILLS = (3, 4, 7, 8)
# Where each step starts from (see ``prepared``) and what a's pilot ends as.
STARTS = {
    "pilot_submit": "fresh",
    "pilot_collect": "submitted",
    "release": "collected",
    "stop": "failed",
}
ENDS = {
    "pilot_submit": "release",
    "pilot_collect": "release",
    "release": "release",
    "stop": "stopped",
}
VERDICT = {"release": "passed", "stopped": "stopped"}
# The server fails this share of requests (by custom_id): one of the pilot's 2 rows (which the
# release carries with its failure, never sending it again) and one of the rest.
FAILURE_RATE = 0.3
DRIVE_SECONDS = 30.0  # a hang guard (harness.LOAD_SLACK times it): convergence takes ~1 s


def cases() -> list[Any]:
    chosen = {"release": RELEASE_KILLS, "stop": STOP_KILLS}
    found = []
    for step, labels in STEPS.items():
        for k in [*chosen.get(step, range(1, len(labels) + 1)), len(labels) + 1]:
            label = labels[k - 1] if k <= len(labels) else "control"
            ident = f"{step}-k{k}-{re.sub(r'[^a-z_<>]+', '_', label)}"
            found.append(pytest.param(step, k, id=ident))
    return found


# --- the prepared states -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """fresh: nothing submitted; submitted: a's pilot created and ended, not collected;
    collected: then collected (one of its 2 rows failed; its verdict: passed); failed: a's
    pilot collected, its every request failed (its verdict: stop). No tick since."""
    made = {}
    made["fresh"] = root = tmp_path_factory.mktemp("fresh")
    pc.write_inputs(root / "inputs")
    make_local_dir(str(root / "local"), failure_rate=FAILURE_RATE)
    instance = dagster_instance()
    made["submitted"] = root = _copy(made["fresh"], tmp_path_factory.mktemp("submitted"))
    flow = pc.build(root)
    assert flow.submit(instance, "a").success
    made["collected"] = root = _copy(root, tmp_path_factory.mktemp("collected"))
    flow = pc.build(root)
    flow.tick(instance)
    made["failed"] = root = _copy(made["fresh"], tmp_path_factory.mktemp("failed"))
    make_local_dir(str(root / "local"), failure_rate=1.0)
    flow = pc.build(root)
    assert flow.submit(instance, "a").success
    flow.tick(instance)
    for start in ("collected", "failed"):
        flow = pc.build(made[start])
        [pilot] = flow.manifests("a")
        assert pilot.state == "collected" and pilot.pilot["role"] == "pilot"
        assert [q.attempt for q in PilotBook(flow.storage).queued()] == [1]
    failed = pc.build(made["collected"]).table("failed", "a")
    assert failed is not None and failed.num_rows == 1, "a pilot row the release must carry"
    return made


def _copy(base: Path, root: Path) -> Path:
    shutil.copytree(base, root, dirs_exist_ok=True)
    return root


@pytest.fixture(scope="module")
def pilot_forks() -> Iterator[restart_anywhere.ForkServer]:
    # pilot_child.py speaks restart_child.py's protocol (restart_child.fork_server)
    server = restart_anywhere.ForkServer("pilot_child.py")
    yield server
    server.close()


def _label(kind: str, what: str) -> str:
    """``write manifests``, ``write pilots/prompts``, ``client create_batch>``: the verb and
    the lake folder under ``<root>/rev/`` (and the pilot book's own folder)."""
    if kind.startswith("client."):
        return f"client {kind[len('client.') :]}"
    verb = {"write_bytes": "write", "open_write": "open", "upload_file": "upload"}.get(
        kind[len("storage.") :], "delete"
    )
    parts = what.split("/lake/rev/", 1)[-1].split("/")
    return f"{verb} pilots/{parts[1]}" if parts[0] == "_pilots" else f"{verb} {parts[0]}"


def _reached(log: str) -> list[str]:
    """The labels of the write points the child reached, and ``done`` if it ended."""
    with open(log, encoding="utf-8") as fh:
        rows = [line.rstrip("\n").split("\t") for line in fh]
    return ["done" if r[0] == "done" else _label(r[1], r[2]) for r in rows]


# --- letting the sensor run, and what must hold then --------------------------------------------


def _settled(flow: Pipeline, role: str) -> bool:
    """a's latest attempt has this pilot role and is collected, and no pilot is queued."""
    active = PartitionHistory.load(flow.storage, "a").active
    if not active or active[0].state != "collected":
        return False
    if (active[0].pilot or {}).get("role") != role:
        return False
    return not PilotBook(flow.storage).queued()


def _sent(flow: Pipeline) -> collections.Counter:
    """custom_id -> how many times the server was sent it (every batch is paid for)."""
    store = Store(flow.local_dir)
    sent: collections.Counter = collections.Counter()
    for batch in store.list_batches():
        with open(store.content_path(batch["input_file_id"]), encoding="utf-8") as fh:
            sent.update(json.loads(line)[CUSTOM_ID] for line in fh if line.strip())
    return sent


def _check(flow: Pipeline, role: str) -> None:
    manifests = flow.manifests("a")
    roles = [m.pilot["role"] for m in manifests]
    assert roles == ["pilot", role], f"one pilot, then one attempt after it: {roles}"
    pilot, latest = manifests
    # Every row in results or failed, exactly once; a failed row says why.
    assert flow.accounted_ids("a") == list(range(ROWS)), flow.accounted_ids("a")
    results, failed = flow.table("results", "a"), flow.table("failed", "a")
    codes = failed.column("error_code").to_pylist() if failed is not None else []
    assert all(codes), f"a failed row without its reason: {codes}"
    # The server: no request twice, no batch that no manifest records.
    sent = _sent(flow)
    assert all(n == 1 for n in sent.values()), f"requests sent (paid) twice: {sent}"
    recorded = {bid for m in manifests for bid in m.batch_ids}
    orphans = [b["id"] for b in Store(flow.local_dir).list_batches() if b["id"] not in recorded]
    assert not orphans, f"batches on the server that no manifest records (paid, lost): {orphans}"
    piloted = set(_request_ids(flow, pilot))
    assert len(piloted) == PILOT
    if role == "release":
        assert results is not None and results.num_rows + len(codes) == ROWS
        assert set(codes) == {"server_error"}, codes
        answered = results.column(CUSTOM_ID).to_pylist() + failed.column(CUSTOM_ID).to_pylist()
        assert set(sent) == set(answered), "every row sent once"
    else:
        assert set(sent) == piloted, f"sent after the stop, beyond the pilot: {sent}"
        stopped = {
            cid
            for cid, code in zip(failed.column(CUSTOM_ID).to_pylist(), codes, strict=True)
            if code == "pilot_stopped"
        }
        assert len(stopped) == ROWS - PILOT and not stopped & piloted
    # The pilot book: the verdict recorded for the prompt, nothing queued.
    book = PilotBook(flow.storage)
    assert not book.queued()
    record = book.record(latest.pilot["prompt"])
    assert record is not None and record["state"] == VERDICT[role], record
    assert (record["partition_key"], record["attempt"]) == ("a", pilot.attempt), record
    markers = [m for m in flow.storage.list_files(flow.storage.base / "inflight") if "=" in m]
    assert not markers, f"in-flight markers left: {markers}"


def _request_ids(flow: Pipeline, manifest: Any) -> list[str]:
    """The custom_ids of an attempt's request files (what it would send)."""
    ids = []
    for chunk in manifest.chunks:
        text = flow.storage.resolve(chunk.path).read_text()
        ids += [json.loads(line)[CUSTOM_ID] for line in text.splitlines() if line]
    return ids


# --- one case -----------------------------------------------------------------------------------


@pytest.mark.parametrize("step, k", cases())
def test_a_kill_at_a_pilot_write_point_converges_unattended_and_pays_nothing_twice(
    step, k, pilot_forks, prepared, monkeypatch, tmp_path
):  # the fork server first: it warms up (another process) while the states are prepared
    monkeypatch.setattr(resume_module, "RESUME_BACKOFF_SECONDS", 0.0)
    monkeypatch.setattr(submit_module, "REATTACH_GRACE_SECONDS", restart_anywhere.GRACE_SECONDS)
    points = STEPS[step]
    root = _copy(prepared[STARTS[step]], tmp_path / "case")
    log = str(root / "points.log")
    status = pilot_forks.run(step, restart_anywhere.rc.Case(str(root), "", ""), k, log)
    reached = _reached(log)
    output = Path(log + ".out").read_text(errors="replace")[-3000:]
    if k > len(points):  # the control
        assert status == 0, output
        assert reached == [*points, "done"], "the step's write points changed"
    else:
        assert status == -9, f"the step ended (exit {status}) before point {k}:\n{output}"
        assert reached == points[:k], "the step's write points changed"
    flow = pc.build(root)
    instance = dagster_instance()
    if step == "pilot_submit" and not flow.manifests("a"):
        # Killed before the pilot's manifest: the lake has no record of the attempt, so the
        # sensor cannot know of it; Dagster's run retry (or the user) runs it again.
        assert flow.submit(instance, "a").success
    role = ENDS[step]
    flow.drive(instance, lambda: _settled(flow, role), timeout=DRIVE_SECONDS, pause=0.0)
    flow.tick(instance)  # once more: what ended is released, nothing more is requested
    _check(flow, role)
