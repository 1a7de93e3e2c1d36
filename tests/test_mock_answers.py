"""Mock answers never become a real pipeline's results: a partition answered by the embedded
local server is sent again once the resource is a real API (its own attempts, rows carried
from them, other partitions' answers with ``reuse_answers="pipeline"``, a retry on top of
them); real answers are reused while developing on the local server; manifests written
before the provider was recorded are trusted, so an upgrade never pays again.

Real Dagster runs and the real sensor. The "real API" is ``infron-local serve`` in its own
process, reached over HTTP with a key: to the library it is a provider like any other
(``http://127.0.0.1:<port>``). What each server was sent is read from its own files.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import dagster as dg
import pytest
from conftest import make_local_dir
from harness import Pipeline, failure, metadata, reviews_frame

from infron_dagster import InfronResource
from infron_dagster.local.process import serve_in_subprocess
from infron_dagster.local.store import Store

# One partition per test: the tests share the "real" server, which counts by custom_id.
PARTS = dg.StaticPartitionsDefinition(["a", "b", "c", "d", "e", "f"])
ROWS = 5
KEY = "sk-test-real-api-0123456789"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A provider that is not the embedded server: its base URL and its state folder."""
    folder = str(tmp_path_factory.mktemp("real"))
    instant = ["--validating-seconds", "0", "--in-progress-seconds", "0"]
    with serve_in_subprocess(
        folder, "--api-key", KEY, *instant, "--finalizing-seconds", "0"
    ) as url:
        yield url, folder


def _real(real) -> InfronResource:
    return InfronResource(api_key=KEY, base_url=real[0], max_retries=2)


def _flow(tmp_path, rows: dict | None = None, resource=None, **factory) -> Pipeline:
    """The pipeline on the lake under ``tmp_path``, on the embedded local server unless
    ``resource`` (building it again with another resource is switching the deployment's
    resource: its runs and ticks use it); ``rows``: a partition's input, if not the default
    ``ROWS`` reviews."""
    local = make_local_dir(str(tmp_path / "local"), **factory.pop("knobs", {}))
    resource = resource or InfronResource(base_url=f"local://{local}")
    given = rows if rows is not None else {}

    def frame(key):
        return given.get(key, reviews_frame(ROWS))

    return Pipeline.build(tmp_path, resource, PARTS, frame=frame, **factory)


def _ids(flow: Pipeline, key: str) -> set[str]:
    """The custom_ids of a partition's rows (from its first attempt's snapshot)."""
    snapshot = flow.storage.read_table(flow.storage.attempt_file("inputs", key, 1))
    return set(snapshot.column("custom_id").to_pylist())


def _sent(folder: str, ids: set[str] | None = None) -> Counter:
    """custom_id -> how many times a server was sent it (of these custom_ids, if given)."""
    store = Store(folder)
    sent: Counter = Counter()
    for batch in store.list_batches():
        for line in Path(store.content_path(batch["input_file_id"])).read_text().splitlines():
            cid = json.loads(line)["custom_id"]
            if ids is None or cid in ids:
                sent[cid] += 1
    return sent


def _submit(flow: Pipeline, instance, key: str, **config) -> dict:
    result = flow.submit(instance, key, **config)
    assert result.success, failure(result)
    return metadata(result)


def _batch_ids(folder: str) -> set[str]:
    return {b["id"] for b in Store(folder).list_batches()}


def test_the_provider_comes_from_the_resource_never_with_the_key(real):
    assert InfronResource().provider == "local"
    assert InfronResource(base_url="local:///tmp/x").provider == "local"
    assert InfronResource(api_key=KEY).provider == "https://llm.onerouter.pro"
    secret = InfronResource(api_key=KEY, base_url=f"https://me:{KEY}@API.Example.com:8443/v1?k=1")
    assert secret.provider == "https://api.example.com:8443"
    assert _real(real).provider == real[0].removesuffix("/v1")
    with InfronResource().get_client() as client:
        from infron_dagster.provider import provider_of

        assert provider_of(client.base_url) == "local"  # the embedded server's client


