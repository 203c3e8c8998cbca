"""The real processes with SESSION_DB=postgresql://... on a real PostgreSQL
server: the history outlives the core, a retried turn (Idempotency-Key) is
answered its kept reply, and a bad URL stops the core at once."""

from __future__ import annotations

import httpx

from tests.helpers import free_port
from tests.postgres_server import PostgresServer

from .conftest import service_env, start, start_both, stop, wait_healthy
from .test_lifecycle import run_core


def test_a_session_outlives_a_restart_of_the_core_and_a_retry_is_not_a_second_turn(
    postgres: PostgresServer, tmp_path
):
    dsn = postgres.new_database()
    env = {**service_env(free_port(), free_port(), tmp_path), "SESSION_DB": dsn}
    running = start_both(env, tmp_path)
    core, gateway = running.core, running.gateway
    try:
        turn = {"message": "My name is Ada.", "session_id": "ada", "max_tokens": 6}
        key = {"Idempotency-Key": "ada-turn-1"}
        first = httpx.post(f"{running.url}/chat", json={**turn, "temperature": 0}, headers=key)
        assert first.status_code == 200, first.text
        assert stop(core) == 0
        core = start(["-m", "inference_server"], env, tmp_path / "core-again.log")
        wait_healthy(running.url, [core, gateway])
        kept = httpx.get(f"{running.url}/sessions/ada").json()["exchanges"]
        assert kept == [{"user": "My name is Ada.", "assistant": first.json()["response"]}]
        # The client never saw the answer, say, and sends the same turn again.
        retry = httpx.post(f"{running.url}/chat", json={**turn, "temperature": 1.5}, headers=key)
        assert retry.json() == first.json()
        assert httpx.get(f"{running.url}/sessions/ada").json()["exchanges"] == kept
    finally:
        codes = (stop(gateway), stop(core))
    assert codes == (0, 0), f"logs in {tmp_path}"


def test_a_bad_postgresql_url_stops_the_core_with_one_line_and_status_2(tmp_path):
    done = run_core(tmp_path, SESSION_DB="postgresql://ada:secret@127.0.0.1:1/sessions")
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, done.stderr
    assert "cannot open postgresql://ada:***@127.0.0.1:1/sessions" in errors[0]
    assert "secret" not in done.stderr
