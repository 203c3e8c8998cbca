"""OpenAI-compatible endpoints: ``POST /v1/chat/completions`` and ``GET /v1/models``.

A completion is stateless, as in OpenAI's API: the client sends the whole
conversation every time, and the core's ``Complete``/``CompleteStream`` keep
nothing (use ``/chat`` for server-kept sessions). Errors come in OpenAI's
shape (``errors.error_response``), so OpenAI's SDKs raise their usual
exceptions. Any model name is served by the one model, as llama.cpp's server
does, so that clients which send their own default name (``gpt-3.5-turbo``)
work unmodified; with ``STRICT_MODEL_NAMES`` only the model's id and
``MODEL_ALIASES`` are (404 ``model_not_found`` otherwise, as OpenAI and vLLM).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import grpc
from fastapi import APIRouter, Request

from llamachat.v1 import chat_pb2, chat_pb2_grpc

from . import openai_schemas as oa
from .affinity import with_session_key
from .disconnect import unless_disconnected
from .errors import ApiError, detail_of, documented_errors, http_status_for, openai_error
from .observe import note
from .openai_requests import FINISH_REASONS, STOPPED_EARLY, completion_fields
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


def first_set(*values: int | None) -> int | None:
    return next((value for value in values if value is not None), None)


async def served_model(stub: chat_pb2_grpc.ChatServiceStub, options: dict[str, Any]) -> Any:
    return await stub.GetModel(chat_pb2.GetModelRequest(), **options)


def model_cards(request: Request, model: Any) -> list[oa.ModelCard]:
    """The served model under its id, then under each of ``MODEL_ALIASES``."""
    aliases = request.app.state.settings.model_aliases
    return [
        oa.ModelCard(id=name, created=request.app.state.started, context_length=model.context_size)
        for name in dict.fromkeys([model.id, *aliases])
    ]


@router.get("/models", response_model=oa.ModelList, responses=ERRORS)
async def list_models(request: Request, stub: ChatStub, options: CallOptions) -> oa.ModelList:
    """The model this server serves (one), and its aliases."""
    return oa.ModelList(data=model_cards(request, await served_model(stub, options)))


@router.get("/models/{model_id:path}", response_model=oa.ModelCard, responses=ERRORS)
async def get_model(
    model_id: str, request: Request, stub: ChatStub, options: CallOptions
) -> oa.ModelCard:
    """One model, by id or alias (404 ``model_not_found`` if not listed)."""
    cards = model_cards(request, await served_model(stub, options))
    card = next((card for card in cards if card.id == model_id), None)
    if card is None:
        raise not_served(model_id, cards[0].id)
    return card


def require_model(request: Request, requested: str, served: str) -> None:
    """Any name serves, unless ``STRICT_MODEL_NAMES``: then the id or an alias."""
    settings = request.app.state.settings
    if settings.strict_model_names and requested not in (served, *settings.model_aliases):
        raise not_served(requested, served)


def not_served(requested: str, served: str) -> ApiError:
    return ApiError(
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
    options = with_session_key(options, body.user)  # X-Session-Id first, then user
    model = await served_model(stub, options)
    require_model(request, body.model, model.id)
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
                    message=assistant_message(reply),
                    finish_reason=FINISH_REASONS[reply.finish_reason],
                    logprobs=logprobs_of(reply, body.logprobs),
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


def tool_call_items(reply: Any) -> list[oa.ToolCallItem]:
    return [
        oa.ToolCallItem(
            id=call.id, function=oa.FunctionCall(name=call.name, arguments=call.arguments_json)
        )
        for call in reply.tool_calls
    ]


def assistant_message(reply: Any) -> oa.AssistantMessage:
    """The reply's text, or (content null, as OpenAI's) the tools it called."""
    if reply.tool_calls:
        return oa.AssistantMessage(content=None, tool_calls=tool_call_items(reply))
    return oa.AssistantMessage(content=reply.text)


def logprobs_of(reply: Any, asked: bool | None) -> oa.ChoiceLogprobs | None:
    """OpenAI's ``logprobs`` of a reply's tokens (``None`` unless asked for)."""
    if not asked:
        return None
    return oa.ChoiceLogprobs(
        content=[
            oa.TokenLogprob(
                token=entry.token,
                logprob=entry.logprob,
                bytes=list(entry.token_bytes),
                top_logprobs=[
                    oa.TopLogprob(token=top.token, logprob=top.logprob, bytes=list(top.token_bytes))
                    for top in entry.top_logprobs
                ],
            )
            for entry in reply.logprobs
        ]
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

    def delta(
        self,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        logprobs: oa.ChoiceLogprobs | None = None,
    ) -> dict[str, Any]:
        """A chunk; the finish chunk carries every token's ``logprobs`` when asked."""
        choice = {
            "index": 0,
            "delta": delta,
            "logprobs": logprobs.model_dump() if logprobs is not None else None,
            "finish_reason": finish_reason,
        }
        return {**self.base, "choices": [choice]}

    def opening(self) -> list[dict[str, Any]]:
        return [self.delta({"role": "assistant", "content": ""})]

    def piece(self, text: str) -> dict[str, Any]:
        return self.delta({"content": text})

    def finish(self, last: chat_pb2.CompleteStreamResponse) -> list[dict[str, Any]]:
        """The tool calls (each whole, as OpenAI's first delta of one), then
        the finish reason."""
        chunks = []
        if last.tool_calls:
            calls = [
                {"index": index, **item.model_dump()}
                for index, item in enumerate(tool_call_items(last))
            ]
            chunks.append(self.delta({"tool_calls": calls}))
        reason = FINISH_REASONS[last.finish_reason]
        chunks.append(self.delta({}, reason, logprobs_of(last, bool(last.logprobs))))
        return chunks

    def usage(self, usage: chat_pb2.Usage) -> dict[str, Any]:
        return {**self.base, "choices": [], "usage": usage_of(usage).model_dump()}


