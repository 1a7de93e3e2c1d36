"""Where a pipeline's files live: one UPath root, local or ``s3://``, with a fixed layout.

Layout under ``<root>/<name>/`` (``<p>`` is the quoted partition key)::

    requests/partition=<p>/attempt=<n>/chunk-00000.jsonl   what was sent
    inputs/partition=<p>/attempt=<n>.parquet               the rows sent, with custom_id
    invalid/partition=<p>/attempt=<n>.parquet              rows never sent, with the reason
    raw/partition=<p>/attempt=<n>/<batch_id>/<file>.jsonl  what came back
    manifests/partition=<p>/attempt=<n>.json               the commit point of an attempt
    inflight/partition=<p>/attempt=<n>.json                index of uncollected attempts (a cache)
    results/partition=<p>/part-0.parquet                   hive-partitioned results
    failed/partition=<p>/part-0.parquet                    hive-partitioned failed rows

Example:
    >>> store = BatchStorage("s3://lake/llm", "reviews", {"anon": False})
    >>> str(store.manifest_path("2026-11-24", 1))
    's3://lake/llm/reviews/manifests/partition=2026-11-24/attempt=1.json'
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any
from urllib.parse import quote, unquote

import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from .errors import InfronDagsterError

__all__ = [
    "UNPARTITIONED",
    "BatchStorage",
    "LockTimeout",
    "decode_partition",
    "encode_partition",
    "pipeline_names",
]

logger = logging.getLogger(__name__)

UNPARTITIONED = "__all__"
_ATTEMPT_RE = re.compile(r"attempt=(\d+)\.json$")


class LockTimeout(InfronDagsterError, RuntimeError):
    """Another run holds the partition's lock for longer than we wait.

    Example::

        try:
            with storage.lock("2026-11-24", wait_seconds=5):
                ...
        except LockTimeout as exc:
            print(exc)  # names the partition and the lock file
    """


@contextlib.contextmanager
def _local_lock(path: str, partition_key: str | None, wait_seconds: float) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``: per open file, so threads and processes exclude."""
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    deadline = time.monotonic() + wait_seconds
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(f"partition {partition_key!r} is locked ({path})") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing releases the lock


EMPTY_KEY = "__empty__"
_MAX_SEGMENT = 120  # bytes of quoted key kept readable; with the hash, well under 255


