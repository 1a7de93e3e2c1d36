"""Where an attempt's batches were sent, so that mock answers never pass for real ones.

Each manifest records its ``provider``: ``"local"`` for the embedded local server (a
``local://`` base URL, or no key and no URL), else the API's scheme and host (never a key,
never a path or query, which may hold one). Answers are reused across attempts and
partitions (an unchanged rerun, carried rows, a revert, ``reuse_answers="pipeline"``); the
local server's are mock, so they never stand for a real provider's: a partition answered
there is sent again once the resource is a real API. Real answers reused while developing on
the local server are fine. A manifest written before the field existed reads as unknown
(None) and is trusted as before, so an upgrade never pays again.

Example:
    >>> provider_of("https://user:sk-secret@LLM.onerouter.pro/v1?key=x")
    'https://llm.onerouter.pro'
    >>> provider_of("http://infron.local/v1")  # the embedded server's transport
    'local'
    >>> mock_for("local", "https://llm.onerouter.pro"), mock_for(None, "https://a.b")
    (True, False)
"""

from __future__ import annotations

from collections.abc import Iterable

import httpx

from .local.hosts import EMBEDDED_HOST

__all__ = ["LOCAL", "mock_for", "mock_note", "provider_of"]

LOCAL = "local"


def provider_of(base_url: str) -> str:
    """The provider a base URL names: ``"local"`` for the embedded server, else its
    lower-cased ``scheme://host[:port]`` (the credentials, path and query are left out)."""
    try:
        url = httpx.URL(base_url)
    except (httpx.InvalidURL, TypeError):
        return "unknown"
    host = (url.host or "").lower()
    if host == EMBEDDED_HOST:
        return LOCAL
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address
    port = f":{url.port}" if url.port is not None else ""
    return f"{url.scheme.lower()}://{host}{port}"


def mock_for(source: str | None, current: str | None) -> bool:
    """Whether answers from provider ``source`` are mock answers that must not stand for
    ``current``'s (the local server's, for a real API). Unknown (None) is trusted."""
    return source == LOCAL and current is not None and current != LOCAL


def mock_note(current: str, attempts: Iterable[int] = (), partitions: int = 0) -> str:
    """The sentence a submission's metadata and log give when it did not reuse mock answers.

    Example:
        >>> mock_note("https://llm.onerouter.pro", attempts=[1]).split(" (")[0]
        'answers from the local mock server are not reused against https://llm.onerouter.pro'
    """
    where = []
    attempts = sorted(set(attempts))
    if attempts:
        numbers = ", ".join(str(a) for a in attempts)
        where.append(f"attempt{'s' if len(attempts) > 1 else ''} {numbers} of this partition")
    if partitions:
        where.append(f"{partitions} other partition(s)")
    return (
        f"answers from the local mock server are not reused against {current}"
        f"{' (' + '; '.join(where) + ')' if where else ''}: the rows they answered are "
        "sent again, for real"
    )
