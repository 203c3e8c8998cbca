"""Cancel a call to the core when the HTTP client goes away before the response starts.

Starlette cancels a streaming response when its client disconnects, but not a
route that is still waiting for the core (a whole ``/chat`` reply, or the
first piece of a stream). ``unless_disconnected`` races that wait against the
client's disconnect, so that a client that gives up frees the core at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import grpc
from fastapi import Request

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The HTTP client closed the connection before the response started."""


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, call: grpc.aio.Call, step: Awaitable[T]) -> T:
    """Await ``step`` of ``call``; if the client disconnects first, cancel the
    call and raise ``ClientDisconnected``."""
    waiting = asyncio.ensure_future(step)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({waiting, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        waiting.cancel()
        call.cancel()
        raise
    finally:
        watcher.cancel()
    if not waiting.done():
        waiting.cancel()
        call.cancel()
        raise ClientDisconnected()
    return waiting.result()
