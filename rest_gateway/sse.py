"""Relay of a gRPC ``ChatStream`` as Server-Sent Events.

The documented stream: ``data: {"token": "..."}`` per piece of text, then
``data: {"done": true, "session_id": "...", "tokens_used": N, "finish_reason": "..."}``.
An error after the response has started (its 200 is already sent) is sent as a
last event ``data: {"error": "..."}``, then the stream ends.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from fastapi.responses import StreamingResponse

from llamachat.v1 import chat_pb2

from .errors import detail_of

T = TypeVar("T")

FINISH_REASON_NAMES = {
    chat_pb2.FINISH_REASON_STOP: "stop",
    chat_pb2.FINISH_REASON_LENGTH: "length",
    chat_pb2.FINISH_REASON_CANCELLED: "cancelled",
}


def sse_event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """A response of Server-Sent Events, which no proxy should buffer or cache."""
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def event_of(message: chat_pb2.ChatStreamResponse) -> dict[str, Any]:
    """The SSE payload of one stream message: a token, or the final ``done``."""
    if message.finish_reason == chat_pb2.FINISH_REASON_UNSPECIFIED:
        return {"token": message.text}
    return {
        "done": True,
        "session_id": message.session_id,
        "tokens_used": message.usage.completion_tokens,
        "finish_reason": FINISH_REASON_NAMES[message.finish_reason],
    }


async def relay(
    first: chat_pb2.ChatStreamResponse,
    rest: AsyncIterator[chat_pb2.ChatStreamResponse],
    call: grpc.aio.UnaryStreamCall,
    on_done: Callable[[chat_pb2.ChatStreamResponse], None] = lambda done: None,
    on_error: Callable[[], None] = lambda: None,
) -> AsyncIterator[str]:
    """SSE lines for a stream whose first message has already arrived;
    ``on_done`` gets the last message (session id and usage) as its event
    is sent, ``on_error`` is called as an error event is.

    When the HTTP client goes away, Starlette cancels this generator and the
    ``finally`` cancels the gRPC call, which stops generation in the core.
    """
    try:
        async for message in chain(first, rest):
            last = message.finish_reason != chat_pb2.FINISH_REASON_UNSPECIFIED
            if last:
                on_done(message)
            yield sse_event(event_of(message))
            if last:  # the response ends here, not when the call's status comes
                break
    except grpc.aio.AioRpcError as error:
        on_error()
        yield sse_event({"error": detail_of(error)})
    finally:
        call.cancel()


async def chain(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    yield first
    async for item in rest:
        yield item
