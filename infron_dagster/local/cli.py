"""``infron-local``: serve the local batch API over HTTP.

Example:
    infron-local serve --port 8765 --data-dir .infron-local --failure-rate 0.05

It answers only requests whose Host header is a loopback name (localhost, 127.0.0.0/8,
::1), the address it is bound to, or a name given with ``--allowed-host`` (``*`` for any):
otherwise a web page could read it by DNS rebinding. Request bodies over
``--max-body-bytes`` (default 256 MiB: a 200 MB batch file plus overhead) are refused
with 413. See server.py for the connection limits (threads, timeouts, connections).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from .app import create_app
from .config import LocalServerConfig, save_config
from .hosts import host_name, is_loopback
from .server import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_THREADS,
    BoundedWSGIServer,
    KeepAliveHandler,
    build_server,
)

# The names other modules (and tests) build their own servers from.
ThreadingWSGIServer = BoundedWSGIServer
QuietHandler = KeepAliveHandler
_WILDCARDS = ("", "0.0.0.0", "::")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``infron-local``."""
    parser = argparse.ArgumentParser(prog="infron-local", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the batch API over HTTP")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    serve.add_argument("--data-dir", default=".infron-local")
    serve.add_argument(
        "--api-key",
        default=os.environ.get("INFRON_LOCAL_API_KEY"),
        help="accept only this bearer token (default: $INFRON_LOCAL_API_KEY; else any token)",
    )
    defaults = LocalServerConfig()
    for name, kind in (
        ("validating_seconds", float),
        ("in_progress_seconds", float),
        ("finalizing_seconds", float),
        ("failure_rate", float),
        ("rate_limit_every", int),
        ("rate_limit_retry_after", float),
        ("server_error_every", int),
        ("expire_fraction", float),
        ("lost_rate", float),
        ("latency_seconds", float),
        ("enqueued_token_limit", int),
    ):
        flag = "--" + name.replace("_", "-")
        serve.add_argument(flag, type=kind, default=getattr(defaults, name), dest=name)
    serve.add_argument("--expire", action="store_true")
    serve.add_argument("--validation-failure", action="store_true")
    _add_hardening(serve, defaults)
    return parser


def _add_hardening(serve: argparse.ArgumentParser, defaults: LocalServerConfig) -> None:
    serve.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        dest="allowed_hosts",
        metavar="NAME",
        help="also answer this Host name (repeatable; '*' answers any); loopback names "
        "and the bound address are always answered",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        default=defaults.max_body_bytes,
        dest="max_body_bytes",
        help="refuse larger request bodies with 413 (default: %(default)s, 256 MiB)",
    )
    serve.add_argument(
        "--no-require-max-tokens",
        action="store_false",
        dest="infron_require_max_tokens",
        help="accept Infron-style chat params without max_tokens",
    )
    serve.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help="requests answered at once; more wait, whole, for a free thread (%(default)s)",
    )
    serve.add_argument(
        "--read-timeout",
        type=float,
        default=DEFAULT_READ_TIMEOUT,
        help="seconds a client may stay silent, idle keep-alive included (%(default)s)",
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT,
        help="seconds a whole request (headers and body) may take to arrive; 408 after "
        "(%(default)s)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="open connections at most; past it the longest-waiting one is closed (%(default)s)",
    )


def config_from_args(args: argparse.Namespace) -> LocalServerConfig:
    """The LocalServerConfig the parsed arguments describe."""
    names = set(LocalServerConfig().to_dict())
    values = {k: v for k, v in vars(args).items() if k in names}
    host = getattr(args, "host", "")
    # The address it is bound to is what its clients put in Host: answer it too.
    name = host_name(host) if host not in _WILDCARDS else None
    if "allowed_hosts" in values and name and not is_loopback(name):
        values["allowed_hosts"] = [*values["allowed_hosts"], name]
    return LocalServerConfig.from_dict(values)


def serve(args: argparse.Namespace) -> None:
    """Serve until SIGTERM or Ctrl-C."""
    config = config_from_args(args)
    save_config(args.data_dir, config)
    # No embedded host name on a socket: only the in-process transport may use it.
    app = create_app(args.data_dir, config, embedded_host=None)
    server = build_server(
        app,
        args.host,
        args.port,
        threads=args.threads,
        read_timeout=args.read_timeout,
        request_timeout=args.request_timeout,
        max_connections=args.max_connections,
        max_body_bytes=config.max_body_bytes,
    )
    signal.signal(signal.SIGTERM, _raise_interrupt)
    print(
        f"infron-local serving on http://{args.host}:{server.server_port}/v1 "
        f"(data: {args.data_dir})",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _raise_interrupt(signum: int, frame: Any) -> None:
    # Turn SIGTERM into the same clean exit as Ctrl-C.
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``infron-local`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            serve(args)
    except ValueError as exc:
        print(f"infron-local: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
