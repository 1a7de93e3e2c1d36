"""A provider that echoes the API key into any string of a batch object.

Every string a provider sends (status, ids, error texts, metadata, file ids, result URLs, error
codes) is input: the key must never reach a log line, a manifest, the admission ledger, a file
name on storage or Dagster's metadata. Descriptive strings are redacted; a reference that must
be used verbatim (a batch id, a file id, a result URL) cannot be stored redacted and still
work, so one that carries the key is refused: a batch id as a protocol error (ambiguous after
a create: the chunk is uncertain, never "not sent"), a file id or result URL as an unusable
field, named in the batch's errors, so its rows fail as missing instead of being fetched.

The scripted server (conftest) is a real HTTP server answering what such a provider would.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
import pytest
from conftest import Answer, Scripted, dagster_instance, json_answer, review_pipeline

from infron_dagster import InfronResource
from infron_dagster.client import InfronClient
from infron_dagster.errors import (
    InfronBadRequestError,
    InfronNotFoundError,
    InfronProtocolError,
)
from infron_dagster.manifest import load_manifests
from infron_dagster.models import BatchStatus

KEY = "sk-echo-test-key-0123456789"
CHAT = "/v1/chat/completions"


def _client(server: Scripted, style: str = "infron") -> InfronClient:
    return InfronClient(KEY, server.url("/v1"), style, sleep=lambda s: None)  # type: ignore[arg-type]


def _requests(tmp_path: Path) -> Path:
    path = tmp_path / "requests.jsonl"
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    line = {"custom_id": "r0", "method": "POST", "url": CHAT, "body": body}
    path.write_text(json.dumps(line) + "\n")
    return path


def _unique_status() -> str:
    """An unknown status never seen before in this process (each is warned about once)."""
    return f"odd-{uuid.uuid4().hex[:8]} {KEY}"


def _batch_object(style: str, batch_id: str, status: str, **extra: Any) -> dict[str, Any]:
    ident = {"batch_id": batch_id} if style == "infron" else {"id": batch_id}
    return {**ident, "status": status, **extra}


# -- the client: descriptive strings are redacted before anything is parsed or logged ---------


@pytest.mark.parametrize("style", ["infron", "openai"])
def test_a_status_echoing_the_key_is_warned_about_redacted(
    scripted: Callable[..., Scripted], style: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # the root logger: every logger that propagates
    status = _unique_status()
    server = scripted({"/v1/batches/b1": [json_answer(_batch_object(style, "b1", status))]})
    with _client(server, style) as client:
        batch = client.retrieve_batch("b1")
    assert batch.status is BatchStatus.UNKNOWN
    assert "Unknown batch status" in caplog.text and "***" in caplog.text  # it was warned
    assert KEY not in caplog.text
    assert KEY not in batch.raw_status and batch.raw_status.endswith(" ***")
    assert KEY not in repr(batch) and KEY not in json.dumps(batch.raw)


def test_every_descriptive_string_of_a_batch_is_redacted(
    scripted: Callable[..., Scripted],
) -> None:
    echo = f"Bearer {KEY}"
    openai_obj = {
        "id": "b1",
        "status": "failed",
        "model": echo,
        "errors": {"data": [{"code": f"code_{KEY}", "message": echo, "line": echo}]},
        "metadata": {"echo": echo, KEY: "as a key", "nested": {"deep": [echo]}},
    }
    infron_obj = {
        "batch_id": "b2",
        "status": "FAILED",
        "error": echo,
        "fail_reason": {"why": echo},
        "model": echo,
        "fees": echo,
        "progress": echo,
    }
    server = scripted(
        {"/v1/batches/b1": [json_answer(openai_obj)], "/v1/batches/b2": [json_answer(infron_obj)]}
    )
    with _client(server, "openai") as openai, _client(server, "infron") as infron:
        batches = [openai.retrieve_batch("b1"), infron.retrieve_batch("b2")]
    for batch in batches:
        assert batch.status is BatchStatus.FAILED
        assert KEY not in repr(batch) and KEY not in json.dumps(batch.raw)
        assert KEY not in json.dumps(batch.metadata) and KEY not in " ".join(batch.errors)
        assert all("***" in e for e in batch.errors)
    assert batches[0].metadata["echo"] == "Bearer ***" and "***" in batches[0].metadata


def test_a_key_across_the_error_text_cut_leaves_no_head(
    scripted: Callable[..., Scripted],
) -> None:
    # The error text is cut at 300 characters: redacting after the cut would miss a key the
    # cut splits and leave its head behind.
    obj = {"batch_id": "b1", "status": "FAILED", "fail_reason": "x" * 290 + KEY + "y" * 50}
    server = scripted({"/v1/batches/b1": [json_answer(obj)]})
    with _client(server) as client:
        batch = client.retrieve_batch("b1")
    assert batch.errors and all(KEY[:6] not in e for e in batch.errors)


@pytest.mark.parametrize("style", ["infron", "openai"])
def test_a_created_batch_whose_id_carries_the_key_is_an_ambiguous_protocol_error(
    scripted: Callable[..., Scripted],
    tmp_path: Path,
    style: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    created = _batch_object(style, f"batch-{KEY}", "PENDING")
    server = scripted(
        {"/v1/files": [json_answer({"id": "file-1"})], "/v1/batches": [json_answer(created)]}
    )
    with _client(server, style) as client, pytest.raises(InfronProtocolError) as caught:
        client.create_batch(_requests(tmp_path))
    # The batch may exist: the chunk must stay uncertain, never be taken as not sent.
    assert caught.value.ambiguous is True
    assert "API key" in str(caught.value)
    assert KEY not in str(caught.value) and KEY not in repr(caught.value)
    assert KEY not in caplog.text
    assert [s[:2] for s in server.seen][-1] == ("POST", "/v1/batches")  # sent once


def test_a_read_or_listed_batch_whose_id_carries_the_key_is_refused(
    scripted: Callable[..., Scripted],
) -> None:
    bad = {"id": f"batch-{KEY}", "status": "completed"}
    page = {"data": [bad, {"id": "b2", "status": "completed"}], "has_more": False}
    server = scripted({"/v1/batches/b1": [json_answer(bad)], "/v1/batches": [json_answer(page)]})
    with _client(server, "openai") as client:
        with pytest.raises(InfronProtocolError) as caught:
            client.retrieve_batch("b1")
        skipped: list[str] = []
        listed = list(client.list_batches(skipped=skipped))
    assert caught.value.ambiguous is False and KEY not in str(caught.value)
    assert [b.id for b in listed] == ["b2"] and len(skipped) == 1
    assert KEY not in skipped[0] and "API key" in skipped[0]


def test_a_file_id_or_result_url_carrying_the_key_is_not_followed(
    scripted: Callable[..., Scripted],
) -> None:
    server = scripted({})
    openai_obj = {
        "id": "b1",
        "status": "completed",
        "output_file_id": f"file-{KEY}",
        "error_file_id": "file-errors",
    }
    infron_obj = {
        "batch_id": "b2",
        "status": "SUCCESS",
        "result_url": server.url(f"/v1/results/{KEY}"),
    }
    server.script.update(
        {"/v1/batches/b1": [json_answer(openai_obj)], "/v1/batches/b2": [json_answer(infron_obj)]}
    )
    with _client(server, "openai") as openai, _client(server, "infron") as infron:
        first, second = openai.retrieve_batch("b1"), infron.retrieve_batch("b2")
        files = [*openai.result_files(first), *infron.result_files(second)]
    assert first.output_file_id is None and first.error_file_id == "file-errors"
    assert second.result_url is None
    assert [f.kind for f in files] == ["errors"]  # the one usable file, nothing else
    for batch, field in ((first, "output_file_id"), (second, "result_url")):
        assert KEY not in repr(batch) and KEY not in json.dumps(batch.raw)
        assert any(field in e and "API key" in e for e in batch.errors), batch.errors


def test_an_uploaded_file_id_carrying_the_key_is_refused(
    scripted: Callable[..., Scripted], tmp_path: Path
) -> None:
    server = scripted({"/v1/files": [json_answer({"id": f"file-{KEY}"})]})
    with _client(server, "openai") as client, pytest.raises(InfronProtocolError) as caught:
        client.upload_file(_requests(tmp_path))
    assert "API key" in str(caught.value) and KEY not in str(caught.value)


def test_an_error_code_echoing_the_key_is_redacted(scripted: Callable[..., Scripted]) -> None:
    body = json.dumps({"error": {"message": "bad request", "code": f"bad_key_{KEY}"}}).encode()
    server = scripted({"/v1/batches/b1": [Answer(400, body)]})
    with _client(server) as client, pytest.raises(InfronBadRequestError) as caught:
        client.retrieve_batch("b1")
    assert caught.value.code == "bad_key_***"
    assert KEY not in str(caught.value) and KEY not in repr(caught.value)


def test_a_batch_id_holding_the_key_is_not_named_in_errors(
    scripted: Callable[..., Scripted],
) -> None:
    # A manifest written before ids were checked may hold one: polling it names no key.
    server = scripted({})
    with _client(server) as client:
        for call in (client.retrieve_batch, client.cancel_batch):
            with pytest.raises(InfronNotFoundError) as caught:
                call(f"b-{KEY}")
            assert KEY not in str(caught.value) and KEY not in caught.value.operation


# -- end to end: a Dagster submit and collect against a provider echoing the key ---------------


def _lake_leaks(root: Path) -> list[str]:
    """Every file under ``root`` whose name or bytes hold the key, and every Parquet cell."""
    leaks = []
    for path in root.rglob("*"):
        if KEY in str(path):
            leaks.append(f"name: {path}")
        elif path.is_file():
            if KEY.encode() in path.read_bytes():
                leaks.append(f"bytes: {path}")
            if path.suffix == ".parquet" and KEY in json.dumps(pq.read_table(path).to_pylist()):
                leaks.append(f"cells: {path}")
    return leaks


def _events(instance: dg.DagsterInstance, runs: list[Any]) -> list[str]:
    return [str(e) for run in runs for e in instance.all_logs(run.run_id)]


def _materialization_metadata(instance: dg.DagsterInstance, key: dg.AssetKey) -> str:
    records = instance.fetch_materializations(key, limit=100).records
    return " ".join(
        str(r.asset_materialization.metadata) for r in records if r.asset_materialization
    )


def _pipeline(tmp_path: Path, server: Scripted, style: str) -> Any:
    resource = InfronResource(
        api_key=KEY, base_url=server.url("/v1"), api_style=style, max_retries=0
    )
    return review_pipeline(
        tmp_path,
        resource,
        dg.StaticPartitionsDefinition(["p"]),
        rows=5,
        max_enqueued_tokens=10**9,  # admission on: its ledger is one of the files checked
        sensor_default_status=dg.DefaultSensorStatus.STOPPED,
    )


@pytest.mark.parametrize("style", ["infron", "openai"])
def test_a_key_echoed_in_status_error_metadata_and_result_reference_reaches_nothing(
    scripted: Callable[..., Scripted],
    tmp_path: Path,
    style: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    echo = f"Bearer {KEY}"
    server = scripted({})
    created = _batch_object(
        style, "batch-echo-1", _unique_status(), metadata={"echo": echo}, error=echo
    )
    if style == "infron":
        done = _batch_object(
            style,
            "batch-echo-1",
            "SUCCESS",
            fail_reason=echo,
            result_url=server.url(f"/v1/results/{KEY}"),
        )
    else:
        done = _batch_object(
            style,
            "batch-echo-1",
            "completed",
            output_file_id=f"file-{KEY}",
            errors={"data": [{"code": "x", "message": echo}]},
            metadata={"echo": echo},
        )
    # Were the references followed, they would give a readable (if useless) result file.
    unknown = Answer(200, b'{"custom_id": "nobody", "response": {"status_code": 200}}\n')
    server.script.update(
        {
            "/v1/files": [json_answer({"id": "file-in"})],
            "/v1/batches": [json_answer(created)],
            "/v1/batches/batch-echo-1": [json_answer(done)],
            f"/v1/results/{KEY}": [unknown],
            f"/v1/files/file-{KEY}/content": [unknown],
        }
    )
    flow = _pipeline(tmp_path, server, style)
    pipeline = flow.pipeline
    with dagster_instance() as instance:
        submitted = dg.materialize(
            [flow.upstream, pipeline.batches_asset],
            partition_key="p",
            resources=flow.resources,
            instance=instance,
        )
        collected = dg.materialize(
            [pipeline.collect_assets],
            partition_key="p",
            resources=flow.resources,
            instance=instance,
            selection=[pipeline.results_key, pipeline.failed_key],
        )
        events = _events(instance, [submitted, collected])
        metadata = " ".join(
            _materialization_metadata(instance, key)
            for key in (pipeline.batches_asset.key, pipeline.results_key, pipeline.failed_key)
        )
    assert submitted.success and collected.success
    assert (tmp_path / "lake" / "_admission" / "infron.json").is_file()
    assert _lake_leaks(tmp_path) == []
    assert KEY not in caplog.text
    assert all(KEY not in event for event in events)
    assert metadata and KEY not in metadata

    assert "***" in caplog.text  # the unknown status was warned about, redacted
    # The reference carrying the key was never followed: the rows fail, saying why.
    fetched = [path for _, path, _ in server.seen if "/results" in path or "/content" in path]
    assert fetched == []
    failed = pq.read_table(pipeline.storage.table_path("failed", "p")).to_pandas()
    assert len(failed) == 5 and set(failed["error_code"]) == {"missing_result"}
    assert failed["error_message"].str.contains("API key", regex=False).all()


@pytest.mark.parametrize("style", ["infron", "openai"])
def test_a_created_batch_id_echoing_the_key_is_never_recorded(
    scripted: Callable[..., Scripted],
    tmp_path: Path,
    style: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    created = _batch_object(style, f"batch-{KEY}", "PENDING")
    page = {"data": [created], "has_more": False}  # openai style lists to re-attach
    server = scripted(
        {
            "/v1/files": [json_answer({"id": "file-in"})],
            "/v1/batches": [json_answer(created), json_answer(page)],
        }
    )
    flow = _pipeline(tmp_path, server, style)
    pipeline = flow.pipeline
    with dagster_instance() as instance:
        submitted = dg.materialize(
            [flow.upstream, pipeline.batches_asset],
            partition_key="p",
            resources=flow.resources,
            instance=instance,
            raise_on_error=False,
        )
        events = _events(instance, [submitted])
        metadata = _materialization_metadata(instance, pipeline.batches_asset.key)
    creates = [s for s in server.seen if s[:2] == ("POST", "/v1/batches")]
    assert len(creates) == 1
    # The batch may exist, but its id cannot be recorded: the chunk is uncertain, not unsent.
    (manifest,) = load_manifests(pipeline.storage, "p")
    assert [(c.batch_id, c.uncertain) for c in manifest.chunks] == [(None, True)]

    assert (tmp_path / "lake" / "_admission" / "infron.json").is_file()
    assert _lake_leaks(tmp_path) == []
    assert KEY not in caplog.text
    assert all(KEY not in event for event in events)
    assert KEY not in metadata
