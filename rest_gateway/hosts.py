"""The Host header check: only the names this service is known by.

A web page on another site cannot read a local service's answers, unless its
domain is made to resolve to 127.0.0.1 (DNS rebinding): the browser then sends
the attacker's name in ``Host``. Answering only the configured names
(``ALLOWED_HOSTS``; by default the loopback names and the bind address, with
any port) stops that. An unknown host gets 400 with a detail that names the
setting.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

LOOPBACK = ("localhost", "127.0.0.1", "::1")
ANY_HOST = "*"


def host_name(host_header: str) -> str:
    """``example.com:8002`` -> ``example.com``; ``[::1]:8002`` -> ``::1``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def allowed_names(configured: list[str], bind_host: str) -> frozenset[str]:
    """The names served: the configured ones, else the loopback names and the
    bind address (unless it is a wildcard)."""
    if configured:
        return frozenset(host_name(name) if name != ANY_HOST else ANY_HOST for name in configured)
    names = set(LOOPBACK)
    if bind_host not in ("0.0.0.0", "::", ""):
        names.add(host_name(bind_host))
    return frozenset(names)


class TrustedHosts:
    """400 for a request whose ``Host`` is not one of ``names``."""

    def __init__(self, app: ASGIApp, names: frozenset[str]) -> None:
        self.app = app
        self.names = names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or ANY_HOST in self.names:
            await self.app(scope, receive, send)
            return
        host = Headers(scope=scope).get("host", "")
        if host_name(host) in self.names:
            await self.app(scope, receive, send)
            return
        response = error_response(
            scope["path"],
            400,
            f"Host {host!r} is not served here: add it to ALLOWED_HOSTS",
            code="invalid_host",
        )
        await response(scope, receive, send)
