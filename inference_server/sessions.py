"""Session histories: each session's most recent exchanges, per tenant.

``SessionStore`` is the interface the engine uses. Three stores implement
it: ``sqlite_sessions.SqliteSessionStore`` (the default; durable, every
exchange committed before it is acknowledged), ``InMemorySessionStore``
(``SESSION_DB=:memory:``; lost on restart), and
``postgres_sessions.PostgresSessionStore``
(``SESSION_DB=postgresql://...``), which several replicas of the core share.

Every session has a version, which changes with each exchange added and when
the session is cleared (0: no such session). A turn reads the history and its
version together (``read``) and builds its prompt from them; ``append`` with
that ``expected_version`` keeps the turn only if the history is still that one
(else ``HistoryChanged``, and nothing is kept), so a clear or another replica's
turn in between never leaves a reply to a conversation that is not the stored
one. Versions come from one counter of the store and are never reused. A turn
may carry a request id: the store keeps it with the exchange (unique in its
session), and ``read`` answers the reply already kept for it, so that a
retried turn is answered again rather than generated twice. A request id is
remembered as long as its exchange is kept (the window and byte bounds).

A session belongs to a tenant (``llamachat_process.tenants``): the same id in
two tenants is two sessions, and every read, write and listing names its
tenant. Every store keeps at most ``max_sessions`` sessions per tenant (the
least recently used of that tenant go first, so one tenant never evicts
another's), at most ``window`` exchanges and ``max_bytes`` bytes of text per
session (the oldest exchanges go first; the newest always stays), and drop
sessions idle for longer than ``ttl_s`` when ``expire`` runs. A session is
"used" when an exchange is added to it. Listings come in pages, least
recently used first, each with an opaque cursor for the next. No store object
is safe for concurrent use: the engine calls it from one thread (processes
that share a PostgreSQL database are safe with one another).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .domain import Exchange, SessionKey
from .errors import HistoryChanged, InvalidRequest, SessionNotFound

IN_MEMORY = ":memory:"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")

Clock = Callable[[], float]


@dataclass(frozen=True)
class Retention:
    """How much a store keeps: exchanges per session, sessions, idle time."""

    window: int
    """Exchanges kept per session; older ones are dropped."""
    max_sessions: int
    """Sessions kept; past it the least recently used are removed."""
    ttl_s: float
    """Seconds a session may stay unused before ``expire`` removes it; 0: forever."""
    clock: Clock = field(default=time.time, compare=False)
    max_bytes: int = 1024 * 1024
    """UTF-8 bytes of text kept per session; older exchanges are dropped."""


@dataclass(frozen=True)
class SessionPage:
    """Some of a tenant's session ids, least recently used first, and the
    cursor of the page after them (``None``: this is the last)."""

    ids: list[str]
    next_cursor: str | None


@dataclass(frozen=True)
class StoredReply:
    """What a turn with a request id was answered, kept to answer its retries."""

    text: str
    finish_reason: str
    """A ``domain.FinishReason`` value."""
    completion_tokens: int
    message: str
    """The user's message of that turn: a retry sends the same one."""


@dataclass(frozen=True)
class RequestRecord:
    """The request id of a turn being kept, and how its reply ended."""

    request_id: str
    finish_reason: str
    completion_tokens: int


@dataclass(frozen=True)
class VersionedHistory:
    """A session's kept exchanges (oldest first) and the version they are."""

    exchanges: list[Exchange]
    version: int
    """0: there is no such session."""
    replay: StoredReply | None = None
    """The reply kept for the request id ``read`` was asked about, if any."""


def exchange_bytes(exchange: Exchange) -> int:
    return len(exchange.user.encode("utf-8", "surrogatepass")) + len(
        exchange.assistant.encode("utf-8", "surrogatepass")
    )


def parse_cursor(cursor: str | None) -> int:
    """The position a page starts after (0: the first page)."""
    if cursor is None or cursor == "":
        return 0
    if not (cursor.isascii() and cursor.isdigit()) or len(cursor) > 18:
        raise InvalidRequest("cursor is not one this server gave: pass next_cursor as it came")
    return int(cursor)


class SessionStore(Protocol):
    """Where the engine keeps each session's recent exchanges."""

    def history(self, tenant: str, session_id: str) -> list[Exchange] | None:
        """The session's kept exchanges, oldest first; ``None`` for an unknown session."""
        ...

    def read(self, tenant: str, session_id: str, request_id: str | None = None) -> VersionedHistory:
        """The session's kept exchanges and their version, read together (version
        0 and no exchanges for an unknown session); with a request id, also the
        reply kept for it, if that turn is kept."""
        ...

    def append(
        self,
        tenant: str,
        session_id: str,
        exchange: Exchange,
        *,
        expected_version: int | None = None,
        request: RequestRecord | None = None,
    ) -> list[SessionKey]:
        """Add an exchange (durably, where the store is durable) in one
        transaction, creating the session if needed, dropping the oldest
        exchanges beyond the window and the byte bound, and giving the session
        a new version. With ``expected_version`` (from ``read``), raises
        ``HistoryChanged`` and keeps nothing unless the session is still at
        that version; a ``request`` whose id the session keeps already is
        ``HistoryChanged`` too. Returns the tenant's sessions removed to stay
        within ``max_sessions``."""
        ...

    def delete(self, tenant: str, session_id: str) -> None:
        """Forget a session; raises ``SessionNotFound`` if there is none."""
        ...

    def list_sessions(self, tenant: str, limit: int, cursor: str | None = None) -> SessionPage:
        """Up to ``limit`` of the tenant's session ids, least recently used
        first, after ``cursor`` (a ``next_cursor``; ``None``: from the start).
        Raises ``InvalidRequest`` for a cursor this store did not give."""
        ...

    def count(self) -> int:
        """How many sessions there are, of every tenant."""
        ...

    def expire(self) -> list[SessionKey]:
        """Remove the sessions idle for longer than the TTL; returns them."""
        ...

    def check_writable(self) -> None:
        """Write and drop a little data, durably; raises ``SessionStoreError``
        while the store cannot be written (a full disk)."""
        ...

    def close(self) -> None:
        """Release the store's resources."""
        ...


