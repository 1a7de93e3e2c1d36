"""Tests of the batch API client (infron_dagster.client) against the real local server.

The local server runs three ways here, always for real: in-process through
``embedded_client`` (the WSGI app over httpx's WSGI transport), served over real HTTP in a
thread (``local_http``: the same app, with fault knobs, behind the wsgiref server that
``infron-local serve`` uses), and as the ``infron-local serve`` process (``served_local``).
Retry waits are recorded through the client's ``sleep=`` parameter instead of being slept.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import make_server

import pytest
from conftest import BOTH_STYLES, Answer, Scripted, free_port, json_answer, make_local_dir

from infron_dagster.client import DEFAULT_BASE_URL, InfronClient, ResultFile, RetryPolicy
from infron_dagster.errors import (
    InfronAuthError,
    InfronBadRequestError,
    InfronConnectionError,
    InfronError,
    InfronInsufficientCreditsError,
    InfronNotFoundError,
    InfronRateLimitError,
    InfronServerError,
)
from infron_dagster.local import create_app
from infron_dagster.local.cli import QuietHandler, ThreadingWSGIServer
from infron_dagster.local.embedded import EMBEDDED_BASE_URL, embedded_client
from infron_dagster.local.mock_model import estimate_prompt_tokens
from infron_dagster.models import Batch, BatchStatus

CHAT = "/v1/chat/completions"
KEY = "sk-client-test-key-0123456789"


# -- helpers ---------------------------------------------------------------------------------


def request_line(custom_id: str, content: str = "hi") -> dict[str, Any]:
    body = {"model": "m", "messages": [{"role": "user", "content": content}]}
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}


def write_requests(path: Path, n: int, *, prefix: str = "req", content: str = "hi") -> list[str]:
    """An OpenAI-style JSONL request file of ``n`` chat requests; returns the custom_ids."""
    ids = [f"{prefix}-{i:03d}" for i in range(n)]
    with open(path, "w", encoding="utf-8") as fh:
        for custom_id in ids:
            fh.write(json.dumps(request_line(custom_id, content)) + "\n")
    return ids


def download_lines(client: InfronClient, result: ResultFile) -> list[dict[str, Any]]:
    buf = io.BytesIO()
    written = client.download(result, buf)
    assert written == len(buf.getvalue())
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def all_result_lines(client: InfronClient, batch: Batch) -> list[dict[str, Any]]:
    return [line for f in client.result_files(batch) for line in download_lines(client, f)]


def error_code(line: dict[str, Any]) -> str | None:
    """The error code of a result line: a batch-level error, or an error answer's code."""
    if line.get("error"):
        return line["error"]["code"]
    body = (line.get("response") or {}).get("body") or {}
    return (body.get("error") or {}).get("code")


def fast_retry(max_retries: int = 3, **kw: float) -> RetryPolicy:
    return RetryPolicy(max_retries=max_retries, initial_delay=0.1, max_delay=10.0, **kw)


@dataclass
class LocalHttp:
    """The local app served over real HTTP in this process; ``hits`` logs every answer."""

    base_url: str
    data_dir: str
    hits: list[tuple[str, str, str, int]] = field(default_factory=list)

    def client(
        self,
        api_style: str,
        waits: list[float] | None = None,
        *,
        retry: RetryPolicy | None = None,
        api_key: str | None = KEY,
        timeout: float = 10.0,
    ) -> InfronClient:
        return InfronClient(
            api_key=api_key,
            base_url=self.base_url,
            api_style=api_style,  # type: ignore[arg-type]
            retry=retry or fast_retry(),
            timeout=timeout,
            connect_timeout=2.0,
            sleep=(waits.append if waits is not None else _never_sleep),
        )

    def statuses(self) -> list[int]:
        return [status for *_, status in self.hits]


def _never_sleep(seconds: float) -> None:
    raise AssertionError(f"the client tried to sleep {seconds}s where no retry was expected")


