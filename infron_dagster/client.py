"""An httpx client for Infron's Batch API and any OpenAI-compatible batch API.

Both wire styles share one interface and return the same :class:`~infron_dagster.models.Batch`.
Requests are always given as OpenAI-style JSONL lines (``{"custom_id","method","url","body"}``);
the ``infron`` style turns them into ``{"custom_id","params"}`` while it streams them out.

Example::

    client = InfronClient(api_key="sk-...", api_style="openai",
                          base_url="https://api.openai.com/v1")
    batch = client.create_batch("requests.jsonl", endpoint="/v1/chat/completions")
    client.retrieve_batch(batch.id).status
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, Literal
from urllib.parse import quote, urlsplit

import httpx

from .errors import InfronConnectionError, InfronProtocolError
from .infron_style import DEFAULT_INFRON_MAX_TOKENS, infron_body, messages_params
from .models import ApiStyle, Batch
from .retry import RetryPolicy, json_object, send
from .untrusted import check_provider_id, map_strings, printable, safe_segment

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_INFRON_MAX_TOKENS",
    "InfronClient",
    "ResultFile",
    "RetryPolicy",
    "messages_params",
]

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://llm.onerouter.pro/v1"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ResultFile:
    """One downloadable result file of a finished batch.

    ``kind`` is ``"output"`` or ``"errors"`` (openai style) or ``"results"`` (infron's
    ``result_url``, which mixes both). Exactly one of ``file_id`` and ``url`` is set.

    Example:
        >>> ResultFile(kind="output", file_id="file-abc").name
        'output-file-abc.jsonl'
    """

    kind: Literal["output", "errors", "results"]
    file_id: str | None = None
    url: str | None = None

    @property
    def name(self) -> str:
        """A stable file name to store it under: one safe path segment, whatever the id."""
        ref = self.file_id or urlsplit(self.url or "").path.strip("/").replace("/", "_")
        return f"{self.kind}-{safe_segment(ref or 'file')}.jsonl"


class InfronClient:
    """Speaks one batch API style over HTTP, with retries, timeouts and typed errors.

    ``api_style="infron"`` is Infron's inline API (``POST /batches`` with ``requests``);
    ``api_style="openai"`` is the OpenAI files + batches API (OpenAI, Azure, vLLM, LiteLLM).
    ``transport`` lets tests and the embedded local server plug in an in-process app.

    Example::

        with InfronClient(api_key=os.environ["INFRON_API_KEY"]) as client:
            batch = client.create_batch("requests.jsonl")
            print(batch.id, batch.status)
    """

    def __init__(
        self,
        api_key: str | None,
        base_url: str = DEFAULT_BASE_URL,
        api_style: ApiStyle = "infron",
        *,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if api_style not in ("infron", "openai"):
            raise ValueError(f"api_style must be 'infron' or 'openai', not {api_style!r}")
        self.api_style: ApiStyle = api_style
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        api_key = _clean_key(api_key)
        self._secret = api_key or ""
        self._sleep = sleep
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            transport=transport,
            follow_redirects=True,
        )
        # Foreign result URLs (CDN, pre-signed links) get no key, and may redirect.
        self._anonymous = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=connect_timeout), follow_redirects=True
        )

    def __repr__(self) -> str:
        return f"InfronClient(base_url={self.base_url!r}, api_style={self.api_style!r})"

    def __enter__(self) -> InfronClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pools."""
        self._http.close()
        self._anonymous.close()

    # --- batches -------------------------------------------------------------------------

    def create_batch(
        self,
        requests_path: str | os.PathLike[str] | None = None,
        *,
        input_file_id: str | None = None,
        endpoint: str = "/v1/chat/completions",
        completion_window: str = "24h",
        metadata: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Batch:
        """Submit the OpenAI-style JSONL file at ``requests_path`` as one batch.

        The file is streamed, never read whole. In openai style it is uploaded first.
        Creating is not idempotent: it is retried only when the server surely did not act
        (429, or no connection); otherwise the error has ``ambiguous=True`` and the caller
        must check before sending again. ``idempotency_key`` goes out as ``Idempotency-Key``.
        In openai style, ``input_file_id`` (from :meth:`upload_file`) replaces the path.

        Example::

            client.create_batch("chunk-00000.jsonl", metadata={"partition": "2026-11-24"})
        """
        if self.api_style == "openai":
            file_id = input_file_id or self.upload_file(_required(requests_path))
            payload = {
                "input_file_id": file_id,
                "endpoint": endpoint,
                "completion_window": completion_window,
                "metadata": metadata or {},
            }
            data = self._json(
                "create batch",
                "POST",
                "/batches",
                json=payload,
                idempotent=False,
                headers=_idempotency(idempotency_key),
            )
            return self._parse_batch("create batch", data, created=True)
        # A file, not a generator: its length is known, so no chunked upload is needed.
        with tempfile.TemporaryFile() as body:
            for part in infron_body(_required(requests_path), endpoint):
                body.write(part)

            def rewind() -> IO[bytes]:
                body.seek(0)
                return body

            data = self._json(
                "create batch",
                "POST",
                "/batches",
                content=rewind,
                headers={"Content-Type": "application/json", **_idempotency(idempotency_key)},
                idempotent=False,
            )
        return self._parse_batch("create batch", data, created=True)

    def retrieve_batch(self, batch_id: str) -> Batch:
        """Fetch the current state of one batch.

        Example::

            client.retrieve_batch("batch_abc").status
            # -> <BatchStatus.IN_PROGRESS: 'in_progress'>
        """
        operation = f"retrieve batch {self._shown_id(batch_id)}"
        data = self._json(operation, "GET", f"/batches/{_path(batch_id)}")
        return self._parse_batch(operation, data)

    def cancel_batch(self, batch_id: str) -> Batch:
        """Ask the server to cancel a batch; finished requests stay available.

        Example::

            client.cancel_batch("batch_abc").status
            # -> <BatchStatus.CANCELLING: 'cancelling'>
        """
        operation = f"cancel batch {self._shown_id(batch_id)}"
        data = self._json(operation, "POST", f"/batches/{_path(batch_id)}/cancel")
        return self._parse_batch(operation, data)

    def list_batches(
        self, *, page_size: int = 100, skipped: list[str] | None = None
    ) -> Iterator[Batch]:
        """Every batch of this key, newest first, following ``has_more`` pagination.

        Only the openai style has a list operation; infron style raises at once. A listed
        object that cannot be read is skipped (one odd batch must not hide all the others),
        and the reason appended to ``skipped`` when given.

        Example::

            [b.id for b in client.list_batches() if b.metadata.get("partition") == "a"]
        """
        if self.api_style != "openai":
            raise NotImplementedError("Infron's batch API has no documented list operation")
        return self._pages(page_size, skipped if skipped is not None else [])

    def _pages(self, page_size: int, skipped: list[str]) -> Iterator[Batch]:
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": page_size}
            if after:
                params["after"] = after
            page = self._json("list batches", "GET", "/batches", params=params)
            rows = page.get("data")
            if not isinstance(rows, list):
                raise InfronProtocolError("list batches", "the page has no list of batches")
            batches = []
            for row in rows:
                try:
                    batches.append(self._parse_batch("list batches", _as_dict(row)))
                except InfronProtocolError as exc:
                    skipped.append(str(exc))
            yield from batches
            last = page.get("last_id")
            after = (
                last if isinstance(last, str) and last else (batches[-1].id if batches else None)
            )
            if not page.get("has_more") or not rows:
                return
            if after is None:
                skipped.append("list batches: a page with no readable id to continue from")
                return

    # --- files ---------------------------------------------------------------------------

    def upload_file(self, path: str | os.PathLike[str], purpose: str = "batch") -> str:
        """Upload a JSONL file (streamed, multipart) and return its file id.

        Example::

            client.upload_file("chunk-00000.jsonl")
            # -> 'file-abc123'
        """
        name = os.path.basename(os.fspath(path))

        def files() -> dict[str, Any]:
            return {"file": (name, open(path, "rb"), "application/jsonl")}

        data = self._json(
            f"upload file {name}", "POST", "/files", files=files, data={"purpose": purpose}
        )
        try:
            file_id = check_provider_id(data.get("id"), "file id")
        except ValueError as exc:
            raise InfronProtocolError(f"upload file {name}", self._redact(str(exc))) from None
        if self._holds_key(file_id):  # it cannot be used redacted, nor stored as it is
            raise InfronProtocolError(f"upload file {name}", "the file id contains the API key")
        return file_id

    def result_files(self, batch: Batch) -> list[ResultFile]:
        """The files that hold a finished batch's results (output and errors).

        Example::

            [f.kind for f in client.result_files(batch)]
            # -> ['output', 'errors']
        """
        files: list[ResultFile] = []
        if batch.output_file_id:
            files.append(ResultFile("output", file_id=batch.output_file_id))
        if batch.error_file_id:
            files.append(ResultFile("errors", file_id=batch.error_file_id))
        if batch.result_url:
            files.append(ResultFile("results", url=batch.result_url))
        return files

    def iter_lines(self, result: ResultFile) -> Iterator[bytes]:
        """Stream one result file line by line, never holding it whole.

        Example::

            for line in client.iter_lines(ResultFile("output", file_id="file-abc")):
                print(json.loads(line)["custom_id"])
        """
        response, operation = self._open_result(result)
        try:
            for line in response.iter_lines():
                if line:
                    yield self._redact(line).encode()
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise InfronConnectionError(operation, self._redact(str(exc))) from None
        finally:
            response.close()

    def download(self, result: ResultFile, dest: IO[bytes]) -> int:
        """Stream one result file into ``dest`` and return the bytes written.

        The API key is sent only to the configured server, never to a foreign
        ``result_url`` (such as a pre-signed object-store link).

        Example::

            with open("output.jsonl", "wb") as fh:
                client.download(ResultFile("output", file_id="file-abc"), fh)
        """
        response, operation = self._open_result(result)
        written = 0
        try:
            for chunk in self._redact_stream(response.iter_bytes(_CHUNK)):
                dest.write(chunk)
                written += len(chunk)
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise InfronConnectionError(operation, self._redact(str(exc))) from None
        finally:
            response.close()
        return written

    # --- plumbing ------------------------------------------------------------------------

    def _open_result(self, result: ResultFile) -> tuple[httpx.Response, str]:
        operation = f"download {result.kind} file"
        if result.file_id:
            target, http = f"/files/{_path(result.file_id)}/content", self._http
        else:
            target, http = self._route_url(operation, result.url or "")
        return self._send(operation, "GET", target, http=http, stream=True), operation

    def _route_url(self, operation: str, url: str) -> tuple[str, httpx.Client]:
        """Which client may fetch ``url``: the keyed one only for the configured origin.

        Origins are compared parsed (scheme, host, port with defaults filled in); a scheme
        other than http(s), or a host without a scheme, is refused: it could carry the key
        in clear text to a host nobody configured.
        """
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as exc:
            message = self._redact(f"invalid result URL: {exc}")
            raise InfronProtocolError(operation, message) from None
        if not parsed.scheme and not parsed.host:
            return url, self._http  # a path relative to base_url: our own server
        if parsed.scheme.lower() not in ("http", "https") or not parsed.host:
            shown = printable(self._redact(f"{parsed.scheme}://{parsed.host}"), 100)
            raise InfronProtocolError(
                operation, f"refusing a result URL that is not http(s): {shown}"
            )
        same = _origin(parsed) == _origin(httpx.URL(self.base_url))
        return str(parsed), (self._http if same else self._anonymous)

    def _parse_batch(self, operation: str, data: dict[str, Any], *, created: bool = False) -> Batch:
        """A batch object from the wire, or a protocol error naming what is wrong.

        After a create call the batch may exist although its answer cannot be read: the
        error is then ambiguous, so the chunk is never taken as "not sent".
        """
        try:
            return self._batch_from(data)
        except (
            ValueError,
            TypeError,
            KeyError,
            AttributeError,
            OverflowError,
            RecursionError,  # metadata nested deeper than the stack, written out as text
        ) as exc:
            error = InfronProtocolError(operation, self._redact(f"unreadable batch object: {exc}"))
            error.ambiguous = created
            raise error from None

    def _batch_from(self, data: dict[str, Any]) -> Batch:
        """Parse a batch object whose every string is redacted first: what the provider sends
        goes into logs (an unknown status), manifests, ledgers and Dagster metadata.

        A reference that must be used as sent cannot be redacted and still work. A batch id
        that holds the key is refused (ValueError: the caller's protocol error, ambiguous
        after a create). A file id or result URL that holds it is dropped, the reason in
        ``errors``: the batch stays readable, and its rows fail as missing, never fetched
        from a location that carries the key.
        """
        infron = "batch_id" in data
        found: list[str] = []

        def redact(text: str) -> str:
            clean = self._redact(text)
            if clean != text:
                found.append(text)
            return clean

        clean = map_strings(data, redact)
        if not found:  # the usual case: the key is nowhere
            return Batch.from_infron(data) if infron else Batch.from_openai(data)
        ident = "batch_id" if infron and data.get("batch_id") else "id"
        if self._holds_key(data.get(ident)):
            raise ValueError(
                "the batch id contains the API key: a batch that cannot be recorded without "
                "it is refused"
            )
        problems = []
        for name in ("result_url",) if infron else ("output_file_id", "error_file_id"):
            if self._holds_key(data.get(name)):
                clean[name] = None
                problems.append(f"unusable {name}: it contains the API key (not followed)")
        batch = Batch.from_infron(clean) if infron else Batch.from_openai(clean)
        return dataclasses.replace(batch, errors=(*batch.errors, *problems))

    def _holds_key(self, value: Any) -> bool:
        return isinstance(value, str) and self._redact(value) != value

    def _shown_id(self, batch_id: str) -> str:
        """A batch id for an error message: redacted before it is cut (a manifest written
        before ids were checked may hold one that carries the key)."""
        return printable(self._redact(batch_id), 80)

    def _json(
        self, operation: str, method: str, url: str, *, idempotent: bool = True, **kwargs: Any
    ) -> dict[str, Any]:
        response = self._send(operation, method, url, idempotent=idempotent, **kwargs)
        return json_object(response, operation, redact=self._redact, idempotent=idempotent)

    def _send(
        self, operation: str, method: str, url: str, *, http: httpx.Client | None = None, **kw: Any
    ) -> httpx.Response:
        """One logical call (see :func:`~infron_dagster.retry.send`), under this client's
        retry policy (read at each call), sleep and redaction."""
        return send(
            http or self._http,
            operation,
            method,
            url,
            policy=self.retry,
            sleep=self._sleep,
            redact=self._redact,
            **kw,
        )

    def redact(self, text: str) -> str:
        """``text`` with this client's key replaced by ``***`` (for what the provider sends
        back: batch errors, result lines).

        Example::

            client.redact("bad key sk-...")
            # -> 'bad key ***'
        """
        return self._redact(text)

    def _redact_stream(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """``chunks`` with the key replaced, even when it straddles two chunks: a provider
        that echoes it into a result file must not put it on our storage."""
        secret = self._secret.encode() if len(self._secret) >= 4 else b""
        if not secret:
            yield from chunks
            return
        keep, pending = len(secret) - 1, b""
        for chunk in chunks:
            data = (pending + chunk).replace(secret, b"***")
            pending, ready = data[-keep:], data[:-keep]
            if ready:
                yield ready
        if pending:
            yield pending

    def _redact(self, text: str) -> str:
        """``text`` with every form of the key the server might echo replaced by ``***``."""
        if self._secret and len(self._secret) >= 4:
            forms = {self._secret, json.dumps(self._secret)[1:-1], quote(self._secret, safe="")}
            for form in sorted(forms, key=len, reverse=True):
                text = text.replace(form, "***")
        return text


def _clean_key(api_key: str | None) -> str | None:
    """Strip the whitespace a mounted secret often carries; refuse control characters.

    httpx would otherwise put the key, escaped, into an "Illegal header value" error.
    """
    if api_key is None:
        return None
    key = api_key.strip()
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        raise ValueError("the API key contains control characters; check how it is stored")
    if not all(33 <= ord(ch) <= 126 for ch in key):
        # Never echo it: a pasted curly quote would otherwise put "Bearer <key>" into a
        # UnicodeEncodeError from the HTTP layer.
        raise ValueError(
            "the API key contains a space or a non-ASCII character (a pasted curly quote?); "
            "API keys are plain ASCII: check how it is stored"
        )
    return key


def _idempotency(key: str | None) -> dict[str, str]:
    """The ``Idempotency-Key`` header: the key itself when it is short printable ASCII, else
    its hash (a partition named ``Zürich`` cannot go into an HTTP header as it is)."""
    if not key:
        return {}
    if not (len(key) <= 200 and all(33 <= ord(ch) <= 126 for ch in key)):
        key = "idk-" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:40]
    return {"Idempotency-Key": key}


def _as_dict(row: Any) -> dict[str, Any]:
    return row if isinstance(row, dict) else {"id": None}


def _required(path: str | os.PathLike[str] | None) -> str | os.PathLike[str]:
    if path is None:
        raise ValueError("create_batch needs requests_path (or, in openai style, input_file_id)")
    return path


def _path(provider_id: str) -> str:
    """A provider's id as one URL path segment: ``../x`` must not climb the API's paths."""
    return quote(provider_id, safe="")


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    scheme = url.scheme.lower()
    default = {"http": 80, "https": 443}.get(scheme)
    return scheme, url.host.lower(), url.port or default
