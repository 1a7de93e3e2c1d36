"""Never paying twice: resuming half-submitted attempts, re-attaching orphans, reviving old
attempts. Real local server (in-process WSGI), real files."""

import json
import shutil
import time

import httpx
import pandas as pd
import pytest
from conftest import BOTH_STYLES, make_local_dir

from infron_dagster import (
    BatchStorage,
    InfronClient,
    RequestSpec,
    prepare_requests,
    submit_prepared,
)
from infron_dagster.local import LocalServerConfig, create_app, save_config
from infron_dagster.local.embedded import embedded_client
from infron_dagster.submit import SubmitIncomplete, load_manifests

SPEC = RequestSpec(model="gpt-4o-mini", prompt_template="Say {word}", key_columns=("id",))


def _frame(words: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"id": range(len(words)), "word": words})


def _submit(tmp_path, local_dir, frame, style="openai", **kwargs):
    storage = BatchStorage(str(tmp_path / "lake"), "words")
    work = tmp_path / f"work-{len(list(tmp_path.iterdir()))}"
    prepared = prepare_requests(
        frame, SPEC, name="words", partition_key="p", workdir=work, max_requests_per_batch=4
    )
    with embedded_client(local_dir, api_style=style) as client:
        return submit_prepared(client, storage, prepared, spec=SPEC, partition_key="p", **kwargs)


def _server_batches(local_dir) -> int:
    with embedded_client(local_dir, api_style="openai") as client:
        return len(list(client.list_batches()))


def test_a_refused_chunk_is_reported_and_the_rerun_resumes_without_paying_twice(tmp_path):
    # Each chunk holds 4 short prompts (about 12 tokens): a limit of 20 lets one chunk in.
    local_dir = make_local_dir(
        str(tmp_path / "srv"), enqueued_token_limit=20, in_progress_seconds=3600
    )
    frame = _frame([f"word{i}" for i in range(12)])
    with pytest.raises(SubmitIncomplete) as info:
        _submit(tmp_path, local_dir, frame)
    assert (info.value.created, info.value.total) == (1, 3)
    assert "resumes with the remaining chunks" in str(info.value)
    [manifest] = load_manifests(BatchStorage(str(tmp_path / "lake"), "words"), "p")
    assert manifest.state == "submitting" and len(manifest.batch_ids) == 1
    save_config(local_dir, LocalServerConfig(in_progress_seconds=3600))  # the queue drained
    outcome = _submit(tmp_path, local_dir, frame)
    assert len(outcome.created) == 2 and outcome.manifest.attempt == 1
    assert outcome.manifest.state == "submitted" and len(outcome.manifest.batch_ids) == 3
    assert _server_batches(local_dir) == 3


def test_an_orphan_created_before_a_crash_is_reattached_by_metadata(tmp_path):
    local_dir = make_local_dir(
        str(tmp_path / "srv"), enqueued_token_limit=30, in_progress_seconds=3600
    )
    frame = _frame([f"word{i}" for i in range(12)])
    with pytest.raises(SubmitIncomplete):
        _submit(tmp_path, local_dir, frame)
    storage = BatchStorage(str(tmp_path / "lake"), "words")
    path = storage.manifest_path("p", 1)
    record = json.loads(path.read_bytes())
    orphan = record["chunks"][1]["batch_id"]
    record["chunks"][1]["batch_id"] = None  # the process died before recording it
    path.write_text(json.dumps(record))
    save_config(local_dir, LocalServerConfig(in_progress_seconds=3600))
    outcome = _submit(tmp_path, local_dir, frame)
    assert outcome.reattached == [orphan] and len(outcome.created) == 1
    assert _server_batches(local_dir) == 3