class _QuietServer(ThreadingWSGIServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out and left is expected here, not an error


@pytest.fixture
def local_http(tmp_path: Path) -> Iterator[Callable[..., LocalHttp]]:
    """Start the local app, with the given fault knobs, on a free port of this process."""
    servers: list[ThreadingWSGIServer] = []

    def start(**knobs: Any) -> LocalHttp:
        folder = make_local_dir(str(tmp_path / f"http-{len(servers)}"), **knobs)
        app = create_app(folder)
        server = make_server(
            "127.0.0.1", 0, app, server_class=_QuietServer, handler_class=QuietHandler
        )
        served = LocalHttp(f"http://127.0.0.1:{server.server_port}/v1", folder)

        def counting(environ: dict[str, Any], start_response: Any) -> Any:
            def record(status: str, headers: Any, exc_info: Any = None) -> Any:
                served.hits.append(
                    (
                        environ["REQUEST_METHOD"],
                        environ["PATH_INFO"],
                        environ.get("QUERY_STRING", ""),
                        int(status.split()[0]),
                    )
                )
                return start_response(status, headers, exc_info)

            return app(environ, record)

        server.set_app(counting)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return served

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# -- the lifecycle, both styles --------------------------------------------------------------


@BOTH_STYLES
def test_create_retrieve_reaches_completed_with_normalised_status(
    local_dir: str, api_style: str, tmp_path: Path
) -> None:
    path = tmp_path / "requests.jsonl"
    write_requests(path, 30)
    with embedded_client(local_dir, api_style=api_style) as client:
        created = client.create_batch(path, endpoint=CHAT, metadata={"partition": "p1"})
        done = client.retrieve_batch(created.id)

    assert created.api_style == done.api_style == api_style
    assert created.status is BatchStatus.VALIDATING and not created.is_terminal
    assert done.id == created.id
    assert done.status is BatchStatus.COMPLETED and done.is_terminal
    # Infron answers its own upper-case "SUCCESS"; the enum is the same for both styles.
    assert done.raw_status == ("SUCCESS" if api_style == "infron" else "completed")
    assert (done.total_requests, done.completed_requests, done.failed_requests) == (30, 30, 0)
    assert done.progress == 1.0
    assert done.created_at is not None and done.finished_at is not None
    assert done.created_at <= done.finished_at
    if api_style == "openai":
        assert done.metadata == {"partition": "p1"}
        assert done.output_file_id and done.result_url is None
    else:
        assert done.result_url and done.output_file_id is None
        assert done.cost is not None and done.cost > 0
        assert done.total_tokens == done.prompt_tokens + done.completion_tokens > 0


@BOTH_STYLES
def test_blank_lines_in_the_request_file_are_skipped(
    local_dir: str, api_style: str, tmp_path: Path
) -> None:
    path = tmp_path / "requests.jsonl"
    lines = [json.dumps(request_line(f"r{i}")) for i in range(3)]
    path.write_text("\n" + "\n\n".join(lines) + "\n\n", encoding="utf-8")
    with embedded_client(local_dir, api_style=api_style) as client:
        batch = client.retrieve_batch(client.create_batch(path).id)
    assert batch.status is BatchStatus.COMPLETED and batch.total_requests == 3


@BOTH_STYLES
def test_results_hold_every_custom_id_exactly_once_in_shuffled_order(
    tmp_path: Path, api_style: str
) -> None:
    folder = make_local_dir(str(tmp_path / "faulty"), failure_rate=0.3)
    path = tmp_path / "requests.jsonl"
    ids = write_requests(path, 30)
    with embedded_client(folder, api_style=api_style) as client:
        batch = client.retrieve_batch(client.create_batch(path).id)
        files = client.result_files(batch)
        per_file = {f.kind: download_lines(client, f) for f in files}

    if api_style == "openai":
        assert [f.kind for f in files] == ["output", "errors"]
        assert all(f.file_id and f.url is None for f in files)
    else:
        assert [f.kind for f in files] == ["results"]  # one file mixes answers and errors
        assert files[0].url and files[0].file_id is None
        assert files[0].name.startswith("results-") and files[0].name.endswith(".jsonl")
    seen = [line["custom_id"] for lines in per_file.values() for line in lines]
    assert len(seen) == len(set(seen)) == 30
    assert set(seen) == set(ids)
    with embedded_client(folder, api_style=api_style) as client:
        streamed = [json.loads(line) for f in files for line in client.iter_lines(f)]
    assert streamed == [line for lines in per_file.values() for line in lines]
    assert seen != ids and seen != sorted(ids)  # the server reorders: join on custom_id only
    failed = [line for lines in per_file.values() for line in lines if error_code(line)]
    assert 0 < len(failed) < 30
    assert batch.failed_requests == len(failed)
    assert batch.completed_requests == 30 - len(failed)


@BOTH_STYLES
def test_cancel_moves_to_cancelled_with_every_request_in_the_results(
    tmp_path: Path, api_style: str
) -> None:
    folder = make_local_dir(str(tmp_path / "slow"), in_progress_seconds=600)
    path = tmp_path / "requests.jsonl"
    ids = write_requests(path, 5)
    with embedded_client(folder, api_style=api_style) as client:
        created = client.create_batch(path)
        cancelling = client.cancel_batch(created.id)
        cancelled = client.retrieve_batch(created.id)
        lines = all_result_lines(client, cancelled)

    assert cancelling.id == created.id
    assert cancelling.status is BatchStatus.CANCELLING and not cancelling.is_terminal
    assert cancelled.status is BatchStatus.CANCELLED and cancelled.is_terminal
    assert sorted(line["custom_id"] for line in lines) == ids
    assert {error_code(line) for line in lines} == {"batch_cancelled"}


@BOTH_STYLES
def test_cancel_of_a_finished_batch_is_a_bad_request_not_retried(
    local_dir: str, api_style: str, tmp_path: Path
) -> None:
    path = tmp_path / "requests.jsonl"
    write_requests(path, 2)
    with embedded_client(local_dir, api_style=api_style) as client:
        batch = client.retrieve_batch(client.create_batch(path).id)
        with pytest.raises(InfronBadRequestError) as caught:
            client.cancel_batch(batch.id)
    assert caught.value.status_code == 400
    assert caught.value.code == "batch_not_cancellable"
    assert f"cancel batch {batch.id}" in str(caught.value)


def test_list_batches_pages_through_every_batch_newest_first(
    local_http: Callable[..., LocalHttp], tmp_path: Path
) -> None:
    server = local_http()
    path = tmp_path / "requests.jsonl"
    write_requests(path, 1)
    with server.client("openai") as client:
        created = [client.create_batch(path, metadata={"n": str(i)}).id for i in range(5)]
        server.hits.clear()
        listed = list(client.list_batches(page_size=2))

    assert [b.id for b in listed] == created[::-1]
    assert [b.metadata for b in listed] == [{"n": str(i)} for i in reversed(range(5))]
    pages = [query for method, route, query, _ in server.hits if route == "/v1/batches"]
    assert len(pages) == len(server.hits) == 3  # 2 + 2 + 1, following has_more
    assert all("limit=2" in query for query in pages)
    assert "after=" not in pages[0] and all("after=" in q for q in pages[1:])


def test_list_batches_is_not_implemented_in_infron_style(
    local_http: Callable[..., LocalHttp],
) -> None:
    server = local_http()
    with server.client("infron") as client, pytest.raises(NotImplementedError):
        client.list_batches()  # refused when called, not later when iterated
    assert server.hits == []  # refused before any call


def test_upload_streams_a_20_mb_file(served_local: Any, tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    ids = write_requests(path, 1000, content="x" * 20_000)
    size = path.stat().st_size
    assert size > 20_000_000
    for api_style in ("infron", "openai"):  # one served process for both: it starts slowly
        with InfronClient(served_local.api_key, served_local.base_url, api_style) as client:
            tracemalloc.start()
            try:
                batch = client.create_batch(path)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert batch.api_style == api_style
            assert batch.total_requests == len(ids)
            # Streamed: the client never holds the file (or infron's JSON body) whole.
            assert peak < size / 4, f"{api_style}: peak {peak} bytes for a {size}-byte file"
            if api_style == "openai":
                uploaded = io.BytesIO()
                client.download(ResultFile("output", file_id=batch.raw["input_file_id"]), uploaded)
                assert uploaded.getvalue() == path.read_bytes()


# -- errors: auth, not found, limits, faults -------------------------------------------------


def test_bad_key_is_an_auth_error_naming_the_operation_never_the_key(
    served_local: Any, tmp_path: Path
) -> None:
    path = tmp_path / "requests.jsonl"
    write_requests(path, 2)
    wrong = "sk-wrong-key-9876543210"
    for api_style, key in itertools.product(("infron", "openai"), (None, wrong)):
        case = f"{api_style}, key={key}"
        with InfronClient(key, served_local.base_url, api_style, sleep=_never_sleep) as client:
            with pytest.raises(InfronAuthError) as on_create:
                client.create_batch(path)
            with pytest.raises(InfronAuthError) as on_retrieve:
                client.retrieve_batch("batch_abc")

        operation = "upload file requests.jsonl" if api_style == "openai" else "create batch"
        assert str(on_create.value).startswith(f"{operation} failed (HTTP 401)"), case
        assert str(on_retrieve.value).startswith("retrieve batch batch_abc failed (HTTP 401)")
        expected = "Invalid API key" if key else "didn't provide an API key"
        for caught in (on_create, on_retrieve):
            assert caught.value.status_code == 401 and not caught.value.retryable, case
            assert expected in caught.value.server_message, case
            assert wrong not in str(caught.value) and wrong not in repr(caught.value), case
            assert served_local.api_key not in str(caught.value), case


@BOTH_STYLES
def test_unknown_batch_is_not_found_naming_the_batch(local_dir: str, api_style: str) -> None:
    with embedded_client(local_dir, api_style=api_style) as client:
        with pytest.raises(InfronNotFoundError) as on_retrieve:
            client.retrieve_batch("batch_doesnotexist")
        with pytest.raises(InfronNotFoundError) as on_cancel:
            client.cancel_batch("batch_doesnotexist")
        with pytest.raises(InfronNotFoundError) as on_download:
            client.download(ResultFile("output", file_id="file-doesnotexist"), io.BytesIO())
    assert str(on_retrieve.value).startswith("retrieve batch batch_doesnotexist failed (HTTP 404)")
    assert str(on_cancel.value).startswith("cancel batch batch_doesnotexist failed (HTTP 404)")
    assert "batch_doesnotexist" in on_retrieve.value.server_message
    assert on_retrieve.value.status_code == 404 and on_retrieve.value.code == "not_found"
    assert str(on_download.value).startswith("download output file failed (HTTP 404)")
    assert "file-doesnotexist" in str(on_download.value)


@BOTH_STYLES
def test_enqueued_token_limit_is_a_bad_request_with_its_code(
    local_http: Callable[..., LocalHttp], api_style: str, tmp_path: Path
) -> None:
    path = tmp_path / "requests.jsonl"
    write_requests(path, 4)
    with open(path, encoding="utf-8") as fh:
        one_batch = sum(estimate_prompt_tokens(json.loads(line)["body"]) for line in fh)
    # Room for exactly one queued batch; the batches stay in progress.
    server = local_http(enqueued_token_limit=one_batch, in_progress_seconds=600)
    with server.client(api_style) as client:
        first = client.create_batch(path)
        with pytest.raises(InfronBadRequestError) as caught:
            client.create_batch(path)
    assert first.status is BatchStatus.VALIDATING
    assert caught.value.status_code == 400
    assert caught.value.code == "token_limit_exceeded"
    assert str(caught.value).startswith("create batch failed (HTTP 400)")
    assert "Enqueued token limit" in caught.value.server_message
    assert not caught.value.retryable


@BOTH_STYLES
def test_expired_batch_keeps_partial_output_and_batch_expired_lines(
    tmp_path: Path, api_style: str
) -> None:
    folder = make_local_dir(str(tmp_path / "expiring"), expire=True, expire_fraction=0.5)
    path = tmp_path / "requests.jsonl"
    ids = write_requests(path, 10)
    with embedded_client(folder, api_style=api_style) as client:
        batch = client.retrieve_batch(client.create_batch(path).id)
        lines = all_result_lines(client, batch)

    assert batch.status is BatchStatus.EXPIRED and batch.is_terminal
    assert batch.status.has_results
    assert sorted(line["custom_id"] for line in lines) == ids
    expired = [line for line in lines if error_code(line) == "batch_expired"]
    answered = [line for line in lines if line["response"] and line["response"]["status_code"]]
    assert len(expired) == 5 and len(answered) == 5
    assert all(line["response"] is None for line in expired)
    assert (batch.completed_requests, batch.failed_requests) == (5, 5)
    if api_style == "openai":
        assert batch.output_file_id and batch.error_file_id
    else:
        assert "batch_expired" in batch.errors


@BOTH_STYLES
def test_validation_failure_fails_the_batch_with_its_errors(tmp_path: Path, api_style: str) -> None:
    folder = make_local_dir(str(tmp_path / "invalid"), validation_failure=True)
    path = tmp_path / "requests.jsonl"
    write_requests(path, 3)
    with embedded_client(folder, api_style=api_style) as client:
        batch = client.retrieve_batch(client.create_batch(path).id)
        files = client.result_files(batch)

    assert batch.status is BatchStatus.FAILED and batch.is_terminal
    assert not batch.status.has_results
    assert files == []
    assert any("validation_failure" in error for error in batch.errors)
    assert any("set to fail every batch validation" in error for error in batch.errors)


# -- retries ----------------------------------------------------------------------------------


@BOTH_STYLES
def test_rate_limits_are_retried_honouring_retry_after(
    local_http: Callable[..., LocalHttp], api_style: str, tmp_path: Path
) -> None:
    server = local_http(rate_limit_every=2, rate_limit_retry_after=0.25)
    path = tmp_path / "requests.jsonl"
    ids = write_requests(path, 6)
    waits: list[float] = []
    with server.client(api_style, waits) as client:
        batch = client.retrieve_batch(client.create_batch(path).id)
        lines = all_result_lines(client, batch)

    assert batch.status is BatchStatus.COMPLETED
    assert sorted(line["custom_id"] for line in lines) == ids
    throttled = server.statuses().count(429)
    assert throttled >= 2
    assert waits == [0.25] * throttled  # the server's hint, not our own backoff
    assert server.statuses().count(200) == len(server.hits) - throttled


@BOTH_STYLES
def test_server_errors_are_retried_with_backoff_then_succeed(
    local_http: Callable[..., LocalHttp], api_style: str, tmp_path: Path
) -> None:
    # Every third request fails, so the (non-idempotent) create lands on a good slot and the
    # idempotent calls after it meet the failures.
    server = local_http(server_error_every=3)
    path = tmp_path / "requests.jsonl"
    ids = write_requests(path, 4)
    waits: list[float] = []
    with server.client(api_style, waits, retry=fast_retry()) as client:
        created = client.create_batch(path)
        for _ in range(5):
            batch = client.retrieve_batch(created.id)
        lines = all_result_lines(client, batch)

    assert batch.status is BatchStatus.COMPLETED
    assert sorted(line["custom_id"] for line in lines) == ids
    failures = [s for s in server.statuses() if s >= 500]
    assert {500, 503} <= set(failures)
    assert len(waits) == len(failures)
    assert all(0.05 <= wait <= 0.1 for wait in waits)  # first retries: within initial_delay


def test_create_is_not_retried_after_an_ambiguous_server_error(
    local_http: Callable[..., LocalHttp], tmp_path: Path
) -> None:
    server = local_http(server_error_every=2)  # upload passes, the create POST gets a 500
    path = tmp_path / "requests.jsonl"
    write_requests(path, 2)
    waits: list[float] = []
    client = server.client("openai", waits, retry=fast_retry())
    with client, pytest.raises(InfronServerError) as info:
        client.create_batch(path)
    assert info.value.ambiguous and waits == []
    posts = [hit for hit in server.hits if hit[:2] == ("POST", "/v1/batches")]
    assert len(posts) == 1  # sent once: a retry might have paid for a second batch


@BOTH_STYLES
def test_permanent_server_error_gives_up_after_max_retries_with_growing_waits(
    local_http: Callable[..., LocalHttp], api_style: str, tmp_path: Path
) -> None:
    server = local_http(server_error_every=1)
    path = tmp_path / "requests.jsonl"
    write_requests(path, 2)
    waits: list[float] = []
    client = server.client(api_style, waits, retry=fast_retry(max_retries=3))
    with client, pytest.raises(InfronServerError) as caught:
        # An idempotent call in each style: openai uploads the file, infron reads a batch.
        if api_style == "openai":
            client.upload_file(path)
        else:
            client.retrieve_batch("batch_x")

    assert len(server.hits) == 4  # max_retries + 1 attempts
    assert {s for s in server.statuses()} <= {500, 503}
    assert len(waits) == 3
    assert waits[0] < waits[1] < waits[2]
    for n, wait in enumerate(waits):  # full jitter in [ceiling / 2, ceiling]
        ceiling = 0.1 * 2**n
        assert ceiling / 2 <= wait <= ceiling
    assert caught.value.retryable and caught.value.status_code in (500, 503)
    operation = "upload file requests.jsonl" if api_style == "openai" else "retrieve batch batch_x"
    assert str(caught.value).startswith(f"{operation} failed (HTTP 50")


def test_backoff_is_capped_at_max_delay(local_http: Callable[..., LocalHttp]) -> None:
    server = local_http(server_error_every=1)
    waits: list[float] = []
    retry = RetryPolicy(max_retries=6, initial_delay=0.1, max_delay=0.3)
    with server.client("openai", waits, retry=retry) as client, pytest.raises(InfronServerError):
        client.retrieve_batch("batch_x")
    assert len(waits) == 6
    assert all(wait <= 0.3 for wait in waits)
    assert all(wait >= 0.15 for wait in waits[2:])  # ceilings 0.3 from the third retry on


def test_zero_retry_budget_means_a_single_attempt(local_http: Callable[..., LocalHttp]) -> None:
    server = local_http(server_error_every=1)
    retry = fast_retry(max_retries=5, budget_seconds=0.0)
    with server.client("infron", retry=retry) as client, pytest.raises(InfronServerError):
        client.retrieve_batch("batch_x")
    assert len(server.hits) == 1


def test_retry_budget_stops_retries_once_spent(local_http: Callable[..., LocalHttp]) -> None:
    server = local_http(server_error_every=1)
    waits: list[float] = []

    def slow_sleep(seconds: float) -> None:
        # Really pass time (a fixed 0.25 s), so the budget's clock moves.
        waits.append(seconds)
        time.sleep(0.25)

    retry = fast_retry(max_retries=50, budget_seconds=0.375)
    client = InfronClient(KEY, server.base_url, "openai", retry=retry, sleep=slow_sleep)
    with client, pytest.raises(InfronServerError):
        client.retrieve_batch("batch_x")
    # Tries at ~0 s and ~0.25 s start a retry; the one at ~0.5 s is past the budget.
    assert len(server.hits) == 3 and len(waits) == 2


def test_connection_refused_retries_then_raises_without_hanging() -> None:
    port = free_port()  # bound, then released: nothing listens there
    waits: list[float] = []
    client = InfronClient(
        KEY,
        f"http://127.0.0.1:{port}/v1",
        "openai",
        timeout=1.0,
        connect_timeout=1.0,
        retry=fast_retry(max_retries=2),
        sleep=waits.append,
    )
    started = time.monotonic()
    with client, pytest.raises(InfronConnectionError) as caught:
        client.retrieve_batch("batch_x")
    assert time.monotonic() - started < 5
    assert len(waits) == 2
    assert caught.value.retryable and caught.value.status_code is None
    assert str(caught.value).startswith("retrieve batch batch_x failed: ")
    assert KEY not in str(caught.value)


def test_slow_server_times_out_as_a_connection_error_in_bounded_time(
    local_http: Callable[..., LocalHttp],
) -> None:
    server = local_http(latency_seconds=2.0)
    waits: list[float] = []
    started = time.monotonic()
    client = server.client("infron", waits, retry=fast_retry(max_retries=1), timeout=0.2)
    with client, pytest.raises(InfronConnectionError) as caught:
        client.retrieve_batch("batch_x")
    elapsed = time.monotonic() - started
    assert elapsed < 1.5  # two 0.2 s tries, not one 2 s answer
    assert len(waits) == 1
    assert "timed out" in str(caught.value).lower()


# -- scripted answers the emulator cannot give ------------------------------------------------

OK_BATCH = {"id": "batch_1", "object": "batch", "status": "in_progress"}


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "1.5"}, 1.5),
        ({"retry-after-ms": "750", "Retry-After": "9"}, 0.75),  # milliseconds win
        ({"Retry-After": "3600"}, 10.0),  # capped at max_delay
    ],
)
def test_retry_after_headers_set_the_wait(
    scripted: Callable[..., Scripted], headers: dict[str, str], expected: float
) -> None:
    server = scripted(
        {"/v1/batches/batch_1": [json_answer({"error": {}}, 429, **headers), json_answer(OK_BATCH)]}
    )
    waits: list[float] = []
    with InfronClient(
        KEY, server.url("/v1"), "openai", retry=fast_retry(), sleep=waits.append
    ) as client:
        assert client.retrieve_batch("batch_1").status is BatchStatus.IN_PROGRESS
    assert waits == [expected]
    assert len(server.seen) == 2


