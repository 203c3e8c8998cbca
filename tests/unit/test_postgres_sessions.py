"""The PostgreSQL store with several replicas at once, on a real server: the
behaviour every store shares is tested in test_sessions.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from inference_server.domain import Exchange
from inference_server.errors import HistoryChanged, SessionStoreError
from inference_server.postgres_sessions import (
    SCHEMA_VERSION,
    SWEEP_LOCK,
    PostgresSessionStore,
)
from inference_server.sessions import Retention, open_session_store
from tests.postgres_server import PostgresServer

T = "default"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dsn(postgres: PostgresServer) -> str:
    return postgres.new_schema()


@pytest.fixture
def replicas(dsn: str) -> Iterator[list[PostgresSessionStore]]:
    """Two stores on one database, as two replicas of the core have."""
    stores = [PostgresSessionStore(dsn, Retention(5, 100, 0)) for _ in range(2)]
    yield stores
    for store in stores:
        store.close()


def turn(n: int) -> Exchange:
    return Exchange(f"question {n}", f"answer {n}")


def test_it_is_chosen_by_a_postgresql_url(dsn: str):
    store = open_session_store(dsn, Retention(5, 10, 0))
    assert isinstance(store, PostgresSessionStore)
    store.close()


def test_two_replicas_appending_to_one_version_keep_exactly_one(
    replicas: list[PostgresSessionStore], dsn: str
):
    one, two = replicas
    one.append(T, "s", turn(0))
    version = one.read(T, "s").version
    # Both replicas' appends wait on the session's tenant, then race.
    blocker = psycopg.connect(dsn)
    blocker.execute("SELECT * FROM tenants FOR UPDATE")
    started = threading.Barrier(3)

    def append(store: PostgresSessionStore, n: int) -> str:
        started.wait()
        try:
            store.append(T, "s", turn(n), expected_version=version)
        except HistoryChanged:
            return "refused"
        return "kept"

    with ThreadPoolExecutor(2) as pool:
        outcomes = [pool.submit(append, store, n) for n, store in ((1, one), (2, two))]
        started.wait()
        blocker.rollback()
        results = sorted(outcome.result(timeout=10) for outcome in outcomes)
    blocker.close()
    assert results == ["kept", "refused"]
    history = two.history(T, "s")
    assert history is not None and len(history) == 2 and history[0] == turn(0)
    assert history[1] in (turn(1), turn(2))


def test_a_clear_by_another_replica_keeps_the_turn_out(replicas: list[PostgresSessionStore]):
    one, two = replicas
    one.append(T, "s", turn(0))
    built_on = one.read(T, "s")
    two.delete(T, "s")
    with pytest.raises(HistoryChanged):
        one.append(T, "s", turn(1), expected_version=built_on.version)
    assert two.history(T, "s") is None


def test_an_exchange_is_committed_synchronously(replicas: list[PostgresSessionStore]):
    one, two = replicas
    one.append(T, "s", turn(0))
    assert two.history(T, "s") == [turn(0)]  # committed: another connection sees it
    connection = one._connect()
    assert connection.execute("SHOW synchronous_commit").fetchone() == ("on",)


def test_the_ttl_sweep_runs_on_one_replica_at_a_time(dsn: str):
    clock = Clock()
    store = PostgresSessionStore(dsn, Retention(5, 100, ttl_s=60, clock=clock))
    store.append(T, "old", turn(0))
    clock.now += 61
    sweeping = psycopg.connect(dsn, autocommit=True)  # another replica, sweeping now
    sweeping.execute("SELECT pg_advisory_lock(%s)", (SWEEP_LOCK,))
    assert store.expire() == []
    assert store.history(T, "old") == [turn(0)]
    sweeping.execute("SELECT pg_advisory_unlock(%s)", (SWEEP_LOCK,))
    sweeping.close()
    assert store.expire() == [(T, "old")]
    assert store.history(T, "old") is None
    store.close()


def test_the_sweep_also_applies_a_lowered_max_sessions(dsn: str):
    before = PostgresSessionStore(dsn, Retention(5, 100, ttl_s=60))
    for n in range(4):
        before.append("acme", f"a{n}", turn(n))
    before.append("globex", "g", turn(0))
    before.close()
    after = PostgresSessionStore(dsn, Retention(5, 2, ttl_s=60))
    assert sorted(after.expire()) == [("acme", "a0"), ("acme", "a1")]
    assert after.list_sessions("acme", 10).ids == ["a2", "a3"]
    assert after.list_sessions("globex", 10).ids == ["g"]
    after.close()


def test_the_schema_is_created_at_open_and_kept_at_the_next(dsn: str):
    first = PostgresSessionStore(dsn, Retention(5, 10, 0))
    first.append(T, "s", turn(0))
    first.close()
    with psycopg.connect(dsn) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    again = PostgresSessionStore(dsn, Retention(5, 10, 0))
    assert again.history(T, "s") == [turn(0)]
    again.close()


def test_replicas_starting_together_on_an_empty_database_all_open(dsn: str):
    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: PostgresSessionStore(dsn, Retention(5, 10, 0)), range(4)))
    stores[0].append(T, "s", turn(0))
    assert [store.history(T, "s") for store in stores] == [[turn(0)]] * 4
    for store in stores:
        store.close()


def test_a_database_of_a_newer_schema_is_refused(dsn: str):
    PostgresSessionStore(dsn, Retention(5, 10, 0)).close()
    with psycopg.connect(dsn) as db:
        db.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(SessionStoreError, match="newer than this server's"):
        PostgresSessionStore(dsn, Retention(5, 10, 0))


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://user:secret@127.0.0.1:1/db", "connection"),
        ("postgresql://user:secret@127.0.0.1:notaport/db", "port"),
    ],
)
def test_a_bad_url_is_one_clear_line_without_the_password(dsn: str, expected: str):
    with pytest.raises(SessionStoreError) as caught:
        PostgresSessionStore(dsn, Retention(5, 10, 0))
    message = str(caught.value)
    assert "\n" not in message and "secret" not in message and expected in message
    assert message.startswith("Session store unavailable: cannot open postgresql://user:***@")


def test_a_restarted_server_is_reconnected_to_and_kept_everything(postgres: PostgresServer):
    dsn = postgres.new_schema()
    store = PostgresSessionStore(dsn, Retention(5, 10, 0))
    store.append(T, "s", turn(0))
    postgres.kill9()
    with pytest.raises(SessionStoreError):
        store.check_writable()  # while it is down: an error, not a hang
    postgres.start()
    store.append(T, "s", turn(1), expected_version=store.read(T, "s").version)
    assert store.history(T, "s") == [turn(0), turn(1)]
    store.close()
