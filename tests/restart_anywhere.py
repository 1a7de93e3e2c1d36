"""Restart anywhere: kill -9 at each write of submit, admission, cancel and collect, then let
the sensor run unattended; every partition converges and nothing is paid twice (issue 17).

Each case starts from a prepared state of one partition (6 rows in 2 chunks, an enqueued-token
limit one chunk fits, a price and a budget, openai style, the embedded local server with its
state on disk), runs one step in a child process (``restart_child.py``) that SIGKILLs itself
at its k-th write point (each lake write, counted before it; each create/cancel/upload call
to the provider, counted after it returned; the create also before it), and then, in this
process, lets the sensor tick and runs what it requests (once per run_key, as the daemon
would) until the partition is collected. Then:

- the latest attempt is collected and every input row is in results or failed exactly once;
- the server holds no batch twice for a chunk, no request twice, and no batch that no
  manifest records (a paid orphan); a cancelled attempt's unsent chunk is never created;
- the admission ledger (``<root>/_admission/infron.json``) holds no entry for the pipeline
  (every batch ended and the partition is collected);
- the budget ledger holds, for each manifest's ``spend`` record, one entry settled to an
  actual cost, and no reservation that no manifest records (one that created nothing).

The steps and their starting states:

- ``submit``: a fresh partition's submit run (reserve, stage, intent, admit, create chunk 0,
  chunk 1 waits);
- ``admission``: chunk 0 ended, chunk 1 waits: one daemon iteration (the sensor tick that
  releases chunk 0's capacity, then the submit run it requests, which creates chunk 1);
- ``cancel``: chunk 0 running, chunk 1 waiting: the cancel job;
- ``collect``: both chunks ended: the collect run.

The cases run from four test files (``test_restart_*.py``: the submit step and the later steps,
on local disk and on S3), so that the workers of ``make test`` share them.

The last k of each step is the control: the step runs to its end without being killed, and
its number of write points is the one swept (so a new write point in the library shows here).

What the test stands in for, besides the sensor:

- a submit killed before the manifest exists leaves the lake with no record of the attempt
  (only a budget reservation, replaced by the same attempt's rerun): only Dagster's run retry
  (or the user) can start it again, so the test reruns it once;
- a cancel run killed before it marked the attempt cancelled failed in the UI: the user runs
  the cancel job again (once); killed after the mark, nothing is done;
- time: the sensor's resume backoff is set to 0, the 10-minute re-attach grace of an
  ambiguous create to 3 s (the test waits through it), and on S3 a lock left by the killed
  process is aged past its 5-minute staleness (its holder is dead: ``BatchStorage.lock``
  breaks it then).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import dagster as dg
import pytest
import restart_child as rc
from conftest import dagster_instance, make_local_dir

import infron_dagster.resume as resume_module
import infron_dagster.submit as submit_module
from infron_dagster import ResultFile
from infron_dagster.columns import CUSTOM_ID
from infron_dagster.local.embedded import embedded_client
from infron_dagster.manifest import load_manifests

HERE = os.path.dirname(os.path.abspath(__file__))
# A partition converges in ~5 ticks (resume, release, resume, collect), or a few seconds
# more when a create call was never made (the re-attach grace below); one that has not
# within this deadline (four times that, for a loaded machine) never will.
DRIVE_SECONDS = 60.0
# The re-attach grace of an ambiguous openai create (10 minutes), shortened: a chunk whose
# create call never reached the provider is sent once the grace has passed, and the sensor
# stops resuming (a note for a person) past twice the grace. Create times are recorded to
# the second, so the window between the two must be seconds wide.
GRACE_SECONDS = 3
CHILD_SECONDS = 60.0

# The write points of each step, in order, on local disk (checked in every case: a change in
# the library's writes shows as a mismatch naming the point). ``<`` before the call, ``>``
# after it returned.
LOCAL_POINTS = {
    "submit": [
        "write ledger",  # 1: the budget reservation (the gate)
        "upload inputs",  # 2
        "write invalid",  # 3
        "upload chunk-file",  # 4
        "upload chunk-file",  # 5
        "write inflight",  # 6: the in-flight marker, before the manifest
        "write manifest",  # 7: the intent (state submitting, no chunk sent)
        "write index",  # 8: the in-flight index rebuilt (no ledger yet)
        "write admission",  # 9: the ledger rebuilt from the manifests
        "write admission",  # 10: chunk 0 admitted
        "client upload_file",  # 11: the input file of chunk 0 (openai style)
        "write manifest",  # 12: chunk 0's create started (uncertain)
        "client create_batch<",  # 13: the create call is about to go
        "client create_batch>",  # 14: chunk 0 created, not recorded
        "write manifest",  # 15: chunk 0's batch id
        "write manifest",  # 16: chunk 1 waits
        "write admission",  # 17: settle: chunk 0's batch id in the ledger
    ],
    "admission": [
        "write admission",  # 1: the tick releases chunk 0 (ended)
        "write manifest",  # 2: the resume run: re-attach (nothing to find), saved
        "write admission",  # 3: chunk 1 admitted
        "client upload_file",  # 4
        "write manifest",  # 5: chunk 1's create started
        "client create_batch<",  # 6
        "client create_batch>",  # 7
        "write manifest",  # 8: chunk 1's batch id
        "write manifest",  # 9: submitted
        "write admission",  # 10: settle
    ],
    "cancel": [
        "client cancel_batch",  # 1: chunk 0's batch cancelled
        "write manifest",  # 2: the attempt marked cancelled (chunk 1 never sent)
    ],
    "collect": [
        "open raw-output",  # 1: chunk 0's output file
        "open raw-output",  # 2: chunk 1's output file
        "write raw-batches",  # 3: the batches' final states
        "open results",  # 4
        "open failed",  # 5
        "write ledger",  # 6: the budget entry settled, before the commit point
        "write manifest",  # 7: collected (the commit point)
    ],
}

# On S3 the locks are objects: each release is a delete (a write point) and a killed holder
# leaves its lock behind. A case costs ~2 s there (a child run, then sensor ticks and runs
# over moto's HTTP), so S3 sweeps a representative subset rather than all 48 points: what
# only S3 has (a lock left behind by each kind of holder: the day ledger's, the admission
# ledger's, the partition's, and the sensor's own lock probe), the intent, around the paid
# create call, the commit points, every cancel point (there are few) and each control.
# The points where S3 writes the same as local disk are swept on local disk.
S3_POINTS = {
    "submit": {
        2: "delete lock",  # the day ledger's lock, left behind after the reservation
        8: "write manifest",  # the intent
        12: "delete lock",  # the admission ledger's lock, left behind after admitting
        16: "client create_batch>",  # chunk 0 created, its answer lost
        21: "delete lock",  # the partition's lock, left behind by a finished submission
    },
    "admission": {
        3: "delete lock",  # the sensor's probe of the partition lock, left behind
        10: "client create_batch>",
        12: "write manifest",  # submitted
    },
    "cancel": {1: "client cancel_batch", 2: "write manifest", 3: "delete lock"},
    "collect": {
        6: "write ledger",  # the budget entry settled
        7: "delete lock",  # the day ledger's lock, left behind
        8: "write manifest",  # collected (the commit point)
    },
}
S3_TOTAL = {"submit": 21, "admission": 15, "cancel": 3, "collect": 9}

# Kill points that show a bug: (step, storage, k) -> what goes wrong (the owner removes an
# entry once the library is fixed; strict: a fixed one fails until its entry is removed).
# Fixed: a kill between the commit point and the budget settle left the reservation
# unsettled for ever (collection now settles before it marks the manifests collected).
KNOWN_BUGS: dict[tuple[str, str, int], str] = {}


def cases(steps: tuple[str, ...], storage: str) -> list[Any]:
    """The kill points of ``steps`` on ``storage`` ("local": all; "s3": the chosen ones), each
    with its control (the step run to its end)."""
    found = []
    if storage == "local":
        for step in steps:
            labels = LOCAL_POINTS[step]
            for k in range(1, len(labels) + 2):
                label = labels[k - 1] if k <= len(labels) else "control"
                found.append(_param(step, "local", k, label))
    else:
        for step in steps:
            for k, label in S3_POINTS[step].items():
                found.append(_param(step, "s3", k, label))
            found.append(_param(step, "s3", S3_TOTAL[step] + 1, "control"))
    return found


def _param(step: str, storage: str, k: int, label: str) -> Any:
    ident = f"{step}-{storage}-k{k}-{re.sub(r'[^a-z_]+', '_', label)}"
    bug = KNOWN_BUGS.get((step, storage, k))
    marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=bug)] if bug else []
    return pytest.param(step, storage, k, label, id=ident, marks=marks)


# --- the child processes -----------------------------------------------------------------------


class ForkServer:
    """``restart_child.py`` as a fork server: it imports Dagster once, then forks a child per
    case (starting a Python process with Dagster per case costs seconds on this machine)."""

    def __init__(self, script: str = "restart_child.py") -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, *sys.path])}
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=HERE,
            env=env,
        )

    def run(self, step: str, case: rc.Case, kill_at: int, log: str) -> int:
        """Run the step in a child; its exit status (-9: killed at ``kill_at``)."""
        command = {"step": step, "case": dataclasses.asdict(case), "kill_at": kill_at}
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({**command, "log": log}) + "\n")
        self.proc.stdin.flush()
        pid = self._answer(CHILD_SECONDS)["pid"]  # the child started
        try:
            return int(self._answer(CHILD_SECONDS)["status"])
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)  # our own child, hung: end it, then say so
            self._answer(10)
            pytest.fail(f"the {step} child (k={kill_at}) hung for {CHILD_SECONDS} s; see {log}.out")

    def _answer(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def forks() -> Iterator[ForkServer]:
    server = ForkServer()
    yield server
    server.close()


def _points(log: str) -> list[tuple[str, str]]:
    """The (kind, what) of each write point the child reached, and ``done`` if it ended."""
    out = []
    with open(log, encoding="utf-8") as fh:
        for line in fh:
            parts = line.rstrip("\n").split("\t")
            out.append((parts[0], parts[1]) if parts[0] == "done" else (parts[1], parts[2]))
    return out


def _label(kind: str, what: str) -> str:
    """A short name for a write point: ``write manifest``, ``client create_batch>``..."""
    if kind.startswith("client."):
        return f"client {kind[len('client.') :]}"
    verb = {"write_bytes": "write", "open_write": "open", "upload_file": "upload"}.get(
        kind[len("storage.") :], "delete"
    )
    for pattern, name in [
        (r"/_ledger/spend/", "ledger"),
        (r"/locks/", "lock"),
        (r"/_admission/", "admission"),
        (r"/manifests/", "manifest"),
        (r"/inflight/_index\.json", "index"),
        (r"/inflight/", "inflight"),
        (r"/inputs/", "inputs"),
        (r"/invalid/", "invalid"),
        (r"/requests/", "chunk-file"),
        (r"/raw/.*batches\.json", "raw-batches"),
        (r"/raw/", "raw-output"),
        (r"/results/", "results"),
        (r"/failed/", "failed"),
    ]:
        if re.search(pattern, what):
            return f"{verb} {name}"
    return f"{verb} {what}"


# --- the prepared states -----------------------------------------------------------------------


@dataclasses.dataclass
class Place:
    """Where the cases of one storage live: a local folder, or a prefix of moto's bucket."""

    kind: str
    tmp: Any
    storage_options: dict[str, Any] | None = None

    def case(self, name: str, server_dir: str | None = None) -> rc.Case:
        root = (
            str(self.tmp / name / "lake")
            if self.kind == "local"
            else f"s3://lake/restart-{uuid.uuid4().hex[:8]}/{name}"
        )
        return rc.Case(
            root=root,
            server_dir=server_dir or make_local_dir(str(self.tmp / name / "server")),
            io_dir=str(self.tmp / "io"),
            storage_options=self.storage_options,
        )

    def clone(self, base: rc.Case, name: str) -> rc.Case:
        """A copy of a prepared state (lake and server) for one case to damage."""
        server = str(self.tmp / name / "server")
        shutil.copytree(base.server_dir, server)
        case = self.case(name, server_dir=server)
        if self.kind == "local":
            if os.path.exists(base.root):  # a fresh lake has no folder yet
                shutil.copytree(base.root, case.root)
        else:
            fs = _fs(case)
            source = base.root.removeprefix("s3://")
            for path in fs.find(source):
                fs.copy(path, case.root.removeprefix("s3://") + path[len(source) :])
        return case