def test_local_answers_are_sent_again_against_a_real_api(tmp_path, instance, real):
    flow = _flow(tmp_path, reuse_answers="pipeline")
    _submit(flow, instance, "a")
    flow.drive(instance, ["a"])
    assert flow.manifests("a")[0].provider == "local"
    local_results = flow.frame("results", "a")

    flow = _flow(tmp_path, resource=_real(real), reuse_answers="pipeline")
    # b's requests are a's (same texts): pipeline reuse would carry a's mock answers
    b = _submit(flow, instance, "b")
    assert b.get("carried_rows", 0) == 0 and b["batches_created"] == 1, b
    assert "not reused against " + real[0].removesuffix("/v1") in b["mock_answers_not_reused"]
    assert "1 other partition(s)" in b["mock_answers_not_reused"]
    # a itself, unchanged: the unchanged rerun that pays nothing would keep the mock answers
    a = _submit(flow, instance, "a")
    assert a["attempt"] == 2 and a["batches_created"] == 1 and not a.get("carried_rows"), a
    assert "attempt 1 of this partition" in a["mock_answers_not_reused"]
    flow.drive(instance, ["a", "b"])

    real_batches = _batch_ids(real[1])
    for key in ("a", "b"):
        results = flow.frame("results", key)
        assert len(results) == ROWS and set(results.batch_id) <= real_batches, key
        sent = _sent(real[1], _ids(flow, key))
        assert len(sent) == ROWS and set(sent.values()) == {1}, (key, sent)
    assert not set(local_results.batch_id) & real_batches
    manifest = flow.manifests("a")[-1]
    assert manifest.provider == real[0].removesuffix("/v1")
    lake = "".join(p.read_text() for p in (tmp_path / "lake").rglob("*.json"))
    assert KEY not in lake  # the provider is the scheme and host, never the key

    again = _submit(flow, instance, "a")  # real answers now: an unchanged rerun pays nothing
    assert again["reused_existing_batches"] is True and not again.get("mock_answers_not_reused")
    assert _batch_ids(real[1]) == real_batches


def test_rows_in_flight_on_the_local_server_are_not_waited_for(tmp_path, instance, real):
    rows: dict = {}
    flow = _flow(tmp_path, rows)
    _submit(flow, instance, "f")  # in flight on the local server, never collected
    rows["f"] = reviews_frame(ROWS + 1)  # changed: its unchanged rows would wait for it
    flow = _flow(tmp_path, rows, resource=_real(real))
    changed = _submit(flow, instance, "f")
    assert not changed.get("carried_rows") and changed["batches_created"] == 1, changed
    assert "attempt 1 of this partition" in changed["mock_answers_not_reused"]
    assert flow.manifests("f")[-1].waits_on == []
    flow.drive(instance, ["f"])
    results = flow.frame("results", "f")
    assert len(results) == ROWS + 1 and set(results.batch_id) <= _batch_ids(real[1])


def test_real_answers_are_reused_while_developing_on_local(tmp_path, instance, real):
    rows: dict = {}
    flow = _flow(tmp_path, rows, resource=_real(real))
    _submit(flow, instance, "c")
    flow.drive(instance, ["c"])
    flow = _flow(tmp_path, rows)
    same = _submit(flow, instance, "c")
    assert same["reused_existing_batches"] is True and not same.get("mock_answers_not_reused")
    rows["c"] = reviews_frame(ROWS + 1)  # a new row, sent to the local server alone
    more = _submit(flow, instance, "c")
    assert more["carried_rows"] == ROWS and more["batches_created"] == 1, more
    assert not more.get("mock_answers_not_reused")
    flow.drive(instance, ["c"])
    assert sum(_sent(flow.local_dir).values()) == 1
    assert len(flow.frame("results", "c")) == ROWS + 1


def test_a_retry_on_top_of_mock_answers_is_refused_against_a_real_api(tmp_path, instance, real):
    flow = _flow(tmp_path, knobs={"failure_rate": 0.5})
    _submit(flow, instance, "d")
    flow.drive(instance, ["d"])
    assert flow.table("failed", "d").num_rows  # retryable failures to retry
    before = _batch_ids(real[1])
    flow = _flow(tmp_path, resource=_real(real))
    refused = flow.job("retry", instance, "d", raise_on_error=False)
    assert not refused.success
    assert "local mock server" in failure(refused) and "Materialize" in failure(refused)
    assert _batch_ids(real[1]) == before


def test_manifests_from_before_the_provider_are_trusted(tmp_path, instance, real):
    flow = _flow(tmp_path)
    _submit(flow, instance, "e")
    flow.drive(instance, ["e"])
    path = flow.storage.manifest_path("e", 1)
    data = json.loads(path.read_text())
    data.pop("provider", None)  # as an earlier version wrote it
    path.write_text(json.dumps(data))
    before = _batch_ids(real[1])
    flow = _flow(tmp_path, resource=_real(real))
    upgraded = _submit(flow, instance, "e")
    assert upgraded["reused_existing_batches"] is True, upgraded
    assert _batch_ids(real[1]) == before  # an upgrade never pays again
