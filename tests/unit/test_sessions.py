"""Every session store (in memory, SQLite, PostgreSQL) keeps the same
promises; the SQLite one also keeps them across a reopen (the crash test with
real processes: tests/e2e/test_reliability.py; PostgreSQL's own:
test_postgres_sessions.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from inference_server.domain import Exchange
from inference_server.errors import (
    HistoryChanged,
    InvalidRequest,
    SessionNotFound,
    SessionStoreError,
)
from inference_server.postgres_sessions import PostgresSessionStore
from inference_server.sessions import (
    InMemorySessionStore,
    RequestRecord,
    Retention,
    SessionStore,
    StoredReply,
    open_session_store,
)
from inference_server.sqlite_sessions import SqliteSessionStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


StoreFactory = Callable[..., SessionStore]


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def make_store(request, tmp_path: Path) -> Iterator[StoreFactory]:
    """Stores of one kind; those made in one test share their database."""
    opened: list[SessionStore] = []
    database: list[str] = []

    def make(
        window: int = 3, max_sessions: int = 100, ttl_s: float = 0, clock=None, max_bytes=1 << 20
    ) -> SessionStore:
        retention = Retention(window, max_sessions, ttl_s, clock or Clock(), max_bytes)
        store: SessionStore
        if request.param == "memory":
            store = InMemorySessionStore(retention)
        elif request.param == "sqlite":
            store = SqliteSessionStore(tmp_path / "sessions.db", retention)
        else:
            if not database:
                database.append(request.getfixturevalue("postgres").new_schema())
            store = PostgresSessionStore(database[0], retention)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


T = "default"  # the tenant of the tests that have one


def ids(store: SessionStore, tenant: str = T) -> list[str]:
    """Every session id of a tenant, page after page of 2."""
    found: list[str] = []
    cursor = None
    while True:
        page = store.list_sessions(tenant, 2, cursor)
        found += page.ids
        if page.next_cursor is None:
            return found
        cursor = page.next_cursor


def turn(n: int) -> Exchange:
    return Exchange(f"question {n}", f"answer {n}")


def test_an_unknown_session_has_no_history(make_store: StoreFactory):
    store = make_store()
    assert store.history(T, "nobody") is None
    assert ids(store) == []


def test_the_window_keeps_the_latest_exchanges_in_order(make_store: StoreFactory):
    store = make_store(window=3)
    for n in range(5):
        store.append(T, "s", turn(n))
    assert store.history(T, "s") == [turn(2), turn(3), turn(4)]


def test_a_window_of_zero_keeps_the_session_without_history(make_store: StoreFactory):
    store = make_store(window=0)
    store.append(T, "s", turn(0))
    assert store.history(T, "s") == []
    assert ids(store) == ["s"]


def test_sessions_are_listed_least_recently_used_first(make_store: StoreFactory):
    store = make_store()
    for session in ("a", "b", "c"):
        store.append(T, session, turn(0))
    store.append(T, "a", turn(1))
    assert ids(store) == ["b", "c", "a"]
    assert store.count() == 3


def test_past_max_sessions_the_least_recently_used_are_removed(make_store: StoreFactory):
    store = make_store(max_sessions=2)
    assert store.append(T, "a", turn(0)) == []
    assert store.append(T, "b", turn(0)) == []
    store.append(T, "a", turn(1))  # b is now the least recently used
    assert store.append(T, "c", turn(0)) == [(T, "b")]
    assert ids(store) == ["a", "c"]
    assert store.history(T, "b") is None


def test_delete_forgets_a_session_and_refuses_an_unknown_one(make_store: StoreFactory):
    store = make_store()
    store.append(T, "a", turn(0))
    store.append(T, "b", turn(0))
    store.delete(T, "a")
    assert store.history(T, "a") is None
    assert ids(store) == ["b"]
    with pytest.raises(SessionNotFound):
        store.delete(T, "a")


def test_expire_removes_sessions_unused_for_longer_than_the_ttl(make_store: StoreFactory):
    clock = Clock()
    store = make_store(ttl_s=60, clock=clock)
    store.append(T, "old", turn(0))
    clock.now += 30
    store.append(T, "recent", turn(0))
    clock.now += 31  # "old" unused for 61 s, "recent" for 31 s
    assert store.expire() == [(T, "old")]
    assert ids(store) == ["recent"]
    assert store.expire() == []


def test_a_ttl_of_zero_never_expires(make_store: StoreFactory):
    clock = Clock()
    store = make_store(ttl_s=0, clock=clock)
    store.append(T, "s", turn(0))
    clock.now += 10**9
    assert store.expire() == []
    assert ids(store) == ["s"]


def test_sqlite_keeps_sessions_windows_and_order_across_a_reopen(tmp_path: Path):
    retention = Retention(window=2, max_sessions=10, ttl_s=0)
    store = SqliteSessionStore(tmp_path / "s.db", retention)
    for n in range(3):
        store.append(T, "a", turn(n))
    store.append(T, "b", turn(9))
    store.append(T, "a", turn(3))
    store.delete(T, "b")
    store.append(T, "c", turn(0))
    # Not closed: as after a crash, only what was committed counts.
    reopened = SqliteSessionStore(tmp_path / "s.db", retention)
    assert ids(reopened) == ["a", "c"]
    assert reopened.history(T, "a") == [turn(2), turn(3)]
    assert reopened.history(T, "c") == [turn(0)]


def test_sqlite_uses_wal_with_full_sync(tmp_path: Path):
    SqliteSessionStore(tmp_path / "s.db", Retention(5, 10, 0)).append(T, "s", turn(0))
    reader = sqlite3.connect(tmp_path / "s.db")
    assert reader.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_store_that_cannot_be_opened_says_where(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SessionStoreError, match=r"cannot open .*file/sessions\.db"):
        SqliteSessionStore(blocker / "sessions.db", Retention(5, 10, 0))


def test_a_failed_write_keeps_nothing_and_raises_a_store_error(tmp_path: Path):
    store = SqliteSessionStore(tmp_path / "s.db", Retention(5, 10, 0))
    store.append(T, "s", turn(0))
    # Another connection holds the write lock past the store's busy timeout.
    blocker = sqlite3.connect(tmp_path / "s.db", isolation_level=None, timeout=0)
    blocker.execute("BEGIN IMMEDIATE")
    store._db.execute("PRAGMA busy_timeout = 50")
    with pytest.raises(SessionStoreError, match="locked"):
        store.append(T, "s", turn(1))
    blocker.execute("ROLLBACK")
    assert store.history(T, "s") == [turn(0)]


def test_memory_is_chosen_by_its_name(tmp_path: Path):
    retention = Retention(5, 10, 0)
    assert isinstance(open_session_store(":memory:", retention), InMemorySessionStore)
    assert isinstance(open_session_store(str(tmp_path / "x.db"), retention), SqliteSessionStore)


def test_a_file_that_is_not_a_database_is_refused_at_open(tmp_path: Path):
    path = tmp_path / "s.db"
    path.write_bytes(b"this is no SQLite file" * 100)
    with pytest.raises(SessionStoreError, match="file is not a database"):
        SqliteSessionStore(path, Retention(5, 10, 0))


def test_a_damaged_database_is_refused_at_open(tmp_path: Path):
    path = tmp_path / "s.db"
    store = SqliteSessionStore(path, Retention(5, 1000, 0))
    for n in range(200):
        store.append(T, f"session {n}", Exchange("q" * 200, "a" * 200))
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 8 * page
    data[3 * page : 6 * page] = b"\xa5" * (3 * page)  # pages in the middle, header intact
    path.write_bytes(bytes(data))
    with pytest.raises(SessionStoreError, match=r"corrupt|malformed"):
        SqliteSessionStore(path, Retention(5, 1000, 0))


def test_a_full_store_refuses_writes_keeps_what_it_had_and_recovers(tmp_path: Path):
    store = SqliteSessionStore(tmp_path / "s.db", Retention(5, 10, 0))
    store.append(T, "big", Exchange("q", "x" * 50_000))
    (pages,) = store._db.execute("PRAGMA page_count").fetchone()
    store._db.execute(f"PRAGMA max_page_count = {pages}")  # as a full disk
    with pytest.raises(SessionStoreError, match="full"):
        store.append(T, "s", Exchange("q" * 10_000, "a"))
    with pytest.raises(SessionStoreError, match="full"):
        store.check_writable()
    assert store.history(T, "s") is None and store.history(T, "big") is not None
    store.delete(T, "big")  # frees pages
    store.check_writable()
    store.append(T, "s", Exchange("q" * 10_000, "a"))
    assert ids(store) == ["s"]


def test_tenants_never_see_or_touch_each_others_sessions(make_store: StoreFactory):
    store = make_store()
    store.append("acme", "shared-id", turn(1))
    store.append("globex", "shared-id", turn(2))
    assert store.history("acme", "shared-id") == [turn(1)]
    assert store.history("globex", "shared-id") == [turn(2)]
    assert ids(store, "acme") == ["shared-id"] and ids(store, "initech") == []
    store.delete("acme", "shared-id")
    assert store.history("globex", "shared-id") == [turn(2)]
    with pytest.raises(SessionNotFound):
        store.delete("acme", "shared-id")


def test_max_sessions_is_per_tenant_so_one_evicts_only_its_own(make_store: StoreFactory):
    store = make_store(max_sessions=2)
    store.append("victim", "v", turn(0))
    for n in range(3):
        store.append("noisy", f"n{n}", turn(n))
    assert ids(store, "victim") == ["v"]
    assert ids(store, "noisy") == ["n1", "n2"]


def test_listing_comes_in_pages_with_a_cursor(make_store: StoreFactory):
    store = make_store()
    for n in range(5):
        store.append(T, f"s{n}", turn(n))
    first = store.list_sessions(T, 3)
    assert first.ids == ["s0", "s1", "s2"] and first.next_cursor is not None
    second = store.list_sessions(T, 3, first.next_cursor)
    assert second.ids == ["s3", "s4"] and second.next_cursor is None
    with pytest.raises(InvalidRequest, match="cursor"):
        store.list_sessions(T, 3, "not-a-cursor")


def test_a_sessions_stored_text_is_bounded_in_bytes(make_store: StoreFactory):
    store = make_store(window=10, max_bytes=1000)
    for n in range(5):
        store.append(T, "s", Exchange(f"q{n}" + "é" * 150, "a"))  # about 300 bytes each
    kept = store.history(T, "s")
    assert kept is not None and [e.user[:2] for e in kept] == ["q2", "q3", "q4"]
    store.append(T, "s", Exchange("x" * 5000, "big"))  # the newest always stays
    assert store.history(T, "s") == [Exchange("x" * 5000, "big")]


def test_a_store_of_the_first_schema_is_migrated_to_the_default_tenant(tmp_path: Path):
    path = tmp_path / "v1.db"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE sessions (id TEXT PRIMARY KEY, last_used REAL NOT NULL,
                               use_order INTEGER NOT NULL);
        CREATE INDEX sessions_by_use ON sessions (use_order);
        CREATE INDEX sessions_by_time ON sessions (last_used);
        CREATE TABLE exchanges (
            session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            turn INTEGER NOT NULL, user TEXT NOT NULL, assistant TEXT NOT NULL,
            PRIMARY KEY (session_id, turn));
        INSERT INTO sessions VALUES ('a', 1.0, 1), ('b', 2.0, 2);
        INSERT INTO exchanges VALUES ('a', 1, 'question 0', 'answer 0'),
                                     ('a', 2, 'question 1', 'answer 1');
        """
    )
    old.close()
    store = SqliteSessionStore(path, Retention(5, 10, 0))
    assert ids(store) == ["a", "b"]
    assert store.history(T, "a") == [turn(0), turn(1)]
    store.append(T, "a", turn(2))
    store.close()
    reopened = SqliteSessionStore(path, Retention(5, 10, 0))
    assert reopened.history(T, "a") == [turn(0), turn(1), turn(2)]