def _fs(case: rc.Case) -> Any:
    import s3fs

    return s3fs.S3FileSystem(**(case.storage_options or {}))


@pytest.fixture(scope="module")
def bases(tmp_path_factory, request) -> dict[str, Any]:
    """Per storage: the prepared state each step starts from (built once, cloned per case)."""
    made: dict[str, Any] = {}

    def get(kind: str) -> tuple[Place, dict[str, rc.Case]]:
        if kind not in made:
            options = None
            if kind == "s3":
                options = request.getfixturevalue("moto_s3").storage_options
            place = Place(kind, tmp_path_factory.mktemp(f"restart-{kind}"), options)
            made[kind] = (place, _prepare(place))
        return made[kind]

    return get  # type: ignore[return-value]


def _prepare(place: Place) -> dict[str, rc.Case]:
    """fresh: nothing submitted; waiting: chunk 0 ended, chunk 1 waits for admission;
    running: chunk 0 running, chunk 1 waits; submitted: both chunks ended, not collected."""
    fresh = place.case("fresh")
    flow = rc.build_flow(fresh)
    with dagster_instance() as instance:
        run = dg.materialize(
            [flow.upstream], partition_key=rc.KEY, resources=flow.resources, instance=instance
        )
        assert run.success
        waiting = place.clone(fresh, "waiting")
        assert rc.submit_run(rc.build_flow(waiting), instance).success
        running = place.case("running")
        make_local_dir(running.server_dir, in_progress_seconds=3600.0)
        assert rc.submit_run(rc.build_flow(running), instance).success
        submitted = place.clone(waiting, "submitted")
        flow = rc.build_flow(submitted)
        _, runs = rc.tick_and_run(flow, instance)
        assert [r.success for r in runs] == [True]
    for case in (waiting, running, submitted):
        [manifest] = load_manifests(rc.build_flow(case).storage, rc.KEY)
        assert len(manifest.chunks) == 2 and manifest.state != "collected"
    [manifest] = load_manifests(flow.storage, rc.KEY)
    assert manifest.fully_submitted
    return {"submit": fresh, "admission": waiting, "cancel": running, "collect": submitted}


