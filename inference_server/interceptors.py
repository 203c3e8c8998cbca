"""Server interceptors: what every call passes before it reaches a servicer.

- ``ApiKeyInterceptor``: with ``API_KEY`` set, a call needs the metadata
  ``authorization: Bearer <key>`` (compared in constant time), else
  UNAUTHENTICATED. Health checks are exempt, so that probes need no secret.
- ``MalformedRequestInterceptor``: a request of the chat service whose bytes
  are not a valid message (for example a string that is not UTF-8) gets
  INVALID_ARGUMENT, where grpc would answer INTERNAL.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from llamachat.v1 import chat_pb2

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]

CHAT_SERVICE_PREFIX = "/" + chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name + "/"
HEALTH_PREFIX = "/grpc.health.v1.Health/"


def _behaviour_field(handler: grpc.RpcMethodHandler) -> str:
    streaming = (handler.request_streaming, handler.response_streaming)
    return {
        (False, False): "unary_unary",
        (False, True): "unary_stream",
        (True, False): "stream_unary",
        (True, True): "stream_stream",
    }[streaming]


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> Any:
    """A handler of the same kind as ``handler`` that ends every call with ``code``."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    return handler._replace(**{_behaviour_field(handler): refuse})  # type: ignore[attr-defined]


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuse calls without ``authorization: Bearer <api_key>`` (UNAUTHENTICATED)."""

    def __init__(self, api_key: str) -> None:
        self._expected = f"Bearer {api_key}".encode()

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        if self._authorized(handler_call_details):
            return handler
        return _refusing(
            handler,
            grpc.StatusCode.UNAUTHENTICATED,
            "Missing or invalid API key: send the metadata 'authorization: Bearer <API_KEY>'",
        )


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
