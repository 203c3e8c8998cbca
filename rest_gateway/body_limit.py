"""Request body size limit, answered in the API's error shape (413)."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response


class BodySizeLimit:
    """Refuse request bodies larger than ``max_bytes``.

    A too-large ``Content-Length`` is refused before the body is read; a body
    sent without one (chunked) is counted as it arrives, and the route's body
    parsing turns the ``HTTPException`` raised past the limit into the 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def detail(self, size: int | str) -> str:
        return f"Request body too large: {size} bytes, the limit is {self.max_bytes}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(scope["path"], 413, self.detail(int(declared)))
            await response(scope, receive, send)
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self.detail(f"more than {self.max_bytes}"))
            return message

        await self.app(scope, counted_receive, send)
