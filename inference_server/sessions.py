"""Session histories: each session's most recent exchanges.

``SessionStore`` is the interface the engine uses, so that a durable or shared
store can replace the in-memory one without touching the engine.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Protocol

from .domain import Exchange
from .errors import SessionNotFound


class SessionStore(Protocol):
    """Where the engine keeps each session's recent exchanges."""

    def history(self, session_id: str) -> list[Exchange]:
        """The session's kept exchanges, oldest first; empty for an unknown session."""
        ...

    def append(self, session_id: str, exchange: Exchange) -> None:
        """Add an exchange, creating the session if needed and dropping the oldest
        exchanges beyond the window."""
        ...

    def delete(self, session_id: str) -> None:
        """Forget a session; raises ``SessionNotFound`` if there is none."""
        ...

    def session_ids(self) -> list[str]:
        """All session ids, least recently used first."""
        ...


class InMemorySessionStore:
    """Sessions in a dict, lost on restart (the documented behaviour).

    Not thread-safe: the engine uses it from the event loop only.
    """

    def __init__(self, window: int) -> None:
        self._window = window
        self._sessions: OrderedDict[str, deque[Exchange]] = OrderedDict()

    def history(self, session_id: str) -> list[Exchange]:
        return list(self._sessions.get(session_id, ()))

    def append(self, session_id: str, exchange: Exchange) -> None:
        exchanges = self._sessions.setdefault(session_id, deque(maxlen=self._window))
        exchanges.append(exchange)
        self._sessions.move_to_end(session_id)

    def delete(self, session_id: str) -> None:
        if self._sessions.pop(session_id, None) is None:
            raise SessionNotFound(session_id)

    def session_ids(self) -> list[str]:
        return list(self._sessions)
