"""A submission killed (SIGKILL) while its paid create call is in flight never pays twice.

A real child process (``crash_child.py``) prepares and submits one partition through the real
code against ``infron-local serve`` in another process, with ``--latency-seconds`` so the
server sleeps before handling each request and the create call stays in flight for seconds.
The test waits until the manifest shows the intent (the chunk ``uncertain``, with
``create_started_at`` and no batch id: written before the paid call), kills the child, lets
the server finish the create it received, and reruns the same submission in-process:

- infron style (no list call to ask): the rerun refuses to send again (``SubmitIncomplete``
  naming ``resubmit_uncertain``), the manifest still shows the chunk uncertain, and the
  server holds exactly the one batch the killed child paid for.
- openai style: a rerun while the create is still in flight (the server does not list the
  batch yet) refuses to send again; once the server has created it, the rerun re-attaches
  the orphan by its metadata, creates nothing and records its id in the manifest.

In both, every request is in exactly one server batch. Without the intent written before the
call, the killed child would leave a chunk with no batch id and not uncertain: the waits below
would not see the intent, an infron rerun would create a second batch (no exception, two
batches, each request twice), and an openai rerun while the create is in flight would find no
batch to re-attach and create a second one. The partition key is non-ASCII, so the chunk
identity sent as ``Idempotency-Key`` (and as metadata) comes from a key no header can carry.
"""

from __future__ import annotations

import collections
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from crash_child import SPEC, rows, submit

from infron_dagster import BatchStorage, InfronClient, ResultFile, prepare_requests
from infron_dagster.columns import CUSTOM_ID
from infron_dagster.local import LocalServerConfig
from infron_dagster.local.embedded import embedded_client
from infron_dagster.local.process import serve_in_subprocess
from infron_dagster.submit import SubmitIncomplete, load_manifests

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crash_child.py")
NAME = "crash"
KEY = "Zürich/2026-11-26"
API_KEY = "sk-crash-test-123456"
LATENCY = 3.0  # seconds the served server sleeps before handling each request
# After the intent is on storage, the child needs milliseconds to send the create request;
# this wait makes sure the bytes left before the kill, and is far below LATENCY.
SEND_GRACE = 0.5
INTENT_DEADLINE = 30.0  # child start (imports) + one upload at LATENCY, with room
POLL = 0.02


@dataclass
class Crash:
    """A child killed during its create call, and where everything lives."""

    style: str
    base_url: str
    data_dir: str
    root: str
    tmp_path: Any
    intent: dict[str, Any]  # the chunk record on storage when the child was killed
    killed_at: float

    @property
    def storage(self) -> BatchStorage:
        return BatchStorage(self.root, NAME)

    def rerun(self, client: InfronClient, **kwargs: Any):
        workdir = self.tmp_path / f"rerun-{len(list(self.tmp_path.glob('rerun-*')))}"
        return submit(client, self.root, NAME, KEY, str(workdir), **kwargs)

    def served_client(self) -> InfronClient:
        return InfronClient(API_KEY, self.base_url, self.style)  # type: ignore[arg-type]


def _front_door(data_dir: str) -> InfronClient:
    """The same server state through an in-process app with no latency: to look at what the
    server holds at once (through its API), while the served process sleeps on a request."""
    config = LocalServerConfig(validating_seconds=0.0, in_progress_seconds=3600.0)
    return embedded_client(data_dir, api_style="openai", config=config)


def _server_batches(data_dir: str) -> list[Any]:
    with _front_door(data_dir) as client:
        return list(client.list_batches())


def _requests_per_custom_id(data_dir: str) -> collections.Counter[str]:
    """How many times each custom_id was sent, over every batch the server holds."""
    counts: collections.Counter[str] = collections.Counter()
    with _front_door(data_dir) as client:
        for batch in client.list_batches():
            buffer = io.BytesIO()
            client.download(ResultFile("output", file_id=batch.raw["input_file_id"]), buffer)
            for line in buffer.getvalue().decode().splitlines():
                if line.strip():
                    counts[json.loads(line)["custom_id"]] += 1
    return counts


def _expected_custom_ids(tmp_path) -> set[str]:
    prepared = prepare_requests(
        rows(), SPEC, name=NAME, partition_key=KEY, workdir=tmp_path / "expected"
    )
    return set(prepared.valid.column(CUSTOM_ID).to_pylist())


def _manifest_record(storage: BatchStorage) -> dict[str, Any] | None:
    path = storage.manifest_path(KEY, 1)
    try:
        return json.loads(path.read_bytes())
    except (FileNotFoundError, json.JSONDecodeError):
        return None  # not written yet (writes are atomic, so never half written)


def _child_log(log_path: str) -> str:
    with open(log_path, encoding="utf-8", errors="replace") as fh:
        return fh.read()[-4000:]


def _await_intent(child: subprocess.Popen, storage: BatchStorage, log: str) -> dict[str, Any]:
    """The chunk record once the intent is on storage (the create call is about to go)."""
    deadline = time.monotonic() + INTENT_DEADLINE
    while time.monotonic() < deadline:
        ended = child.poll() is not None  # before reading, so a last write is seen
        record = _manifest_record(storage)
        if record is not None:
            [chunk] = record["chunks"]
            assert chunk["batch_id"] is None, (
                f"the create call answered (batch {chunk['batch_id']} recorded) and no intent "
                "(the chunk uncertain, with create_started_at and no batch id) was seen on "
                "storage before it: the intent must be written before the paid call, or the "
                "server's latency did not hold the call in flight"
            )
            if chunk["uncertain"] and chunk["create_started_at"]:
                return chunk
        if ended:
            pytest.fail(
                f"the child ended ({child.returncode}) before its create call; manifest: "
                f"{record}\nchild:\n{_child_log(log)}"
            )
        time.sleep(POLL)
    record = _manifest_record(storage)
    pytest.fail(
        f"no intent on storage within {INTENT_DEADLINE} s (the create call must be recorded "
        f"as started before it is made); manifest: {record}\nchild:\n{_child_log(log)}"
    )


