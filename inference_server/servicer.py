"""gRPC servicer: protobuf in, domain dataclasses to the engine, protobuf out.

Engine errors become gRPC status codes here, in ``status_for``, and nowhere else.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any, TypeVar

import grpc

from llamachat.v1 import chat_pb2, chat_pb2_grpc
from llamachat_process.tenants import KeyRing

from . import domain
from .engine_api import MAX_PAGE, Engine
from .errors import (
    EngineError,
    EngineFailed,
    EngineNotReady,
    InvalidRequest,
    NoRoomInKvCache,
    Overloaded,
    SessionBusy,
    SessionNotFound,
    SessionStoreError,
)
from .interceptors import tenant_of

log = logging.getLogger(__name__)

STATUS_FOR_ERROR: dict[type[EngineError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    SessionNotFound: grpc.StatusCode.NOT_FOUND,
    EngineNotReady: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    SessionStoreError: grpc.StatusCode.UNAVAILABLE,
    EngineFailed: grpc.StatusCode.UNAVAILABLE,
    NoRoomInKvCache: grpc.StatusCode.INVALID_ARGUMENT,
    SessionBusy: grpc.StatusCode.ABORTED,
}

ROLES = {
    chat_pb2.ROLE_SYSTEM: domain.Role.SYSTEM,
    chat_pb2.ROLE_USER: domain.Role.USER,
    chat_pb2.ROLE_ASSISTANT: domain.Role.ASSISTANT,
}

FINISH_REASONS = {
    domain.FinishReason.STOP: chat_pb2.FINISH_REASON_STOP,
    domain.FinishReason.LENGTH: chat_pb2.FINISH_REASON_LENGTH,
    domain.FinishReason.CANCELLED: chat_pb2.FINISH_REASON_CANCELLED,
}


def status_for(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status of an exception raised while serving a call."""
    for error_type, code in STATUS_FOR_ERROR.items():
        if isinstance(error, error_type):
            return code, str(error)
    log.exception("generation failed", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"Generation error: {error}"


Handler = TypeVar("Handler", bound=Callable[..., Any])


def maps_errors(method: Handler) -> Handler:
    """Abort the call with ``status_for`` when a handler raises."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except Exception as error:  # every error is mapped to a status, none is lost
            await context.abort(*status_for(error))

    return wrapper  # type: ignore[return-value]


def to_domain(
    request: chat_pb2.ChatRequest | chat_pb2.ChatStreamRequest, tenant: str
) -> domain.ChatRequest:
    """The engine's request from either protobuf request (they share their fields)."""

    return domain.ChatRequest(
        message=request.message,
        session_id=request.session_id or None,
        sampling=sampling_of(request),
        tenant=tenant,
    )


def sampling_of(request: Any) -> domain.SamplingParams:
    """The sampling fields every request type shares; unset ones stay ``None``."""

    def optional(field: str) -> Any:
        return getattr(request, field) if request.HasField(field) else None

    return domain.SamplingParams(
        temperature=optional("temperature"),
        top_p=optional("top_p"),
        max_tokens=optional("max_tokens"),
        seed=optional("seed"),
    )


def completion_of(
    request: chat_pb2.CompleteRequest | chat_pb2.CompleteStreamRequest, tenant: str
) -> domain.CompletionRequest:
    """The engine's request from either protobuf completion request."""
    messages = []
    for index, message in enumerate(request.messages):
        role = ROLES.get(message.role)
        if role is None:
            raise InvalidRequest(
                f"messages[{index}].role must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT"
            )
        messages.append(domain.Message(role, message.content))
    return domain.CompletionRequest(
        messages=tuple(messages),
        sampling=sampling_of(request),
        stop=tuple(request.stop),
        tenant=tenant,
    )


def usage_of(result: domain.ChatResult) -> chat_pb2.Usage:
    return chat_pb2.Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        cached_prompt_tokens=result.cached_prompt_tokens,
    )


StreamMessage = TypeVar(
    "StreamMessage", chat_pb2.ChatStreamResponse, chat_pb2.CompleteStreamResponse
)