# --- letting the sensor run ----------------------------------------------------------------------


@dataclasses.dataclass
class Drive:
    runs: list[tuple[str, bool]] = dataclasses.field(default_factory=list)
    ticks: int = 0


def _converged(flow: rc.Flow) -> bool:
    manifests = load_manifests(flow.storage, rc.KEY)
    return bool(manifests) and manifests[-1].state == "collected"


def _drive(flow: rc.Flow, instance: dg.DagsterInstance) -> Drive:
    """Tick the sensor and run what it requests (each run_key once) until the partition is
    collected, then tick once more (the tick after collection releases what ended)."""
    drive, seen, cursor = Drive(), set(), None
    deadline = time.monotonic() + DRIVE_SECONDS
    extra = 1
    while True:
        if _converged(flow):
            if extra == 0:
                return drive
            extra -= 1
        elif time.monotonic() > deadline:
            pytest.fail(
                f"the partition did not converge in {drive.ticks} unattended sensor ticks "
                f"({len(drive.runs)} runs: {drive.runs[-3:]}...); manifests: "
                f"{[m.to_dict() for m in load_manifests(flow.storage, rc.KEY)]}"
            )
        context = dg.build_sensor_context(
            instance=instance, definitions=flow.defs, resources=flow.resources, cursor=cursor
        )
        result = flow.pipeline.sensor(context)
        drive.ticks += 1
        cursor = result.cursor
        for request in result.run_requests or []:
            if request.run_key in seen:  # the daemon launches a run_key once
                continue
            seen.add(request.run_key)
            run = flow.job.execute_in_process(
                partition_key=request.partition_key,
                asset_selection=request.asset_selection,
                tags=request.tags,
                run_config=request.run_config,
                instance=instance,
                raise_on_error=False,
            )
            drive.runs.append((request.run_key, run.success))
        time.sleep(0.1)


