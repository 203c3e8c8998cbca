"""API key check of the REST API (``API_KEY``), answered in the API's error shape."""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

# Open without a key: service information, health probes, the API's
# documentation, the web page (whose own calls to the API carry the key) and
# the Prometheus metrics (scrapers carry no key, as with vLLM's /metrics).
PUBLIC_PATHS = frozenset(
    {"/", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/ui", "/metrics"}
)


def presented_key(headers: Headers) -> str | None:
    """The key from ``Authorization: Bearer <key>``, else from ``X-API-Key``."""
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials:
        return credentials.strip()
    return headers.get("x-api-key")


class ApiKeyAuth:
    """401 for requests to non-public paths without the right key.

    The comparison takes the same time whatever the key presented, so it does
    not tell an attacker how much of a guess was right.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    def authorized(self, scope: Scope) -> bool:
        key = presented_key(Headers(scope=scope))
        return key is not None and hmac.compare_digest(key.encode(), self.expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        response = error_response(
            scope["path"],
            401,
            "Missing or invalid API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": "Bearer"},
            code="invalid_api_key",
        )
        await response(scope, receive, send)
