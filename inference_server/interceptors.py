"""Server interceptors: what every call passes before it reaches a servicer.

- ``TenantInterceptor``: with API keys (``API_KEY``, ``API_KEY_FILE``,
  ``API_KEYS_FILE``), a call needs the metadata ``authorization: Bearer
  <key>`` (the scheme in any case; compared in constant time), else
  UNAUTHENTICATED; the key names the caller's tenant (``tenant_of``). Health
  checks, ``GetModel`` and ``GetMetrics`` are exempt, so that probes and the
  gateway's public ``/health`` and ``/metrics`` need no secret. With
  ``RATE_LIMIT_RPM``, each tenant may make that many calls a minute (a token
  bucket); past it, RESOURCE_EXHAUSTED with the trailing metadata
  ``retry-after``.
- ``MalformedRequestInterceptor``: a request of the chat service whose bytes
  are not a valid message (for example a string that is not UTF-8) gets
  INVALID_ARGUMENT, where grpc would answer INTERNAL.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from llamachat.v1 import chat_pb2
from llamachat_process.tenants import DEFAULT_TENANT, KeyRing, bearer_token

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]

CHAT_SERVICE_PREFIX = "/" + chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name + "/"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
OPEN_METHODS = frozenset({CHAT_SERVICE_PREFIX + "GetModel", CHAT_SERVICE_PREFIX + "GetMetrics"})


def _behaviour_field(handler: grpc.RpcMethodHandler) -> str:
    streaming = (handler.request_streaming, handler.response_streaming)
    return {
        (False, False): "unary_unary",
        (False, True): "unary_stream",
        (True, False): "stream_unary",
        (True, True): "stream_stream",
    }[streaming]


def _refusing(
    handler: grpc.RpcMethodHandler,
    code: grpc.StatusCode,
    details: str,
    trailing: tuple[tuple[str, str], ...] = (),
) -> Any:
    """A handler of the same kind as ``handler`` that ends every call with ``code``."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        if trailing:
            context.set_trailing_metadata(trailing)
        await context.abort(code, details)

    return handler._replace(**{_behaviour_field(handler): refuse})  # type: ignore[attr-defined]


def presented_key(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The key of a call's ``authorization: Bearer <key>`` metadata."""
    for key, value in metadata or ():
        if key == "authorization":
            return bearer_token(value.decode() if isinstance(value, bytes) else value)
    return None


def tenant_of(keys: KeyRing, context: grpc.aio.ServicerContext) -> str:
    """The tenant of a call that ``TenantInterceptor`` let through."""
    return keys.tenant_for(presented_key(context.invocation_metadata())) or DEFAULT_TENANT


class RateLimit:
    """A token bucket per tenant: ``per_minute`` calls a minute, in bursts of
    at most ``per_minute``."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._rate = per_minute / 60.0
        self._capacity = float(per_minute)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def wait_s(self, tenant: str) -> float:
        """0 when the call may go (and it is counted), else the seconds until one may."""
        now = self._clock()
        tokens, then = self._buckets.get(tenant, (self._capacity, now))
        tokens = min(self._capacity, tokens + (now - then) * self._rate)
        if tokens >= 1.0:
            self._buckets[tenant] = (tokens - 1.0, now)
            return 0.0
        self._buckets[tenant] = (tokens, now)
        return (1.0 - tokens) / self._rate


class TenantInterceptor(grpc.aio.ServerInterceptor):
    """Refuse calls without a known key (UNAUTHENTICATED), and calls of a
    tenant past its rate limit (RESOURCE_EXHAUSTED)."""

    def __init__(self, keys: KeyRing, rate_limit_per_minute: int = 0) -> None:
        self._keys = keys
        self._limit = RateLimit(rate_limit_per_minute) if rate_limit_per_minute else None

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(HEALTH_PREFIX) or method in OPEN_METHODS:
            return handler
        tenant = self._keys.tenant_for(presented_key(handler_call_details.invocation_metadata))
        if tenant is None:
            return _refusing(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "Missing or invalid API key: send the metadata 'authorization: Bearer <key>'",
            )
        if self._limit is not None and method.startswith(CHAT_SERVICE_PREFIX):
            wait_s = self._limit.wait_s(tenant)
            if wait_s > 0:
                retry_after = max(1, math.ceil(wait_s))
                return _refusing(
                    handler,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"Rate limit reached: {self._limit.per_minute} requests a minute "
                    f"for this API key's tenant; retry in {retry_after} s",
                    trailing=(("retry-after", str(retry_after)),),
                )
        return handler


class _Malformed:
    """Stands for a request whose bytes could not be parsed."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """INVALID_ARGUMENT, not INTERNAL, for chat requests that do not parse."""

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if (
            handler is None
            or handler.request_streaming
            or handler.request_deserializer is None  # raw bytes: nothing to parse
            or not handler_call_details.method.startswith(CHAT_SERVICE_PREFIX)
        ):
            return handler
        parse = handler.request_deserializer
        field = _behaviour_field(handler)
        behaviour = getattr(handler, field)

        def lenient_parse(data: bytes) -> Any:
            try:
                return parse(data)
            except (DecodeError, ValueError, UnicodeDecodeError) as error:
                return _Malformed(error)

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Request is not a valid {handler_call_details.method} message: "
                    f"{request.error}",
                )
            return await behaviour(request, context)

        return handler._replace(  # type: ignore[attr-defined]
            request_deserializer=lenient_parse, **{field: guarded}
        )
