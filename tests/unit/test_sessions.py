"""Both session stores keep the same promises; the SQLite one also keeps them
across a reopen (the crash test with real processes: tests/e2e/test_reliability.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from inference_server.domain import Exchange
from inference_server.errors import SessionNotFound, SessionStoreError
from inference_server.sessions import (
    InMemorySessionStore,
    Retention,
    SessionStore,
    SqliteSessionStore,
    open_session_store,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


StoreFactory = Callable[..., SessionStore]


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request, tmp_path: Path) -> StoreFactory:
    def make(
        window: int = 3, max_sessions: int = 100, ttl_s: float = 0, clock=None
    ) -> SessionStore:
        retention = Retention(window, max_sessions, ttl_s, clock or Clock())
        if request.param == "memory":
            return InMemorySessionStore(retention)
        return SqliteSessionStore(tmp_path / "sessions.db", retention)

    return make


def turn(n: int) -> Exchange:
    return Exchange(f"question {n}", f"answer {n}")


def test_an_unknown_session_has_no_history(make_store: StoreFactory):
    store = make_store()
    assert store.history("nobody") is None
    assert store.session_ids() == []


def test_the_window_keeps_the_latest_exchanges_in_order(make_store: StoreFactory):
    store = make_store(window=3)
    for n in range(5):
        store.append("s", turn(n))
    assert store.history("s") == [turn(2), turn(3), turn(4)]


def test_a_window_of_zero_keeps_the_session_without_history(make_store: StoreFactory):
    store = make_store(window=0)
    store.append("s", turn(0))
    assert store.history("s") == []
    assert store.session_ids() == ["s"]


def test_sessions_are_listed_least_recently_used_first(make_store: StoreFactory):
    store = make_store()
    for session in ("a", "b", "c"):
        store.append(session, turn(0))
    store.append("a", turn(1))
    assert store.session_ids() == ["b", "c", "a"]
    assert store.count() == 3


def test_past_max_sessions_the_least_recently_used_are_removed(make_store: StoreFactory):
    store = make_store(max_sessions=2)
    assert store.append("a", turn(0)) == []
    assert store.append("b", turn(0)) == []
    store.append("a", turn(1))  # b is now the least recently used
    assert store.append("c", turn(0)) == ["b"]
    assert store.session_ids() == ["a", "c"]
    assert store.history("b") is None


def test_delete_forgets_a_session_and_refuses_an_unknown_one(make_store: StoreFactory):
    store = make_store()
    store.append("a", turn(0))
    store.append("b", turn(0))
    store.delete("a")
    assert store.history("a") is None
    assert store.session_ids() == ["b"]
    with pytest.raises(SessionNotFound):
        store.delete("a")


def test_expire_removes_sessions_unused_for_longer_than_the_ttl(make_store: StoreFactory):
    clock = Clock()
    store = make_store(ttl_s=60, clock=clock)
    store.append("old", turn(0))
    clock.now += 30
    store.append("recent", turn(0))
    clock.now += 31  # "old" unused for 61 s, "recent" for 31 s
    assert store.expire() == ["old"]
    assert store.session_ids() == ["recent"]
    assert store.expire() == []


def test_a_ttl_of_zero_never_expires(make_store: StoreFactory):
    clock = Clock()
    store = make_store(ttl_s=0, clock=clock)
    store.append("s", turn(0))
    clock.now += 10**9
    assert store.expire() == []
    assert store.session_ids() == ["s"]


def test_sqlite_keeps_sessions_windows_and_order_across_a_reopen(tmp_path: Path):
    retention = Retention(window=2, max_sessions=10, ttl_s=0)
    store = SqliteSessionStore(tmp_path / "s.db", retention)
    for n in range(3):
        store.append("a", turn(n))
    store.append("b", turn(9))
    store.append("a", turn(3))
    store.delete("b")
    store.append("c", turn(0))
    # Not closed: as after a crash, only what was committed counts.
    reopened = SqliteSessionStore(tmp_path / "s.db", retention)
    assert reopened.session_ids() == ["a", "c"]
    assert reopened.history("a") == [turn(2), turn(3)]
    assert reopened.history("c") == [turn(0)]


def test_sqlite_uses_wal_with_full_sync(tmp_path: Path):
    SqliteSessionStore(tmp_path / "s.db", Retention(5, 10, 0)).append("s", turn(0))
    reader = sqlite3.connect(tmp_path / "s.db")
    assert reader.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_store_that_cannot_be_opened_says_where(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SessionStoreError, match=r"cannot open .*file/sessions\.db"):
        SqliteSessionStore(blocker / "sessions.db", Retention(5, 10, 0))


def test_a_failed_write_keeps_nothing_and_raises_a_store_error(tmp_path: Path):
    store = SqliteSessionStore(tmp_path / "s.db", Retention(5, 10, 0))
    store.append("s", turn(0))
    # Another connection holds the write lock past the store's busy timeout.
    blocker = sqlite3.connect(tmp_path / "s.db", isolation_level=None, timeout=0)
    blocker.execute("BEGIN IMMEDIATE")
    store._db.execute("PRAGMA busy_timeout = 50")
    with pytest.raises(SessionStoreError, match="locked"):
        store.append("s", turn(1))
    blocker.execute("ROLLBACK")
    assert store.history("s") == [turn(0)]


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
        store.append(f"session {n}", Exchange("q" * 200, "a" * 200))
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
    store.append("big", Exchange("q", "x" * 50_000))
    (pages,) = store._db.execute("PRAGMA page_count").fetchone()
    store._db.execute(f"PRAGMA max_page_count = {pages}")  # as a full disk
    with pytest.raises(SessionStoreError, match="full"):
        store.append("s", Exchange("q" * 10_000, "a"))
    with pytest.raises(SessionStoreError, match="full"):
        store.check_writable()
    assert store.history("s") is None and store.history("big") is not None
    store.delete("big")  # frees pages
    store.check_writable()
    store.append("s", Exchange("q" * 10_000, "a"))
    assert store.session_ids() == ["s"]
