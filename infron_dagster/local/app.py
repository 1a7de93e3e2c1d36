"""The WSGI app: routing, auth, fault injection and the request handlers.

Runs in-process behind ``httpx.WSGITransport`` or served by ``infron-local serve``; both
keep every bit of state in the data folder, so any number of app instances agree.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

from . import engine, jsonstream, multipart
from .config import LocalServerConfig, load_config
from .errors import ApiError
from .hosts import EMBEDDED_HOST, host_allowed
from .store import Store
from .views import infron_view, openai_view
from .wsgi import CHUNK, BodyInput, Request, Response, StartResponse, json_response

PREFIX = "/v1"
DEFAULT_LIST_LIMIT = 20
MAX_LIST_LIMIT = 100


class LocalBatchApp:
    """The batch API emulator as a WSGI callable.

    Example:
        >>> import tempfile, httpx
        >>> app = LocalBatchApp(tempfile.mkdtemp())
        >>> client = httpx.Client(transport=httpx.WSGITransport(app=app),
        ...                       base_url="http://localhost/v1",
        ...                       headers={"Authorization": "Bearer x"})
        >>> client.get("/batches").json()["data"]
        []
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        config: LocalServerConfig | None = None,
        *,
        embedded_host: str | None = EMBEDDED_HOST,
    ) -> None:
        self.store = Store(data_dir)
        self.config = config or load_config(data_dir) or LocalServerConfig()
        # The in-process transport's host name; None when a socket serves the app.
        self._trusted_hosts = (embedded_host,) if embedded_host else ()
        self._requests_seen = 0
        self._counter_lock = threading.Lock()
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., Response]]] = [
            ("POST", re.compile(r"/files"), self.create_file),
            ("GET", re.compile(r"/files"), self.list_files),
            ("GET", re.compile(r"/files/(?P<file_id>[\w-]+)"), self.get_file),
            ("DELETE", re.compile(r"/files/(?P<file_id>[\w-]+)"), self.delete_file),
            ("GET", re.compile(r"/files/(?P<file_id>[\w-]+)/content"), self.file_content),
            ("POST", re.compile(r"/batches"), self.create_batch),
            ("GET", re.compile(r"/batches"), self.list_batches),
            ("GET", re.compile(r"/batches/(?P<batch_id>[\w-]+)"), self.get_batch),
            ("POST", re.compile(r"/batches/(?P<batch_id>[\w-]+)/cancel"), self.cancel_batch),
        ]

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        try:
            response = self._dispatch(environ)
        except ApiError as exc:
            response = json_response(exc.body(), exc.status, exc.headers)
        except Exception:
            traceback.print_exc(file=environ.get("wsgi.errors") or sys.stderr)
            error = ApiError(
                500,
                "The local server failed on this request.",
                type="server_error",
                code="internal_error",
            )
            response = json_response(error.body(), 500)
        phrase = HTTPStatus(response.status).phrase
        start_response(f"{response.status} {phrase}", response.headers)
        return response.body

    # -- plumbing ----------------------------------------------------------------------------

    def _dispatch(self, environ: dict[str, Any]) -> Response:
        # First of all: a page rebinding its own name to this server learns nothing.
        self._check_host(environ.get("HTTP_HOST"))
        if self.config.latency_seconds:
            time.sleep(self.config.latency_seconds)
        request, handler = self._route(environ)
        if not self._signed_download(request):
            self._authenticate(environ)
        self._inject_faults()
        return handler(request, **request.params)

    def _route(self, environ: dict[str, Any]) -> tuple[Request, Callable[..., Response]]:
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET").upper()
        sub = path[len(PREFIX) :].rstrip("/") if path.startswith(PREFIX + "/") else None
        matches = [(m, p.fullmatch(sub), h) for m, p, h in self._routes] if sub else []
        matches = [(m, found, h) for m, found, h in matches if found]
        for route_method, found, handler in matches:
            if route_method == method:
                return Request(environ, method, path, found.groupdict()), handler
        if matches:
            raise ApiError(
                405, f"Method {method} is not allowed on {path}.", code="method_not_allowed"
            )
        raise ApiError(404, f"Unknown path {path}.", code="unknown_url")

    def _check_host(self, header: str | None) -> None:
        if host_allowed(header, self.config.allowed_hosts, self._trusted_hosts):
            return
        shown = (header or "")[:100].encode("ascii", "replace").decode()
        raise ApiError(
            403,
            f"Host {shown!r} is not allowed: infron-local answers loopback host names "
            "(localhost, 127.0.0.0/8, ::1) and the names it is told to. To serve this one, "
            f"start it with --allowed-host {shown.rsplit(':', 1)[0] or 'NAME'} "
            "(or --allowed-host '*' for any).",
            code="host_not_allowed",
        )

    def _authenticate(self, environ: dict[str, Any]) -> None:
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "You didn't provide an API key. Provide it in an Authorization "
                "header using Bearer auth (Authorization: Bearer YOUR_KEY).",
                code="missing_api_key",
            )
        expected = self.config.api_key
        if expected is not None and not hmac.compare_digest(
            token.strip().encode("utf-8"), expected.encode("utf-8")
        ):
            # Never echo the presented token: it may be a real secret sent to the wrong place.
            raise ApiError(401, "Invalid API key", code="invalid_api_key")

    def _signed_download(self, request: Request) -> bool:
        token = request.query.get("token")
        file_id = request.params.get("file_id")
        if not token or not file_id or not request.path.endswith("/content"):
            return False
        meta = self.store.get_file(file_id)
        expected = (meta or {}).get("download_token", "")
        return bool(expected) and hmac.compare_digest(token.encode(), expected.encode())

    def _inject_faults(self) -> None:
        with self._counter_lock:
            self._requests_seen += 1
            seen = self._requests_seen
        cfg = self.config
        if cfg.rate_limit_every and seen % cfg.rate_limit_every == 0:
            wait = cfg.rate_limit_retry_after
            raise ApiError(
                429,
                "Rate limit reached for requests (local server fault injection).",
                type="requests",
                code="rate_limit_exceeded",
                headers=[("Retry-After", f"{wait:g}"), ("retry-after-ms", str(int(wait * 1000)))],
            )
        if cfg.server_error_every and seen % cfg.server_error_every == 0:
            # Alternate 500 and 503 so clients are exercised on both.
            if (seen // cfg.server_error_every) % 2:
                raise ApiError(
                    500,
                    "The server had an error while processing your request.",
                    type="server_error",
                    code="internal_error",
                )
            raise ApiError(
                503,
                "The server is overloaded or not ready yet.",
                type="server_error",
                code="service_unavailable",
            )

    # -- files -------------------------------------------------------------------------------

    def create_file(self, request: Request) -> Response:
        """POST /files: multipart upload, streamed to disk."""
        try:
            boundary = multipart.boundary_of(request.environ.get("CONTENT_TYPE", ""))
        except multipart.MultipartError as exc:
            raise ApiError(400, str(exc)) from None
        stream = request.body_stream(self.config.max_body_bytes)
        raw = self.store.tmp_path(".upload")
        # Filled as parts are written, so every temp file goes whatever fails where.
        parts: dict[str, multipart.Part] = {}
        try:
            self._receive_parts(stream, raw, boundary, parts)
            content, filename = self._file_part(parts)
            purpose = (parts["purpose"].value or b"").decode("utf-8", "replace").strip()
            meta = self.store.add_file(content, filename=filename, purpose=purpose)
        finally:
            raw.unlink(missing_ok=True)
            for part in parts.values():
                if part.path is not None:
                    part.path.unlink(missing_ok=True)
        return json_response(_public_file(meta))

    def _receive_parts(
        self, stream: BodyInput, raw: Path, boundary: bytes, parts: dict[str, multipart.Part]
    ) -> None:
        multipart.spool(stream, raw, None)
        if stream.short:
            raise ApiError(400, "The upload ended before Content-Length bytes arrived.")
        try:
            multipart.parse(raw, boundary, lambda: self.store.tmp_path(".part"), parts)
        except multipart.MultipartError as exc:
            raise ApiError(400, f"Invalid multipart body: {exc}") from None
        if "purpose" not in parts or parts["purpose"].value is None:
            raise ApiError(400, "Missing required parameter: 'purpose'.", param="purpose")

    def _file_part(self, parts: dict[str, multipart.Part]) -> tuple[Path, str]:
        part = parts.get("file")
        if part is None:
            raise ApiError(400, "Missing required parameter: 'file'.", param="file")
        if part.path is None:
            part.path = self.store.tmp_path(".part")
            part.path.write_bytes(part.value or b"")
        return part.path, part.filename or "upload.jsonl"

    def list_files(self, request: Request) -> Response:
        """GET /files."""
        data = [_public_file(meta) for meta in self.store.list_files()]
        return json_response({"object": "list", "data": data, "has_more": False})

    def get_file(self, request: Request, file_id: str) -> Response:
        """GET /files/{id}."""
        return json_response(_public_file(self._file(file_id)))

    def delete_file(self, request: Request, file_id: str) -> Response:
        """DELETE /files/{id}."""
        self._file(file_id)
        self.store.delete_file(file_id)
        return json_response({"id": file_id, "object": "file", "deleted": True})

    def file_content(self, request: Request, file_id: str) -> Response:
        """GET /files/{id}/content: the raw bytes, streamed."""
        self._file(file_id)
        path = self.store.content_path(file_id)
        headers = [
            ("Content-Type", "application/octet-stream"),
            ("Content-Length", str(path.stat().st_size)),
        ]
        return Response(200, _stream(path), headers)

    def _file(self, file_id: str) -> dict[str, Any]:
        meta = self.store.get_file(file_id)
        if meta is None:
            raise ApiError(
                404, f"No such File object: {file_id[:100]}", code="not_found", param="id"
            )
        return meta

    # -- batches -----------------------------------------------------------------------------

    def create_batch(self, request: Request) -> Response:
        """POST /batches: OpenAI style (input_file_id) or Infron style (inline requests).

        The body is parsed as it streams in, the inline requests go to a temp file one by
        one: a large inline batch never sits in memory whole (see jsonstream.py).
        """
        raw = self.store.tmp_path(".requests")
        try:
            body = self._read_create_body(request, raw)
            inline = "requests" in body
            record = self._create_infron(body, raw) if inline else self._create_openai(body)
        finally:
            raw.unlink(missing_ok=True)
        # Every batch answers its creation as validating, even with zero timings.
        return self._render(request, record, engine.State("validating"))

    def _read_create_body(self, request: Request, raw: Path) -> dict[str, Any]:
        stream = request.body_stream(self.config.max_body_bytes)

        def read(size: int) -> bytes:
            data = stream.read(size)
            if not data and stream.short:
                raise ApiError(400, "The body ended before Content-Length bytes arrived.")
            return data

        with open(raw, "w", encoding="utf-8") as out:

            def keep(item: Any) -> None:
                out.write(_dump_line(item) + "\n")

            try:
                return jsonstream.read_object(read, "requests", keep)
            except RecursionError:
                raise ApiError(400, "The request body is nested too deeply.") from None
            except jsonstream.MemberTooLarge:
                raise ApiError(
                    413,
                    "A member of the request body other than 'requests' is over "
                    f"{jsonstream.MAX_MEMBER_CHARS} characters.",
                    code="member_too_large",
                ) from None
            except jsonstream.JsonStreamError as exc:
                if str(exc).startswith("expected one of '{'"):
                    raise ApiError(400, "The request body must be a JSON object.") from None
                raise ApiError(400, f"The request body is not valid JSON: {exc}") from None

    def _create_openai(self, body: dict[str, Any]) -> dict[str, Any]:
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str) or not file_id:
            raise ApiError(
                400, "Missing required parameter: 'input_file_id'.", param="input_file_id"
            )
        endpoint = _endpoint(body.get("endpoint"))
        if self.store.get_file(file_id) is None:
            raise ApiError(
                400,
                f"Input file '{file_id[:100]}' does not exist.",
                code="file_not_found",
                param="input_file_id",
            )
        window = _window(body.get("completion_window"))
        return self._register(
            "openai", endpoint, file_id, window, _metadata(body.get("metadata")), mixed=False
        )

    def _create_infron(self, body: dict[str, Any], raw: Path) -> dict[str, Any]:
        requests = body["requests"]
        if not isinstance(requests, jsonstream.Streamed) or not requests.count:
            raise ApiError(400, "'requests' must be a non-empty list.", param="requests")
        explicit = body.get("endpoint") is not None
        endpoint = _endpoint(body["endpoint"] if explicit else "/v1/chat/completions")
        metadata = _metadata(body.get("metadata"))
        tmp = self.store.tmp_path(".jsonl")
        try:
            # A second pass, line by line: the endpoint may come after the requests.
            with open(raw, encoding="utf-8") as lines, open(tmp, "w", encoding="utf-8") as out:
                for line in lines:
                    item = json.loads(line)
                    out.write(_dump_line(_infron_line(item, endpoint, explicit)) + "\n")
            meta = self.store.add_file(tmp, filename="infron_requests.jsonl", purpose="batch")
        finally:
            tmp.unlink(missing_ok=True)  # gone already when the store took it
        return self._register("infron", endpoint, meta["id"], "24h", metadata, mixed=True)

    def _register(
        self,
        style: str,
        endpoint: str,
        file_id: str,
        window: str,
        metadata: dict[str, str] | None,
        *,
        mixed: bool,
    ) -> dict[str, Any]:
        path = self.store.content_path(file_id)
        fault_round = self.store.batch_count()
        scan = engine.scan_input(
            path, endpoint, mixed=mixed, config=self.config, fault_round=fault_round
        )
        # The global lock makes the token-limit check and the insert one step.
        with self.store.lock("global"):
            now = time.time()
            self._check_token_limit(scan, now)
            record = engine.new_record(
                style=style,
                endpoint=endpoint,
                input_file_id=file_id,
                completion_window=window,
                metadata=metadata,
                scan=scan,
                config=self.config,
                now=now,
                fault_round=fault_round,
            )
            self.store.put_batch(record)
        return record

    def _check_token_limit(self, scan: engine.Scan, now: float) -> None:
        limit = self.config.enqueued_token_limit
        if limit is None:
            return
        queued = engine.enqueued_tokens(self.store, scan.model, now)
        if queued + scan.prompt_tokens > limit:
            raise ApiError(
                400,
                f"Enqueued token limit reached for {scan.model or 'mock-model'} in organization "
                f"local. Limit: {limit} enqueued tokens. Already enqueued: {queued}; this batch: "
                f"{scan.prompt_tokens}. Please try again once some in_progress batches have "
                "been completed.",
                code="token_limit_exceeded",
            )

    def list_batches(self, request: Request) -> Response:
        """GET /batches?after=&limit=: OpenAI list, newest first."""
        limit = _limit(request.query.get("limit"))
        records = self.store.list_batches()
        after = request.query.get("after")
        if after:
            ids = [r["id"] for r in records]
            records = records[ids.index(after) + 1 :] if after in ids else []
        page = records[:limit]
        now = time.time()
        data = [self._openai(engine.current(self.store, r["id"], now), now) for r in page]
        return json_response(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": len(records) > limit,
            }
        )

    def get_batch(self, request: Request, batch_id: str) -> Response:
        """GET /batches/{id}, in the style the batch was created in."""
        now = time.time()
        record = engine.current(self.store, batch_id, now)
        return self._render(request, record, engine.state_at(record, now))

    def cancel_batch(self, request: Request, batch_id: str) -> Response:
        """POST /batches/{id}/cancel."""
        record, state = engine.cancel(self.store, batch_id)
        return self._render(request, record, state)

    def _openai(self, record: dict[str, Any], now: float) -> dict[str, Any]:
        return openai_view(record, engine.state_at(record, now))

    def _render(self, request: Request, record: dict[str, Any], state: engine.State) -> Response:
        if record["style"] != "infron":
            return json_response(openai_view(record, state))
        result_id = (record["final"] or {}).get("output_file_id")
        meta = self.store.get_file(result_id) if result_id else None
        token = meta.get("download_token") if meta else None
        return json_response(infron_view(record, state, request.base_url, token))


