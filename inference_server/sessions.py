"""Session histories: each session's most recent exchanges.

``SessionStore`` is the interface the engine uses, so that a shared store (for
several replicas) can replace these without touching the engine. Two stores
implement it: ``SqliteSessionStore`` (the default; durable, every exchange
committed before it is acknowledged) and ``InMemorySessionStore``
(``SESSION_DB=:memory:``; lost on restart).

Both keep at most ``max_sessions`` sessions (the least recently used go first)
and drop sessions idle for longer than ``ttl_s`` when ``expire`` runs. A
session is "used" when an exchange is added to it. Neither store is safe for
concurrent use: the engine calls it from one thread.
"""

from __future__ import annotations

import sqlite3
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .domain import Exchange
from .errors import SessionNotFound, SessionStoreError

IN_MEMORY = ":memory:"

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


class SessionStore(Protocol):
    """Where the engine keeps each session's recent exchanges."""

    def history(self, session_id: str) -> list[Exchange] | None:
        """The session's kept exchanges, oldest first; ``None`` for an unknown session."""
        ...

    def append(self, session_id: str, exchange: Exchange) -> list[str]:
        """Add an exchange (durably, where the store is durable), creating the
        session if needed and dropping the oldest exchanges beyond the window.
        Returns the sessions removed to stay within ``max_sessions``."""
        ...

    def delete(self, session_id: str) -> None:
        """Forget a session; raises ``SessionNotFound`` if there is none."""
        ...

    def session_ids(self) -> list[str]:
        """All session ids, least recently used first."""
        ...

    def count(self) -> int:
        """How many sessions there are."""
        ...

    def expire(self) -> list[str]:
        """Remove the sessions idle for longer than the TTL; returns their ids."""
        ...

    def check_writable(self) -> None:
        """Write and drop a little data, durably; raises ``SessionStoreError``
        while the store cannot be written (a full disk)."""
        ...

    def close(self) -> None:
        """Release the store's resources."""
        ...


class InMemorySessionStore:
    """Sessions in a dict, lost on restart."""

    def __init__(self, retention: Retention) -> None:
        self._retention = retention
        # Least recently used first; each with the time it was last used.
        self._sessions: OrderedDict[str, tuple[float, deque[Exchange]]] = OrderedDict()

    def history(self, session_id: str) -> list[Exchange] | None:
        if session_id not in self._sessions:
            return None
        return list(self._sessions[session_id][1])

    def append(self, session_id: str, exchange: Exchange) -> list[str]:
        _, exchanges = self._sessions.pop(session_id, (0.0, deque(maxlen=self._retention.window)))
        exchanges.append(exchange)
        self._sessions[session_id] = (self._retention.clock(), exchanges)
        removed = []
        while len(self._sessions) > self._retention.max_sessions:
            removed.append(self._sessions.popitem(last=False)[0])
        return removed

    def delete(self, session_id: str) -> None:
        if self._sessions.pop(session_id, None) is None:
            raise SessionNotFound(session_id)

    def session_ids(self) -> list[str]:
        return list(self._sessions)

    def count(self) -> int:
        return len(self._sessions)

    def expire(self) -> list[str]:
        if not self._retention.ttl_s:
            return []
        oldest_kept = self._retention.clock() - self._retention.ttl_s
        expired = [sid for sid, (used, _) in self._sessions.items() if used < oldest_kept]
        for session_id in expired:
            del self._sessions[session_id]
        return expired

    def check_writable(self) -> None:
        pass  # memory is written as long as the process lives

    def close(self) -> None:
        pass  # nothing to release


SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id        TEXT PRIMARY KEY,
    last_used REAL NOT NULL,    -- wall-clock time of the last exchange, for the TTL
    use_order INTEGER NOT NULL  -- larger: used more recently
);
CREATE INDEX IF NOT EXISTS sessions_by_use ON sessions (use_order);
CREATE INDEX IF NOT EXISTS sessions_by_time ON sessions (last_used);
CREATE TABLE IF NOT EXISTS write_probe (
    id   INTEGER PRIMARY KEY,
    data BLOB NOT NULL          -- written and deleted by check_writable
);
CREATE TABLE IF NOT EXISTS exchanges (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    turn       INTEGER NOT NULL,
    user       TEXT NOT NULL,
    assistant  TEXT NOT NULL,
    PRIMARY KEY (session_id, turn)
);
"""


class SqliteSessionStore:
    """Sessions in a SQLite file (WAL journal, ``synchronous=FULL``).

    ``append`` commits the exchange, the window trim and any eviction in one
    transaction before it returns, so an acknowledged exchange survives a
    crash of the process or of the machine, and a half exchange never exists.
    Opening checks the file (``PRAGMA quick_check``): a corrupt one is refused
    with ``SessionStoreError`` rather than served half-readable.
    """

    def __init__(self, path: str | Path, retention: Retention) -> None:
        self._retention = retention
        try:
            if str(path) != IN_MEMORY:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: transactions are explicit (see _transaction).
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._db.execute("PRAGMA busy_timeout = 5000")
            problems = [row[0] for row in self._db.execute("PRAGMA quick_check")]
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as error:
            raise SessionStoreError(f"cannot open {path}: {error}") from error
        if problems != ["ok"]:
            self._db.close()
            raise SessionStoreError(
                f"{path} is corrupt (PRAGMA quick_check: {'; '.join(problems[:3])}); "
                "restore it from a backup, or move it away to start with no sessions"
            )

    @contextmanager
    def _transaction(self, *, writes: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction (one that only reads takes no write lock); SQLite's
        errors (disk full, I/O error) become ``SessionStoreError`` after the
        rollback, so nothing half done is kept."""
        try:
            self._db.execute("BEGIN IMMEDIATE" if writes else "BEGIN DEFERRED")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite has rolled back already after some errors (a full disk).
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as error:
            raise SessionStoreError(str(error)) from error

    def history(self, session_id: str) -> list[Exchange] | None:
        with self._transaction(writes=False) as db:
            if db.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone() is None:
                return None
            rows = db.execute(
                "SELECT user, assistant FROM exchanges WHERE session_id = ? "
                "ORDER BY turn DESC LIMIT ?",
                (session_id, self._retention.window),
            ).fetchall()
        return [Exchange(user, assistant) for user, assistant in reversed(rows)]

    def append(self, session_id: str, exchange: Exchange) -> list[str]:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO sessions (id, last_used, use_order) "
                "VALUES (?, ?, (SELECT COALESCE(MAX(use_order), 0) + 1 FROM sessions)) "
                "ON CONFLICT (id) DO UPDATE SET "
                "last_used = excluded.last_used, use_order = excluded.use_order",
                (session_id, self._retention.clock()),
            )
            (turn,) = db.execute(
                "SELECT COALESCE(MAX(turn), 0) + 1 FROM exchanges WHERE session_id = ?",
                (session_id,),
            ).fetchone()
            db.execute(
                "INSERT INTO exchanges (session_id, turn, user, assistant) VALUES (?, ?, ?, ?)",
                (session_id, turn, exchange.user, exchange.assistant),
            )
            db.execute(
                "DELETE FROM exchanges WHERE session_id = ? AND turn <= ?",
                (session_id, turn - self._retention.window),
            )
            removed = [
                row[0]
                for row in db.execute(
                    "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions "
                    "ORDER BY use_order DESC LIMIT -1 OFFSET ?) RETURNING id",
                    (self._retention.max_sessions,),
                )
            ]
        return removed

    def delete(self, session_id: str) -> None:
        with self._transaction() as db:
            if db.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount == 0:
                raise SessionNotFound(session_id)

    def session_ids(self) -> list[str]:
        with self._transaction(writes=False) as db:
            rows = db.execute("SELECT id FROM sessions ORDER BY use_order").fetchall()
        return [row[0] for row in rows]

    def count(self) -> int:
        with self._transaction(writes=False) as db:
            (count,) = db.execute("SELECT COUNT(*) FROM sessions").fetchone()
        return int(count)

    def expire(self) -> list[str]:
        if not self._retention.ttl_s:
            return []
        oldest_kept = self._retention.clock() - self._retention.ttl_s
        with self._transaction() as db:
            rows = db.execute(
                "DELETE FROM sessions WHERE last_used < ? RETURNING id", (oldest_kept,)
            ).fetchall()
        return [row[0] for row in rows]

    def check_writable(self) -> None:
        # Two pages' worth, so that a full file or disk fails here as an append would.
        with self._transaction() as db:
            db.execute("INSERT INTO write_probe (data) VALUES (zeroblob(8192))")
            db.execute("DELETE FROM write_probe")

    def close(self) -> None:
        self._db.close()


def open_session_store(path: str, retention: Retention) -> SessionStore:
    """The store ``SESSION_DB`` names: ``:memory:`` or a SQLite file."""
    if path == IN_MEMORY:
        return InMemorySessionStore(retention)
    return SqliteSessionStore(path, retention)
