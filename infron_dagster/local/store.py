"""Batch and file state on disk, shared by every process that opens the same folder.

Layout::

    <data_dir>/config.json            optional persisted LocalServerConfig
    <data_dir>/batches/<id>.json      batch records (internal shape, see engine.py)
    <data_dir>/files/<id>.json        file objects (OpenAI shape)
    <data_dir>/files/<id>.bin         file content
    <data_dir>/locks/<name>.lock      flock files guarding read-modify-write transitions
    <data_dir>/tmp/                   uploads and outputs being written

Every write goes to a temp file in the same filesystem and is renamed into place, so a reader
in another process sees either the old or the new version, never half of one.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: fall back to an in-process lock only
    fcntl = None  # type: ignore[assignment]

_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_thread_lock = threading.Lock()


def new_id(prefix: str) -> str:
    """A fresh random id with `prefix`, e.g. ``new_id("file-")`` -> ``"file-3f2a..."``."""
    return f"{prefix}{uuid.uuid4().hex}"


class Store:
    """Files and batches kept as JSON and bytes under one folder.

    Example:
        >>> import tempfile
        >>> store = Store(tempfile.mkdtemp())
        >>> store.get_batch("batch_missing") is None
        True
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.root = Path(data_dir)
        self.batches_dir = self.root / "batches"
        self.files_dir = self.root / "files"
        self.locks_dir = self.root / "locks"
        self.tmp_dir = self.root / "tmp"
        for directory in (self.batches_dir, self.files_dir, self.locks_dir, self.tmp_dir):
            directory.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def lock(self, name: str = "global") -> Iterator[None]:
        """Hold an exclusive lock named `name`, across threads and processes.

        Example:
            >>> import tempfile
            >>> with Store(tempfile.mkdtemp()).lock("batch_x"):
            ...     pass
        """
        path = self.locks_dir / f"{_checked(name)}.lock"
        # Each call opens its own descriptor: flock then also excludes other threads of
        # this process, because flock locks belong to the open file description.
        with open(path, "a+b") as handle:
            if fcntl is None:  # pragma: no cover
                with _thread_lock:
                    yield
                return
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def tmp_path(self, suffix: str = ".tmp") -> Path:
        """A unique, not yet existing path in the store's temp folder."""
        return self.tmp_dir / f"{uuid.uuid4().hex}{suffix}"

    def write_json(self, path: Path, obj: Any) -> None:
        """Write `obj` as JSON to `path` atomically (temp file + rename)."""
        tmp = self.tmp_path(".json")
        tmp.write_text(json.dumps(obj, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)

    # -- files -------------------------------------------------------------------------------

    def content_path(self, file_id: str) -> Path:
        """Where the bytes of `file_id` live."""
        return self.files_dir / f"{_checked(file_id)}.bin"

    def add_file(self, content: Path, *, filename: str, purpose: str) -> dict[str, Any]:
        """Move `content` (a temp file of this store) in as a new file; return its file object.

        Example:
            >>> import tempfile
            >>> store = Store(tempfile.mkdtemp())
            >>> tmp = store.tmp_path(); _ = tmp.write_bytes(b"{}\\n")
            >>> store.add_file(tmp, filename="in.jsonl", purpose="batch")["bytes"]
            3
        """
        file_id = new_id("file-")
        os.replace(content, self.content_path(file_id))
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": self.content_path(file_id).stat().st_size,
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
            "download_token": uuid.uuid4().hex,
        }
        self.write_json(self.files_dir / f"{file_id}.json", meta)
        return meta

    def get_file(self, file_id: str) -> dict[str, Any] | None:
        """The stored file object (with the internal `download_token`), or None."""
        if not _SAFE_ID.match(file_id):
            return None
        return _read_json(self.files_dir / f"{file_id}.json")

    def list_files(self) -> list[dict[str, Any]]:
        """Every stored file object, newest first."""
        found = (_read_json(p) for p in self.files_dir.glob("*.json"))
        files = [f for f in found if f is not None]
        return sorted(files, key=lambda f: (f["created_at"], f["id"]), reverse=True)

    def delete_file(self, file_id: str) -> bool:
        """Remove a file; False when it did not exist."""
        if self.get_file(file_id) is None:
            return False
        (self.files_dir / f"{file_id}.json").unlink(missing_ok=True)
        self.content_path(file_id).unlink(missing_ok=True)
        return True

    # -- batches -----------------------------------------------------------------------------

    def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        """The stored batch record, or None."""
        if not _SAFE_ID.match(batch_id):
            return None
        return _read_json(self.batches_dir / f"{batch_id}.json")

    def put_batch(self, record: dict[str, Any]) -> None:
        """Persist a batch record atomically."""
        self.write_json(self.batches_dir / f"{_checked(record['id'])}.json", record)

    def batch_count(self) -> int:
        """How many batches the store holds."""
        return sum(1 for _ in self.batches_dir.glob("*.json"))

    def list_batches(self) -> list[dict[str, Any]]:
        """Every batch record, newest first (ties broken by id, so paging is stable)."""
        found = (_read_json(p) for p in self.batches_dir.glob("*.json"))
        batches = [b for b in found if b is not None]
        return sorted(batches, key=lambda b: (b["created_ts"], b["id"]), reverse=True)


def _checked(name: str) -> str:
    # Ids come from URLs: refuse anything that could walk out of the folder.
    if not _SAFE_ID.match(name):
        raise ValueError(f"invalid id {name!r}")
    return name


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
