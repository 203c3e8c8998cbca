"""``POST /v1/completions``: OpenAI's legacy text completion, a raw prompt
continued with no chat template (what LlamaIndex's ``OpenAILike`` with
``is_chat_model=False``, Continue's autocomplete and the openai SDK's
``completions.create`` call). The core's ``Complete`` with ``prompt`` set.
``suffix`` is fill-in-the-middle (400 for a model without its tokens);
``echo`` and ``n``/``best_of`` above 1 are refused with a 400 naming them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request

from llamachat.v1 import chat_pb2

from . import openai_schemas as oa
from .affinity import with_session_key
from .disconnect import unless_disconnected
from .errors import ApiError
from .observe import note
from .openai_requests import FINISH_REASONS, STOPPED_EARLY, sampling_options
from .openai_routes import ERRORS, relay_chunks, require_model, served_model, usage_of
from .routes import CallOptions, ChatStub, to_grpc_message
from .sse import event_stream

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])


def prompt_fields(body: oa.CompletionRequest) -> dict[str, Any]:
    """The fields of a ``CompleteRequest`` with a raw prompt."""
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise ApiError(400, "prompt: give one prompt (n=1)", param="prompt")
        prompt = body.prompt[0]
    else:
        prompt = body.prompt
    if not prompt:
        raise ApiError(400, "prompt cannot be empty", param="prompt")
    for param, unsupported, reason in [
        ("n", body.n not in (None, 1), "only n=1 is supported"),
        ("best_of", body.best_of not in (None, 1), "only best_of=1 is supported"),
        ("echo", bool(body.echo), "echo is not supported"),
        (
            "stream_options",
            body.stream_options is not None and not body.stream,
            "stream_options is only allowed when stream is true",
        ),
    ]:
        if unsupported:
            raise ApiError(400, f"{param}: {reason}", param=param, code="unsupported_parameter")
    fields: dict[str, Any] = {
        "prompt": prompt,
        "suffix": body.suffix,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_tokens": body.max_tokens,
        "seed": None if body.seed == -1 else body.seed,
        "stop": [body.stop] if isinstance(body.stop, str) else body.stop,
        "options": sampling_options(body, body.logprobs),
    }
    return {name: value for name, value in fields.items() if value is not None}


def logprobs_of(reply: Any, asked: int | None) -> oa.CompletionLogprobs | None:
    """The legacy ``logprobs`` shape: tokens, their log probabilities, the
    top alternatives of each, and where each token starts in the text."""
    if asked is None:
        return None
    offsets, at = [], 0
    for entry in reply.logprobs:
        offsets.append(at)
        at += len(entry.token)
    return oa.CompletionLogprobs(
        tokens=[entry.token for entry in reply.logprobs],
        token_logprobs=[entry.logprob for entry in reply.logprobs],
        top_logprobs=[
            {top.token: top.logprob for top in entry.top_logprobs} for entry in reply.logprobs
        ],
        text_offset=offsets,
    )


@router.post(
    "/completions",
    response_model=oa.TextCompletion,
    responses={200: {"content": {"text/event-stream": {}}}, **ERRORS},
)
async def completions(
    request: Request, body: oa.CompletionRequest, stub: ChatStub, options: CallOptions
) -> Any:
    """The continuation of ``prompt``; with ``stream: true``, as Server-Sent
    Events of ``text_completion`` objects ending in ``[DONE]``."""
    fields = prompt_fields(body)
    options = with_session_key(options, body.user)  # X-Session-Id first, then user
    model = await served_model(stub, options)
    require_model(request, body.model, model.id)
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model.id}
    if not body.stream:
        call = stub.Complete(to_grpc_message(chat_pb2.CompleteRequest, fields), **options)
        reply = await unless_disconnected(request, call, call)
        note(request, usage=reply.usage)
        if reply.finish_reason not in FINISH_REASONS:
            raise ApiError(503, STOPPED_EARLY)
        choice = oa.CompletionChoice(
            text=reply.text,
            finish_reason=FINISH_REASONS[reply.finish_reason],
            logprobs=logprobs_of(reply, body.logprobs),
        )
        return oa.TextCompletion(**base, choices=[choice], usage=usage_of(reply.usage))
    stream_call = stub.CompleteStream(
        to_grpc_message(chat_pb2.CompleteStreamRequest, fields), **options
    )
    messages = aiter(stream_call)
    first = await unless_disconnected(request, stream_call, anext(messages))
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return event_stream(
        relay_chunks(
            first,
            messages,
            stream_call,
            TextChunks(base, body.logprobs),
            include_usage,
            on_usage=lambda usage: note(request, usage=usage, delivered=True),
            on_error=lambda: note(request, stream_error=True),
        )
    )


class TextChunks:
    """``text_completion`` objects of one streamed text completion."""

    def __init__(self, base: dict[str, Any], logprobs: int | None) -> None:
        self.base = {**base, "object": "text_completion"}
        self.logprobs = logprobs

    def chunk(self, text: str, finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        choice = {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": finish}
        return {**self.base, "choices": [choice]}

    def opening(self) -> list[dict[str, Any]]:
        return []

    def piece(self, text: str) -> dict[str, Any]:
        return self.chunk(text)

    def finish(self, last: chat_pb2.CompleteStreamResponse) -> list[dict[str, Any]]:
        found = logprobs_of(last, self.logprobs)
        reason = FINISH_REASONS[last.finish_reason]
        return [self.chunk("", reason, found.model_dump() if found else None)]

    def usage(self, usage: chat_pb2.Usage) -> dict[str, Any]:
        return {**self.base, "choices": [], "usage": usage_of(usage).model_dump()}