def test_a_cursor_that_is_not_ours_is_a_clear_error(make_store: StoreFactory):
    store = make_store()
    for cursor in ("²", "-1", "1" * 40, "abc"):
        with pytest.raises(InvalidRequest, match="cursor"):
            store.list_sessions(T, 10, cursor)


def test_cursors_count_per_tenant_and_tell_nothing_of_others(make_store: StoreFactory):
    store = make_store()
    store.append("acme", "a1", turn(0))
    store.append("acme", "a2", turn(0))
    first = store.list_sessions("acme", 1)
    for n in range(50):
        store.append("globex", f"g{n}", turn(n))  # another tenant's traffic
    assert store.list_sessions("acme", 1).next_cursor == first.next_cursor == "1"


def test_a_read_gives_the_history_with_its_version(make_store: StoreFactory):
    store = make_store()
    unknown = store.read(T, "s")
    assert (unknown.exchanges, unknown.version, unknown.replay) == ([], 0, None)
    store.append(T, "s", turn(0), expected_version=0)
    first = store.read(T, "s")
    store.append(T, "s", turn(1), expected_version=first.version)
    second = store.read(T, "s")
    assert first.exchanges == [turn(0)] and second.exchanges == [turn(0), turn(1)]
    assert 0 < first.version < second.version


