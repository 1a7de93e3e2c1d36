"""Running a batch through the mock model and writing its output and error files.

Lines are written in sha256(custom_id) order, not input order, because real services reorder
results and clients must join on custom_id. The sort is external (16 bucket files sorted one
at a time) so a 200 MB batch never sits in memory whole.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .infron_params import chat_body_from_params
from .mock_model import MockRequestError, respond
from .store import Store

_BUCKETS = 16


def order_key(custom_id: str) -> str:
    """The key that orders output lines and decides which requests finish first."""
    return hashlib.sha256(custom_id.encode("utf-8")).hexdigest()


def hash_fraction(custom_id: str, salt: str) -> float:
    """A stable number in [0, 1) for `custom_id`; different salts give independent draws.

    Example:
        >>> hash_fraction("a", "failure") == hash_fraction("a", "failure")
        True
    """
    digest = hashlib.sha256(f"{salt}\x00{custom_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _drawn(custom_id: str, fault_round: int) -> str:
    # Round 0 keeps the plain custom_id draw; a later batch draws afresh, so a retried
    # request is not doomed to fail forever (as on a real service).
    return custom_id if not fault_round else f"{custom_id}\x00{fault_round}"


def is_failed(custom_id: str, rate: float, fault_round: int = 0) -> bool:
    """Whether the failure_rate knob makes this request fail in a batch of that round."""
    return rate > 0 and hash_fraction(_drawn(custom_id, fault_round), "failure") < rate


def is_lost(custom_id: str, rate: float, fault_round: int = 0) -> bool:
    """Whether the lost_rate knob makes the service lose this request in that round."""
    return rate > 0 and hash_fraction(_drawn(custom_id, fault_round), "lost") < rate


def iter_requests(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) for every non-blank line of a JSONL file."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if raw.strip():
                yield number, raw


class ShuffledWriter:
    """Collects JSONL lines with sort keys and writes them sorted by key into a store file."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._buckets: dict[int, tuple[Path, IO[str]]] = {}
        self.count = 0

    def add(self, key: str, line: dict[str, Any]) -> None:
        """Queue one line; `key` is a hex digest. Nothing is written if `line` cannot be."""
        text = json.dumps(line)
        bucket = int(key[0], 16) * _BUCKETS // 16
        if bucket not in self._buckets:
            path = self._store.tmp_path(".bucket")
            self._buckets[bucket] = (path, open(path, "w", encoding="utf-8"))  # noqa: SIM115
        self._buckets[bucket][1].write(f"{key}\t{text}\n")
        self.count += 1

    def commit(self, filename: str, purpose: str) -> str | None:
        """Write the sorted file into the store; its id, or None when no line was added."""
        try:
            if self.count == 0:
                return None
            target = self._store.tmp_path(".jsonl")
            with open(target, "w", encoding="utf-8") as out:
                for bucket in sorted(self._buckets):
                    path, handle = self._buckets[bucket]
                    handle.close()
                    rows = sorted(path.read_text(encoding="utf-8").splitlines())
                    out.writelines(row.split("\t", 1)[1] + "\n" for row in rows)
            return self._store.add_file(target, filename=filename, purpose=purpose)["id"]
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the bucket files."""
        for path, handle in self._buckets.values():
            handle.close()
            path.unlink(missing_ok=True)
        self._buckets.clear()


@dataclass
class Outcome:
    """What running a batch produced."""

    output_file_id: str | None = None
    error_file_id: str | None = None
    completed: int = 0
    failed: int = 0
    lost: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def run_batch(
    store: Store, record: dict[str, Any], fraction: float, unfinished_code: str, created: int
) -> Outcome:
    """Answer the finished `fraction` of the batch's requests and write the result files.

    Requests beyond the fraction (by sha256 of custom_id) get `unfinished_code` error lines.
    Infron-style batches get one combined file (success and error lines), reported as output.
    """
    path = store.content_path(record["input_file_id"])
    finished = _finished_predicate(path, fraction)
    out = ShuffledWriter(store)
    err = out if record["style"] == "infron" else ShuffledWriter(store)
    outcome = Outcome()
    try:
        for _, raw in iter_requests(path):
            _run_one(json.loads(raw), record, finished, unfinished_code, created, out, err, outcome)
        name = record["id"]
        outcome.output_file_id = out.commit(f"{name}_output.jsonl", "batch_output")
        if err is not out:
            outcome.error_file_id = err.commit(f"{name}_error.jsonl", "batch_output")
    finally:
        out.discard()
        err.discard()
    return outcome


def _finished_predicate(path: Path, fraction: float) -> Any:
    keys = sorted(order_key(json.loads(raw)["custom_id"]) for _, raw in iter_requests(path))
    cut = math.floor(fraction * len(keys) + 1e-9)
    if cut >= len(keys):
        return lambda key: True
    threshold = keys[cut]
    return lambda key: key < threshold


def _run_one(
    request: dict[str, Any],
    record: dict[str, Any],
    finished: Any,
    unfinished_code: str,
    created: int,
    out: ShuffledWriter,
    err: ShuffledWriter,
    outcome: Outcome,
) -> None:
    custom_id, faults = request["custom_id"], record["faults"]
    key = order_key(custom_id)
    if not finished(key):
        err.add(key, _abandoned_line(record["id"], custom_id, unfinished_code))
        outcome.failed += 1
    elif is_lost(custom_id, faults["lost_rate"], faults.get("round", 0)):
        outcome.lost += 1
    elif is_failed(custom_id, faults["failure_rate"], faults.get("round", 0)):
        err.add(
            key,
            _error_line(
                record["id"], custom_id, 500, "mock model failure", "server_error", "server_error"
            ),
        )
        outcome.failed += 1
    else:
        _answer(request, record, key, created, out, err, outcome)


def _answer(
    request: dict[str, Any],
    record: dict[str, Any],
    key: str,
    created: int,
    out: ShuffledWriter,
    err: ShuffledWriter,
    outcome: Outcome,
) -> None:
    custom_id, batch_id = request["custom_id"], record["id"]
    try:
        body = respond(request["url"], _model_body(request, record), custom_id, created)
        response = {"status_code": 200, "request_id": _request_id(batch_id, custom_id)}
        out.add(key, _line(batch_id, custom_id, {**response, "body": body}, None))
    except OSError:
        raise  # the disk, not the request: let the batch's finalization report it
    except Exception as exc:
        # Whatever one request makes the mock model do (a MockRequestError, or a body
        # it trips on), it is that request's 400: a batch must never stop finishing.
        message = str(exc) if isinstance(exc, MockRequestError) else _unanswerable(exc)
        err.add(
            key,
            _error_line(
                batch_id, custom_id, 400, message, "invalid_request_error", "invalid_request"
            ),
        )
        outcome.failed += 1
        return
    prompt, completion = _tokens(body.get("usage") or {})
    outcome.prompt_tokens += prompt
    outcome.completion_tokens += completion
    outcome.completed += 1


def _model_body(request: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI-shaped body the mock model answers for this request."""
    if record["style"] != "infron" or request["url"] != "/v1/chat/completions":
        return request["body"]
    # Infron's chat params are Messages-style; the checks decided at creation apply.
    required = (record.get("checks") or {}).get("infron_max_tokens", True)
    return chat_body_from_params(request["body"], require_max_tokens=required)