def test_retry_after_as_a_date_falls_back_to_backoff(scripted: Callable[..., Scripted]) -> None:
    date = {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}
    server = scripted(
        {"/v1/batches/batch_1": [json_answer({"error": {}}, 503, **date), json_answer(OK_BATCH)]}
    )
    waits: list[float] = []
    with InfronClient(
        KEY, server.url("/v1"), "openai", retry=fast_retry(), sleep=waits.append
    ) as client:
        client.retrieve_batch("batch_1")
    assert len(waits) == 1 and 0.05 <= waits[0] <= 0.1


@pytest.mark.parametrize("status", [408, 409])
def test_timeout_and_conflict_answers_are_retried(
    scripted: Callable[..., Scripted], status: int
) -> None:
    server = scripted(
        {"/v1/batches/batch_1": [json_answer({"error": {}}, status), json_answer(OK_BATCH)]}
    )
    waits: list[float] = []
    with InfronClient(
        KEY, server.url("/v1"), "openai", retry=fast_retry(), sleep=waits.append
    ) as client:
        assert client.retrieve_batch("batch_1").id == "batch_1"
    assert len(server.seen) == 2 and len(waits) == 1


@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, InfronBadRequestError),
        (402, InfronInsufficientCreditsError),
        (403, InfronAuthError),
        (422, InfronBadRequestError),
    ],
)
def test_client_errors_fail_at_once_with_the_server_message(
    scripted: Callable[..., Scripted], status: int, error_class: type[InfronError]
) -> None:
    body = {"error": {"message": f"told you {status}", "code": f"code_{status}"}}
    server = scripted({"/v1/batches/batch_1": [json_answer(body, status)]})
    client = InfronClient(KEY, server.url("/v1"), "openai", sleep=_never_sleep)
    with client, pytest.raises(error_class) as caught:
        client.retrieve_batch("batch_1")
    assert type(caught.value) is error_class
    assert str(caught.value) == (
        f"retrieve batch batch_1 failed (HTTP {status}): told you {status}"
    )
    assert caught.value.code == f"code_{status}"
    assert len(server.seen) == 1


