"""moto's S3 server in its own process, counting the requests it answers.

``GET /__counts`` answers ``{"total": n, "by_method": {...}}`` and ``POST /__counts/reset``
sets them to zero; every other request goes to moto unchanged. The counts are what S3 saw,
retries included, so "requests per tick" is measured at the server, not guessed at the client.

Usage (the benchmark and the tests start it as a subprocess by file path)::

    python benchmarks/counting_s3.py PORT
    python -c "from benchmarks.counting_s3 import serve; serve(5000)"
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

COUNTS_PATH = "/__counts"


def counting(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """A WSGI middleware that counts requests by method and answers ``/__counts``."""
    lock = threading.Lock()
    counts: Counter[str] = Counter()

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "")
        if path == COUNTS_PATH:
            with lock:
                body = json.dumps({"total": sum(counts.values()), "by_method": dict(counts)})
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body.encode()]
        if path == COUNTS_PATH + "/reset":
            with lock:
                counts.clear()
            start_response("204 No Content", [])
            return [b""]
        with lock:
            counts[method] += 1
        return app(environ, start_response)

    return wrapped


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Serve moto's S3 with counting on ``host:port`` until killed (threaded, like moto's)."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per request
    app = counting(DomainDispatcherApplication(create_backend_app))
    make_server(host, port, app, threaded=True, request_handler=MotoRequestHandler).serve_forever()


class CountingS3:
    """A handle on a running counting server: its URL, its counts, s3fs options for it."""

    def __init__(self, endpoint_url: str) -> None:
        self.endpoint_url = endpoint_url

    @property
    def storage_options(self) -> dict[str, Any]:
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"},
        }

    def counts(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.endpoint_url + COUNTS_PATH, timeout=10) as answer:
            return json.loads(answer.read())

    def reset(self) -> None:
        request = urllib.request.Request(self.endpoint_url + COUNTS_PATH + "/reset", method="POST")
        urllib.request.urlopen(request, timeout=10).close()

    @contextmanager
    def measure(self) -> Iterator[dict[str, Any]]:
        """Counts of the requests made inside the block, filled in when it ends."""
        self.reset()
        out: dict[str, Any] = {}
        yield out
        out.update(self.counts())


@contextmanager
def running(port: int, bucket: str = "lake") -> Iterator[CountingS3]:
    """Start the server in a subprocess, create ``bucket``, stop it afterwards."""
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    command = [sys.executable, os.path.abspath(__file__), str(port)]
    with tempfile.TemporaryFile() as log:  # startup errors, for the message if it fails
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env)
        server = CountingS3(f"http://127.0.0.1:{port}")
        try:
            _wait_until_up(server, proc, log)
            import s3fs

            # No region: s3fs would send it as a LocationConstraint, which us-east-1 refuses.
            fs = s3fs.S3FileSystem(
                key="testing", secret="testing", client_kwargs={"endpoint_url": server.endpoint_url}
            )
            fs.mkdir(bucket)
            yield server
        finally:
            proc.terminate()  # moto's server may hold on to a keep-alive thread: then kill it
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _wait_until_up(server: CountingS3, proc: subprocess.Popen, log: Any) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            server.counts()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = log.read()[-3000:].decode(errors="replace")
                raise RuntimeError(f"the counting S3 server did not start:\n{tail}") from None
            time.sleep(0.1)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
