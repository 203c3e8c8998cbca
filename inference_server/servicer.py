"""gRPC servicer: protobuf in, domain dataclasses to the engine, protobuf out.

Engine errors become gRPC status codes here, in ``status_for``, and nowhere else.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any, Literal, TypeVar

import grpc

from llamachat.v1 import chat_pb2, chat_pb2_grpc
from llamachat_process.tenants import KeyRing

from . import domain
from .engine_api import MAX_PAGE, Engine
from .errors import (
    EngineError,
    EngineFailed,
    EngineNotReady,
    HistoryChanged,
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
    HistoryChanged: grpc.StatusCode.ABORTED,
}

ROLES = {
    chat_pb2.ROLE_SYSTEM: domain.Role.SYSTEM,
    chat_pb2.ROLE_USER: domain.Role.USER,
    chat_pb2.ROLE_ASSISTANT: domain.Role.ASSISTANT,
    chat_pb2.ROLE_TOOL: domain.Role.TOOL,
}

TOOL_CHOICES: dict[int, Literal["auto", "none", "required", "function"]] = {
    chat_pb2.TOOL_CHOICE_UNSPECIFIED: "auto",
    chat_pb2.TOOL_CHOICE_AUTO: "auto",
    chat_pb2.TOOL_CHOICE_NONE: "none",
    chat_pb2.TOOL_CHOICE_REQUIRED: "required",
    chat_pb2.TOOL_CHOICE_FUNCTION: "function",
}

FINISH_REASONS = {
    domain.FinishReason.STOP: chat_pb2.FINISH_REASON_STOP,
    domain.FinishReason.LENGTH: chat_pb2.FINISH_REASON_LENGTH,
    domain.FinishReason.CANCELLED: chat_pb2.FINISH_REASON_CANCELLED,
    domain.FinishReason.TOOL_CALLS: chat_pb2.FINISH_REASON_TOOL_CALLS,
}


def status_for(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status of an exception raised while serving a call."""
    for error_type, code in STATUS_FOR_ERROR.items():
        if isinstance(error, error_type):
            return code, str(error)
    log.exception("generation failed", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"Generation error: {error}"


Handler = TypeVar("Handler", bound=Callable[..., Any])


# Trailing metadata of an INVALID_ARGUMENT: the field at fault and a code that
# clients act on (OpenAI's param and code: "context_length_exceeded").
PARAM_KEY = "error-param"
CODE_KEY = "error-code"
# Metadata naming the replica that answered: initial metadata of a stream
# (sent with its first message, so a gateway knows it before relaying any) and
# trailing metadata of every call.
REPLICA_KEY = "x-core-replica"


def error_metadata(error: Exception) -> tuple[tuple[str, str], ...]:
    if not isinstance(error, InvalidRequest):
        return ()
    found = ((PARAM_KEY, error.param), (CODE_KEY, error.code))
    return tuple((key, value) for key, value in found if value)


def maps_errors(method: Handler) -> Handler:
    """Abort the call with ``status_for`` when a handler raises."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        context.set_trailing_metadata(self.replica_metadata)
        try:
            return await method(self, request, context)
        except Exception as error:  # every error is mapped to a status, none is lost
            context.set_trailing_metadata((*self.replica_metadata, *error_metadata(error)))
            await context.abort(*status_for(error))

    return wrapper  # type: ignore[return-value]


def to_domain(
    request: chat_pb2.ChatRequest | chat_pb2.ChatStreamRequest, tenant: str
) -> domain.ChatRequest:
    """The engine's request from either protobuf request (they share their fields)."""
    if request.options.logprobs:
        raise InvalidRequest("logprobs are reported by Complete only", param="logprobs")
    return domain.ChatRequest(
        message=request.message,
        session_id=request.session_id or None,
        sampling=sampling_of(request),
        tenant=tenant,
        request_id=request.request_id or None,
    )


def sampling_of(request: Any) -> domain.SamplingParams:
    """The sampling fields every request type shares; unset ones stay ``None``."""

    def optional(message: Any, field: str) -> Any:
        return getattr(message, field) if message.HasField(field) else None

    options = request.options
    return domain.SamplingParams(
        temperature=optional(request, "temperature"),
        top_p=optional(request, "top_p"),
        max_tokens=optional(request, "max_tokens"),
        seed=optional(request, "seed"),
        top_k=optional(options, "top_k"),
        min_p=optional(options, "min_p"),
        repeat_penalty=optional(options, "repeat_penalty"),
        frequency_penalty=optional(options, "frequency_penalty"),
        presence_penalty=optional(options, "presence_penalty"),
        logit_bias=tuple(sorted(options.logit_bias.items())),
        json_schema=options.json_schema or None,
        json_object=options.json_object,
        grammar=options.grammar or None,
        logprobs=options.top_logprobs if options.logprobs else None,
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
                f"messages[{index}].role must be ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT "
                "or ROLE_TOOL",
                param=f"messages[{index}].role",
            )
        calls = tuple(
            domain.ToolCall(call.id, call.name, json_object(call.arguments_json, "tool_calls"))
            for call in message.tool_calls
        )
        messages.append(domain.Message(role, message.content, calls, message.tool_call_id or None))
    tools = tuple(
        domain.ToolSpec(
            tool.name,
            tool.description,
            json.loads(json_object(tool.parameters_json or "{}", "tools")),
        )
        for tool in request.tools
    )
    return domain.CompletionRequest(
        messages=tuple(messages),
        sampling=sampling_of(request),
        stop=tuple(request.stop),
        tenant=tenant,
        tools=tools,
        tool_choice=domain.ToolChoice(
            TOOL_CHOICES[request.tool_choice], request.tool_choice_function or None
        ),
        parallel_tool_calls=(
            request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True
        ),
        prompt=request.prompt or None,
        suffix=request.suffix or None,
    )


def json_object(text: str, param: str) -> str:
    """``text`` if it is a JSON object, else ``InvalidRequest`` naming ``param``."""
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise InvalidRequest(f"{param}: not valid JSON: {error}", param=param) from error
    if not isinstance(parsed, dict):
        raise InvalidRequest(f"{param}: a JSON object is needed", param=param)
    return text


def tool_calls_of(result: domain.ChatResult) -> list[chat_pb2.ToolCall]:
    return [
        chat_pb2.ToolCall(id=call.id, name=call.name, arguments_json=call.arguments)
        for call in result.tool_calls
    ]


def logprobs_of(result: domain.ChatResult) -> list[chat_pb2.TokenLogprob]:
    return [
        chat_pb2.TokenLogprob(
            token=entry.token,
            token_bytes=entry.token_bytes,
            logprob=entry.logprob,
            top_logprobs=[
                chat_pb2.TopLogprob(
                    token=top.token, token_bytes=top.token_bytes, logprob=top.logprob
                )
                for top in entry.top
            ],
        )
        for entry in result.logprobs
    ]


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
    headers: tuple[tuple[str, str], ...] = (),
) -> None:
    """Write an engine stream: a ``piece(text)`` per ``TextDelta``, then
    ``last(result)``. Written with context.write rather than yield, so that a
    cancelled call raises here and aclosing closes the engine's stream at
    once, which stops generation within one token. ``headers`` go out with the
    first message, not before: until then a client may still retry the call
    elsewhere."""
    async with aclosing(events) as stream:
        async for event in stream:
            if headers:
                await context.send_initial_metadata(headers)
                headers = ()
            if isinstance(event, domain.TextDelta):
                await context.write(piece(event.text))
            else:
                await context.write(last(event))


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    """``llamachat.v1.ChatService`` on an ``Engine``; every call acts for the
    tenant its key names (``keys``: none configured, one tenant for all)."""

    def __init__(self, engine: Engine, keys: KeyRing | None = None, replica: str = "") -> None:
        self._engine = engine
        self._keys = keys or KeyRing()
        self.replica_metadata = ((REPLICA_KEY, replica),) if replica else ()

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
            self.replica_metadata,
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
            logprobs=logprobs_of(result),
            tool_calls=tool_calls_of(result),
        )

    @maps_errors
    async def CompleteStream(
        self, request: chat_pb2.CompleteStreamRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await write_stream(
            context,
            self._engine.complete_stream(completion_of(request, self._tenant(context))),
            lambda result: chat_pb2.CompleteStreamResponse(
                finish_reason=FINISH_REASONS[result.finish_reason],
                usage=usage_of(result),
                logprobs=logprobs_of(result),
                tool_calls=tool_calls_of(result),
            ),
            lambda text: chat_pb2.CompleteStreamResponse(text=text),
            self.replica_metadata,
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
            details=(
                chat_pb2.ModelDetails(**dataclasses.asdict(model.details))
                if model.details is not None
                else None
            ),
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