def test_a_clear_between_the_read_and_the_append_keeps_nothing(make_store: StoreFactory):
    store = make_store()
    store.append(T, "s", turn(0))
    prompt_built_from = store.read(T, "s")
    store.delete(T, "s")
    with pytest.raises(HistoryChanged, match="history changed"):
        store.append(T, "s", turn(1), expected_version=prompt_built_from.version)
    assert store.history(T, "s") is None and ids(store) == []


def test_another_turn_between_the_read_and_the_append_wins(make_store: StoreFactory):
    store = make_store()
    store.append(T, "s", turn(0))
    mine = store.read(T, "s")
    store.append(T, "s", turn(1), expected_version=store.read(T, "s").version)  # another
    with pytest.raises(HistoryChanged):
        store.append(T, "s", turn(2), expected_version=mine.version)
    assert store.history(T, "s") == [turn(0), turn(1)]


def test_a_new_session_made_meanwhile_refuses_a_turn_built_on_none(make_store: StoreFactory):
    store = make_store()
    store.append(T, "s", turn(1))  # another replica made it after my read found none
    with pytest.raises(HistoryChanged):
        store.append(T, "s", turn(2), expected_version=0)
    assert store.history(T, "s") == [turn(1)]


def test_a_cleared_and_remade_session_never_has_its_old_version(make_store: StoreFactory):
    store = make_store()
    store.append(T, "s", turn(0))
    old = store.read(T, "s")
    store.delete(T, "s")
    store.append(T, "s", turn(9))  # as many exchanges as before, a new conversation
    assert store.read(T, "s").version != old.version
    with pytest.raises(HistoryChanged):
        store.append(T, "s", turn(1), expected_version=old.version)