def _await_server_batches(data_dir: str, count: int, since: float) -> list[Any]:
    """The server's batches once it holds ``count`` (the create it was sent has finished)."""
    deadline = since + LATENCY + 10.0
    while True:
        batches = _server_batches(data_dir)
        if len(batches) >= count:
            assert len(batches) == count, f"{len(batches)} batches on the server: {batches}"
            return batches
        if time.monotonic() > deadline:
            pytest.fail(
                f"the server holds {len(batches)} batch(es), not {count}, {LATENCY} s "
                "after the kill: the create request never reached it"
            )
        time.sleep(0.05)


@contextmanager
def _crash(tmp_path, style: str) -> Iterator[Crash]:
    """A served server, and a child submitting through it killed during its create call."""
    data_dir, root = str(tmp_path / "server"), str(tmp_path / "lake")
    flags = ["--api-key", API_KEY, "--latency-seconds", f"{LATENCY:g}"]
    flags += ["--validating-seconds", "0", "--in-progress-seconds", "3600"]
    with serve_in_subprocess(data_dir, *flags) as base_url:
        log = str(tmp_path / "child.log")
        args = [style, base_url, API_KEY, root, NAME, KEY, str(tmp_path / "child-work")]
        with open(log, "wb") as out:
            child = subprocess.Popen(
                [sys.executable, CHILD, *args], stdout=out, stderr=subprocess.STDOUT
            )
        try:
            storage = BatchStorage(root, NAME)
            intent = _await_intent(child, storage, log)
            time.sleep(SEND_GRACE)
            if child.poll() is not None:
                pytest.fail(
                    f"the child ended ({child.returncode}) during its create call:\n"
                    + _child_log(log)
                )
            child.send_signal(signal.SIGKILL)
            assert child.wait(timeout=10) == -signal.SIGKILL
            killed_at = time.monotonic()
            [chunk] = _manifest_record(storage)["chunks"]  # type: ignore[index]
            assert chunk["batch_id"] is None and chunk["uncertain"], (
                "the create call answered before the kill: it was not in flight"
            )
            # The chunk's identity (header and metadata) is ASCII, whatever the partition key.
            assert intent["idempotency_key"].isascii() and KEY not in intent["idempotency_key"]
            yield Crash(style, base_url, data_dir, root, tmp_path, intent, killed_at)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=10)


def _assert_paid_once(crash: Crash) -> Any:
    """Exactly one batch on the server, holding each request of the partition once."""
    batches = _server_batches(crash.data_dir)
    assert len(batches) == 1, f"{len(batches)} batches on the server: {batches}"
    counts = _requests_per_custom_id(crash.data_dir)
    assert set(counts) == _expected_custom_ids(crash.tmp_path)
    assert all(n == 1 for n in counts.values()), f"requests paid more than once: {counts}"
    return batches[0]


def test_infron_style_a_kill_during_create_is_never_resent_blindly(tmp_path):
    with _crash(tmp_path, "infron") as crash:
        # Let the server finish the create the killed child sent it.
        [orphan] = _await_server_batches(crash.data_dir, 1, crash.killed_at)
        with (
            crash.served_client() as client,
            pytest.raises(SubmitIncomplete, match="resubmit_uncertain"),
        ):
            crash.rerun(client)
        _assert_paid_once(crash)
        # Sending again (resubmit_uncertain=True) would pay twice: infron style cannot ask
        # the server, so the chunk stays uncertain for a person to decide.
        [manifest] = load_manifests(crash.storage, KEY)
        [chunk] = manifest.chunks
        assert chunk.uncertain and chunk.batch_id is None
        assert chunk.create_started_at == crash.intent["create_started_at"]
        assert manifest.state == "submitting" and manifest.batch_ids == []
        assert orphan.id not in json.dumps(manifest.to_dict())


def test_openai_style_a_kill_during_create_reattaches_the_orphan(tmp_path):
    with _crash(tmp_path, "openai") as crash:
        # While the server still sleeps on the create, it does not list the batch: only the
        # intent stops the rerun from creating a second one.
        assert _server_batches(crash.data_dir) == [], "the create finished before the rerun"
        with _front_door(crash.data_dir) as client:
            waiting = crash.rerun(client)  # only time settles it: the run waits, not fails
        assert "re-attached by its metadata" in waiting.waiting_for
        assert waiting.created == [] and waiting.reattached == []
        [chunk] = load_manifests(crash.storage, KEY)[0].chunks
        assert chunk.uncertain and chunk.batch_id is None

        [orphan] = _await_server_batches(crash.data_dir, 1, crash.killed_at)
        assert orphan.metadata["infron_dagster_key"] == crash.intent["idempotency_key"]
        with crash.served_client() as client:
            outcome = crash.rerun(client)
        assert outcome.reattached == [orphan.id] and outcome.created == []
        assert _assert_paid_once(crash).id == orphan.id
        [manifest] = load_manifests(crash.storage, KEY)
        assert manifest.batch_ids == [orphan.id] and manifest.state == "submitted"
        assert not manifest.chunks[0].uncertain