def _age_locks(case: rc.Case) -> list[str]:
    """Locks the killed child left on S3, aged past their staleness (5 minutes): what the
    wall clock does to a lock whose holder died (it no longer refreshes it)."""
    fs = _fs(case)
    aged = []
    for path in fs.find(case.root.removeprefix("s3://")):
        if path.endswith("/lock.json"):
            body = json.loads(fs.cat_file(path))
            body["created"] = time.time() - 3600
            fs.pipe_file(path, json.dumps(body).encode())
            aged.append(path)
    return aged


# --- what must hold at the end --------------------------------------------------------------------


def _server_batches(case: rc.Case) -> list[tuple[Any, list[str]]]:
    """Every batch the server holds, with the custom_ids it was sent."""
    out = []
    with embedded_client(case.server_dir, api_style="openai") as client:
        for batch in client.list_batches():
            buffer = io.BytesIO()
            client.download(ResultFile("output", file_id=batch.raw["input_file_id"]), buffer)
            ids = [json.loads(line)[CUSTOM_ID] for line in buffer.getvalue().splitlines() if line]
            out.append((batch, ids))
    return out


def _read_json(flow: rc.Flow, path: Any) -> Any:
    return json.loads(flow.storage.fresh(path).read_bytes())


def _check(step: str, case: rc.Case, flow: rc.Flow, unsent_before: dict[str, list[str]]) -> None:
    storage = flow.storage
    manifests = load_manifests(storage, rc.KEY)
    latest = manifests[-1]
    assert latest.state == "collected", latest
    # Every row in results or failed, exactly once.
    tables = {}
    for kind in ("results", "failed"):
        path = storage.table_path(kind, rc.KEY)
        tables[kind] = storage.read_table(path) if storage.exists(path) else None
    ids = [
        cid
        for table in tables.values()
        if table is not None
        for cid in table.column(CUSTOM_ID).to_pylist()
    ]
    inputs = storage.read_table(storage.attempt_file("inputs", rc.KEY, latest.base_attempt))
    expected = set(inputs.column(CUSTOM_ID).to_pylist())
    assert len(expected) == rc.ROWS
    assert collections.Counter(ids) == collections.Counter(expected), (
        f"rows not accounted for exactly once: {collections.Counter(ids)}"
    )
    # The server: each chunk created once, each request sent once, no paid orphan.
    batches = _server_batches(case)
    keys = collections.Counter(b.metadata.get("infron_dagster_key") for b, _ in batches)
    assert all(n == 1 for n in keys.values()), f"a chunk was created twice: {keys}"
    sent = collections.Counter(cid for _, cids in batches for cid in cids)
    assert all(n == 1 for n in sent.values()), f"requests sent twice: {sent}"
    recorded = {bid for m in manifests for bid in m.batch_ids}
    orphans = [b.id for b, _ in batches if b.id not in recorded]
    assert not orphans, f"batches on the server that no manifest records (paid, lost): {orphans}"
    if step == "cancel":
        created = set(sent)
        never = [cid for cids in unsent_before.values() for cid in cids if cid in created]
        assert not never, f"a cancelled attempt's unsent chunk was created: {never}"
        assert latest.cancelled
        failed = tables["failed"]
        assert failed is not None and failed.num_rows == rc.ROWS
        assert set(failed.column("error_code").to_pylist()) == {"batch_cancelled"}
    else:
        assert set(sent) == expected, "every row sent once"
        assert tables["results"] is not None and tables["results"].num_rows == rc.ROWS
    # The admission ledger: nothing of this pipeline is enqueued any more.
    ledger_path = storage.root / "_admission" / "infron.json"
    if storage.exists(ledger_path):
        entries = _read_json(flow, ledger_path)["entries"]
        mine = {k: e for k, e in entries.items() if e["pipeline"] == rc.NAME}
        assert not mine, f"admission ledger entries left after collection: {mine}"
    # The budget ledger: each manifest's reservation settled; none that no manifest records.
    spends = {(m.spend["day"], m.spend["entry"]): m for m in manifests if m.spend}
    assert spends, "every attempt that sent something reserved its worst case"
    ledger = storage.base / "_ledger" / "spend"
    found = {}
    for path in storage.fresh(ledger).glob("partition=*/*.json"):
        day = path.parent.name[len("partition=") :]
        found[(day, path.name[: -len(".json")])] = _read_json(flow, path)
    for key, manifest in spends.items():
        assert key in found, f"the reservation of attempt {manifest.attempt} is missing: {key}"
        entry = found[key]
        assert entry["worst_cost"] == pytest.approx(manifest.spend["worst_cost"])
        assert entry["actual_cost"] is not None, f"not settled after collection: {entry}"
        assert 0 <= entry["actual_cost"] <= entry["worst_cost"] + 1e-12, entry
    stray = {k: e for k, e in found.items() if k not in spends and not e.get("released")}
    assert not stray, f"reservations that no manifest records (nothing created): {stray}"
    # The in-flight index (a cache): no marker left for the collected attempt.
    markers = storage.list_files(storage.base / "inflight")
    left = [m for m in markers if m.startswith("partition=")]
    assert not left, f"in-flight markers left after collection: {left}"


