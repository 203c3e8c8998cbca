"""API keys of the REST API (``API_KEY``, ``API_KEY_FILE``, ``API_KEYS_FILE``),
answered in the API's error shape.

A request with a known key goes on, carrying the key (``presented_key``): the
gateway passes it on to the core, which reads the caller's tenant from it, so
both processes hold the same keys and the core decides whose sessions a call
sees.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from llamachat_process.tenants import KeyRing, bearer_token

from .errors import error_response

# Open without a key: service information, health probes, the API's
# documentation, the web page (whose own calls to the API carry the key) and
# the Prometheus metrics (scrapers carry no key, as with vLLM's /metrics).
PUBLIC_PATHS = frozenset(
    {"/", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/ui", "/metrics"}
)
PUBLIC_PREFIX = "/ui/static/"  # the web page's script, style and libraries
KEY_STATE = "api_key"


def presented_key(headers: Headers) -> str | None:
    """The key from ``Authorization: Bearer <key>`` (any case), else ``X-API-Key``."""
    return bearer_token(headers.get("authorization")) or headers.get("x-api-key")


def key_of(scope: Scope) -> str | None:
    """The key a request that ``ApiKeyAuth`` let through presented."""
    return scope.get("state", {}).get(KEY_STATE)


class ApiKeyAuth:
    """401 for requests to non-public paths without a known key.

    The comparison takes the same time whatever the key presented, so it does
    not tell an attacker how much of a guess was right.
    """

    def __init__(self, app: ASGIApp, keys: KeyRing) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = presented_key(Headers(scope=scope))
        path = scope["path"]
        if (
            path in PUBLIC_PATHS
            or path.startswith(PUBLIC_PREFIX)
            or self.keys.tenant_for(key) is not None
        ):
            scope.setdefault("state", {})[KEY_STATE] = key
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