@dataclass(frozen=True)
class _KeptExchange:
    exchange: Exchange
    request: RequestRecord | None


@dataclass
class _KeptSession:
    last_used: float
    use_order: int
    version: int
    exchanges: deque[_KeptExchange]


class InMemorySessionStore:
    """Sessions in a dict, lost on restart."""

    def __init__(self, retention: Retention) -> None:
        self._retention = retention
        # Least recently used first.
        self._sessions: OrderedDict[SessionKey, _KeptSession] = OrderedDict()
        # Per tenant, so that a cursor tells nothing of other tenants' traffic.
        self._use_order: dict[str, int] = {}
        self._last_version = 0

    def history(self, tenant: str, session_id: str) -> list[Exchange] | None:
        kept = self._sessions.get((tenant, session_id))
        return None if kept is None else [k.exchange for k in kept.exchanges]

    def read(self, tenant: str, session_id: str, request_id: str | None = None) -> VersionedHistory:
        kept = self._sessions.get((tenant, session_id))
        if kept is None:
            return VersionedHistory([], 0)
        return VersionedHistory(
            [k.exchange for k in kept.exchanges], kept.version, _replay_of(kept, request_id)
        )

    def append(
        self,
        tenant: str,
        session_id: str,
        exchange: Exchange,
        *,
        expected_version: int | None = None,
        request: RequestRecord | None = None,
    ) -> list[SessionKey]:
        key = (tenant, session_id)
        kept = self._sessions.get(key)
        if expected_version is not None and (kept.version if kept else 0) != expected_version:
            raise HistoryChanged(session_id)
        if request is not None and kept and _replay_of(kept, request.request_id):
            raise HistoryChanged(session_id)
        self._sessions.pop(key, None)
        exchanges = kept.exchanges if kept else deque(maxlen=self._retention.window)
        exchanges.append(_KeptExchange(exchange, request))
        while (
            len(exchanges) > 1
            and sum(exchange_bytes(k.exchange) for k in exchanges) > self._retention.max_bytes
        ):
            exchanges.popleft()
        order = self._use_order[tenant] = self._use_order.get(tenant, 0) + 1
        self._last_version += 1
        self._sessions[key] = _KeptSession(
            self._retention.clock(), order, self._last_version, exchanges
        )
        mine = [k for k in self._sessions if k[0] == tenant]
        removed = mine[: max(0, len(mine) - self._retention.max_sessions)]
        for old in removed:
            del self._sessions[old]
        return removed

    def delete(self, tenant: str, session_id: str) -> None:
        if self._sessions.pop((tenant, session_id), None) is None:
            raise SessionNotFound(session_id)

    def list_sessions(self, tenant: str, limit: int, cursor: str | None = None) -> SessionPage:
        after = parse_cursor(cursor)
        found = [
            (kept.use_order, key[1])
            for key, kept in self._sessions.items()
            if key[0] == tenant and kept.use_order > after
        ]
        page = found[:limit]
        more = len(found) > limit
        return SessionPage([sid for _, sid in page], str(page[-1][0]) if more else None)

    def count(self) -> int:
        return len(self._sessions)

    def expire(self) -> list[SessionKey]:
        if not self._retention.ttl_s:
            return []
        oldest_kept = self._retention.clock() - self._retention.ttl_s
        expired = [key for key, kept in self._sessions.items() if kept.last_used < oldest_kept]
        for key in expired:
            del self._sessions[key]
        return expired

    def check_writable(self) -> None:
        pass  # memory is written as long as the process lives

    def close(self) -> None:
        pass  # nothing to release


def _replay_of(kept: _KeptSession, request_id: str | None) -> StoredReply | None:
    if request_id is None:
        return None
    for k in kept.exchanges:
        if k.request is not None and k.request.request_id == request_id:
            return StoredReply(
                k.exchange.assistant,
                k.request.finish_reason,
                k.request.completion_tokens,
                k.exchange.user,
            )
    return None


def open_session_store(path: str, retention: Retention) -> SessionStore:
    """The store ``SESSION_DB`` names: ``:memory:``, a ``postgresql://`` URL
    (psycopg is imported only then), or a SQLite file."""
    if path == IN_MEMORY:
        return InMemorySessionStore(retention)
    if path.startswith(POSTGRES_SCHEMES):
        from .postgres_sessions import PostgresSessionStore

        return PostgresSessionStore(path, retention)
    from .sqlite_sessions import SqliteSessionStore

    return SqliteSessionStore(path, retention)
