"""Per request, as it ends: the Prometheus request metrics and one structured
log line (method, path, status, session, tokens, time to first byte of a
stream, duration).

``RequestObserver`` wraps the whole app; routes add what only they know
(the session, the token counts) with ``note``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import GatewayMetrics

log = logging.getLogger("rest_gateway.requests")

NOTES = "observed"
CLIENT_CLOSED = 499
# The status label of a stream that began with 200 and ended with an error event.
STREAM_ERROR = "stream_error"


def note(
    request: Request,
    *,
    session: str | None = None,
    usage: Any = None,
    delivered: bool = False,
    stream_error: bool = False,
) -> None:
    """Add a request's session and token counts (a ``chat_pb2.Usage``) to its
    log line; ``delivered``: a stream's last events are being sent (a client
    that closes the connection then, before the response's very end, got the
    whole reply); ``stream_error``: a stream ends with an error event."""
    fields = request.scope.get("state", {}).get(NOTES)
    if fields is None:  # not behind a RequestObserver (unit tests of one route)
        return
    if session:
        fields["session"] = session
    if delivered:
        fields["delivered"] = True
    if stream_error:
        fields["stream_error"] = True
    if usage is not None:
        fields["prompt_tokens"] = usage.prompt_tokens
        fields["cached_tokens"] = usage.cached_prompt_tokens
        fields["completion_tokens"] = usage.completion_tokens


class RequestObserver:
    """ASGI middleware: metrics and a log line for every HTTP request."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        fields: dict[str, Any] = {}
        scope.setdefault("state", {})[NOTES] = fields
        status: int | str = 500  # if the app fails before it answers
        streamed = completed = False
        first_byte: float | None = None

        async def observed_send(message: Message) -> None:
            nonlocal status, streamed, completed, first_byte
            if message["type"] == "http.response.start":
                status = message["status"]
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                streamed = content_type.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body":
                if first_byte is None and message.get("body"):
                    first_byte = time.monotonic()
                completed = not message.get("more_body", False)
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except BaseException:
            if isinstance(status, int) and status < 400:  # failed after a 200 began
                status = 500
            raise
        finally:
            if fields.get("stream_error"):
                status = STREAM_ERROR  # a 200 that ended in an error event
            elif (
                not (completed or fields.get("delivered"))
                and isinstance(status, int)
                and status < 400
            ):
                # The response began but never ended: the client went away
                # mid-stream (499, as nginx logs it), not a 200.
                status = CLIENT_CLOSED
            duration = time.monotonic() - started
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(scope["method"], endpoint, status, duration)
            line: dict[str, Any] = {
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "session": fields.get("session"),
                "prompt_tokens": fields.get("prompt_tokens"),
                "cached_tokens": fields.get("cached_tokens"),
                "completion_tokens": fields.get("completion_tokens"),
                "ttft_s": round(first_byte - started, 4) if streamed and first_byte else None,
                "duration_s": round(duration, 4),
            }
            log.info(
                "request %s",
                " ".join(f"{key}={value}" for key, value in line.items() if value is not None),
                extra=line,
            )
