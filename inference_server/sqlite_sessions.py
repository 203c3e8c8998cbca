"""The session store in a SQLite file, the single-machine default
(``sessions.SessionStore``'s promises, one process at a time)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .domain import Exchange, SessionKey
from .errors import HistoryChanged, SessionNotFound, SessionStoreError
from .sessions import (
    IN_MEMORY,
    RequestRecord,
    Retention,
    SessionPage,
    StoredReply,
    VersionedHistory,
    parse_cursor,
)

# Version 3 (PRAGMA user_version): sessions have versions, exchanges their
# request ids. Version 2: sessions belong to tenants. Version 1 (user_version
# 0) had no tenant; its sessions move to the tenant "default".
SCHEMA_VERSION = 3
SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    tenant    TEXT NOT NULL,
    id        TEXT NOT NULL,
    last_used REAL NOT NULL,    -- wall-clock time of the last exchange, for the TTL
    use_order INTEGER NOT NULL, -- larger: used more recently (counted per tenant)
    version   INTEGER NOT NULL DEFAULT 1, -- from versions.last, changed by every exchange
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
    request_id TEXT,            -- the turn's request id, if it had one
    finish_reason TEXT,         -- with a request id: how the reply ended
    completion_tokens INTEGER,  -- with a request id: the reply's tokens
    PRIMARY KEY (tenant, session_id, turn),
    FOREIGN KEY (tenant, session_id) REFERENCES sessions (tenant, id) ON DELETE CASCADE
);
"""
# Run after SCHEMA, or MIGRATE_FROM_2: what version 3 adds that IF NOT EXISTS covers.
SCHEMA_3 = """
CREATE UNIQUE INDEX IF NOT EXISTS exchanges_by_request
    ON exchanges (tenant, session_id, request_id);
CREATE TABLE IF NOT EXISTS versions (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    last INTEGER NOT NULL       -- the last session version given; never reused
);
INSERT OR IGNORE INTO versions (id, last) VALUES (1, 1);
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
MIGRATE_FROM_2 = """
ALTER TABLE sessions ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE exchanges ADD COLUMN request_id TEXT;
ALTER TABLE exchanges ADD COLUMN finish_reason TEXT;
ALTER TABLE exchanges ADD COLUMN completion_tokens INTEGER;
"""


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
        if version == 2:
            script = MIGRATE_FROM_2
        else:
            script = MIGRATE_FROM_1 if old else SCHEMA
        script += SCHEMA_3
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
        kept = self.read(tenant, session_id)
        return kept.exchanges if kept.version else None

    def read(self, tenant: str, session_id: str, request_id: str | None = None) -> VersionedHistory:
        with self._transaction(writes=False) as db:
            found = db.execute(
                "SELECT version FROM sessions WHERE tenant = ? AND id = ?", (tenant, session_id)
            ).fetchone()
            if found is None:
                return VersionedHistory([], 0)
            rows = db.execute(
                "SELECT user, assistant FROM exchanges WHERE tenant = ? AND session_id = ? "
                "ORDER BY turn DESC LIMIT ?",
                (tenant, session_id, self._retention.window),
            ).fetchall()
            replay = None
            if request_id is not None:
                reply = db.execute(
                    "SELECT assistant, finish_reason, completion_tokens, user FROM exchanges "
                    "WHERE tenant = ? AND session_id = ? AND request_id = ?",
                    (tenant, session_id, request_id),
                ).fetchone()
                replay = StoredReply(*reply) if reply else None
        exchanges = [Exchange(user, assistant) for user, assistant in reversed(rows)]
        return VersionedHistory(exchanges, found[0], replay)

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
        with self._transaction() as db:
            found = db.execute(
                "SELECT version FROM sessions WHERE tenant = ? AND id = ?", key
            ).fetchone()
            if expected_version is not None and (found[0] if found else 0) != expected_version:
                raise HistoryChanged(session_id)
            if (
                request is not None
                and db.execute(
                    "SELECT 1 FROM exchanges "
                    "WHERE tenant = ? AND session_id = ? AND request_id = ?",
                    (*key, request.request_id),
                ).fetchone()
            ):
                raise HistoryChanged(session_id)
            (version,) = db.execute("UPDATE versions SET last = last + 1 RETURNING last").fetchone()
            db.execute(
                "INSERT INTO sessions (tenant, id, last_used, use_order, version) "
                "VALUES (?, ?, ?, "
                "(SELECT COALESCE(MAX(use_order), 0) + 1 FROM sessions WHERE tenant = ?), ?) "
                "ON CONFLICT (tenant, id) DO UPDATE SET last_used = excluded.last_used, "
                "use_order = excluded.use_order, version = excluded.version",
                (*key, self._retention.clock(), tenant, version),
            )
            (turn,) = db.execute(
                "SELECT COALESCE(MAX(turn), 0) + 1 FROM exchanges "
                "WHERE tenant = ? AND session_id = ?",
                key,
            ).fetchone()
            if self._retention.window:
                db.execute(
                    "INSERT INTO exchanges (tenant, session_id, turn, user, assistant, "
                    "request_id, finish_reason, completion_tokens) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        *key,
                        turn,
                        exchange.user,
                        exchange.assistant,
                        *(
                            (request.request_id, request.finish_reason, request.completion_tokens)
                            if request
                            else (None, None, None)
                        ),
                    ),
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
