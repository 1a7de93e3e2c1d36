"""Which Host headers the local server answers: a guard against DNS rebinding.

With no API key the server answers any bearer token, so a web page the developer visits could
point a host name of its own at 127.0.0.1 and read the batches through the browser. The
browser still sends that name as ``Host``; answering only loopback names, the embedded
transport's name and the names the operator allowed shuts that door.

Example:
    >>> host_allowed("localhost:8765", ())
    True
    >>> host_allowed("attacker.example", ())
    False
    >>> host_allowed("batch.test", ("batch.test",))
    True
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["ANY_HOST", "EMBEDDED_HOST", "host_allowed", "host_name"]

# The host name of the in-process transport's base URL (see embedded.py). No socket ever
# serves it unless the operator allows it explicitly.
EMBEDDED_HOST = "infron.local"
ANY_HOST = "*"


def host_name(header: str) -> str | None:
    """The lower-cased host name of a Host header without its port; None when malformed.

    Example:
        >>> host_name("[::1]:8765"), host_name("LocalHost.:80"), host_name("a b")
        ('::1', 'localhost', None)
    """
    header = header.strip().lower()
    if header.startswith("["):
        name, bracket, rest = header[1:].partition("]")
        port_ok = rest == "" or (rest.startswith(":") and rest[1:].isdigit())
        return name if bracket and name and port_ok else None
    name, colon, port = header.partition(":")
    if colon and not port.isdigit():
        return None
    name = name.rstrip(".")
    if not name or any(not (c.isalnum() or c in "-._") for c in name) or not name.isascii():
        return None
    return name


def is_loopback(name: str) -> bool:
    """Whether the host name is loopback by definition: localhost, 127.0.0.0/8 or ::1.

    Example:
        >>> is_loopback("127.9.9.9"), is_loopback("::1"), is_loopback("127.0.0.1.nip.io")
        (True, True, False)
    """
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_allowed(header: str | None, allowed: Iterable[str], extra: Iterable[str] = ()) -> bool:
    """Whether a request with this Host header may be answered.

    ``allowed`` are the configured names (``*`` allows every host), ``extra`` names the caller
    trusts on top (the embedded host). A request without a Host header comes from no browser
    (browsers always send one), so it is answered.
    """
    names = {n.lower().rstrip(".") for n in (*allowed, *extra)}
    if ANY_HOST in names:
        return True
    if header is None:
        return True
    name = host_name(header)
    if name is None:
        return False
    return is_loopback(name) or name in names