def _unanswerable(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "The request body is nested too deeply for the mock model to answer."
    return f"The mock model cannot answer this request ({type(exc).__name__}: {exc!s:.200})."


def _tokens(usage: dict[str, Any]) -> tuple[int, int]:
    prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    return int(prompt), int(completion)


def _error_line(
    batch_id: str, custom_id: str, status: int, message: str, kind: str, code: str
) -> dict[str, Any]:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    response = {"status_code": status, "request_id": _request_id(batch_id, custom_id), "body": body}
    return _line(batch_id, custom_id, response, None)


def _abandoned_line(batch_id: str, custom_id: str, code: str) -> dict[str, Any]:
    reason = "expired" if code == "batch_expired" else "was cancelled"
    message = f"This request could not be executed before the batch {reason}."
    return _line(batch_id, custom_id, None, {"code": code, "message": message})


def _line(
    batch_id: str, custom_id: str, response: dict[str, Any] | None, error: dict[str, Any] | None
) -> dict[str, Any]:
    digest = hashlib.sha256(f"{batch_id}\x00{custom_id}".encode()).hexdigest()
    return {
        "id": f"batch_req_{digest[:32]}",
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }


def _request_id(batch_id: str, custom_id: str) -> str:
    return "req_" + hashlib.sha256(f"req\x00{batch_id}\x00{custom_id}".encode()).hexdigest()[:32]
