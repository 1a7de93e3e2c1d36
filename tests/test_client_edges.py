"""The client at the edges: hostile URLs, echoed keys, odd keys, unreadable answers to a paid
create, odd timestamps, and Infron's documented Messages-style params on the wire.

The scripted server (conftest) is a real HTTP server that answers what a hostile or broken
provider would; the local emulator cannot be made to answer these on purpose.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Answer, Scripted, json_answer

from infron_dagster.client import InfronClient, ResultFile, RetryPolicy, messages_params
from infron_dagster.errors import (
    InfronAuthError,
    InfronBadRequestError,
    InfronConnectionError,
    InfronNotFoundError,
    InfronProtocolError,
)
from infron_dagster.models import Batch, BatchStatus
from infron_dagster.untrusted import safe_segment

KEY = "sk-edge-test-key-0123456789"
CHAT = "/v1/chat/completions"


def _requests(tmp_path: Path, n: int = 2) -> Path:
    path = tmp_path / "requests.jsonl"
    with open(path, "w") as fh:
        for i in range(n):
            body = {
                "model": "m",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": f"hi {i}"},
                ],
                "stop": "END",
            }
            fh.write(
                json.dumps({"custom_id": f"r{i}", "method": "POST", "url": CHAT, "body": body})
            )
            fh.write("\n")
    return path


def _client(server: Scripted, style: str = "infron") -> InfronClient:
    return InfronClient(KEY, server.url("/v1"), style, sleep=lambda s: None)  # type: ignore[arg-type]


# -- 1. the key goes only to the configured origin, over http(s) ----------------------------------


@pytest.mark.parametrize("scheme", ["ws", "WS", "wss", "ftp", "file"])
def test_result_url_with_a_non_http_scheme_is_refused_and_gets_no_request(
    scripted: Callable[..., Scripted], scheme: str
) -> None:
    home = scripted({})
    foreign = scripted({"/r": [Answer(200, b"{}\n")]})
    url = foreign.url("/r").replace("http", scheme, 1)
    with _client(home) as client, pytest.raises(InfronProtocolError, match="not http"):
        client.download(ResultFile("results", url=url), io.BytesIO())
    assert foreign.seen == [] and home.seen == []


def test_scheme_relative_result_url_is_refused(scripted: Callable[..., Scripted]) -> None:
    home = scripted({})
    foreign = scripted({"/r": [Answer(200, b"{}\n")]})
    url = foreign.url("/r").replace("http:", "", 1)  # //127.0.0.1:port/r
    with _client(home) as client, pytest.raises(InfronProtocolError):
        client.download(ResultFile("results", url=url), io.BytesIO())
    assert foreign.seen == []


def test_default_port_written_out_is_the_same_origin() -> None:
    with InfronClient(KEY, "https://api.example.test/v1") as client:
        _, keyed = client._route_url("x", "https://API.example.test:443/v1/files/f/content")
        _, other = client._route_url("x", "http://api.example.test/v1/files/f/content")
        assert keyed is client._http and other is client._anonymous


def test_non_json_2xx_that_echoes_the_request_never_shows_the_key(
    scripted: Callable[..., Scripted], caplog: pytest.LogCaptureFixture
) -> None:
    portal = scripted(
        {"/v1/batches/b1": [lambda auth: Answer(200, f"<html>you sent {auth}</html>".encode())]}
    )
    caplog.set_level(logging.DEBUG)
    with _client(portal) as client, pytest.raises(InfronProtocolError) as caught:
        client.retrieve_batch("b1")
    assert portal.seen[0][2] == f"Bearer {KEY}"  # the key did go out, to the configured host
    assert "expected JSON" in str(caught.value)
    assert KEY not in str(caught.value) and KEY not in repr(caught.value)
    assert KEY not in caplog.text


def test_key_echoed_url_encoded_or_json_escaped_is_redacted(
    scripted: Callable[..., Scripted],
) -> None:
    key = "sk-a/b+c\\d-0123456789"
    from urllib.parse import quote

    body = json.dumps({"error": {"message": f"{quote(key, safe='')} | {key}"}})
    server = scripted({"/v1/batches/b1": [Answer(401, body.encode())]})
    client = InfronClient(key, server.url("/v1"), "infron", sleep=lambda s: None)
    with client, pytest.raises(InfronAuthError) as caught:
        client.retrieve_batch("b1")
    text = str(caught.value)
    assert key not in text and quote(key, safe="") not in text and "***" in text


@pytest.mark.parametrize("key", ["sk-abc\u201d123456", "sk-abc 123456", "sk-ab\u00e9c123456"])
def test_a_key_with_non_ascii_or_space_is_refused_without_echoing_it(key: str) -> None:
    with pytest.raises(ValueError) as caught:
        InfronClient(key, "https://api.example.test/v1")
    assert key not in str(caught.value) and key not in repr(caught.value)
    assert "non-ASCII" in str(caught.value)


# -- 2. provider ids never become paths (client side: URL paths and file names) --------------------


def test_hostile_batch_id_cannot_climb_the_api_paths(scripted: Callable[..., Scripted]) -> None:
    server = scripted({})
    with _client(server) as client, pytest.raises(InfronNotFoundError):
        client.retrieve_batch("../files/secret")
    assert server.seen[0][1] == "/v1/batches/..%2Ffiles%2Fsecret"


@pytest.mark.parametrize("ref", ["../../../../x", "x/../../y", "/abs", "..", "a\\b", "é" * 300])
def test_result_file_names_are_one_safe_segment(ref: str) -> None:
    name = ResultFile("output", file_id=ref).name
    assert "/" not in name and "\\" not in name and len(name) < 120
    assert not name.startswith(".") and name.isascii()


def test_safe_segment_is_injective_on_lookalikes() -> None:
    values = ["a/b", "a_b", "a.b", "a%2Fb", "a~b", "..", "._", "A/B"]
    assert len({safe_segment(v) for v in values}) == len(values)


# -- 3. an unreadable answer to a paid create is ambiguous -----------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        Answer(200, b'{"batch_id": "b1", "status": "PEND'),  # truncated
        Answer(200, b"<html>ok</html>"),
        json_answer({"status": "SUCCESS"}),  # no id
        json_answer(["b1"]),
        json_answer({"batch_id": {"x": 1}, "status": "PENDING"}),
        json_answer({"batch_id": "b\n1", "status": "PENDING"}),
    ],
    ids=["truncated", "html", "no-id", "list", "id-object", "id-control-char"],
)
def test_unreadable_2xx_answer_to_create_is_ambiguous(
    scripted: Callable[..., Scripted], tmp_path: Path, answer: Answer
) -> None:
    server = scripted({"/v1/batches": [answer]})
    with _client(server) as client, pytest.raises(InfronProtocolError) as caught:
        client.create_batch(_requests(tmp_path))
    assert caught.value.ambiguous is True
    assert [s[:2] for s in server.seen] == [("POST", "/v1/batches")]  # sent once, never again


def test_unreadable_answer_to_a_read_is_not_ambiguous(scripted: Callable[..., Scripted]) -> None:
    server = scripted({"/v1/batches/b1": [Answer(200, b"{broken")]})
    with _client(server) as client, pytest.raises(InfronProtocolError) as caught:
        client.retrieve_batch("b1")
    assert caught.value.ambiguous is False


@pytest.mark.parametrize(
    ("value", "year"),
    [(1764000000, 2025), (1764000000000, 2025), (1764000000000000, 2025), ("1764000000000", 2025)],
)
def test_timestamps_in_seconds_millis_or_micros(value: Any, year: int) -> None:
    batch = Batch.from_infron({"batch_id": "b", "status": "SUCCESS", "submit_time": value})
    assert batch.created_at is not None and batch.created_at.year == year


@pytest.mark.parametrize("value", [0, "0", 1e308, -1e308, "soon", [1], {"a": 1}, True])
def test_unknown_or_garbage_timestamps_are_none(value: Any) -> None:
    batch = Batch.from_infron(
        {
            "batch_id": "b",
            "status": "PENDING",
            "start_time": value,
            "submit_time": value,
            "finish_time": value,
        }
    )
    assert batch.created_at is None and batch.finished_at is None


def test_infron_fees_progress_and_odd_types() -> None:
    batch = Batch.from_infron(
        {
            "batch_id": "b",
            "status": "processing",
            "fees": "0.001772",
            "progress": "42%",
            "total_requests": "12abc",
            "completed_count": 1e999,
            "failed_count": True,
        }
    )
    assert batch.cost == pytest.approx(0.001772) and batch.progress == pytest.approx(0.42)
    assert batch.total_requests is None and batch.completed_requests is None
    assert batch.failed_requests is None and batch.status is BatchStatus.IN_PROGRESS


@pytest.mark.parametrize("status", [5, None, {"a": 1}, "x" * 10_000, "new\nline"])
def test_odd_status_values_are_unknown_never_a_crash(status: Any) -> None:
    batch = Batch.from_openai({"id": "b", "status": status, "metadata": [1], "errors": "x"})
    assert batch.status is BatchStatus.UNKNOWN and not batch.is_terminal
    assert len(batch.raw_status) < 300 and "\n" not in batch.raw_status


def test_non_ascii_idempotency_key_goes_out_as_ascii(
    scripted: Callable[..., Scripted], tmp_path: Path
) -> None:
    server = scripted({"/v1/batches": [json_answer({"batch_id": "b1", "status": "PENDING"})]})
    with _client(server) as client:
        batch = client.create_batch(_requests(tmp_path), idempotency_key="pipe/Zürich/1/0")
    assert batch.id == "b1"


# -- 8. Infron's wire as documented ---------------------------------------------------------------


def test_infron_style_sends_messages_params() -> None:
    body = {
        "model": "openai/gpt-4o-mini-batch",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "stop": "END",
        "temperature": 0,
    }
    params = messages_params(body)
    assert params == {
        "model": "openai/gpt-4o-mini-batch",
        "messages": [{"role": "user", "content": "Hi"}],
        "system": "Be brief.",
        "max_tokens": 4096,
        "stop_sequences": ["END"],
        "temperature": 0,
    }
    assert messages_params({**body, "max_completion_tokens": 50})["max_tokens"] == 50
    assert messages_params({**body, "max_tokens": 7})["max_tokens"] == 7
    assert messages_params({**body, "max_tokens": None})["max_tokens"] == 4096
    assert "system" not in messages_params({"model": "m", "messages": []})


def test_infron_create_body_on_the_wire(tmp_path: Path) -> None:
    seen: list[bytes] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0)))
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps({"batch_id": "b1", "status": "PENDING"}).encode()]

    import httpx

    client = InfronClient(KEY, "http://h/v1", "infron", transport=httpx.WSGITransport(app=app))
    with client:
        client.create_batch(_requests(tmp_path, 1))
    sent = json.loads(seen[0])["requests"][0]
    assert sent["custom_id"] == "r0"
    assert sent["params"]["system"] == "Be brief."
    assert sent["params"]["max_tokens"] == 4096
    assert sent["params"]["stop_sequences"] == ["END"]
    assert [m["role"] for m in sent["params"]["messages"]] == ["user"]


def test_a_key_echoed_into_a_result_file_is_redacted_even_across_chunks(
    scripted: Callable[..., Scripted],
) -> None:
    echoed = (b"x" * ((1 << 20) - 5)) + f"Bearer {KEY} and {KEY}\n".encode()
    server = scripted({"/v1/files/f1/content": [Answer(200, echoed)]})
    buf = io.BytesIO()
    with _client(server) as client:
        client.download(ResultFile("output", file_id="f1"), buf)
        lines = list(client.iter_lines(ResultFile("output", file_id="f1")))
    assert KEY.encode() not in buf.getvalue() and buf.getvalue().endswith(b"Bearer *** and ***\n")
    assert all(KEY.encode() not in line for line in lines)


# -- review findings: redirects, broken bodies, odd lists, cut messages ----------------------------


def test_a_create_follows_no_redirect_and_the_answer_is_ambiguous(
    scripted: Callable[..., Scripted], tmp_path: Path
) -> None:
    server = scripted(
        {
            "/v1/batches": [Answer(307, b"", {"Location": "/v1/batches2"})],
            "/v1/batches2": [json_answer({"batch_id": "b1", "status": "PENDING"})],
        }
    )
    with _client(server) as client, pytest.raises(InfronProtocolError) as caught:
        client.create_batch(_requests(tmp_path))
    assert caught.value.ambiguous is True
    assert [path for _, path, _ in server.seen] == ["/v1/batches"]  # never sent twice


def test_a_body_that_fails_to_decode_is_a_typed_retryable_error(
    scripted: Callable[..., Scripted],
) -> None:
    broken = Answer(200, b"not gzip at all", {"Content-Encoding": "gzip"})
    server = scripted({"/v1/batches/b1": [broken]})
    client = InfronClient(KEY, server.url("/v1"), "infron", retry=RetryPolicy(max_retries=1),
                          sleep=lambda s: None)  # fmt: skip
    with client, pytest.raises(InfronConnectionError) as caught:
        client.retrieve_batch("b1")
    assert caught.value.retryable and len(server.seen) == 2  # retried once, then typed


def test_an_unreadable_listed_batch_is_skipped_not_fatal(scripted: Callable[..., Scripted]) -> None:
    page = {"data": [{"id": None}, "junk", {"id": "b2", "status": "completed"}], "has_more": False}
    server = scripted({"/v1/batches": [json_answer(page)]})
    skipped: list[str] = []
    with _client(server, "openai") as client:
        listed = list(client.list_batches(skipped=skipped))
    assert [b.id for b in listed] == ["b2"] and len(skipped) == 2


def test_a_key_straddling_the_message_cut_leaves_no_trace(
    scripted: Callable[..., Scripted],
) -> None:
    body = json.dumps({"error": {"message": "x" * 495 + KEY + "y" * 100}}).encode()
    server = scripted({"/v1/batches/b1": [Answer(400, body)]})
    with _client(server) as client, pytest.raises(InfronBadRequestError) as caught:
        client.retrieve_batch("b1")
    assert KEY[:6] not in str(caught.value)


@pytest.mark.parametrize("bad", [".", ".."])
def test_dot_ids_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="dot segment"):
        Batch.from_openai({"id": bad, "status": "completed"})


def test_odd_file_ids_leave_the_batch_readable_and_say_why() -> None:
    batch = Batch.from_openai(
        {"id": "b1", "status": "completed", "output_file_id": ["f"], "error_file_id": "e\n1"}
    )
    assert batch.is_terminal and batch.output_file_id is None and batch.error_file_id is None
    assert len(batch.errors) == 2 and all("unusable" in e for e in batch.errors)


def test_batch_error_text_that_echoes_the_key_is_redacted(
    scripted: Callable[..., Scripted],
) -> None:
    obj = {"batch_id": "b1", "status": "FAILED", "fail_reason": f"auth Bearer {KEY} refused"}
    server = scripted({"/v1/batches/b1": [json_answer(obj)]})
    with _client(server) as client:
        batch = client.retrieve_batch("b1")
    assert batch.errors == ("auth Bearer *** refused",)