@BOTH_STYLES
def test_input_changing_back_revives_the_old_batches_as_a_new_attempt(tmp_path, api_style):
    local_dir = make_local_dir(str(tmp_path / "srv"))
    first = _submit(tmp_path, local_dir, _frame(["a", "b"]), style=api_style)
    second = _submit(tmp_path, local_dir, _frame(["a", "c"]), style=api_style)
    third = _submit(tmp_path, local_dir, _frame(["a", "b"]), style=api_style)
    assert [o.manifest.attempt for o in (first, second, third)] == [1, 2, 3]
    assert third.reused and third.created == []
    assert third.manifest.batch_ids == first.manifest.batch_ids
    assert _server_batches(local_dir) == 2
    again = _submit(tmp_path, local_dir, _frame(["a", "b"]), style=api_style)
    assert again.reused and again.manifest.attempt == 3


def test_force_resubmit_pays_again_on_purpose(tmp_path):
    local_dir = make_local_dir(str(tmp_path / "srv"))
    _submit(tmp_path, local_dir, _frame(["a", "b"]))
    forced = _submit(tmp_path, local_dir, _frame(["a", "b"]), force=True)
    assert not forced.reused and forced.manifest.attempt == 2 and len(forced.created) == 1
    assert _server_batches(local_dir) == 2


class _LostAnswerTransport(httpx.WSGITransport):
    """The real local app, but the first "create batch" answer is lost on the way back:
    the server created the batch, the client saw a read timeout. No real server can be made
    to drop exactly that answer, so the loss is injected here, at the transport."""

    def __init__(self, app) -> None:
        super().__init__(app=app)
        self.dropped = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method == "POST" and request.url.path.endswith("/batches") and not self.dropped:
            self.dropped += 1
            raise httpx.ReadTimeout("answer lost", request=request)
        return response


def _lossy_client(local_dir, style):
    transport = _LostAnswerTransport(create_app(local_dir))
    client = InfronClient("k", "http://infron.local/v1", style, transport=transport)
    return client, transport


def _submit_with(client, tmp_path, frame, **kwargs):
    storage = BatchStorage(str(tmp_path / "lake"), "words")
    work = tmp_path / f"work-{len(list(tmp_path.iterdir()))}"
    prepared = prepare_requests(frame, SPEC, name="words", partition_key="p", workdir=work)
    return submit_prepared(client, storage, prepared, spec=SPEC, partition_key="p", **kwargs)


def test_a_lost_create_answer_is_reattached_not_paid_twice_openai(tmp_path):
    local_dir = make_local_dir(str(tmp_path / "srv"), in_progress_seconds=3600)
    client, transport = _lossy_client(local_dir, "openai")
    outcome = _submit_with(client, tmp_path, _frame(["a", "b"]))
    assert transport.dropped == 1 and len(outcome.reattached) == 1 and outcome.created == []
    assert outcome.manifest.state == "submitted" and _server_batches(local_dir) == 1


def test_a_lost_create_answer_in_infron_style_is_never_resent_blindly(tmp_path):
    local_dir = make_local_dir(str(tmp_path / "srv"), in_progress_seconds=3600)
    client, _transport = _lossy_client(local_dir, "infron")
    with pytest.raises(SubmitIncomplete, match="resubmit_uncertain"):
        _submit_with(client, tmp_path, _frame(["a", "b"]))
    with pytest.raises(SubmitIncomplete, match="resubmit_uncertain"):
        _submit_with(client, tmp_path, _frame(["a", "b"]))  # a plain re-run does not pay
    assert _server_batches(local_dir) == 1
    outcome = _submit_with(client, tmp_path, _frame(["a", "b"]), resubmit_uncertain=True)
    assert len(outcome.created) == 1 and _server_batches(local_dir) == 2


def test_an_api_key_with_a_trailing_newline_is_cleaned_and_never_echoed():
    client = InfronClient("sk-secret-123\n", "http://infron.local/v1")
    assert client._secret == "sk-secret-123"
    with pytest.raises(ValueError) as info:
        InfronClient("sk-se\x07cret", "http://infron.local/v1")
    assert "sk-se" not in str(info.value)


