"""OpenAI-compatible endpoints: ``POST /v1/chat/completions`` and ``GET /v1/models``.

A completion is stateless, as in OpenAI's API: the client sends the whole
conversation every time, and the core's ``Complete``/``CompleteStream`` keep
nothing (use ``/chat`` for server-kept sessions). Errors come in OpenAI's
shape (``errors.error_response``), so OpenAI's SDKs raise their usual
exceptions. The model must be named as ``GET /v1/models`` lists it, as with
OpenAI and vLLM (404 ``model_not_found`` otherwise).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from fastapi import APIRouter, Request

from llamachat.v1 import chat_pb2, chat_pb2_grpc

from . import openai_schemas as oa
from .disconnect import unless_disconnected
from .errors import ApiError, detail_of, documented_errors, http_status_for, openai_error
from .observe import note
from .routes import CallOptions, ChatStub, to_grpc_message
from .sse import chain, event_stream, sse_event

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

ERRORS = documented_errors(
    oa.OpenAIError,
    {
        400: "Bad parameter, unsupported parameter, or a conversation too long",
        401: "Missing or invalid API key",
        404: "No such model",
        429: "Every slot busy and the queue full: retry after Retry-After seconds",
        503: "Model not loaded, or the inference core is unreachable",
    },
)

ROLES = {
    "system": chat_pb2.ROLE_SYSTEM,
    "developer": chat_pb2.ROLE_SYSTEM,
    "user": chat_pb2.ROLE_USER,
    "assistant": chat_pb2.ROLE_ASSISTANT,
}

FINISH_REASONS = {
    chat_pb2.FINISH_REASON_STOP: "stop",
    chat_pb2.FINISH_REASON_LENGTH: "length",
}

# A generation the core stopped before its end (it is shutting down) is no
# reply at all: OpenAI's finish reasons have no word for it.
STOPPED_EARLY = "Generation was stopped before the reply ended (the server is shutting down); retry"


def refuse_unsupported(body: oa.ChatCompletionRequest) -> None:
    """A 400 naming the first parameter that asks for what this server cannot do."""
    checks: list[tuple[str, bool, str]] = [
        ("n", body.n not in (None, 1), "only n=1 is supported"),
        ("tools", bool(body.tools or body.functions), "tools and functions are not supported"),
        ("tool_choice", body.tool_choice not in (None, "none"), "tools are not supported"),
        ("logprobs", bool(body.logprobs or body.top_logprobs), "logprobs are not supported"),
        (
            "response_format",
            body.response_format is not None and body.response_format.get("type") != "text",
            "only the text response format is supported",
        ),
        ("presence_penalty", bool(body.presence_penalty), "penalties are not supported"),
        ("frequency_penalty", bool(body.frequency_penalty), "penalties are not supported"),
        ("logit_bias", bool(body.logit_bias), "logit_bias is not supported"),
    ]
    for param, unsupported, reason in checks:
        if unsupported:
            raise ApiError(400, f"{param}: {reason}", param=param, code="unsupported_parameter")


def completion_fields(body: oa.ChatCompletionRequest) -> dict[str, Any]:
    """The fields of a ``CompleteRequest``/``CompleteStreamRequest``."""
    refuse_unsupported(body)
    messages = []
    for index, message in enumerate(body.messages):
        role = ROLES.get(message.role)
        if role is None:
            raise ApiError(
                400,
                f"messages[{index}].role: {message.role!r} is not one of "
                "system, developer, user, assistant",
                param=f"messages[{index}].role",
            )
        # A dict: the message is built (and its text checked) by to_grpc_message.
        messages.append({"role": role, "content": message.text()})
    fields: dict[str, Any] = {
        "messages": messages,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_tokens": (
            body.max_completion_tokens
            if body.max_completion_tokens is not None
            else body.max_tokens
        ),
        "seed": body.seed,
        "stop": [body.stop] if isinstance(body.stop, str) else body.stop,
    }
    return {name: value for name, value in fields.items() if value is not None}


def first_set(*values: int | None) -> int | None:
    return next((value for value in values if value is not None), None)


async def served_model(stub: chat_pb2_grpc.ChatServiceStub, options: dict[str, Any]) -> Any:
    return await stub.GetModel(chat_pb2.GetModelRequest(), **options)


def model_card(request: Request, model: Any) -> oa.ModelCard:
    return oa.ModelCard(
        id=model.id, created=request.app.state.started, context_length=model.context_size
    )


@router.get("/models", response_model=oa.ModelList, responses=ERRORS)
async def list_models(request: Request, stub: ChatStub, options: CallOptions) -> oa.ModelList:
    """The model this server serves (one)."""
    return oa.ModelList(data=[model_card(request, await served_model(stub, options))])


@router.get("/models/{model_id:path}", response_model=oa.ModelCard, responses=ERRORS)
async def get_model(
    model_id: str, request: Request, stub: ChatStub, options: CallOptions
) -> oa.ModelCard:
    """One model, by id (404 ``model_not_found`` if not served)."""
    model = await served_model(stub, options)
    require_model(model_id, model.id)
    return model_card(request, model)


def require_model(requested: str, served: str) -> None:
    if requested != served:
        raise ApiError(
            404,
            f"The model {requested!r} does not exist: this server serves {served!r} "
            "(see GET /v1/models)",
            param="model",
            code="model_not_found",
        )


@router.post(
    "/chat/completions",
    response_model=oa.ChatCompletion,
    responses={200: {"content": {"text/event-stream": {}}}, **ERRORS},
)
async def chat_completions(
    request: Request, body: oa.ChatCompletionRequest, stub: ChatStub, options: CallOptions
) -> Any:
    """A reply to the conversation in ``messages``; with ``stream: true``, as
    Server-Sent Events of ``chat.completion.chunk`` objects ending in ``[DONE]``."""
    fields = completion_fields(body)
    model = await served_model(stub, options)
    require_model(body.model, model.id)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if not body.stream:
        call = stub.Complete(to_grpc_message(chat_pb2.CompleteRequest, fields), **options)
        reply = await unless_disconnected(request, call, call)
        note(request, usage=reply.usage)
        if reply.finish_reason not in FINISH_REASONS:
            raise ApiError(503, STOPPED_EARLY)
        return oa.ChatCompletion(
            id=completion_id,
            created=created,
            model=model.id,
            choices=[
                oa.Choice(
                    message=oa.AssistantMessage(content=reply.text),
                    finish_reason=FINISH_REASONS[reply.finish_reason],
                )
            ],
            usage=usage_of(reply.usage),
        )
    stream_call = stub.CompleteStream(
        to_grpc_message(chat_pb2.CompleteStreamRequest, fields), **options
    )
    messages = aiter(stream_call)
    first = await unless_disconnected(request, stream_call, anext(messages))
    chunk = ChunkMaker(completion_id, created, model.id)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return event_stream(
        relay_chunks(
            first,
            messages,
            stream_call,
            chunk,
            include_usage,
            on_usage=lambda usage: note(request, usage=usage, delivered=True),
            on_error=lambda: note(request, stream_error=True),
        )
    )


def usage_of(usage: chat_pb2.Usage) -> oa.CompletionUsage:
    return oa.CompletionUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=oa.PromptTokensDetails(cached_tokens=usage.cached_prompt_tokens),
    )


class ChunkMaker:
    """``chat.completion.chunk`` objects of one streamed completion."""

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        self.base = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }

    def delta(self, delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self.base, "choices": [choice]}

    def usage(self, usage: chat_pb2.Usage) -> dict[str, Any]:
        return {**self.base, "choices": [], "usage": usage_of(usage).model_dump()}


# The event that ends an OpenAI stream.
DONE_EVENT = "data: [DONE]\n\n"


async def relay_chunks(
    first: chat_pb2.CompleteStreamResponse,
    rest: AsyncIterator[chat_pb2.CompleteStreamResponse],
    call: grpc.aio.UnaryStreamCall,
    chunk: ChunkMaker,
    include_usage: bool,
    on_usage: Callable[[chat_pb2.Usage], None],
    on_error: Callable[[], None] = lambda: None,
) -> AsyncIterator[str]:
    """The SSE stream of a ``CompleteStream`` whose first message has arrived:
    a first chunk with the role, one per piece of text, one with the finish
    reason, one with the usage if asked for, then ``[DONE]``. An error after
    the 200 was sent comes as a last ``{"error": ...}`` event, as vLLM sends it.
    ``on_usage`` gets the usage as the last events are sent, ``on_error`` is
    called as an error event is. The ``finally`` cancels the call when the
    client goes away."""

    try:
        yield sse_event(chunk.delta({"role": "assistant", "content": ""}))
        async for message in chain(first, rest):
            if message.finish_reason == chat_pb2.FINISH_REASON_UNSPECIFIED:
                yield sse_event(chunk.delta({"content": message.text}))
                continue
            on_usage(message.usage)
            if message.finish_reason not in FINISH_REASONS:
                on_error()
                yield sse_event(openai_error(503, STOPPED_EARLY))
                break
            yield sse_event(chunk.delta({}, FINISH_REASONS[message.finish_reason]))
            if include_usage:
                yield sse_event(chunk.usage(message.usage))
            break  # the response ends here, not when the call's status comes
        yield DONE_EVENT
    except grpc.aio.AioRpcError as error:
        on_error()
        yield sse_event(openai_error(http_status_for(error.code()), detail_of(error)))
        yield DONE_EVENT
    finally:
        call.cancel()