# --- one case -----------------------------------------------------------------------------------


def run_case(step, storage, k, label, bases, forks, monkeypatch, request) -> None:
    """One case: the step killed at its k-th write point, then the sensor alone, then checks."""
    monkeypatch.setattr(resume_module, "RESUME_BACKOFF_SECONDS", 0.0)
    monkeypatch.setattr(submit_module, "REATTACH_GRACE_SECONDS", GRACE_SECONDS)
    place, prepared = bases(storage)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.callspec.id)
    case = place.clone(prepared[step], name)
    flow = rc.build_flow(case)
    unsent_before = _unsent_ids(flow) if step == "cancel" else {}
    log = str(place.tmp / name / "points.log")
    status = forks.run(step, case, k, log)
    points = _points(log)
    control = label == "control"
    with open(log + ".out", encoding="utf-8", errors="replace") as fh:
        output = fh.read()[-3000:]
    if control:
        assert status == 0, f"the step failed (exit {status}):\n{output}"
        assert points[-1][0] == "done"
        assert len(points) == k, (
            f"{step} on {storage} has {len(points) - 1} write points, not {k - 1}: "
            f"{[_label(*p) for p in points[:-1]]}"
        )
    else:
        assert status == -9, (
            f"the step ended (exit {status}) before write point {k} ({label}): the library's "
            f"writes changed: {[_label(*p) for p in points if p[0] != 'done']}\n{output}"
        )
        assert len(points) == k
        assert _label(*points[-1]) == label, (
            f"write point {k} is {_label(*points[-1])!r} ({points[-1][1]}), not {label!r}: "
            f"the library's writes changed: {[_label(*p) for p in points]}"
        )
    # In memory: the sensor reads run records only to pace the submit runs it requests.
    with dg.DagsterInstance.ephemeral() as instance:
        if storage == "s3" and not control:
            _age_locks(case)
        manifests = load_manifests(flow.storage, rc.KEY)
        if step == "submit" and not manifests:
            # Killed before the intent: the lake has no record of the attempt, so the
            # sensor cannot know of it; Dagster's run retry (or the user) runs it again.
            assert rc.submit_run(flow, instance).success
        if step == "cancel" and not any(m.cancelled for m in manifests):
            # The cancel run failed before marking the attempt: the user runs it again.
            assert rc.cancel_run(flow, instance).success
        drive = _drive(flow, instance)
    failed = [key for key, ok in drive.runs if not ok]
    assert not failed, f"runs the sensor requested failed: {failed}"
    _check(step, case, flow, unsent_before)


def _unsent_ids(flow: rc.Flow) -> dict[str, list[str]]:
    """The custom_ids of each chunk with no batch yet (read from its request file)."""
    out = {}
    for manifest in load_manifests(flow.storage, rc.KEY):
        for chunk in manifest.chunks:
            if chunk.batch_id:
                continue
            text = flow.storage.resolve(chunk.path).read_text()
            out[chunk.path] = [json.loads(line)[CUSTOM_ID] for line in text.splitlines() if line]
    return out
