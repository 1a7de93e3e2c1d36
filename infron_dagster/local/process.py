"""``infron-local serve`` as a child process, for tests, benchmarks and scripts.

Example::

    with serve_in_subprocess("/tmp/srv", "--api-key", "sk-x") as base_url:
        InfronClient("sk-x", base_url).retrieve_batch("batch_1")
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator

__all__ = ["serve_in_subprocess"]


@contextlib.contextmanager
def serve_in_subprocess(
    data_dir: str | os.PathLike[str], *flags: str, start_timeout: float = 30.0
) -> Iterator[str]:
    """Serve on a free loopback port until the block ends; yields the ``.../v1`` base URL.

    ``flags`` are any further ``infron-local serve`` options (fault knobs, ``--api-key``).
    """
    command = [
        sys.executable,
        "-m",
        "infron_dagster.local.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--data-dir",
        os.fspath(data_dir),
        *flags,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], start_timeout)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("infron-local serving on http://"):
            raise RuntimeError(f"infron-local did not start: {line!r}")
        yield line.split()[3]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise RuntimeError("infron-local did not stop on SIGTERM") from None
    if code != 0:
        raise RuntimeError(f"infron-local exited with code {code} on SIGTERM")
