"""``infron-local``: serve the local batch API over HTTP.

Example:
    infron-local serve --port 8765 --data-dir .infron-local --failure-rate 0.05
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .app import create_app
from .config import LocalServerConfig, save_config


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """wsgiref's server, one daemon thread per connection so a slow client blocks no one."""

    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    """Logs nothing: request lines are noise, and headers (Authorization) must never leak."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


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
    return parser


def config_from_args(args: argparse.Namespace) -> LocalServerConfig:
    """The LocalServerConfig the parsed arguments describe."""
    names = set(LocalServerConfig().to_dict())
    return LocalServerConfig.from_dict({k: v for k, v in vars(args).items() if k in names})


def serve(args: argparse.Namespace) -> None:
    """Serve until SIGTERM or Ctrl-C."""
    config = config_from_args(args)
    save_config(args.data_dir, config)
    app = create_app(args.data_dir, config)
    server = make_server(
        args.host, args.port, app, server_class=ThreadingWSGIServer, handler_class=QuietHandler
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