def encode_partition(partition_key: str | None) -> str:
    """A partition key as one safe path segment: injective, within file-name limits.

    URL-quoting (hive style: readers decode it back) keeps every key a single segment with
    no ``/``, glob or dot-segment meaning. Reserved names keep distinct keys apart: ``None``
    (unpartitioned) is ``__all__``, ``""`` is ``__empty__``, and a key that itself starts
    with ``__`` gets its first ``_`` quoted. A key whose quoted form is long (300 characters,
    or 90 CJK characters) becomes a readable prefix, ``~`` and a hash of the key; ``~`` is
    quoted everywhere else, so the two forms never meet.

    Example:
        >>> encode_partition("2026-11-24|eu")
        '2026-11-24%7Ceu'
        >>> encode_partition(None), encode_partition(""), encode_partition("__all__")
        ('__all__', '__empty__', '%5F_all__')
    """
    if partition_key is None:
        return UNPARTITIONED
    if partition_key == "":
        return EMPTY_KEY
    try:
        quoted = quote(partition_key, safe="-_.").replace("~", "%7E")
    except UnicodeEncodeError:  # a lone surrogate: not text a reader could decode
        quoted = "~" * (_MAX_SEGMENT + 1)  # so it is hashed below
    if quoted.startswith("__"):
        quoted = "%5F" + quoted[1:]
    if len(quoted) <= _MAX_SEGMENT:
        return quoted
    prefix = _quoted_prefix(partition_key, _MAX_SEGMENT - 40)
    digest = hashlib.sha256(partition_key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{prefix}~{digest}"


def _quoted_prefix(key: str, limit: int) -> str:
    """The quoted form of the longest leading part of ``key`` that fits ``limit``, cut
    between characters: readers URL-decode the segment and need whole UTF-8 sequences."""
    out = ""
    for ch in key:
        if 0xD800 <= ord(ch) <= 0xDFFF:
            break
        part = quote(ch, safe="-_.").replace("~", "%7E")
        if len(out) + len(part) > limit:
            break
        out += part
    return "%5F" + out[1:] if out.startswith("__") else out


def decode_partition(segment: str) -> str | None:
    """The key of an encoded segment, or None when only a manifest can tell (a hashed key).

    Example:
        >>> decode_partition("2026-11-24%7Ceu"), decode_partition("__empty__")
        ('2026-11-24|eu', '')
    """
    if segment == EMPTY_KEY:
        return ""
    if "~" in segment:
        return None
    return unquote(segment)


def _mtime(info: dict[str, Any]) -> float:
    """A listing entry's modification time as a UNIX timestamp (0.0 when not given)."""
    when = info.get("LastModified", info.get("mtime", info.get("last_modified")))
    if hasattr(when, "timestamp"):
        return float(when.timestamp())
    try:
        return float(when)
    except (TypeError, ValueError):
        return 0.0


def pipeline_names(root: UPath, kinds: tuple[str, ...] = ("manifests", "inflight")) -> list[str]:
    """The folders of a storage root that hold a pipeline (one of ``kinds`` inside), sorted;
    shared folders (``_admission``, ``_ledger``) start with ``_`` and are left out.

    Example::

        pipeline_names(UPath("/lake"))   # -> ['review_embeddings', 'review_sentiment']
    """
    if root.protocol not in ("", "file", "local"):
        root.fs.invalidate_cache(root.path)  # a long-lived sensor must see new pipelines
    try:
        names = [p.name for p in root.iterdir()]
    except FileNotFoundError:
        return []
    return sorted(
        n
        for n in names
        if not n.startswith("_") and any((root / n / kind).exists() for kind in kinds)
    )


def _lock_body(token: str) -> bytes:
    """A lock's content: its holder and when it last proved alive."""
    return json.dumps({"token": token, "created": time.time()}, allow_nan=False).encode()


class BatchStorage:
    """Paths, atomic writes and partition locks for one pipeline's files.

    Example:
        >>> store = BatchStorage("/tmp/lake", "reviews")
        >>> store.write_json(store.manifest_path("a", 1), {"attempt": 1})
    """

    def __init__(
        self, root: str | os.PathLike[str], name: str, storage_options: dict[str, Any] | None = None
    ) -> None:
        self.root = UPath(str(root), **(storage_options or {}))
        self.name = name
        self.base = self.root / name

    def __repr__(self) -> str:
        return f"BatchStorage({str(self.base)!r})"

    @property
    def is_local(self) -> bool:
        """True on a local file system, where rename is atomic."""
        return self.base.protocol in ("", "file", "local")

    # --- layout --------------------------------------------------------------------------

    def partition_dir(self, kind: str, partition_key: str | None) -> UPath:
        """``<base>/<kind>/partition=<p>``."""
        return self.base / kind / f"partition={encode_partition(partition_key)}"

    def segment_dir(self, kind: str, segment: str) -> UPath:
        """``<base>/<kind>/partition=<segment>`` for a segment read from a listing (encoded)."""
        return self.base / kind / f"partition={segment}"

    def manifest_path(self, partition_key: str | None, attempt: int) -> UPath:
        """Where an attempt's manifest lives."""
        return self.partition_dir("manifests", partition_key) / f"attempt={attempt}.json"

    def attempt_file(self, kind: str, partition_key: str | None, attempt: int) -> UPath:
        """``<kind>/partition=<p>/attempt=<n>.parquet`` (inputs, invalid)."""
        return self.partition_dir(kind, partition_key) / f"attempt={attempt}.parquet"

    def attempt_dir(self, kind: str, partition_key: str | None, attempt: int) -> UPath:
        """``<kind>/partition=<p>/attempt=<n>/`` (requests, raw)."""
        return self.partition_dir(kind, partition_key) / f"attempt={attempt}"

    def table_path(self, kind: str, partition_key: str | None) -> UPath:
        """The one Parquet file of a results/failed partition."""
        return self.partition_dir(kind, partition_key) / "part-0.parquet"

    def table_root(self, kind: str) -> UPath:
        """The root of a hive-partitioned table (``results`` or ``failed``)."""
        return self.base / kind

    def relative(self, path: UPath) -> str:
        """``path`` relative to the pipeline's base, as stored in manifests."""
        return str(path.relative_to(self.base))

    def resolve(self, relative: str) -> UPath:
        """The inverse of :meth:`relative`."""
        return self.base.joinpath(*relative.split("/"))

    # --- discovery -----------------------------------------------------------------------

    def fresh(self, path: UPath) -> UPath:
        """``path`` with the file system's listing cache dropped.

        Object stores cache listings (forever, by default, in s3fs); a long-lived sensor must
        see the manifests other processes write.
        """
        if not self.is_local:
            path.fs.invalidate_cache(path.path)
        return path

    def exists(self, path: UPath) -> bool:
        """Whether ``path`` exists now, not in a cached listing."""
        return self.fresh(path).exists()

    def partitions_with_manifests(self) -> list[str]:
        """Every partition key that has at least one manifest (``__all__``: unpartitioned)."""
        root = self.fresh(self.base / "manifests")
        if not root.exists():
            return []
        keys = []
        for child in root.iterdir():
            if not child.name.startswith("partition="):
                continue
            key = decode_partition(child.name[len("partition=") :])
            if key is None:  # a long key, stored hashed: its manifests hold it whole
                key = self._key_from_manifest(child)
            if key is not None:
                keys.append(key)
        return sorted(keys)

    def _key_from_manifest(self, folder: UPath) -> str | None:
        for path in folder.iterdir():
            if _ATTEMPT_RE.search(path.name):
                key = self.read_json(path).get("partition_key")
                return key if isinstance(key, str) else None
        return None

    def list_files(self, folder: UPath) -> dict[str, float]:
        """Every file under ``folder``, recursively: relative path -> modification time.

        One listing call on an object store (paginated, 1,000 keys a page), however deep the
        tree: the cheap way to see many small files at once. ``{}`` when ``folder`` is absent.
        """
        fs = self.fresh(folder).fs
        root = fs._strip_protocol(folder.path).rstrip("/") + "/"
        try:
            if self.is_local:
                found = fs.find(root, detail=True)
            else:
                # As a prefix of the parent: an empty answer then costs no extra HEAD and
                # listing to tell "no folder" from "a file of that name".
                parent, name = root[:-1].rsplit("/", 1)
                found = fs.find(parent, detail=True, prefix=name + "/")
        except FileNotFoundError:
            return {}
        return {
            name[len(root) :]: _mtime(info)
            for name, info in found.items()
            if name.startswith(root) and info.get("type") != "directory"
        }

    def read_many(self, paths: Iterable[UPath], workers: int = 32) -> dict[str, bytes | Exception]:
        """The bytes of many small files, read concurrently; a failed read is its exception.

        Keys are ``str(path)``. On an object store each read is a round trip, so a sensor
        that reads hundreds of manifests one by one spends its tick waiting.
        """
        paths = list(paths)
        # One GET per file: s3fs would otherwise ask for the size first (a HEAD) to decide
        # whether to split the download, doubling the round trips for files of a few KB.
        options = {} if self.is_local else {"max_concurrency": 1}

        def read(path: UPath) -> bytes | Exception:
            try:
                return path.fs.cat_file(path.path, **options)
            except Exception as exc:  # the caller decides what a missing or bad file means
                return exc

        if len(paths) <= 1 or self.is_local:
            return {str(p): read(p) for p in paths}
        with ThreadPoolExecutor(max_workers=min(workers, len(paths))) as pool:
            return dict(zip(map(str, paths), pool.map(read, paths), strict=True))

    def delete_many(self, paths: Iterable[UPath]) -> None:
        """Remove files that may or may not exist (one bulk request per 1,000 on S3)."""
        paths = list(paths)
        if not paths:
            return
        if self.is_local:
            for path in paths:
                self.delete(path)
            return
        paths[0].fs.rm([p.path for p in paths])

    def attempts(self, partition_key: str | None) -> list[int]:
        """The attempt numbers with a manifest, ascending (one listing on an object store)."""
        names = self.list_files(self.partition_dir("manifests", partition_key))
        found = (_ATTEMPT_RE.fullmatch(name) for name in names)
        return sorted(int(m.group(1)) for m in found if m)

    # --- atomic writes -------------------------------------------------------------------

    def write_bytes(self, path: UPath, data: bytes) -> None:
        """Write a whole file so readers see the old one or the new one, never half."""
        if self.is_local:
            os.makedirs(os.path.dirname(path.path), exist_ok=True)
            tmp = f"{path.path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path.path)
        else:
            path.fs.pipe_file(path.path, data)  # one PUT: the object appears whole

    @contextlib.contextmanager
    def open_write(self, path: UPath) -> Iterator[IO[bytes]]:
        """A binary file to stream into; it appears at ``path`` only when complete."""
        if not self.is_local:
            fh = path.open("wb")  # an object store PUTs the object on close
            try:
                yield fh
            except BaseException:
                # A half-downloaded file must not appear: closing would upload it.
                with contextlib.suppress(Exception):
                    fh.discard()
                    fh.closed = True  # so that garbage collection does not close (upload) it
                raise
            fh.close()
            return
        os.makedirs(os.path.dirname(path.path), exist_ok=True)
        tmp = f"{path.path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as fh:
                yield fh
            os.replace(tmp, path.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    def write_json(self, path: UPath, data: dict[str, Any]) -> None:
        """Atomically write a JSON document.

        A NaN or an infinity is refused (``ValueError`` naming the file) before anything is
        written: JSON has no such numbers, and a file holding ``Infinity`` is not JSON to
        other readers (Spark, jq, a browser).
        """
        try:
            text = json.dumps(data, indent=2, sort_keys=True, default=str, allow_nan=False)
        except ValueError as exc:
            raise ValueError(f"{path} not written: {exc} (a NaN or an infinity)") from exc
        self.write_bytes(path, text.encode())

    def read_json(self, path: UPath) -> dict[str, Any]:
        """Read a JSON document (one GET on an object store: no size lookup first)."""
        if self.is_local:
            return json.loads(path.read_bytes())
        return json.loads(path.fs.cat_file(path.path, max_concurrency=1))

    def write_table(self, path: UPath, table: pa.Table) -> None:
        """Atomically write a Parquet file (zstd)."""
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        self.write_bytes(path, sink.getvalue())

    def read_table(self, path: UPath, columns: list[str] | None = None) -> pa.Table:
        """Read one Parquet file (only ``columns``, when given: the rest is not read)."""
        with path.open("rb") as fh:
            return pq.read_table(fh, columns=columns)

    def upload_file(self, local_path: str, dest: UPath) -> None:
        """Copy a local file to storage, streaming, atomically."""
        if self.is_local:
            os.makedirs(os.path.dirname(dest.path), exist_ok=True)
            tmp = f"{dest.path}.tmp-{uuid.uuid4().hex}"
            with open(local_path, "rb") as src, open(tmp, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            os.replace(tmp, dest.path)
        else:
            dest.fs.put_file(local_path, dest.path)

    def download_file(self, path: UPath, local_path: str) -> None:
        """Copy a stored file to local disk, streaming."""
        with path.open("rb") as src, open(local_path, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)

    def delete(self, path: UPath) -> None:
        """Remove a file if it exists."""
        with contextlib.suppress(FileNotFoundError):
            path.fs.rm_file(path.path)

    # --- locks ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(
        self,
        partition_key: str | None,
        *,
        wait_seconds: float = 120.0,
        stale_seconds: float = 300.0,
    ) -> Iterator[None]:
        """Hold the partition's lock: only one run submits or collects it at a time.

        On local disk this is ``flock``: the kernel releases it when the holder dies. On an
        object store it is an exclusive create (``If-None-Match: *``) that the holder refreshes
        every ``stale_seconds / 3``, so only a lock whose holder died goes stale and is broken;
        a holder deletes the lock only while it still owns it.
        """
        path = self.partition_dir("locks", partition_key) / "lock.json"
        if self.is_local:
            with _local_lock(path.path, partition_key, wait_seconds):
                yield
            return
        token = uuid.uuid4().hex
        deadline = time.monotonic() + wait_seconds
        while not self._try_create(path, token):
            if self._is_stale(path, stale_seconds):
                self.delete(path)
                continue
            if time.monotonic() > deadline:
                raise LockTimeout(f"partition {partition_key!r} is locked by another run ({path})")
            time.sleep(0.2)
        stop = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat, args=(path, token, stop, stale_seconds / 3), daemon=True
        )
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join()
            if self._owner(path) == token:
                self.delete(path)

    def _heartbeat(self, path: UPath, token: str, stop: threading.Event, every: float) -> None:
        while not stop.wait(every):
            try:
                if self._owner(path) != token:
                    logger.warning("lock %s was broken by another run", path)
                    return  # judged dead by someone else: do not fight over it
                body = _lock_body(token)
                self.write_bytes(path, body)
            except OSError as exc:  # keep trying: a missed beat only risks staleness
                logger.warning("could not refresh lock %s: %s", path, exc)

    def _owner(self, path: UPath) -> str | None:
        body = self._lock_bytes(path)
        try:
            return None if body is None else json.loads(body).get("token")
        except (ValueError, AttributeError):
            return None

    def _lock_bytes(self, path: UPath) -> bytes | None:
        """The lock's body; None once it is gone.

        Its holder rewrites it every beat and deletes it on release, so a read may meet an
        object that changed under it (s3fs's ``FileExpired``, or the store's answer to a read
        pinned to the old version, ``PreconditionFailed``): it is read again, not raised into
        the run that waits for the lock.
        """
        for _ in range(5):
            try:
                return self.fresh(path).read_bytes()
            except FileNotFoundError:
                return None
            except OSError as exc:
                if not _changed_under_read(exc):
                    raise
        return None

    def _try_create(self, path: UPath, token: str) -> bool:
        body = _lock_body(token)
        try:
            if self.is_local:
                os.makedirs(os.path.dirname(path.path), exist_ok=True)
                with open(path.path, "xb") as fh:
                    fh.write(body)
            else:
                path.fs.pipe_file(path.path, body, mode="create")
        except (FileExistsError, OSError) as exc:
            if isinstance(exc, FileExistsError) or "PreconditionFailed" in repr(exc):
                return False
            raise
        return True

    def _is_stale(self, path: UPath, stale_seconds: float) -> bool:
        """Whether the lock's holder stopped refreshing it ``stale_seconds`` ago.

        A lock whose body cannot be read (empty, truncated, foreign) is judged by when the
        object was last written: its holder, if alive, rewrites it every beat, so an
        unreadable body that old has no holder (before, it was never stale: a lock for ever).
        """
        body = self._lock_bytes(path)
        if body is None:
            return False
        try:
            created = float(json.loads(body)["created"])
        except (ValueError, TypeError, KeyError, IndexError, OverflowError):
            created = self._written_at(path)
        if created != created:  # NaN: no age can be told from it
            created = self._written_at(path)
        return time.time() - created > stale_seconds

    def _written_at(self, path: UPath) -> float:
        """When the object was last written, from the store (now, if it cannot tell)."""
        try:
            return _mtime(path.fs.info(path.path)) or time.time()
        except FileNotFoundError:
            return time.time()


def _changed_under_read(exc: OSError) -> bool:
    """Whether a read failed because the object was rewritten or deleted while it was read."""
    text = repr(exc)
    return (
        type(exc).__name__ == "FileExpired"
        or "PreconditionFailed" in text
        or ("pre-conditions you specified did not hold" in text)
    )
