"""A session's turns, one after another: each turn's prompt holds the
previous turn's reply."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from .domain import SessionKey
from .errors import SessionBusy


class SessionTurns:
    """One fair ``asyncio.Lock`` per session in use: a session's turns run one
    after another, in arrival order; different sessions run side by side.

    At most one turn waits for a session's running turn; a further one is
    refused at once (``SessionBusy``), so that one session cannot pile up
    requests. A waiting turn takes no slot and no place in the engine's queue.
    """

    def __init__(self) -> None:
        self._locks: dict[SessionKey, tuple[asyncio.Lock, int]] = {}

    @property
    def waiting(self) -> int:
        """Turns waiting for their session's running turn."""
        return sum(max(0, users - 1) for _, users in self._locks.values())

    @asynccontextmanager
    async def hold(self, session: SessionKey) -> AsyncIterator[None]:
        lock, users = self._locks.get(session, (asyncio.Lock(), 0))
        if users >= 2:
            raise SessionBusy(session[1])
        self._locks[session] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[session]
            if users == 1:
                del self._locks[session]
            else:
                self._locks[session] = (lock, users - 1)
