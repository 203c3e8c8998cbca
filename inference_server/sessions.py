"""Session histories: each session's most recent exchanges, per tenant.

``SessionStore`` is the interface the engine uses, so that a shared store (for
several replicas) can replace these without touching the engine. Two stores
implement it: ``SqliteSessionStore`` (the default; durable, every exchange
committed before it is acknowledged) and ``InMemorySessionStore``
(``SESSION_DB=:memory:``; lost on restart).

A session belongs to a tenant (``llamachat_process.tenants``): the same id in
two tenants is two sessions, and every read, write and listing names its
tenant. Both stores keep at most ``max_sessions`` sessions per tenant (the
least recently used of that tenant go first, so one tenant never evicts
another's), at most ``window`` exchanges and ``max_bytes`` bytes of text per
session (the oldest exchanges go first; the newest always stays), and drop
sessions idle for longer than ``ttl_s`` when ``expire`` runs. A session is
"used" when an exchange is added to it. Listings come in pages, least
recently used first, each with an opaque cursor for the next. Neither store
is safe for concurrent use: the engine calls it from one thread.
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

from .domain import Exchange, SessionKey
from .errors import InvalidRequest, SessionNotFound, SessionStoreError

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
    max_bytes: int = 1024 * 1024
    """UTF-8 bytes of text kept per session; older exchanges are dropped."""


@dataclass(frozen=True)
class SessionPage:
    """Some of a tenant's session ids, least recently used first, and the
    cursor of the page after them (``None``: this is the last)."""

    ids: list[str]
    next_cursor: str | None


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

    def append(self, tenant: str, session_id: str, exchange: Exchange) -> list[SessionKey]:
        """Add an exchange (durably, where the store is durable), creating the
        session if needed and dropping the oldest exchanges beyond the window
        and the byte bound. Returns the tenant's sessions removed to stay
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


@dataclass
class _KeptSession:
    last_used: float
    use_order: int
    exchanges: deque[Exchange]


class InMemorySessionStore:
    """Sessions in a dict, lost on restart."""

    def __init__(self, retention: Retention) -> None:
        self._retention = retention
        # Least recently used first.
        self._sessions: OrderedDict[SessionKey, _KeptSession] = OrderedDict()
        # Per tenant, so that a cursor tells nothing of other tenants' traffic.
        self._use_order: dict[str, int] = {}

    def history(self, tenant: str, session_id: str) -> list[Exchange] | None:
        kept = self._sessions.get((tenant, session_id))
        return None if kept is None else list(kept.exchanges)

    def append(self, tenant: str, session_id: str, exchange: Exchange) -> list[SessionKey]:
        key = (tenant, session_id)
        kept = self._sessions.pop(key, None)
        exchanges = kept.exchanges if kept else deque(maxlen=self._retention.window)
        exchanges.append(exchange)
        while (
            len(exchanges) > 1 and sum(map(exchange_bytes, exchanges)) > self._retention.max_bytes
        ):
            exchanges.popleft()
        order = self._use_order[tenant] = self._use_order.get(tenant, 0) + 1
        self._sessions[key] = _KeptSession(self._retention.clock(), order, exchanges)
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


# Version 2 (PRAGMA user_version): sessions belong to tenants. Version 1
# (user_version 0) had no tenant; its sessions move to the tenant "default".
SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    tenant    TEXT NOT NULL,
    id        TEXT NOT NULL,
    last_used REAL NOT NULL,    -- wall-clock time of the last exchange, for the TTL
    use_order INTEGER NOT NULL, -- larger: used more recently (counted per tenant)
    PRIMARY KEY (tenant, id)
);
CREATE INDEX IF NOT EXISTS sessions_by_use ON sessions (tenant, use_order);
CREATE INDEX IF NOT EXISTS sessions_by_time ON sessions (last_used);
CREATE TABLE IF NOT EXISTS write_probe (
    id   INTEGER PRIMARY KEY,
    data BLOB NOT NULL          -- written and deleted by check_writable
);
CREATE TABLE IF NOT EXISTS exchanges (
    tenant     TEXT NOT NULL,
    session_id TEXT NOT NULL,
    turn       INTEGER NOT NULL,
    user       TEXT NOT NULL,
    assistant  TEXT NOT NULL,
    PRIMARY KEY (tenant, session_id, turn),
    FOREIGN KEY (tenant, session_id) REFERENCES sessions (tenant, id) ON DELETE CASCADE
);
"""
MIGRATE_FROM_1 = (
    """
ALTER TABLE sessions RENAME TO sessions_v1;
ALTER TABLE exchanges RENAME TO exchanges_v1;
DROP INDEX IF EXISTS sessions_by_use;
DROP INDEX IF EXISTS sessions_by_time;
"""
    + SCHEMA
    + """
INSERT INTO sessions (tenant, id, last_used, use_order)
    SELECT 'default', id, last_used, use_order FROM sessions_v1;
INSERT INTO exchanges (tenant, session_id, turn, user, assistant)
    SELECT 'default', session_id, turn, user, assistant FROM exchanges_v1;