def create_app(
    data_dir: str | os.PathLike[str],
    config: LocalServerConfig | None = None,
    *,
    embedded_host: str | None = EMBEDDED_HOST,
) -> LocalBatchApp:
    """The WSGI app over `data_dir` (created if missing).

    Without `config`, the one persisted in `data_dir/config.json` applies, else the defaults.
    `embedded_host` is the in-process transport's host name, answered besides loopback
    names and ``config.allowed_hosts``; a socket server passes None.

    Example:
        >>> import tempfile
        >>> app = create_app(tempfile.mkdtemp(), LocalServerConfig(validating_seconds=0))
        >>> app.config.validating_seconds
        0
    """
    return LocalBatchApp(data_dir, config, embedded_host=embedded_host)


def _public_file(meta: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in meta.items() if key != "download_token"}


def _stream(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            yield chunk


def _endpoint(value: Any) -> str:
    if value not in engine.ENDPOINTS:
        raise ApiError(
            400,
            f"Invalid endpoint {value!r}; expected one of {', '.join(engine.ENDPOINTS)}.",
            param="endpoint",
            code="invalid_endpoint",
        )
    return str(value)


def _window(value: Any) -> str:
    # OpenAI offers "24h" only; any whole number of hours is accepted here, nothing else.
    if value is None:
        return "24h"
    if not isinstance(value, str) or not re.fullmatch(r"[1-9][0-9]{0,3}h", value):
        raise ApiError(
            400,
            f"completion_window must be a number of hours such as '24h', got {value!r:.100}.",
            param="completion_window",
        )
    return value


def _dump_line(line: Any) -> str:
    try:
        return json.dumps(line)
    except (RecursionError, ValueError):
        # Parsed, yet too deep to write back: refuse the create rather than fail later.
        raise ApiError(400, "A request in 'requests' is nested too deeply.") from None


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    valid = (
        isinstance(value, dict)
        and len(value) <= 16
        and all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
            for k, v in value.items()
        )
    )
    if not valid:
        raise ApiError(
            400,
            "metadata must be an object of at most 16 string keys (<= 64 chars) "
            "with string values (<= 512 chars).",
            param="metadata",
        )
    return dict(value)


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIST_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIST_LIMIT:
        raise ApiError(
            400, f"limit must be an integer between 1 and {MAX_LIST_LIMIT}.", param="limit"
        )
    return int(raw)


def _infron_line(item: Any, endpoint: str, explicit: bool) -> Any:
    if not isinstance(item, dict):
        return item  # validation reports it as an invalid line
    params = item.get("params")
    url = endpoint
    if not explicit and isinstance(params, dict) and "input" in params and "messages" not in params:
        url = "/v1/embeddings"
    return {"custom_id": item.get("custom_id"), "method": "POST", "url": url, "body": params}