def test_a_request_id_is_answered_its_kept_reply_and_never_kept_twice(
    make_store: StoreFactory,
):
    store = make_store()
    record = RequestRecord("req-1", "length", 7)
    store.append(T, "s", turn(0), expected_version=0, request=record)
    retry = store.read(T, "s", "req-1")
    assert retry.replay == StoredReply("answer 0", "length", 7, "question 0")
    assert store.read(T, "s", "req-2").replay is None
    assert store.read("other", "s", "req-1").replay is None  # ids are per session
    with pytest.raises(HistoryChanged):
        store.append(T, "s", turn(0), expected_version=retry.version, request=record)
    assert store.history(T, "s") == [turn(0)]


def test_a_request_id_is_forgotten_with_its_exchange(make_store: StoreFactory):
    store = make_store(window=2)
    store.append(T, "s", turn(0), request=RequestRecord("old", "stop", 2))
    store.append(T, "s", turn(1))
    assert store.read(T, "s", "old").replay is not None
    store.append(T, "s", turn(2))  # turn 0 leaves the window, its id with it
    assert store.read(T, "s", "old").replay is None


def test_texts_with_nul_and_any_unicode_are_kept_as_they_came(make_store: StoreFactory):
    store = make_store()
    odd = Exchange("a\x00b \U0001f600 \u00e9", "\x00")
    store.append(T, "id \x00 \u00e9", odd, request=RequestRecord("r\x00", "stop", 1))
    assert store.history(T, "id \x00 \u00e9") == [odd]
    assert store.read(T, "id \x00 \u00e9", "r\x00").replay == StoredReply(
        "\x00", "stop", 1, "a\x00b \U0001f600 \u00e9"
    )
    assert ids(store) == ["id \x00 \u00e9"]


def test_a_store_of_the_second_schema_gets_versions_and_request_ids(tmp_path: Path):
    path = tmp_path / "v2.db"
    store = SqliteSessionStore(path, Retention(5, 10, 0))
    store.append(T, "a", turn(0))
    store.close()
    old = sqlite3.connect(path, isolation_level=None)  # back to version 2, as it was
    old.executescript(
        """
        BEGIN;
        DROP INDEX exchanges_by_request;
        DROP TABLE versions;
        ALTER TABLE exchanges DROP COLUMN request_id;
        ALTER TABLE exchanges DROP COLUMN finish_reason;
        ALTER TABLE exchanges DROP COLUMN completion_tokens;
        ALTER TABLE sessions DROP COLUMN version;
        PRAGMA user_version = 2;
        COMMIT;
        """
    )
    old.close()
    store = SqliteSessionStore(path, Retention(5, 10, 0))
    before = store.read(T, "a")
    assert before.exchanges == [turn(0)] and before.version > 0
    store.append(
        T, "a", turn(1), expected_version=before.version, request=RequestRecord("r", "stop", 1)
    )
    assert store.read(T, "a", "r").replay == StoredReply("answer 1", "stop", 1, "question 1")
    assert store.read(T, "a").version > before.version