def test_rate_limit_beyond_retries_is_a_rate_limit_error(
    scripted: Callable[..., Scripted],
) -> None:
    server = scripted({"/v1/batches/batch_1": [json_answer({"error": {"message": "slow"}}, 429)]})
    waits: list[float] = []
    with (
        InfronClient(
            KEY, server.url("/v1"), "openai", retry=fast_retry(max_retries=2), sleep=waits.append
        ) as client,
        pytest.raises(InfronRateLimitError) as caught,
    ):
        client.retrieve_batch("batch_1")
    assert caught.value.retryable and len(server.seen) == 3 and len(waits) == 2


def test_a_non_json_error_page_still_gives_a_typed_error(
    scripted: Callable[..., Scripted],
) -> None:
    page = Answer(502, b"<html><body>Bad gateway from the proxy</body></html>")
    server = scripted({"/v1/batches/batch_1": [page]})
    with (
        InfronClient(
            KEY, server.url("/v1"), "infron", retry=fast_retry(max_retries=1), sleep=lambda s: None
        ) as client,
        pytest.raises(InfronServerError) as caught,
    ):
        client.retrieve_batch("batch_1")
    assert "Bad gateway from the proxy" in str(caught.value)


# -- the API key stays secret ------------------------------------------------------------------


def test_key_echoed_by_the_local_server_is_redacted_everywhere(
    served_local: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The local server never echoes the presented key in its 401s; it does echo an invalid
    # endpoint verbatim, so sending the key as the endpoint makes the server echo it.
    caplog.set_level(logging.DEBUG)
    key = served_local.api_key
    path = tmp_path / "requests.jsonl"
    write_requests(path, 2)
    client = InfronClient(key, served_local.base_url, "openai", sleep=_never_sleep)
    with client, pytest.raises(InfronBadRequestError) as caught:
        client.create_batch(path, endpoint=key)

    assert "Invalid endpoint '***'" in str(caught.value)  # echoed by the server, then redacted
    assert key not in str(caught.value) and key not in repr(caught.value)
    assert all(key not in str(arg) for arg in caught.value.args)
    assert key not in repr(client)
    assert repr(client) == f"InfronClient(base_url='{served_local.base_url}', api_style='openai')"
    assert caplog.records and key not in caplog.text
    assert all(key not in record.getMessage() for record in caplog.records)


def test_key_echoed_in_retried_and_final_errors_never_reaches_logs_or_messages(
    scripted: Callable[..., Scripted], caplog: pytest.LogCaptureFixture
) -> None:
    def echo(status: int) -> Callable[[str | None], Answer]:
        return lambda auth: json_answer({"error": {"message": f"bad header: {auth}"}}, status)

    server = scripted({"/v1/batches/batch_1": [echo(503), echo(500), echo(401)]})
    caplog.set_level(logging.DEBUG)
    with (
        InfronClient(
            KEY, server.url("/v1"), "infron", retry=fast_retry(), sleep=lambda s: None
        ) as client,
        pytest.raises(InfronAuthError) as caught,
    ):
        client.retrieve_batch("batch_1")

    assert [auth for *_, auth in server.seen] == [f"Bearer {KEY}"] * 3  # the key was sent
    assert str(caught.value) == "retrieve batch batch_1 failed (HTTP 401): bad header: Bearer ***"
    retry_logs = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(retry_logs) == 2 and all("Bearer ***" in r.getMessage() for r in retry_logs)
    assert KEY not in caplog.text
    assert all(KEY not in record.getMessage() for record in caplog.records)


def test_full_flow_over_http_logs_never_contain_the_key(
    served_local: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = served_local.api_key
    path = tmp_path / "requests.jsonl"
    ids = write_requests(path, 8)
    for api_style in ("infron", "openai"):
        with InfronClient(key, served_local.base_url, api_style) as client:
            batch = client.retrieve_batch(client.create_batch(path).id)
            files = client.result_files(batch)
            lines = [line for f in files for line in download_lines(client, f)]
            with pytest.raises(InfronNotFoundError) as caught:
                client.retrieve_batch("batch_missing")
        assert batch.status is BatchStatus.COMPLETED
        assert sorted(line["custom_id"] for line in lines) == ids
        if api_style == "infron":  # the server's own result_url: same origin, downloads
            assert files[0].url and files[0].url.startswith(served_local.base_url)
        assert key not in str(caught.value)
    assert caplog.records and key not in caplog.text
    assert all(key not in record.getMessage() for record in caplog.records)


# -- result downloads: the key goes to the configured origin only -------------------------------

RESULT_LINE = b'{"custom_id": "a", "response": {"status_code": 200, "body": {}}, "error": null}\n'


def test_foreign_result_url_is_downloaded_without_the_key(
    scripted: Callable[..., Scripted],
) -> None:
    home = scripted({})
    foreign = scripted({"/bucket/results.jsonl": [Answer(200, RESULT_LINE)]})
    client = InfronClient(KEY, home.url("/v1"), "infron")
    buf = io.BytesIO()
    with client:
        written = client.download(
            ResultFile("results", url=foreign.url("/bucket/results.jsonl")), buf
        )
    assert buf.getvalue() == RESULT_LINE and written == len(RESULT_LINE)
    assert foreign.seen == [("GET", "/bucket/results.jsonl", None)]
    assert home.seen == []


def test_same_origin_result_url_is_downloaded_with_the_key(
    scripted: Callable[..., Scripted],
) -> None:
    server = scripted({"/v1/files/f1/content": [Answer(200, RESULT_LINE)]})
    buf = io.BytesIO()
    with InfronClient(KEY, server.url("/v1"), "infron") as client:
        client.download(ResultFile("results", url=server.url("/v1/files/f1/content")), buf)
    assert buf.getvalue() == RESULT_LINE
    assert server.seen == [("GET", "/v1/files/f1/content", f"Bearer {KEY}")]


def test_same_host_other_port_counts_as_foreign(
    scripted: Callable[..., Scripted],
) -> None:
    home = scripted({})
    other = scripted({"/r.jsonl": [Answer(200, RESULT_LINE)]})
    with InfronClient(KEY, home.url("/v1"), "infron") as client:
        client.download(ResultFile("results", url=other.url("/r.jsonl")), io.BytesIO())
    assert other.seen == [("GET", "/r.jsonl", None)]


def test_same_origin_redirect_to_a_foreign_host_drops_the_key(
    scripted: Callable[..., Scripted],
) -> None:
    foreign = scripted({"/signed.jsonl": [Answer(200, RESULT_LINE)]})
    home = scripted(
        {"/v1/files/f1/content": [Answer(302, headers={"Location": foreign.url("/signed.jsonl")})]}
    )
    buf = io.BytesIO()
    with InfronClient(KEY, home.url("/v1"), "infron") as client:
        client.download(ResultFile("results", url=home.url("/v1/files/f1/content")), buf)
    assert buf.getvalue() == RESULT_LINE
    assert home.seen[0][2] == f"Bearer {KEY}"
    assert foreign.seen == [("GET", "/signed.jsonl", None)]


def test_upper_case_scheme_foreign_url_gets_no_key(scripted: Callable[..., Scripted]) -> None:
    home = scripted({})
    foreign = scripted({"/r.jsonl": [Answer(200, RESULT_LINE)]})
    url = foreign.url("/r.jsonl").replace("http://", "HTTP://")
    with InfronClient(KEY, home.url("/v1"), "infron") as client:
        client.download(ResultFile("results", url=url), io.BytesIO())
    assert foreign.seen == [("GET", "/r.jsonl", None)]


def test_foreign_result_url_that_redirects_is_followed(
    scripted: Callable[..., Scripted],
) -> None:
    home = scripted({})
    foreign = scripted(
        {
            "/short/r": [Answer(302, headers={"Location": "/bucket/r.jsonl"})],
            "/bucket/r.jsonl": [Answer(200, RESULT_LINE)],
        }
    )
    buf = io.BytesIO()
    with InfronClient(KEY, home.url("/v1"), "infron") as client:
        client.download(ResultFile("results", url=foreign.url("/short/r")), buf)
    assert buf.getvalue() == RESULT_LINE


# -- construction ------------------------------------------------------------------------------


def test_client_defaults_and_validation() -> None:
    client = InfronClient(KEY)
    with client:
        assert client.base_url == DEFAULT_BASE_URL == "https://llm.onerouter.pro/v1"
        assert client.api_style == "infron"
    with InfronClient(KEY, "https://example.test/v1/", "openai") as slashed:
        assert slashed.base_url == "https://example.test/v1"
    with pytest.raises(ValueError, match="api_style"):
        InfronClient(KEY, api_style="anthropic")  # type: ignore[arg-type]


def test_embedded_client_speaks_to_the_in_process_app(local_dir: str) -> None:
    with embedded_client(local_dir, api_style="openai") as client:
        assert client.base_url == EMBEDDED_BASE_URL
        assert list(client.list_batches()) == []
