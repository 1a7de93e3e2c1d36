"""Tests of the local batch API emulator (infron_dagster.local)."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import Clock

from infron_dagster.local import LocalServerConfig, create_app, load_config, save_config
from infron_dagster.local import multipart as multipart_module
from infron_dagster.local.process import serve_in_subprocess

ZERO = {"validating_seconds": 0, "in_progress_seconds": 0, "finalizing_seconds": 0}
CHAT = "/v1/chat/completions"


# -- helpers ---------------------------------------------------------------------------------


def client_for(app: Any, token: str | None = "test-key") -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(
        transport=httpx.WSGITransport(app=app), base_url="http://infron.local/v1", headers=headers
    )


def make(tmp_path: Path, **knobs: Any) -> httpx.Client:
    return client_for(create_app(tmp_path / "data", LocalServerConfig(**{**ZERO, **knobs})))


def chat_line(custom_id: str, text: str, **extra: Any) -> dict[str, Any]:
    body = {"model": "mock-1", "messages": [{"role": "user", "content": text}], **extra}
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}


def chat_lines(n: int, prefix: str = "row") -> list[dict[str, Any]]:
    return [chat_line(f"{prefix}-{i}", f"question number {i}") for i in range(n)]


def upload(client: httpx.Client, lines: list[Any]) -> str:
    payload = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    response = client.post(
        "/files", files={"file": ("in.jsonl", payload.encode())}, data={"purpose": "batch"}
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


def submit(
    client: httpx.Client, lines: list[Any], endpoint: str = CHAT, **extra: Any
) -> dict[str, Any]:
    body = {
        "input_file_id": upload(client, lines),
        "endpoint": endpoint,
        "completion_window": "24h",
        **extra,
    }
    response = client.post("/batches", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def get(client: httpx.Client, batch_id: str) -> dict[str, Any]:
    response = client.get(f"/batches/{batch_id}")
    assert response.status_code == 200, response.text
    return response.json()


def jsonl(client: httpx.Client, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    response = client.get(f"/files/{file_id}/content")
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines()]


def run_openai(client: httpx.Client, lines: list[Any], endpoint: str = CHAT):
    batch = get(client, submit(client, lines, endpoint)["id"])
    return batch, jsonl(client, batch["output_file_id"]), jsonl(client, batch["error_file_id"])


def by_id(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {line["custom_id"]: line for line in lines}


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    return Clock.install(monkeypatch, now=1_700_000_000.0)  # a fixed epoch: stable outputs


def check_schema(value: Any, schema: dict[str, Any], root: dict[str, Any]) -> list[str]:
    """A tiny JSON-schema checker: the subset the mock model claims to honour."""
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"][2:].split("/"):
            target = target[part]
        return check_schema(value, target, root)
    if "anyOf" in schema:
        ok = any(not check_schema(value, s, root) for s in schema["anyOf"])
        return [] if ok else [f"{value!r} matches no anyOf branch"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{value!r} not in enum"]
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds] if kinds else []
    python = {
        "object": dict,
        "array": list,
        "string": str,
        "boolean": bool,
        "null": type(None),
        "integer": int,
        "number": (int, float),
    }
    if kinds and not any(
        isinstance(value, python[k])
        and not (k in ("integer", "number") and isinstance(value, bool))
        for k in kinds
    ):
        return [f"{value!r} is not {kinds}"]
    problems: list[str] = []
    if isinstance(value, dict):
        problems += [f"missing {k}" for k in schema.get("required", []) if k not in value]
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            problems += [f"extra {k}" for k in value if k not in props]
        for key, sub in props.items():
            if key in value:
                problems += check_schema(value[key], sub, root)
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 10**9):
            problems.append(f"bad length {len(value)}")
        for item in value:
            problems += check_schema(item, schema.get("items", {}), root)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if is_number and not schema.get("minimum", -math.inf) <= value <= schema.get(
        "maximum", math.inf
    ):
        problems.append(f"{value} out of range")
    if isinstance(value, str) and len(value) > schema.get("maxLength", 10**9):
        problems.append(f"{value!r} too long")
    return problems


SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["sentiment", "score", "confidence", "flagged", "tags", "author", "note", "ref"],
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "flagged": {"type": "boolean"},
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 12},
            "minItems": 1,
            "maxItems": 4,
        },
        "author": {
            "type": "object",
            "required": ["name", "age"],
            "properties": {
                "name": {"type": "string"},
                "age": {"type": ["integer", "null"], "minimum": 18},
            },
        },
        "note": {"anyOf": [{"type": "null"}, {"type": "string"}]},
        "ref": {"$ref": "#/$defs/Ref"},
    },
    "$defs": {
        "Ref": {"type": "object", "required": ["id"], "properties": {"id": {"type": "integer"}}}
    },
}


# -- auth and routing ------------------------------------------------------------------------


def test_missing_bearer_token_is_401(tmp_path: Path) -> None:
    response = client_for(create_app(tmp_path), token=None).get("/batches")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "missing_api_key"


def test_wrong_api_key_is_401_without_echoing_it(tmp_path: Path) -> None:
    app = create_app(tmp_path, LocalServerConfig(api_key="sk-right"))
    response = client_for(app, token="sk-wrong-secret").get("/batches")
    assert response.status_code == 401
    assert response.json()["error"]["message"] == "Invalid API key"
    assert "sk-wrong-secret" not in response.text
    assert client_for(app, token="sk-right").get("/batches").status_code == 200


def test_paths_outside_v1_and_unknown_ids_are_json_404(tmp_path: Path) -> None:
    client = make(tmp_path)
    outside = httpx.Client(transport=httpx.WSGITransport(app=create_app(tmp_path)))
    response = outside.get("http://infron.local/health", headers={"Authorization": "Bearer x"})
    assert response.status_code == 404 and "error" in response.json()
    assert client.get("/batches/batch_nope").status_code == 404
    assert client.get("/files/file-nope/content").status_code == 404


# -- OpenAI style ----------------------------------------------------------------------------


def test_openai_style_completes_and_orders_output_by_hash_not_input(tmp_path: Path) -> None:
    client = make(tmp_path)
    lines = chat_lines(20)
    created = submit(client, lines, metadata={"asset": "reviews", "partition": "2024-01-01"})
    assert created["status"] == "validating" and created["object"] == "batch"
    batch = get(client, created["id"])
    assert batch["status"] == "completed"
    assert batch["metadata"] == {"asset": "reviews", "partition": "2024-01-01"}
    assert batch["request_counts"] == {"total": 20, "completed": 20, "failed": 0}
    assert batch["error_file_id"] is None and batch["completed_at"] is not None
    output = jsonl(client, batch["output_file_id"])
    order = [line["custom_id"] for line in output]
    assert sorted(order) == sorted(x["custom_id"] for x in lines)
    assert order != [x["custom_id"] for x in lines]
    line = by_id(output)["row-3"]
    assert line["id"].startswith("batch_req_") and line["error"] is None
    assert line["response"]["status_code"] == 200
    assert line["response"]["request_id"].startswith("req_")
    body = line["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "mock-1"
    assert body["choices"][0]["message"]["content"] == "Mock answer to: question number 3"
    assert body["usage"]["prompt_tokens"] == len("question number 3") // 4 + 1


def test_same_input_gives_same_answers(tmp_path: Path) -> None:
    client = make(tmp_path)
    lines = [
        chat_line(
            f"s{i}",
            "rate me",
            response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}},
        )
        for i in range(5)
    ]
    first = by_id(run_openai(client, lines)[1])
    second = by_id(run_openai(client, lines)[1])
    content = {
        k: v["response"]["body"]["choices"][0]["message"]["content"] for k, v in first.items()
    }
    assert content == {
        k: v["response"]["body"]["choices"][0]["message"]["content"] for k, v in second.items()
    }
    assert len(set(content.values())) > 1  # seeded by custom_id too


def test_json_schema_answers_validate_against_the_schema(tmp_path: Path) -> None:
    client = make(tmp_path)
    fmt = {"type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA}}
    lines = [chat_line(f"j{i}", f"review {i}", response_format=fmt) for i in range(30)]
    _, output, errors = run_openai(client, lines)
    assert len(output) == 30 and errors == []
    for line in output:
        value = json.loads(line["response"]["body"]["choices"][0]["message"]["content"])
        assert check_schema(value, SCHEMA, SCHEMA) == [], value


def test_json_object_and_responses_endpoint(tmp_path: Path) -> None:
    client = make(tmp_path)
    _, output, _ = run_openai(
        client, [chat_line("o", "hi", response_format={"type": "json_object"})]
    )
    assert isinstance(
        json.loads(output[0]["response"]["body"]["choices"][0]["message"]["content"]), dict
    )
    fmt = {"type": "json_schema", "name": "r", "schema": SCHEMA}
    line = {
        "custom_id": "r1",
        "method": "POST",
        "url": "/v1/responses",
        "body": {"model": "m", "input": "Summarise this", "text": {"format": fmt}},
    }
    _, output, _ = run_openai(client, [line], endpoint="/v1/responses")
    body = output[0]["response"]["body"]
    assert body["object"] == "response" and body["status"] == "completed"
    assert body["id"].startswith("resp_") and body["usage"]["input_tokens"] > 0
    text = body["output"][0]["content"][0]["text"]
    assert check_schema(json.loads(text), SCHEMA, SCHEMA) == []


def test_embeddings_are_stable_unit_vectors(tmp_path: Path) -> None:
    client = make(tmp_path)

    def line(cid: str, text: Any, **extra: Any) -> dict[str, Any]:
        return {
            "custom_id": cid,
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "emb", "input": text, **extra},
        }

    lines = [line("a", "hello"), line("b", "hello"), line("c", ["x", "hello"], dimensions=3)]
    _, output, _ = run_openai(client, lines, endpoint="/v1/embeddings")
    out = {k: v["response"]["body"] for k, v in by_id(output).items()}
    vec_a = out["a"]["data"][0]["embedding"]
    assert len(vec_a) == 8 and math.isclose(sum(x * x for x in vec_a), 1.0)
    assert vec_a == out["b"]["data"][0]["embedding"]
    assert [d["index"] for d in out["c"]["data"]] == [0, 1]
    assert len(out["c"]["data"][1]["embedding"]) == 3
    again = by_id(run_openai(client, lines, endpoint="/v1/embeddings")[1])
    assert again["a"]["response"]["body"]["data"][0]["embedding"] == vec_a


def test_invalid_input_lines_fail_the_batch_with_line_numbers(tmp_path: Path) -> None:
    client = make(tmp_path)
    bad_url = {**chat_line("c", "x"), "url": "/v1/embeddings"}
    no_body = {k: v for k, v in chat_line("d", "x").items() if k != "body"}
    lines = [chat_line("a", "x"), chat_line("a", "y"), "{not json", bad_url, no_body]
    batch = get(client, submit(client, lines)["id"])
    assert batch["status"] == "failed" and batch["failed_at"] is not None
    codes = {e["line"]: e["code"] for e in batch["errors"]["data"]}
    assert codes == {
        2: "duplicate_custom_id",
        3: "invalid_json_line",
        4: "mismatched_url",
        5: "missing_body",
    }
    assert batch["output_file_id"] is None and batch["error_file_id"] is None


def test_create_rejects_unknown_file_and_endpoint(tmp_path: Path) -> None:
    client = make(tmp_path)
    response = client.post("/batches", json={"input_file_id": "file-missing", "endpoint": CHAT})
    assert response.status_code == 400 and "file-missing" in response.json()["error"]["message"]
    file_id = upload(client, chat_lines(1))
    response = client.post("/batches", json={"input_file_id": file_id, "endpoint": "/v1/x"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "endpoint"


def test_list_paginates_newest_first(tmp_path: Path, clock: Clock) -> None:
    client = make(tmp_path)
    ids = []
    for i in range(5):
        clock.now += 1
        ids.append(submit(client, chat_lines(1, prefix=f"p{i}"))["id"])
    page = client.get("/batches", params={"limit": 2}).json()
    assert [b["id"] for b in page["data"]] == ids[::-1][:2] and page["has_more"] is True
    assert page["first_id"] == ids[4] and page["last_id"] == ids[3]
    rest = client.get("/batches", params={"limit": 100, "after": page["last_id"]}).json()
    assert [b["id"] for b in rest["data"]] == ids[::-1][2:] and rest["has_more"] is False
    assert client.get("/batches", params={"limit": 101}).status_code == 400


# -- lifecycle -------------------------------------------------------------------------------


def test_status_moves_with_elapsed_time(tmp_path: Path, clock: Clock) -> None:
    client = make(tmp_path, validating_seconds=1, in_progress_seconds=2, finalizing_seconds=1)
    batch_id = submit(client, chat_lines(8))["id"]
    assert get(client, batch_id)["status"] == "validating"
    clock.now += 1.5
    halfway = get(client, batch_id)
    assert halfway["status"] == "in_progress" and halfway["in_progress_at"] is not None
    assert halfway["request_counts"]["completed"] == 2  # a quarter of the in-progress window
    clock.now += 2
    assert get(client, batch_id)["status"] == "finalizing"
    clock.now += 1
    done = get(client, batch_id)
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 8
    assert done["completed_at"] - done["created_at"] == 4


def test_cancel_keeps_finished_requests(tmp_path: Path, clock: Clock) -> None:
    client = make(tmp_path, validating_seconds=0, in_progress_seconds=10, finalizing_seconds=1)
    batch_id = submit(client, chat_lines(10))["id"]
    clock.now += 5
    cancelling = client.post(f"/batches/{batch_id}/cancel").json()
    assert cancelling["status"] == "cancelling" and cancelling["cancelling_at"] is not None
    assert get(client, batch_id)["status"] == "cancelling"
    clock.now += 1
    batch = get(client, batch_id)
    assert batch["status"] == "cancelled" and batch["cancelled_at"] is not None
    output, errors = jsonl(client, batch["output_file_id"]), jsonl(client, batch["error_file_id"])
    assert len(output) == 5 and len(errors) == 5
    assert all(e["response"] is None and e["error"]["code"] == "batch_cancelled" for e in errors)
    completed = get(client, submit(client, chat_lines(1, "z"))["id"])
    clock.now += 20
    response = client.post(f"/batches/{completed['id']}/cancel")
    assert response.status_code == 400


# -- Infron style ----------------------------------------------------------------------------


def infron_requests(n: int) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"in-{i}",
            # Infron's documented Messages-style params: max_tokens is required.
            "params": {
                "model": "mock-1",
                "max_tokens": 64,
                "messages": [{"role": "user", "content": f"infron {i}"}],
            },
        }
        for i in range(n)
    ]


def test_infron_style_completes_with_one_combined_result_file(tmp_path: Path) -> None:
    client = make(tmp_path, failure_rate=0.3)
    requests = [
        *infron_requests(10),
        {"custom_id": "emb", "params": {"model": "e", "input": "vector me"}},
    ]
    created = client.post("/batches", json={"requests": requests}).json()
    assert created["status"] == "PENDING" and created["result_url"] is None
    batch = get(client, created["batch_id"])
    assert batch["status"] == "SUCCESS" and batch["progress"] == "100%"
    assert batch["total_requests"] == 11
    assert batch["completed_count"] + batch["failed_count"] == 11 and batch["failed_count"] > 0
    assert batch["total_tokens"] == batch["prompt_tokens"] + batch["completion_tokens"] > 0
    fees = (batch["prompt_tokens"] * 0.15 + batch["completion_tokens"] * 0.60) / 1e6 * 0.5
    assert batch["fees"] == f"{fees:.6f}"
    assert batch["submit_time"].endswith("Z") and batch["finish_time"].endswith("Z")
    assert batch["result_url"].startswith("http://infron.local/v1/files/")
    # result_url is fetchable without the Authorization header, like a presigned URL.
    lines = by_id(
        [
            json.loads(x)
            for x in httpx.Client(transport=client._transport)
            .get(batch["result_url"])
            .text.splitlines()
        ]
    )
    assert set(lines) == {r["custom_id"] for r in requests}
    assert (
        sum(line["response"]["status_code"] == 500 for line in lines.values())
        == batch["failed_count"]
    )
    listed = client.get("/batches").json()["data"][0]
    assert listed["id"] == created["batch_id"] and listed["metadata"] is None


def test_infron_params_with_input_are_embeddings(tmp_path: Path) -> None:
    client = make(tmp_path)
    requests = [
        *infron_requests(1),
        {"custom_id": "emb", "params": {"model": "e", "input": "vector me"}},
    ]
    batch = get(client, client.post("/batches", json={"requests": requests}).json()["batch_id"])
    lines = by_id(jsonl(client, batch["result_url"].split("/files/")[1].split("/")[0]))
    assert lines["emb"]["response"]["body"]["object"] == "list"
    assert lines["in-0"]["response"]["body"]["object"] == "chat.completion"


def test_infron_status_progress_and_cancel(tmp_path: Path, clock: Clock) -> None:
    client = make(tmp_path, validating_seconds=1, in_progress_seconds=4, finalizing_seconds=0)
    batch_id = client.post("/batches", json={"requests": infron_requests(4)}).json()["batch_id"]
    assert get(client, batch_id)["status"] == "PENDING"
    clock.now += 3
    batch = get(client, batch_id)
    assert batch["status"] == "PROCESSING" and batch["progress"] == "50%"
    assert client.post(f"/batches/{batch_id}/cancel").json()["status"] == "CANCELLING"
    batch = get(client, batch_id)
    assert batch["status"] == "CANCELLED" and batch["finish_time"] is not None
    codes = [
        line["error"] and line["error"]["code"]
        for line in jsonl(client, batch["result_url"].split("/files/")[1].split("/")[0])
    ]
    assert sorted(codes, key=str) == [None, None, "batch_cancelled", "batch_cancelled"]


def test_infron_rejects_empty_requests(tmp_path: Path) -> None:
    response = make(tmp_path).post("/batches", json={"requests": []})
    assert response.status_code == 400


# -- fault knobs -----------------------------------------------------------------------------


def test_failure_rate_sends_requests_to_the_error_file(tmp_path: Path) -> None:
    client = make(tmp_path, failure_rate=0.5)
    lines = chat_lines(40)
    batch, output, errors = run_openai(client, lines)
    assert 8 < len(errors) < 32 and len(output) + len(errors) == 40
    assert set(by_id(output)).isdisjoint(by_id(errors))
    assert batch["request_counts"] == {"total": 40, "completed": len(output), "failed": len(errors)}
    error = errors[0]["response"]
    assert error["status_code"] == 500 and error["body"]["error"]["type"] == "server_error"
    assert error["body"]["error"]["message"] == "mock model failure"
    # Same requests in a fresh store: the same fate (deterministic by custom_id) ...
    fresh = make(tmp_path / "fresh", failure_rate=0.5)
    assert set(by_id(run_openai(fresh, lines)[2])) == set(by_id(errors))
    # ... while a later batch in the same store draws afresh, so retries can succeed.
    assert set(by_id(run_openai(client, lines)[2])) != set(by_id(errors))
    all_failed = make(tmp_path / "b", failure_rate=1.0)
    batch, output, errors = run_openai(all_failed, chat_lines(3))
    assert batch["status"] == "completed" and batch["output_file_id"] is None
    assert len(errors) == 3


def test_rate_limit_every_nth_request(tmp_path: Path) -> None:
    client = make(tmp_path, rate_limit_every=3, rate_limit_retry_after=0.25)
    statuses = [client.get("/batches") for _ in range(4)]
    assert [r.status_code for r in statuses] == [200, 200, 429, 200]
    limited = statuses[2]
    assert limited.headers["Retry-After"] == "0.25" and limited.headers["retry-after-ms"] == "250"
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"


def test_server_error_every_nth_request(tmp_path: Path) -> None:
    client = make(tmp_path, server_error_every=2)
    codes = [client.get("/batches").status_code for _ in range(4)]
    assert codes == [200, 500, 200, 503]


def test_expire_keeps_the_finished_fraction(tmp_path: Path) -> None:
    client = make(tmp_path, expire=True, expire_fraction=0.5)
    batch, output, errors = run_openai(client, chat_lines(10))
    assert batch["status"] == "expired" and batch["expired_at"] is not None
    assert len(output) == 5 and len(errors) == 5
    assert all(e["response"] is None and e["error"]["code"] == "batch_expired" for e in errors)
    infron = client.post("/batches", json={"requests": infron_requests(4)}).json()
    assert get(client, infron["batch_id"])["status"] == "EXPIRED"


def test_lost_rate_drops_requests_from_both_files(tmp_path: Path) -> None:
    client = make(tmp_path, lost_rate=0.3)
    lines = chat_lines(40)
    batch, output, errors = run_openai(client, lines)
    seen = set(by_id(output)) | set(by_id(errors))
    lost = {x["custom_id"] for x in lines} - seen
    assert batch["status"] == "completed" and 3 < len(lost) < 25 and errors == []
    assert batch["request_counts"]["completed"] == len(output) == 40 - len(lost)
    fresh = run_openai(make(tmp_path / "fresh", lost_rate=0.3), lines)[1]
    assert {x["custom_id"] for x in lines} - set(by_id(fresh)) == lost
    again = run_openai(client, lines)[1]
    assert {x["custom_id"] for x in lines} - set(by_id(again)) != lost


def test_validation_failure_fails_every_batch(tmp_path: Path) -> None:
    client = make(tmp_path, validation_failure=True)
    batch = run_openai(client, chat_lines(2))[0]
    assert batch["status"] == "failed" and batch["errors"]["data"][0]["code"]
    infron = client.post("/batches", json={"requests": infron_requests(2)}).json()
    failed = get(client, infron["batch_id"])
    assert failed["status"] == "FAILED" and failed["fail_reason"] and failed["result_url"] is None


def test_latency_slows_every_answer(tmp_path: Path) -> None:
    client = make(tmp_path, latency_seconds=0.2)
    started = time.monotonic()
    assert client.get("/batches").status_code == 200
    assert time.monotonic() - started >= 0.2


def test_enqueued_token_limit(tmp_path: Path, clock: Clock) -> None:
    client = make(
        tmp_path,
        validating_seconds=0,
        in_progress_seconds=10,
        finalizing_seconds=0,
        enqueued_token_limit=60,
    )
    lines = chat_lines(5)  # 5 tokens each
    submit(client, lines)
    submit(client, chat_lines(5, "b"))
    file_id = upload(client, chat_lines(5, "c"))
    response = client.post("/batches", json={"input_file_id": file_id, "endpoint": CHAT})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "token_limit_exceeded" and "mock-1" in error["message"]
    clock.now += 11  # the queued batches finish, freeing the queue
    assert (
        client.post("/batches", json={"input_file_id": file_id, "endpoint": CHAT}).status_code
        == 200
    )


# -- shared state ----------------------------------------------------------------------------


def test_two_apps_over_one_folder_share_batches(tmp_path: Path) -> None:
    config = LocalServerConfig(**ZERO)
    first = client_for(create_app(tmp_path, config))
    second = client_for(create_app(tmp_path, config))
    batch_id = submit(first, chat_lines(3))["id"]
    seen_by_second = get(second, batch_id)
    assert seen_by_second["status"] == "completed"
    assert get(first, batch_id)["output_file_id"] == seen_by_second["output_file_id"]
    assert len(jsonl(first, seen_by_second["output_file_id"])) == 3


def test_results_are_generated_once_under_concurrency(tmp_path: Path) -> None:
    config = LocalServerConfig(**ZERO)
    batch_id = submit(client_for(create_app(tmp_path, config)), chat_lines(50))["id"]
    found: list[str] = []

    def read() -> None:
        found.append(get(client_for(create_app(tmp_path, config)), batch_id)["output_file_id"])

    threads = [threading.Thread(target=read) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(found)) == 1 and len(found) == 8
    assert len(list((tmp_path / "files").glob("*.bin"))) == 2  # input + one output


def test_persisted_config_applies_when_none_is_passed(tmp_path: Path) -> None:
    save_config(tmp_path, LocalServerConfig(**ZERO, failure_rate=1.0, api_key="secret"))
    assert "secret" not in (tmp_path / "config.json").read_text()
    loaded = load_config(tmp_path)
    assert loaded is not None and loaded.failure_rate == 1.0
    batch = run_openai(client_for(create_app(tmp_path)), chat_lines(2))[0]
    assert batch["request_counts"]["failed"] == 2
    with pytest.raises(ValueError):
        LocalServerConfig.from_dict({"failure_rat": 0.1})


def test_multipart_parsing_across_chunk_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(multipart_module, "CHUNK", 7)
    client = make(tmp_path)
    payload = b"".join(json.dumps(x).encode() + b"\r\n" for x in chat_lines(30))
    response = client.post(
        "/files", files={"file": ("x.jsonl", payload)}, data={"purpose": "batch"}
    )
    file_id = response.json()["id"]
    assert response.json()["bytes"] == len(payload)
    assert client.get(f"/files/{file_id}/content").content == payload


# -- served over HTTP, driven by the official openai SDK ------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("served")
    timing = [
        "--validating-seconds",
        "0",
        "--in-progress-seconds",
        "600",
        "--finalizing-seconds",
        "0",
    ]
    with serve_in_subprocess(data_dir, "--api-key", "sk-local", *timing) as base_url:
        assert base_url.startswith("http://127.0.0.1:")
        yield base_url


def test_openai_sdk_against_served_instance(served: str, tmp_path: Path) -> None:
    client = openai.OpenAI(api_key="sk-local", base_url=served, max_retries=0)
    source = tmp_path / "requests.jsonl"
    lines = [chat_line(f"sdk-{i}", f"{i} " + "padding " * 40) for i in range(3000)]
    source.write_text("".join(json.dumps(x) + "\n" for x in lines))
    uploaded = client.files.create(file=open(source, "rb"), purpose="batch")  # noqa: SIM115
    assert uploaded.bytes == source.stat().st_size > 1 << 20
    assert client.files.content(uploaded.id).content == source.read_bytes()
    ids = [
        client.batches.create(
            input_file_id=uploaded.id,
            endpoint=CHAT,
            completion_window="24h",
            metadata={"n": str(i)},
        ).id
        for i in range(3)
    ]
    batch = client.batches.retrieve(ids[0])
    assert batch.status == "in_progress" and batch.metadata == {"n": "0"}
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    rest = client.batches.list(limit=2, after=page.data[-1].id)
    assert rest.data[0].id == ids[0]
    assert client.batches.cancel(ids[1]).status == "cancelling"
    cancelled = client.batches.retrieve(ids[1])
    assert cancelled.status == "cancelled" and cancelled.error_file_id
    errors = client.files.content(cancelled.error_file_id).text.splitlines()
    assert json.loads(errors[0])["error"]["code"] == "batch_cancelled"
    finished = (
        len(client.files.content(cancelled.output_file_id).text.splitlines())
        if cancelled.output_file_id
        else 0
    )
    assert finished + len(errors) == 3000


def test_openai_sdk_wrong_key_is_an_authentication_error(served: str) -> None:
    client = openai.OpenAI(api_key="sk-leaky", base_url=served, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.batches.list()
    assert "sk-leaky" not in str(caught.value)