async def write_stream(
    context: grpc.aio.ServicerContext,
    events: AsyncGenerator[domain.ChatEvent, None],
    last: Callable[[domain.ChatResult], StreamMessage],
    piece: Callable[[str], StreamMessage],
) -> None:
    """Write an engine stream: a ``piece(text)`` per ``TextDelta``, then
    ``last(result)``. Written with context.write rather than yield, so that a
    cancelled call raises here and aclosing closes the engine's stream at
    once, which stops generation within one token."""
    async with aclosing(events) as stream:
        async for event in stream:
            if isinstance(event, domain.TextDelta):
                await context.write(piece(event.text))
            else:
                await context.write(last(event))


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    """``llamachat.v1.ChatService`` on an ``Engine``; every call acts for the
    tenant its key names (``keys``: none configured, one tenant for all)."""

    def __init__(self, engine: Engine, keys: KeyRing | None = None) -> None:
        self._engine = engine
        self._keys = keys or KeyRing()

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        return tenant_of(self._keys, context)

    @maps_errors
    async def Chat(
        self, request: chat_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.ChatResponse:
        result = await self._engine.chat(to_domain(request, self._tenant(context)))
        return chat_pb2.ChatResponse(
            text=result.text,
            session_id=result.session_id or "",
            finish_reason=FINISH_REASONS[result.finish_reason],
            usage=usage_of(result),
        )

    @maps_errors
    async def ChatStream(
        self, request: chat_pb2.ChatStreamRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await write_stream(
            context,
            self._engine.chat_stream(to_domain(request, self._tenant(context))),
            lambda result: chat_pb2.ChatStreamResponse(
                session_id=result.session_id,
                finish_reason=FINISH_REASONS[result.finish_reason],
                usage=usage_of(result),
            ),
            lambda text: chat_pb2.ChatStreamResponse(text=text),
        )

    @maps_errors
    async def Complete(
        self, request: chat_pb2.CompleteRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.CompleteResponse:
        result = await self._engine.complete(completion_of(request, self._tenant(context)))
        return chat_pb2.CompleteResponse(
            text=result.text,
            finish_reason=FINISH_REASONS[result.finish_reason],
            usage=usage_of(result),
        )

    @maps_errors
    async def CompleteStream(
        self, request: chat_pb2.CompleteStreamRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await write_stream(
            context,
            self._engine.complete_stream(completion_of(request, self._tenant(context))),
            lambda result: chat_pb2.CompleteStreamResponse(
                finish_reason=FINISH_REASONS[result.finish_reason], usage=usage_of(result)
            ),
            lambda text: chat_pb2.CompleteStreamResponse(text=text),
        )

    @maps_errors
    async def GetModel(
        self, request: chat_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.GetModelResponse:
        model = self._engine.model_info()
        return chat_pb2.GetModelResponse(
            id=model.id,
            context_size=model.context_size,
            loaded=model.loaded,
            unavailable_reason=model.unavailable_reason or "",
        )

    @maps_errors
    async def GetMetrics(
        self, request: chat_pb2.GetMetricsRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.GetMetricsResponse:
        return chat_pb2.GetMetricsResponse(text=await self._engine.metrics_text())

    @maps_errors
    async def Clear(
        self, request: chat_pb2.ClearRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.ClearResponse:
        await self._engine.clear(request.session_id, self._tenant(context))
        return chat_pb2.ClearResponse(session_id=request.session_id)

    @maps_errors
    async def ListSessions(
        self, request: chat_pb2.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.ListSessionsResponse:
        page = await self._engine.list_sessions(
            self._tenant(context), request.limit or MAX_PAGE, request.cursor or None
        )
        return chat_pb2.ListSessionsResponse(
            session_ids=page.ids, next_cursor=page.next_cursor or ""
        )

    @maps_errors
    async def GetSession(
        self, request: chat_pb2.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> chat_pb2.GetSessionResponse:
        exchanges = await self._engine.history(request.session_id, self._tenant(context))
        return chat_pb2.GetSessionResponse(
            session_id=request.session_id,
            exchanges=[chat_pb2.Exchange(user=e.user, assistant=e.assistant) for e in exchanges],
        )
