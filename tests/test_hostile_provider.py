"""A hostile provider, through the real submit and collect paths in Dagster.

``HostileProvider`` is a small WSGI app served over real HTTP on loopback. It speaks either
wire style well enough to take a batch, and then answers with everything a broken or hostile
provider sends: ids that climb out of the storage root, timestamps in milliseconds, result
lines of every malformed shape (wrong types, ``1e999``, deep nesting, a line over the size
bound, lone surrogates, a 200 without a body, duplicates, unknown ids, no line at all), and
messages that echo the API key. The promises checked after a full Dagster run:

- no exception escapes collection, and every input row ends in results or failed with a code;
- no file is written outside the storage root;
- the key is in no message, file, log line or Dagster event.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import dagster_instance

from infron_dagster import InfronResource, RequestSpec, build_infron_batch_assets
from infron_dagster.client import InfronClient
from infron_dagster.collect import MAX_DOWNLOAD_REFUSALS, collect_partition
from infron_dagster.errors import InfronNotFoundError
from infron_dagster.prepare import prepare_requests
from infron_dagster.storage import BatchStorage
from infron_dagster.submit import submit_prepared

KEY = "sk-hostile-test-key-0123456789"
LINE_LIMIT = 16384
HOSTILE_IDS = {
    "batch": "../../../../escaped-batch",
    "file": "../../../escaped-upload",
    "output": "../../../../../escaped-output",
    "errors": "/abs/escaped-errors",
}


def _ok(content: Any, **usage: Any) -> dict[str, Any]:
    body = {"choices": [{"message": {"content": content}, "finish_reason": "stop"}]}
    body["usage"] = usage or {"prompt_tokens": 3, "completion_tokens": 2}
    return {"status_code": 200, "body": body}


# Each request, by its position in the batch, gets one of these answers. Values are
# (kind of line, expected final error code or None for a result).
SHAPES: list[tuple[str, str | None]] = [
    ("good", None),
    ("choices_not_objects", "unparseable_result"),
    ("usage_is_a_list", None),  # the answer is kept; token counts are unknown
    ("status_1e999", "unparseable_result"),
    ("tokens_12abc", None),
    ("content_object", "unparseable_result"),
    ("deep_nesting", "unparseable_result"),
    ("too_long", "result_too_large"),
    ("200_without_body", "empty_response"),
    ("no_line", "missing_result"),
    ("error_then_good", None),  # a duplicate error line never hides a paid success
    ("not_json", "unparseable_result"),
    ("lone_surrogate", "unparseable_result"),
    ("error_echoing_key", "server_error"),
    ("model_is_a_number", None),
    ("error_echoing_escaped_key", "server_error"),  # \u-escaped: only parsing reveals it
]


def result_lines(custom_id: str, shape: str) -> list[bytes]:
    """The raw result lines a hostile provider sends for one request."""

    def line(obj: dict[str, Any]) -> bytes:
        return json.dumps({"custom_id": custom_id, **obj}).encode()

    good = line({"response": _ok("fine"), "error": None})
    lines = {
        "good": [good],
        "choices_not_objects": [
            line({"response": {"status_code": 200, "body": {"choices": ["x"]}}})
        ],
        "usage_is_a_list": [
            line({"response": {"status_code": 200, "body": {**_ok("ok")["body"], "usage": [1]}}})
        ],
        "status_1e999": [
            b'{"custom_id": "%s", "response": {"status_code": 1e999, "body": {}}}'
            % custom_id.encode()
        ],
        "tokens_12abc": [line({"response": _ok("ok", prompt_tokens="12abc")})],
        "content_object": [line({"response": _ok({"not": "text"})})],
        "deep_nesting": [
            f'{{"custom_id": "{custom_id}", "response": '.encode()
            + b"[" * 5_000
            + b"]" * 5_000
            + b"}"
        ],
        "too_long": [line({"response": _ok("x" * (LINE_LIMIT * 3))})],
        "200_without_body": [line({"response": {"status_code": 200}, "error": None})],
        "no_line": [],
        "error_then_good": [good, line({"error": {"code": "server_error", "message": "dup"}})],
        "not_json": [f'{{"custom_id": "{custom_id}", "response": {{oops'.encode()],
        "lone_surrogate": [line({"response": _ok("\ud800")}).replace(b"\\ud800", b"\\ud800")],
        "error_echoing_key": [
            line({"error": {"code": "server_error", "message": f"bad auth Bearer {KEY}"}})
        ],
        "error_echoing_escaped_key": [
            line({"error": {"code": "server_error", "message": "KEYHERE"}}).replace(
                b"KEYHERE", b"Bearer \\u0073" + KEY[1:].encode()
            )
        ],
        "model_is_a_number": [
            line({"response": {"status_code": 200, "body": {**_ok("ok")["body"], "model": 5}}})
        ],
    }
    return lines[shape]


@dataclass
class HostileProvider:
    """Both wire styles, minimally, with hostile ids and malformed result lines."""

    style: str
    base_url: str = ""
    requests: list[str] = field(default_factory=list)
    batches: int = 0
    refuse_downloads: int = 0  # answer 404 to this many result downloads first
    good_lines_only: bool = False

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        status, payload = self._route(method, path, body)
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        start_response(status, [("Content-Length", str(len(data)))])
        return [data]

    def _route(self, method: str, path: str, body: bytes) -> tuple[str, Any]:
        if method == "POST" and path == "/v1/files":
            self._take_upload(body)
            return "200 OK", {"id": HOSTILE_IDS["file"], "object": "file"}
        if method == "POST" and path == "/v1/batches":
            if self.style == "infron":
                self.requests += [r["custom_id"] for r in json.loads(body)["requests"]]
            self.batches += 1
            return "200 OK", self._batch("PENDING")
        if method == "GET" and path.startswith("/v1/batches/"):
            return "200 OK", self._batch("SUCCESS" if self.style == "infron" else "completed")
        if method == "GET" and path.startswith(("/v1/results", "/v1/files/")):
            if self.refuse_downloads > 0:
                self.refuse_downloads -= 1
                return "404 Not Found", {"error": {"message": "not there yet"}}
            return "200 OK", self._results(path)
        return "404 Not Found", {"error": {"message": f"no route; your key was Bearer {KEY}"}}

    def _take_upload(self, body: bytes) -> None:
        for raw in body.splitlines():
            if raw.startswith(b"{"):
                self.requests.append(json.loads(raw)["custom_id"])

    def _batch(self, status: str) -> dict[str, Any]:
        if self.style == "infron":
            return {
                "batch_id": HOSTILE_IDS["batch"],
                "status": status,
                "progress": "100%",
                "fees": "0.0017720000000000001",
                "submit_time": 1764000000000,  # milliseconds
                "finish_time": 1764000000123,
                "result_url": f"{self.base_url}/v1/results/{'x' * 10}",
            }
        return {
            "id": HOSTILE_IDS["batch"],
            "status": status,
            "created_at": 1764000000000,
            "output_file_id": HOSTILE_IDS["output"],
            "error_file_id": HOSTILE_IDS["errors"],
            "metadata": {"echo": f"Bearer {KEY}"},
        }

    def _results(self, path: str) -> bytes:
        want_errors = "escaped-errors" in path
        lines: list[bytes] = [b'{"custom_id": "req-unknown", "response": {"status_code": 200}}']
        for i, custom_id in enumerate(sorted(self.requests)):
            shape = "good" if self.good_lines_only else SHAPES[i % len(SHAPES)][0]
            is_error = shape.startswith("error_echoing")
            if self.style == "infron" or want_errors == is_error:
                lines += result_lines(custom_id, shape)
        return b"\n".join(lines) + b"\n"


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def provider(request: pytest.FixtureRequest) -> Iterator[HostileProvider]:
    app = HostileProvider(request.param)
    server = make_server("127.0.0.1", 0, app, server_class=WSGIServer, handler_class=_Quiet)
    app.base_url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield app
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("provider", ["infron", "openai"], indirect=True)
def test_hostile_provider_cannot_lose_rows_escape_the_root_or_leak_the_key(
    provider: HostileProvider, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    root = tmp_path / "a" / "b" / "c" / "lake"
    n = len(SHAPES) * 2
    rows = pd.DataFrame({"id": range(n), "text": [f"t{i}" for i in range(n)]})

    @dg.asset(partitions_def=dg.StaticPartitionsDefinition(["Zürich"]))
    def reviews() -> pd.DataFrame:
        return rows

    pipeline = build_infron_batch_assets(
        name="hostile",
        spec=RequestSpec(model="m", prompt_template="{text}", key_columns=("id",)),
        source=reviews,
        partitions_def=reviews.partitions_def,
        storage_root=str(root),
        max_result_line_bytes=LINE_LIMIT,
        sensor_default_status=dg.DefaultSensorStatus.STOPPED,
    )
    resource = InfronResource(
        api_key=KEY, base_url=f"{provider.base_url}/v1", api_style=provider.style, max_retries=0
    )
    with dagster_instance() as instance:
        submitted = dg.materialize(
            [reviews, pipeline.batches_asset],
            partition_key="Zürich",
            resources={"infron": resource},
            instance=instance,
        )
        collected = dg.materialize(
            [pipeline.collect_assets],
            partition_key="Zürich",
            resources={"infron": resource},
            instance=instance,
            selection=[pipeline.results_key, pipeline.failed_key],
        )
        events = [str(e) for e in instance.all_logs(collected.run_id)]
        events += [str(e) for e in instance.all_logs(submitted.run_id)]
    assert submitted.success and collected.success
    assert provider.batches == 1 and len(provider.requests) == len(rows)

    results = pq.read_table(pipeline.storage.table_path("results", "Zürich")).to_pandas()
    failed = pq.read_table(pipeline.storage.table_path("failed", "Zürich")).to_pandas()
    # Every row in exactly one table, each with the answer its line deserved.
    assert sorted([*results["id"], *failed["id"]]) == list(rows["id"])
    by_order = sorted([*results["custom_id"], *failed["custom_id"]])
    expected = {cid: SHAPES[i % len(SHAPES)][1] for i, cid in enumerate(by_order)}
    got = {cid: None for cid in results["custom_id"]}
    got |= dict(zip(failed["custom_id"], failed["error_code"], strict=True))
    assert got == expected
    assert failed["error_message"].map(bool).all()
    # Parquet is compressed, so the byte scan below cannot see into it: read the cells.
    assert not failed["error_message"].str.contains(KEY, regex=False).any()
    assert failed["error_message"].str.contains("Bearer ***", regex=False).sum() == 4
    flaky = failed[failed["error_code"] != "result_too_large"]
    assert flaky["retryable"].all()

    # Nothing outside the storage root, and the key in no file, message or event.
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and root not in p.parents]
    assert outside == []
    # ... nor outside this partition's own attempt folder, where the provider's bytes go.
    raw = pipeline.storage.attempt_dir("raw", "Zürich", 1)
    stray = [p for p in (root / "hostile" / "raw").rglob("*") if p.is_file()]
    assert stray and all(str(p).startswith(raw.path + "/") for p in stray)
    for path in root.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in caplog.text
    assert all(KEY not in event for event in events)


def _collect_through_refusals(provider: HostileProvider, tmp_path: Path, rows: int) -> Any:
    """Submit ``rows`` rows, then collect until the refusals run out; the last outcome."""
    spec = RequestSpec(model="m", prompt_template="{text}", key_columns=("id",))
    frame = pd.DataFrame({"id": range(rows), "text": [f"t{i}" for i in range(rows)]})
    storage = BatchStorage(tmp_path / "lake", "late")
    with InfronClient(KEY, f"{provider.base_url}/v1", "infron", sleep=lambda s: None) as client:
        prepared = prepare_requests(frame, spec, name="late", partition_key="p", workdir=tmp_path)
        submit_prepared(client, storage, prepared, spec=spec, partition_key="p")
        for _ in range(MAX_DOWNLOAD_REFUSALS - 1):  # a link not valid yet: the run stops
            with pytest.raises(InfronNotFoundError):
                collect_partition(client, storage, spec, "p")
        return collect_partition(client, storage, spec, "p")


@pytest.mark.parametrize("provider", ["infron"], indirect=True)
def test_a_result_file_refused_at_first_is_downloaded_by_a_later_collection(
    provider: HostileProvider, tmp_path: Path
) -> None:
    provider.good_lines_only = True
    provider.refuse_downloads = MAX_DOWNLOAD_REFUSALS - 1
    outcome = _collect_through_refusals(provider, tmp_path, 6)
    assert outcome.results is not None and outcome.results.num_rows == 6  # nothing paid twice


@pytest.mark.parametrize("provider", ["infron"], indirect=True)
def test_a_result_file_refused_for_good_fails_its_rows_as_missing(
    provider: HostileProvider, tmp_path: Path
) -> None:
    provider.refuse_downloads = 10**6
    outcome = _collect_through_refusals(provider, tmp_path, 4)
    assert outcome.failed is not None and outcome.failed.num_rows == 4
    assert set(outcome.failed.column("error_code").to_pylist()) == {"missing_result"}
    messages = outcome.failed.column("error_message").to_pylist()
    assert all("could not be downloaded" in m for m in messages)