def test_a_new_lake_gets_new_run_keys_so_dagster_does_not_skip_its_collections(tmp_path):
    local_dir = make_local_dir(str(tmp_path / "srv"))
    first = _submit(tmp_path, local_dir, _frame(["a", "b"])).manifest
    time.sleep(1.1)  # created_at has one-second resolution
    shutil.rmtree(tmp_path / "lake")  # the lake is wiped; the Dagster instance is not
    second = _submit(tmp_path, local_dir, _frame(["a", "b"]), force=True).manifest
    assert (first.attempt, second.attempt) == (1, 1)
    assert first.run_key.startswith("words:p:1:") and second.run_key.startswith("words:p:1:")
    assert first.run_key != second.run_key


class _ForgetfulTransport(httpx.WSGITransport):
    """The real local app behind a provider that loses the first create's answer (timeout)
    and, when ``echo_metadata`` is off, lists batches without their metadata, as some
    OpenAI-compatible servers do. Only a transport can shape answers this precisely."""

    def __init__(self, app, *, echo_metadata: bool, create_reaches_server: bool) -> None:
        super().__init__(app=app)
        self.echo_metadata = echo_metadata
        self.create_reaches_server = create_reaches_server
        self.creates = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        is_create = request.method == "POST" and request.url.path.endswith("/batches")
        if is_create and self.creates == 0:
            self.creates += 1
            if self.create_reaches_server:
                super().handle_request(request)
            raise httpx.ReadTimeout("answer lost", request=request)
        response = super().handle_request(request)
        if request.method == "GET" and request.url.path.endswith("/batches"):
            page = json.loads(response.read())
            for row in page["data"]:
                if not self.echo_metadata:
                    row["metadata"] = {}
            return httpx.Response(200, json=page)
        return response


def _age_intents(tmp_path, seconds: float) -> None:
    """Pretend the create calls of attempt 1 were started ``seconds`` ago."""
    storage = BatchStorage(str(tmp_path / "lake"), "words")
    path = storage.manifest_path("p", 1)
    manifest = storage.read_json(path)
    when = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - seconds))
    for chunk in manifest["chunks"]:
        chunk["create_started_at"] = when if chunk["create_started_at"] else None
    storage.write_json(path, manifest)


def test_a_provider_that_drops_metadata_never_makes_a_lost_create_look_unsent(tmp_path):
    local_dir = make_local_dir(str(tmp_path / "srv"), in_progress_seconds=3600)
    transport = _ForgetfulTransport(
        create_app(local_dir), echo_metadata=False, create_reaches_server=True
    )
    client = InfronClient("k", "http://infron.local/v1", "openai", transport=transport)
    # An ambiguous create in openai style waits (the run succeeds), it does not fail
    first = _submit_with(client, tmp_path, _frame(["a", "b"]))
    assert "re-attached by its metadata" in first.waiting_for and not first.manifest.batch_ids
    _age_intents(tmp_path, 3600)  # long past the grace period
    again = _submit_with(client, tmp_path, _frame(["a", "b"]))
    assert again.waiting_for and again.created == []  # an untrusted list: still uncertain
    assert _server_batches(local_dir) == 1  # the lost create was never paid for again


def test_a_create_that_never_arrived_is_sent_once_the_list_is_trusted(tmp_path):
    local_dir = make_local_dir(str(tmp_path / "srv"), in_progress_seconds=3600)
    (tmp_path / "other").mkdir()
    _submit(tmp_path / "other", local_dir, _frame(["x"]))  # a batch with our metadata
    transport = _ForgetfulTransport(
        create_app(local_dir), echo_metadata=True, create_reaches_server=False
    )
    client = InfronClient("k", "http://infron.local/v1", "openai", transport=transport)
    waiting = _submit_with(client, tmp_path, _frame(["a", "b"]))
    assert waiting.waiting_for and waiting.created == []  # within the grace: wait, no resend
    assert _server_batches(local_dir) == 1
    _age_intents(tmp_path, 3600)
    outcome = _submit_with(client, tmp_path, _frame(["a", "b"]))
    assert len(outcome.created) == 1 and outcome.reattached == []
    assert _server_batches(local_dir) == 2
