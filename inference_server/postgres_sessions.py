"""The session store in PostgreSQL (``SESSION_DB=postgresql://...``), which
several replicas of the core share.

Its promises are ``sessions.SessionStore``'s. How it keeps them with several
replicas writing at once:

- An exchange is appended in one transaction, committed with
  ``synchronous_commit = on`` before ``append`` returns. It locks the tenant's
  use counter, then the session's row (``SELECT ... FOR UPDATE``), checks the
  session's version against the one the prompt was built from
  (``HistoryChanged`` and a rollback if it differs), adds the exchange, trims
  the window and the byte bound, gives the session a new version from a
  sequence (never reused), and evicts the tenant's least recently used
  sessions past ``max_sessions``. Taking the tenant's lock first puts a
  tenant's appends in one order, so evictions cannot deadlock.
- A history and its version are read in one ``REPEATABLE READ`` snapshot.
- The TTL sweep (``expire``) runs on one replica at a time: it returns at once
  where another holds ``pg_try_advisory_xact_lock``, and it skips rows a
  transaction holds (``SKIP LOCKED``); the same sweep removes each tenant's
  sessions past ``max_sessions`` (after ``MAX_SESSIONS`` was lowered).
- The schema is created, or migrated, at open, under an advisory lock, and
  its version is in ``schema_version``; a database of a newer version is refused.

Texts and ids are stored as UTF-8 bytes (``bytea``): PostgreSQL's ``text``
holds no NUL character, which a message may. One connection serves the store
(the engine calls it from one thread); a connection found broken is opened again.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg

from .domain import Exchange, SessionKey
from .errors import HistoryChanged, SessionNotFound, SessionStoreError
from .sessions import (
    RequestRecord,
    Retention,
    SessionPage,
    StoredReply,
    VersionedHistory,
    parse_cursor,
)

SCHEMA_VERSION = 1
# Advisory lock keys (any 64-bit numbers; these spell "llamachat" roughly).
MIGRATION_LOCK = 0x11A3AC4A7_0001
SWEEP_LOCK = 0x11A3AC4A7_0002
# Defaults of the connection, where the URL sets none: a server that stops
# answering (a network cut, not a refusal) is an error within about half a
# minute rather than a store thread that waits forever.
CONNECTION_DEFAULTS = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # ms
}
# A connection idle for longer is checked (SELECT 1) before a transaction:
# after a restart of the server it is broken, and a new one is opened.
IDLE_CHECK_S = 1.0

SCHEMA = [
    """CREATE TABLE tenants (
        tenant   bytea PRIMARY KEY,
        last_use bigint NOT NULL  -- the tenant's use counter (sessions.use_order)
    )""",
    "CREATE SEQUENCE session_versions",
    """CREATE TABLE sessions (
        tenant    bytea NOT NULL,
        id        bytea NOT NULL,
        version   bigint NOT NULL,            -- from session_versions, per exchange
        last_used double precision NOT NULL,  -- wall-clock time of the last exchange
        use_order bigint NOT NULL,            -- larger: used more recently (per tenant)
        PRIMARY KEY (tenant, id)
    )""",
    "CREATE INDEX sessions_by_use ON sessions (tenant, use_order)",
    "CREATE INDEX sessions_by_time ON sessions (last_used)",
    """CREATE TABLE exchanges (
        tenant            bytea NOT NULL,
        session_id        bytea NOT NULL,
        turn              bigint NOT NULL,
        user_message      bytea NOT NULL,
        reply             bytea NOT NULL,
        request_id        bytea,    -- the turn's request id, if it had one
        finish_reason     text,     -- with a request id: how the reply ended
        completion_tokens integer,  -- with a request id: the reply's tokens
        PRIMARY KEY (tenant, session_id, turn),
        UNIQUE (tenant, session_id, request_id),
        FOREIGN KEY (tenant, session_id) REFERENCES sessions (tenant, id) ON DELETE CASCADE
    )""",
    """CREATE TABLE write_probe (
        id   bigserial PRIMARY KEY,
        data bytea NOT NULL  -- written and deleted by check_writable
    )""",
]
# MIGRATIONS[n] takes a database from version n to n + 1 (0: empty).
MIGRATIONS: list[list[str]] = [SCHEMA]

R = TypeVar("R")


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _text(data: bytes) -> str:
    return bytes(data).decode("utf-8", "surrogatepass")


def redacted(dsn: str) -> str:
    """The URL without its password, to be logged."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", dsn)


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