DROP TABLE exchanges_v1;
DROP TABLE sessions_v1;
"""
)


class SqliteSessionStore:
    """Sessions in a SQLite file (WAL journal, ``synchronous=FULL``).

    ``append`` commits the exchange, the window trim and any eviction in one
    transaction before it returns, so an acknowledged exchange survives a
    crash of the process or of the machine, and a half exchange never exists.
    Opening checks the file (``PRAGMA quick_check``): a corrupt one is refused
    with ``SessionStoreError`` rather than served half-readable. A file of an
    earlier version is migrated, in one transaction.
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
            if problems == ["ok"]:
                self._create_or_migrate()
        except (OSError, sqlite3.Error) as error:
            raise SessionStoreError(f"cannot open {path}: {error}") from error
        if problems != ["ok"]:
            self._db.close()
            raise SessionStoreError(
                f"{path} is corrupt (PRAGMA quick_check: {'; '.join(problems[:3])}); "
                "restore it from a backup, or move it away to start with no sessions"
            )

    def _create_or_migrate(self) -> None:
        db = self._db
        (version,) = db.execute("PRAGMA user_version").fetchone()
        old = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'sessions'").fetchone()
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"its schema version {version} is newer than this server's {SCHEMA_VERSION}"
            )
        script = MIGRATE_FROM_1 if old else SCHEMA
        db.execute("PRAGMA foreign_keys = OFF")  # while tables are renamed
        try:
            db.executescript(
                f"BEGIN IMMEDIATE; {script} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            )
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.execute("PRAGMA foreign_keys = ON")

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

    def history(self, tenant: str, session_id: str) -> list[Exchange] | None:
        with self._transaction(writes=False) as db:
            found = db.execute(
                "SELECT 1 FROM sessions WHERE tenant = ? AND id = ?", (tenant, session_id)
            ).fetchone()
            if found is None:
                return None
            rows = db.execute(
                "SELECT user, assistant FROM exchanges WHERE tenant = ? AND session_id = ? "
                "ORDER BY turn DESC LIMIT ?",
                (tenant, session_id, self._retention.window),
            ).fetchall()
        return [Exchange(user, assistant) for user, assistant in reversed(rows)]

    def append(self, tenant: str, session_id: str, exchange: Exchange) -> list[SessionKey]:
        key = (tenant, session_id)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO sessions (tenant, id, last_used, use_order) VALUES (?, ?, ?, "
                "(SELECT COALESCE(MAX(use_order), 0) + 1 FROM sessions WHERE tenant = ?)) "
                "ON CONFLICT (tenant, id) DO UPDATE SET "
                "last_used = excluded.last_used, use_order = excluded.use_order",
                (*key, self._retention.clock(), tenant),
            )
            (turn,) = db.execute(
                "SELECT COALESCE(MAX(turn), 0) + 1 FROM exchanges "
                "WHERE tenant = ? AND session_id = ?",
                key,
            ).fetchone()
            if self._retention.window:
                db.execute(
                    "INSERT INTO exchanges (tenant, session_id, turn, user, assistant) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (*key, turn, exchange.user, exchange.assistant),
                )
            db.execute(
                "DELETE FROM exchanges WHERE tenant = ? AND session_id = ? AND turn <= ?",
                (*key, turn - self._retention.window),
            )
            self._trim_to_bytes(db, key)
            removed = db.execute(
                "DELETE FROM sessions WHERE tenant = ? AND id IN (SELECT id FROM sessions "
                "WHERE tenant = ? ORDER BY use_order DESC LIMIT -1 OFFSET ?) RETURNING id",
                (tenant, tenant, self._retention.max_sessions),
            ).fetchall()
        return [(tenant, row[0]) for row in removed]

    def _trim_to_bytes(self, db: sqlite3.Connection, key: SessionKey) -> None:
        """Drop the oldest exchanges past ``max_bytes``; the newest stays."""
        sizes = db.execute(
            "SELECT turn, LENGTH(CAST(user AS BLOB)) + LENGTH(CAST(assistant AS BLOB)) "
            "FROM exchanges WHERE tenant = ? AND session_id = ? ORDER BY turn DESC",
            key,
        ).fetchall()
        total = 0
        for index, (turn, size) in enumerate(sizes):
            total += size
            if index > 0 and total > self._retention.max_bytes:
                db.execute(
                    "DELETE FROM exchanges WHERE tenant = ? AND session_id = ? AND turn <= ?",
                    (*key, turn),
                )
                return

    def delete(self, tenant: str, session_id: str) -> None:
        with self._transaction() as db:
            deleted = db.execute(
                "DELETE FROM sessions WHERE tenant = ? AND id = ?", (tenant, session_id)
            )
            if deleted.rowcount == 0:
                raise SessionNotFound(session_id)

    def list_sessions(self, tenant: str, limit: int, cursor: str | None = None) -> SessionPage:
        after = parse_cursor(cursor)
        with self._transaction(writes=False) as db:
            rows = db.execute(
                "SELECT id, use_order FROM sessions WHERE tenant = ? AND use_order > ? "
                "ORDER BY use_order LIMIT ?",
                (tenant, after, limit + 1),
            ).fetchall()
        page = rows[:limit]
        more = len(rows) > limit
        return SessionPage([row[0] for row in page], str(page[-1][1]) if more else None)

    def count(self) -> int:
        with self._transaction(writes=False) as db:
            (count,) = db.execute("SELECT COUNT(*) FROM sessions").fetchone()
        return int(count)

    def expire(self) -> list[SessionKey]:
        if not self._retention.ttl_s:
            return []
        oldest_kept = self._retention.clock() - self._retention.ttl_s
        with self._transaction() as db:
            rows = db.execute(
                "DELETE FROM sessions WHERE last_used < ? RETURNING tenant, id", (oldest_kept,)
            ).fetchall()
        return [(tenant, sid) for tenant, sid in rows]

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
