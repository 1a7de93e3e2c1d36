"""Tests of InfronResource (infron_dagster.resources): local vs real endpoints, and the key."""

from __future__ import annotations

import http.server
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from conftest import BOTH_STYLES

from infron_dagster.client import DEFAULT_BASE_URL
from infron_dagster.errors import InfronConnectionError
from infron_dagster.local.embedded import EMBEDDED_BASE_URL, embedded_client
from infron_dagster.models import BatchStatus
from infron_dagster.resources import InfronResource, default_local_dir

KEY = "sk-resource-test-key-424242"
CHAT = "/v1/chat/completions"


def write_requests(path: Path, n: int) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            body = {"model": "m", "messages": [{"role": "user", "content": f"hi {i}"}]}
            line = {"custom_id": f"r-{i}", "method": "POST", "url": CHAT, "body": body}
            fh.write(json.dumps(line) + "\n")
    return path


@pytest.fixture
def default_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the embedded server's default folder at a temp dir (not the working directory)."""
    folder = str(tmp_path / "default-local")
    monkeypatch.setenv("INFRON_LOCAL_DATA_DIR", folder)
    return folder


def batch_exists_in(folder: str, batch_id: str) -> bool:
    with embedded_client(folder) as client:
        try:
            client.retrieve_batch(batch_id)
        except Exception:
            return False
    return True


# -- where the resource points -----------------------------------------------------------------


def test_no_key_no_url_is_the_embedded_local_server(default_dir: str, tmp_path: Path) -> None:
    resource = InfronResource()
    assert resource.is_local
    with resource.get_client() as client:
        assert client.base_url == EMBEDDED_BASE_URL
        batch = client.create_batch(write_requests(tmp_path / "r.jsonl", 2))
        assert batch.status is BatchStatus.VALIDATING
    # The state is on disk in the default folder, where another process would see it.
    assert batch_exists_in(default_dir, batch.id)


def test_api_key_alone_means_the_real_infron_api(default_dir: str) -> None:
    resource = InfronResource(api_key=KEY, max_retries=2, retry_budget_seconds=7.0)
    assert not resource.is_local
    # Building a client makes no network call; nothing here may reach the internet.
    with resource.get_client() as client:
        assert client.base_url == DEFAULT_BASE_URL == "https://llm.onerouter.pro/v1"
        assert client.api_style == "infron"
        assert (client.retry.max_retries, client.retry.budget_seconds) == (2, 7.0)
        assert KEY not in repr(client)


def test_explicit_real_url_and_style_are_used() -> None:
    resource = InfronResource(
        api_key=KEY, base_url="https://api.openai.com/v1/", api_style="openai"
    )
    assert not resource.is_local
    with resource.get_client() as client:
        assert client.base_url == "https://api.openai.com/v1"
        assert client.api_style == "openai"


@pytest.mark.parametrize("api_key", [None, KEY])
@BOTH_STYLES
def test_local_url_uses_that_folder(
    default_dir: str, tmp_path: Path, api_style: str, api_key: str | None
) -> None:
    folder = str(tmp_path / "chosen")
    resource = InfronResource(api_key=api_key, base_url=f"local://{folder}", api_style=api_style)
    assert resource.is_local
    with resource.get_client() as client:
        assert client.base_url == EMBEDDED_BASE_URL and client.api_style == api_style
        batch = client.create_batch(write_requests(tmp_path / "r.jsonl", 2))
    assert batch.api_style == api_style
    assert batch_exists_in(folder, batch.id)
    assert not batch_exists_in(default_dir, batch.id)


def test_bare_local_url_uses_local_data_dir(default_dir: str, tmp_path: Path) -> None:
    folder = str(tmp_path / "configured")
    resource = InfronResource(base_url="local", local_data_dir=folder)
    assert resource.is_local
    with resource.get_client() as client:
        batch = client.create_batch(write_requests(tmp_path / "r.jsonl", 1))
    assert batch_exists_in(folder, batch.id)
    assert not batch_exists_in(default_dir, batch.id)


def test_default_local_dir_prefers_env_then_dagster_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFRON_LOCAL_DATA_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert default_local_dir() == str(tmp_path / "explicit")
    monkeypatch.delenv("INFRON_LOCAL_DATA_DIR")
    assert default_local_dir() == str(tmp_path / "home" / "infron_local")


@pytest.fixture
def slow_server() -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server that answers after 2 s (the local server's latency knob cannot be
    set through the resource, which builds its own client); records each request path."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            time.sleep(2.0)
            try:
                self.send_response(200)
                self.end_headers()
            except OSError:
                pass  # the client gave up long ago, as it should

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", hits
    finally:
        server.shutdown()
        server.server_close()