class Chunks(Protocol):
    """The events of one kind of OpenAI stream (chat or text completion)."""

    def opening(self) -> list[dict[str, Any]]: ...

    def piece(self, text: str) -> dict[str, Any]: ...

    def finish(self, last: chat_pb2.CompleteStreamResponse) -> list[dict[str, Any]]: ...

    def usage(self, usage: chat_pb2.Usage) -> dict[str, Any]: ...


# The event that ends an OpenAI stream.
DONE_EVENT = "data: [DONE]\n\n"


async def relay_chunks(
    first: chat_pb2.CompleteStreamResponse,
    rest: AsyncIterator[chat_pb2.CompleteStreamResponse],
    call: grpc.aio.UnaryStreamCall,
    chunk: Chunks,
    include_usage: bool,
    on_usage: Callable[[chat_pb2.Usage], None],
    on_error: Callable[[], None] = lambda: None,
) -> AsyncIterator[str]:
    """The SSE stream of a ``CompleteStream`` whose first message has arrived:
    ``chunk``'s opening chunks, one per piece of text, its finish chunks, one
    with the usage if asked for, then ``[DONE]``. An error after
    the 200 was sent comes as a last ``{"error": ...}`` event, as vLLM sends it.
    ``on_usage`` gets the usage as the last events are sent, ``on_error`` is
    called as an error event is. The ``finally`` cancels the call when the
    client goes away."""

    try:
        for opening in chunk.opening():
            yield sse_event(opening)
        async for message in chain(first, rest):
            if message.finish_reason == chat_pb2.FINISH_REASON_UNSPECIFIED:
                yield sse_event(chunk.piece(message.text))
                continue
            on_usage(message.usage)
            if message.finish_reason not in FINISH_REASONS:
                on_error()
                yield sse_event(openai_error(503, STOPPED_EARLY))
                break
            for finish in chunk.finish(message):
                yield sse_event(finish)
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
