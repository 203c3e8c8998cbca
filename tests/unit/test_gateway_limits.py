"""What the gateway refuses to let one client do: other Host names, slow or
idle connections, unbounded listings; and how a failed stream is counted."""

from __future__ import annotations

import asyncio
import time

import pytest

from inference_server.domain import Exchange
from inference_server.sessions import InMemorySessionStore, Retention
from rest_gateway.hosts import allowed_names, host_name
from tests.fake_engine import FakeEngine

from .conftest import gateway_for


@pytest.mark.parametrize(
    "header, name",
    [("localhost:8002", "localhost"), ("[::1]:8002", "::1"), ("127.0.0.1", "127.0.0.1")],
)
def test_host_names_are_read_without_their_port(header, name):
    assert host_name(header) == name


def test_the_default_hosts_are_the_loopback_names_and_the_bind_address():
    assert allowed_names([], "127.0.0.1") == {"localhost", "127.0.0.1", "::1"}
    assert allowed_names([], "10.1.2.3") == {"localhost", "127.0.0.1", "::1", "10.1.2.3"}
    assert allowed_names([], "0.0.0.0") == {"localhost", "127.0.0.1", "::1"}
    assert allowed_names(["chat.example.com:443"], "0.0.0.0") == {"chat.example.com"}


async def test_a_request_for_another_host_is_refused_and_the_documented_ones_served(core):
    async with gateway_for(grpc_address=f"127.0.0.1:{core.port}") as http:
        for host in ("attacker.example:8002", "attacker.example", "127.0.0.1.nip.io"):
            refused = await http.get("/health", headers={"Host": host})
            assert refused.status_code == 400, host
            assert "ALLOWED_HOSTS" in refused.json()["detail"]
        for host in ("localhost:8002", "127.0.0.1:8002", "[::1]:8002", "LOCALHOST"):
            assert (await http.get("/health", headers={"Host": host})).status_code == 200, host
    address = f"127.0.0.1:{core.port}"
    async with gateway_for(grpc_address=address, allowed_hosts="chat.example.com") as http:
        assert (await http.get("/", headers={"Host": "chat.example.com"})).status_code == 200
        assert (await http.get("/", headers={"Host": "localhost"})).status_code == 400
    async with gateway_for(grpc_address=address, allowed_hosts="*") as http:
        assert (await http.get("/", headers={"Host": "anything.example"})).status_code == 200


async def open_connection(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def closed_within(reader: asyncio.StreamReader, timeout_s: float) -> float:
    """Seconds until the server closed the connection (read to its end)."""
    started = time.monotonic()
    await asyncio.wait_for(reader.read(), timeout_s)
    return time.monotonic() - started


async def test_idle_slow_header_and_slow_body_connections_are_closed(core):
    settings = {
        "grpc_address": f"127.0.0.1:{core.port}",
        "header_timeout_s": 1,
        "body_timeout_s": 1,
    }
    async with gateway_for(**settings) as http:
        url = str(http.base_url).rstrip("/")
        # Connected, sending nothing.
        idle_reader, _ = await open_connection(url)
        # Headers a few bytes at a time, never finished.
        slow_reader, slow_writer = await open_connection(url)

        async def trickle() -> None:
            for byte in b"GET /health HTTP/1.1\r\nHost: localhost\r\n":
                slow_writer.write(bytes([byte]))
                await asyncio.sleep(0.2)

        trickling = asyncio.create_task(trickle())
        # A body promised and not sent.
        body_reader, body_writer = await open_connection(url)
        body_writer.write(
            b"POST /chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        waits = await asyncio.gather(
            closed_within(idle_reader, 5),
            closed_within(slow_reader, 5),
            closed_within(body_reader, 5),
        )
        trickling.cancel()
        # A prompt client is still served.
        assert (await http.get("/health")).status_code == 200
    assert all(wait < 3 for wait in waits), waits


async def test_sessions_come_in_pages_however_many_there_are(core, engine: FakeEngine):
    # 2,500 ids of 256 bytes: 640 kB, more than one message should carry.
    ids = [f"{n:05d}".ljust(256, "x") for n in range(2500)]
    engine.store = InMemorySessionStore(Retention(window=5, max_sessions=10_000, ttl_s=0))
    for session_id in ids:
        engine.store.append("default", session_id, Exchange("q", "a"))
    async with gateway_for(grpc_address=f"127.0.0.1:{core.port}") as http:
        first = (await http.get("/sessions")).json()
        assert first["count"] == 1000 and first["sessions"] == ids[:1000]
        found, cursor = list(first["sessions"]), first["next_cursor"]
        while cursor:
            page = (await http.get("/sessions", params={"cursor": cursor, "limit": 700})).json()
            found += page["sessions"]
            cursor = page.get("next_cursor")
        assert found == ids
        assert (await http.get("/sessions", params={"limit": 0})).status_code == 422
        bad = await http.get("/sessions", params={"cursor": "nonsense"})
        assert bad.status_code == 400 and "cursor" in bad.json()["detail"]


async def test_a_stream_that_ends_in_an_error_event_is_counted_as_one(http, engine: FakeEngine):
    engine.fail_after = 2
    async with http.stream("POST", "/chat/stream", json={"message": "hi"}) as reply:
        assert reply.status_code == 200
        assert '"error"' in "".join([line async for line in reply.aiter_lines()])
    metrics = (await http.get("/metrics")).text
    assert (
        'llamachat:http_requests_total{endpoint="/chat/stream",method="POST",status="stream_error"}'
        " 1.0" in metrics
    )
    assert 'endpoint="/chat/stream",method="POST",status="200"' not in metrics