class PostgresSessionStore:
    """Sessions in PostgreSQL, shared by every replica that opens the same
    database. Opening connects, and creates or migrates the schema; it raises
    ``SessionStoreError`` (one line, the password left out) when it cannot."""

    def __init__(self, dsn: str, retention: Retention) -> None:
        self._retention = retention
        self._connection: psycopg.Connection[Any] | None = None
        self._last_used = 0.0
        try:
            given = psycopg.conninfo.conninfo_to_dict(dsn)  # refuses a malformed URL
            self._conninfo = psycopg.conninfo.make_conninfo(dsn, **{**CONNECTION_DEFAULTS, **given})
            self._run(self._create_or_migrate)
        except (psycopg.Error, SessionStoreError) as error:
            self.close()
            reason = error.reason if isinstance(error, SessionStoreError) else one_line(error)
            raise SessionStoreError(f"cannot open {redacted(dsn)}: {reason}") from error

    def _connect(self) -> psycopg.Connection[Any]:
        """The store's connection: opened when there is none, or again when
        the one there is broken (the server restarted, the network dropped)."""
        connection = self._connection
        if connection is not None and not connection.closed and not connection.broken:
            if time.monotonic() - self._last_used < IDLE_CHECK_S:
                return connection
            try:
                connection.execute("SELECT 1")
                return connection
            except psycopg.OperationalError:
                connection.close()
        self._connection = None
        connection = psycopg.connect(self._conninfo, autocommit=True)
        # Durable before acknowledged, whatever the server's default is.
        connection.execute("SET synchronous_commit TO on")
        self._connection = connection
        return connection

    @contextmanager
    def _transaction(self, snapshot: bool) -> Iterator[psycopg.Connection[Any]]:
        connection = self._connect()
        with connection.transaction():
            if snapshot:  # every statement sees the same commits
                connection.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield connection

    def _run(self, work: Callable[[psycopg.Connection[Any]], R], snapshot: bool = False) -> R:
        """``work`` in one transaction (read-only in one snapshot, if asked);
        the database's errors become ``SessionStoreError`` after the rollback,
        so nothing half done is kept."""
        try:
            with self._transaction(snapshot) as connection:
                return work(connection)
        except psycopg.Error as error:
            raise SessionStoreError(one_line(error)) from error
        finally:
            self._last_used = time.monotonic()

    def _create_or_migrate(self, db: psycopg.Connection[Any]) -> None:
        # Replicas starting together: one migrates, the others wait and see it done.
        db.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        row = db.execute("SELECT version FROM schema_version").fetchone()
        version = row[0] if row else 0
        if version > SCHEMA_VERSION:
            raise SessionStoreError(
                f"its schema version {version} is newer than this server's {SCHEMA_VERSION}"
            )
        for step in MIGRATIONS[version:]:
            for statement in step:
                db.execute(statement)
        if row is None:
            db.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))
        elif version != SCHEMA_VERSION:
            db.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION,))

    def history(self, tenant: str, session_id: str) -> list[Exchange] | None:
        kept = self.read(tenant, session_id)
        return kept.exchanges if kept.version else None

    def read(self, tenant: str, session_id: str, request_id: str | None = None) -> VersionedHistory:
        key = (_bytes(tenant), _bytes(session_id))

        def read(db: psycopg.Connection[Any]) -> VersionedHistory:
            found = db.execute(
                "SELECT version FROM sessions WHERE tenant = %s AND id = %s", key
            ).fetchone()
            if found is None:
                return VersionedHistory([], 0)
            rows = db.execute(
                "SELECT user_message, reply FROM exchanges WHERE tenant = %s "
                "AND session_id = %s ORDER BY turn DESC LIMIT %s",
                (*key, self._retention.window),
            ).fetchall()
            replay = None
            if request_id is not None:
                reply = db.execute(
                    "SELECT reply, finish_reason, completion_tokens, user_message FROM exchanges "
                    "WHERE tenant = %s AND session_id = %s AND request_id = %s",
                    (*key, _bytes(request_id)),
                ).fetchone()
                if reply is not None:
                    replay = StoredReply(_text(reply[0]), reply[1], reply[2], _text(reply[3]))
            exchanges = [Exchange(_text(user), _text(text)) for user, text in reversed(rows)]
            return VersionedHistory(exchanges, found[0], replay)

        return self._run(read, snapshot=True)

    def append(
        self,
        tenant: str,
        session_id: str,
        exchange: Exchange,
        *,
        expected_version: int | None = None,
        request: RequestRecord | None = None,
    ) -> list[SessionKey]:
        key = (_bytes(tenant), _bytes(session_id))

        def append(db: psycopg.Connection[Any]) -> list[SessionKey]:
            (use_order,) = _one(
                db,
                "INSERT INTO tenants (tenant, last_use) VALUES (%s, 1) ON CONFLICT (tenant) "
                "DO UPDATE SET last_use = tenants.last_use + 1 RETURNING last_use",
                (key[0],),
            )
            current = self._lock_session(db, key)
            if expected_version is not None and current != expected_version:
                raise HistoryChanged(session_id)
            if (
                request is not None
                and db.execute(
                    "SELECT 1 FROM exchanges WHERE tenant = %s AND session_id = %s "
                    "AND request_id = %s",
                    (*key, _bytes(request.request_id)),
                ).fetchone()
            ):
                raise HistoryChanged(session_id)
            db.execute(
                "INSERT INTO sessions (tenant, id, version, last_used, use_order) "
                "VALUES (%s, %s, nextval('session_versions'), %s, %s) "
                "ON CONFLICT (tenant, id) DO UPDATE SET version = excluded.version, "
                "last_used = excluded.last_used, use_order = excluded.use_order",
                (*key, self._retention.clock(), use_order),
            )
            (turn,) = _one(
                db,
                "SELECT COALESCE(MAX(turn), 0) + 1 FROM exchanges "
                "WHERE tenant = %s AND session_id = %s",
                key,
            )
            if self._retention.window:
                db.execute(
                    "INSERT INTO exchanges (tenant, session_id, turn, user_message, reply, "
                    "request_id, finish_reason, completion_tokens) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                    (
                        *key,
                        turn,
                        _bytes(exchange.user),
                        _bytes(exchange.assistant),
                        _bytes(request.request_id) if request else None,
                        request.finish_reason if request else None,
                        request.completion_tokens if request else None,
                    ),
                )
            db.execute(
                "DELETE FROM exchanges WHERE tenant = %s AND session_id = %s AND turn <= %s",
                (*key, turn - self._retention.window),
            )
            self._trim_to_bytes(db, key)
            removed = db.execute(
                "DELETE FROM sessions WHERE tenant = %s AND id IN (SELECT id FROM sessions "
                "WHERE tenant = %s ORDER BY use_order DESC OFFSET %s) RETURNING id",
                (key[0], key[0], self._retention.max_sessions),
            ).fetchall()
            return [(tenant, _text(row[0])) for row in removed]

        return self._run(append)

    @staticmethod
    def _lock_session(db: psycopg.Connection[Any], key: tuple[bytes, bytes]) -> int:
        """Lock the session's row for this transaction; its version (0: none).
        A session another replica creates meanwhile is found at its insert:
        the tenant's lock, held here, orders them, so none can appear after."""
        found = db.execute(
            "SELECT version FROM sessions WHERE tenant = %s AND id = %s FOR UPDATE", key
        ).fetchone()
        return int(found[0]) if found else 0

    def _trim_to_bytes(self, db: psycopg.Connection[Any], key: tuple[bytes, bytes]) -> None:
        """Drop the oldest exchanges past ``max_bytes``; the newest stays."""
        db.execute(
            "DELETE FROM exchanges WHERE tenant = %s AND session_id = %s AND turn <= ("
            "SELECT turn FROM (SELECT turn, ROW_NUMBER() OVER newest AS place, "
            "SUM(octet_length(user_message) + octet_length(reply)) OVER newest AS total "
            "FROM exchanges WHERE tenant = %s AND session_id = %s "
            "WINDOW newest AS (ORDER BY turn DESC)) AS sized "
            "WHERE place > 1 AND total > %s ORDER BY turn DESC LIMIT 1)",
            (*key, *key, self._retention.max_bytes),
        )

    def delete(self, tenant: str, session_id: str) -> None:
        def delete(db: psycopg.Connection[Any]) -> None:
            deleted = db.execute(
                "DELETE FROM sessions WHERE tenant = %s AND id = %s",
                (_bytes(tenant), _bytes(session_id)),
            )
            if deleted.rowcount == 0:
                raise SessionNotFound(session_id)

        self._run(delete)

    def list_sessions(self, tenant: str, limit: int, cursor: str | None = None) -> SessionPage:
        after = parse_cursor(cursor)
        rows = self._run(
            lambda db: db.execute(
                "SELECT id, use_order FROM sessions WHERE tenant = %s AND use_order > %s "
                "ORDER BY use_order LIMIT %s",
                (_bytes(tenant), after, limit + 1),
            ).fetchall()
        )
        page = rows[:limit]
        more = len(rows) > limit
        return SessionPage([_text(row[0]) for row in page], str(page[-1][1]) if more else None)

    def count(self) -> int:
        return int(self._run(lambda db: _one(db, "SELECT COUNT(*) FROM sessions", ())[0]))

    def expire(self) -> list[SessionKey]:
        """Remove the sessions past the TTL, and each tenant's past
        ``max_sessions``; an empty list at once where another replica sweeps now."""

        def sweep(db: psycopg.Connection[Any]) -> list[SessionKey]:
            (mine,) = _one(db, "SELECT pg_try_advisory_xact_lock(%s)", (SWEEP_LOCK,))
            if not mine:
                return []
            rows = []
            if self._retention.ttl_s:
                oldest_kept = self._retention.clock() - self._retention.ttl_s
                rows += db.execute(
                    "DELETE FROM sessions WHERE (tenant, id) IN (SELECT tenant, id FROM "
                    "sessions WHERE last_used < %s FOR UPDATE SKIP LOCKED) RETURNING tenant, id",
                    (oldest_kept,),
                ).fetchall()
            rows += db.execute(
                "DELETE FROM sessions WHERE (tenant, id) IN (SELECT tenant, id FROM sessions "
                "WHERE (tenant, id) IN (SELECT tenant, id FROM (SELECT tenant, id, "
                "ROW_NUMBER() OVER (PARTITION BY tenant ORDER BY use_order DESC) AS place "
                "FROM sessions) AS ranked WHERE place > %s) FOR UPDATE SKIP LOCKED) "
                "RETURNING tenant, id",
                (self._retention.max_sessions,),
            ).fetchall()
            return [(_text(tenant), _text(sid)) for tenant, sid in rows]

        return self._run(sweep)

    def check_writable(self) -> None:
        def probe(db: psycopg.Connection[Any]) -> None:
            db.execute("INSERT INTO write_probe (data) VALUES (%s)", (bytes(8192),))
            db.execute("DELETE FROM write_probe")

        self._run(probe)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def _one(db: psycopg.Connection[Any], query: str, params: tuple[Any, ...]) -> tuple[Any, ...]:
    row = db.execute(query, params).fetchone()
    assert row is not None  # the queries given here always return a row
    return tuple(row)