def test_timeout_and_retries_reach_the_client(slow_server: tuple[str, list[str]]) -> None:
    base_url, hits = slow_server
    resource = InfronResource(api_key=KEY, base_url=base_url, timeout_seconds=0.2, max_retries=1)
    started = time.monotonic()
    with resource.get_client() as client, pytest.raises(InfronConnectionError):
        client.retrieve_batch("batch_x")
    # Two tries of 0.2 s (about 0.5 s); ignoring the timeout would wait the server's 2 s twice
    # (4 s): the margin between is for a busy machine.
    assert time.monotonic() - started < 3.5
    assert hits == ["/v1/batches/batch_x"] * 2  # max_retries=1: two tries


def test_configured_but_empty_key_does_not_fall_back_to_the_mock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("INFRON_API_KEY", "")
    seen: list[bool] = []

    @dg.asset
    def probe(infron: InfronResource) -> None:
        seen.append(infron.is_local)

    resources = {"infron": InfronResource(api_key=dg.EnvVar("INFRON_API_KEY"))}
    dg.materialize([probe], resources=resources, raise_on_error=False)
    assert seen == [False]


def test_resource_repr_hides_the_key() -> None:
    resource = InfronResource(api_key=KEY)
    assert KEY not in repr(resource) and KEY not in str(resource)


# -- dg.EnvVar in a real run -----------------------------------------------------------------


def _run_texts(instance: dg.DagsterInstance, result: dg.ExecuteInJobResult) -> list[str]:
    """Everything the run left behind: every event record (full serialised form) and the run."""
    records = instance.all_logs(result.run_id)
    texts = [str(r) for r in records] + [dg.serialize_value(r) for r in records]
    texts += [str(event) for event in result.all_events]
    texts.append(str(instance.get_run_by_id(result.run_id)))
    return texts


def test_env_var_key_resolves_in_a_run_and_never_reaches_the_event_log(
    served_local: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    requests = write_requests(tmp_path / "r.jsonl", 3)

    # `context` stays unannotated: with postponed annotations Dagster would see a string.
    @dg.asset
    def submitted(context, infron: InfronResource) -> dg.MaterializeResult:
        with infron.get_client() as client:
            batch = client.retrieve_batch(client.create_batch(requests).id)
        context.log.info(f"{client!r} finished {batch.id} as {batch.status.value}")
        return dg.MaterializeResult(
            metadata={
                "batch_id": batch.id,
                "status": batch.status.value,
                "base_url": client.base_url,
                "is_local": infron.is_local,
            }
        )

    resources = {
        "infron": InfronResource(
            api_key=dg.EnvVar("INFRON_API_KEY"), base_url=served_local.base_url, api_style="openai"
        )
    }
    instance = dg.DagsterInstance.ephemeral()

    # The right key: the served process accepts only it, so success proves EnvVar resolved.
    monkeypatch.setenv("INFRON_API_KEY", served_local.api_key)
    good = dg.materialize([submitted], resources=resources, instance=instance)
    assert good.success
    (materialization,) = good.asset_materializations_for_node("submitted")
    meta = {k: v.value for k, v in materialization.metadata.items()}
    assert meta["status"] == "completed" and meta["base_url"] == served_local.base_url
    assert meta["is_local"] is False
    good_texts = _run_texts(instance, good)
    assert any(meta["batch_id"] in text for text in good_texts)  # the scan sees the run's data
    assert all(served_local.api_key not in text for text in good_texts)

    # A wrong key: the run fails with the auth error, and neither key is in what it recorded.
    wrong = "sk-wrong-resource-key-000111"
    monkeypatch.setenv("INFRON_API_KEY", wrong)
    bad = dg.materialize([submitted], resources=resources, instance=instance, raise_on_error=False)
    assert not bad.success
    bad_texts = _run_texts(instance, bad)
    assert any("InfronAuthError" in text and "HTTP 401" in text for text in bad_texts)
    for text in bad_texts:
        assert wrong not in text and served_local.api_key not in text

    assert served_local.api_key not in caplog.text and wrong not in caplog.text


def test_a_literal_api_key_is_warned_about_once_without_showing_it(caplog, monkeypatch):
    import infron_dagster.resources as resources

    monkeypatch.setattr(resources, "_warned", set())
    monkeypatch.setenv("INFRON_TEST_KEY", "sk-from-the-environment-42")
    with caplog.at_level("WARNING", logger="infron_dagster.resources"):
        InfronResource(api_key=dg.EnvVar("INFRON_TEST_KEY"))
        InfronResource(api_key="sk-from-the-environment-42")  # Dagster's run-time rebuild
        assert caplog.records == []
        InfronResource(api_key="sk-literal-in-code-1234")
        InfronResource(api_key="sk-literal-in-code-5678")
    [record] = caplog.records
    assert "dg.EnvVar" in record.getMessage() and "sk-literal" not in caplog.text
