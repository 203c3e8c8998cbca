"""Tenants: several API keys, each naming whose sessions a caller sees, on
both protocols, with the fake engine over real gRPC and HTTP (the real store
rules: tests/unit/test_sessions.py; the real engine: test_isolation.py)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from inference_server.server import CoreServer, create_server
from llamachat.v1 import chat_pb2, chat_pb2_grpc
from llamachat_process.tenants import (
    DEFAULT_TENANT,
    KeyFileError,
    bearer_token,
    load_key_ring,
    parse_keys_file,
)
from tests.fake_engine import FakeEngine

from .conftest import gateway_for

ACME_KEY, GLOBEX_KEY = "acme-key-1", "globex-key-1"
KEYS_FILE = f"""# tenant key
acme {ACME_KEY}

globex sha256:{hashlib.sha256(GLOBEX_KEY.encode()).hexdigest()}  # kept as a digest
"""


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    path.write_text(KEYS_FILE)
    return path


async def start_core(engine: FakeEngine, keys_file: Path, rate_limit: int = 0) -> CoreServer:
    keys = load_key_ring(None, None, keys_file)
    core = await create_server("127.0.0.1:0", engine, keys=keys, rate_limit_per_minute=rate_limit)
    await core.server.start()
    await core.set_serving(True)
    return core


@pytest.fixture
async def tenant_core(engine: FakeEngine, keys_file: Path) -> AsyncIterator[CoreServer]:
    core = await start_core(engine, keys_file)
    yield core
    await core.server.stop(None)


@pytest.fixture
async def tenant_stub(tenant_core: CoreServer) -> AsyncIterator[chat_pb2_grpc.ChatServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{tenant_core.port}") as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


def test_the_keys_file_names_tenants_and_keeps_digests(keys_file: Path):
    ring = load_key_ring(None, None, keys_file)
    assert ring.tenant_for(ACME_KEY) == "acme"
    assert ring.tenant_for(GLOBEX_KEY) == "globex"
    assert ring.tenant_for("sha256:" + hashlib.sha256(GLOBEX_KEY.encode()).hexdigest()) is None
    assert ring.tenant_for("nope") is None and ring.tenant_for(None) is None
    assert load_key_ring(None, None, None).tenant_for(None) == DEFAULT_TENANT  # no keys: open


@pytest.mark.parametrize(
    "line, problem",
    [
        ("acme", "expected 'TENANT KEY'"),
        ("acme key extra", "expected 'TENANT KEY'"),
        ("a/b key", "a tenant is 1 to 64"),
        ("acme sha256:abc", "sha256: must be followed by 64 hexadecimal digits"),
        (f"globex {GLOBEX_KEY}", "this key is listed already"),
    ],
)
def test_a_malformed_keys_file_says_which_line(line: str, problem: str):
    with pytest.raises(KeyFileError, match=f"line 2: {problem}"):
        parse_keys_file(f"other {GLOBEX_KEY}\n{line}\n")


def test_a_hash_sign_inside_a_key_is_part_of_it():
    (entry,) = parse_keys_file("acme k#Xy9 # a comment\n")
    assert entry == ("acme", hashlib.sha256(b"k#Xy9").digest())


def test_api_key_file_holds_one_key_of_the_default_tenant(tmp_path: Path):
    path = tmp_path / "key"
    path.write_text("file-key\n")
    assert load_key_ring(None, path, None).tenant_for("file-key") == DEFAULT_TENANT
    path.write_text("\n")
    with pytest.raises(KeyFileError, match="empty"):
        load_key_ring(None, path, None)


def test_the_bearer_scheme_is_read_in_any_case():
    assert bearer_token("bearer k") == bearer_token("BEARER k") == bearer_token("Bearer  k") == "k"
    assert bearer_token("Basic k") is None and bearer_token("Bearer ") is None


async def test_grpc_keeps_each_tenants_sessions_to_itself(tenant_stub):
    acme, globex = bearer(ACME_KEY), bearer(GLOBEX_KEY)
    await tenant_stub.Chat(
        chat_pb2.ChatRequest(message="acme secret", session_id="s"), metadata=acme
    )
    listed = await tenant_stub.ListSessions(chat_pb2.ListSessionsRequest(), metadata=globex)
    assert list(listed.session_ids) == []
    for call in (
        tenant_stub.GetSession(chat_pb2.GetSessionRequest(session_id="s"), metadata=globex),
        tenant_stub.Clear(chat_pb2.ClearRequest(session_id="s"), metadata=globex),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # Sending acme's id starts globex's own session of that id.
    await tenant_stub.Chat(chat_pb2.ChatRequest(message="globex", session_id="s"), metadata=globex)
    theirs = await tenant_stub.GetSession(
        chat_pb2.GetSessionRequest(session_id="s"), metadata=globex
    )
    assert [e.user for e in theirs.exchanges] == ["globex"]
    mine = await tenant_stub.GetSession(chat_pb2.GetSessionRequest(session_id="s"), metadata=acme)
    assert [e.user for e in mine.exchanges] == ["acme secret"]


async def test_grpc_accepts_the_bearer_scheme_in_lower_case(tenant_stub):
    metadata = (("authorization", f"bearer {ACME_KEY}"),)
    reply = await tenant_stub.Chat(chat_pb2.ChatRequest(message="hi"), metadata=metadata)
    assert reply.text == "Hello, world!"


async def test_rest_keeps_each_tenants_sessions_to_itself(tenant_core, keys_file):
    acme = {"Authorization": f"Bearer {ACME_KEY}"}
    globex = {"X-API-Key": GLOBEX_KEY}
    address = f"127.0.0.1:{tenant_core.port}"
    async with gateway_for(grpc_address=address, api_keys_file=keys_file) as http:
        made = await http.post("/chat", json={"message": "acme secret"}, headers=acme)
        session = made.json()["session_id"]
        assert (await http.get("/sessions", headers=acme)).json()["sessions"] == [session]
        assert (await http.get("/sessions", headers=globex)).json() == {"sessions": [], "count": 0}
        for method, path, body in [
            ("GET", f"/sessions/{session}", None),
            ("POST", "/chat/clear", {"session_id": session}),
        ]:
            response = await http.request(method, path, json=body, headers=globex)
            assert response.status_code == 404, path
        await http.post("/chat", json={"message": "globex", "session_id": session}, headers=globex)
        mine = (await http.get(f"/sessions/{session}", headers=acme)).json()["exchanges"]
        assert [e["user"] for e in mine] == ["acme secret"]
        assert (await http.get("/sessions", headers={"X-API-Key": "nope"})).status_code == 401


async def test_a_tenant_past_its_rate_limit_gets_429_with_retry_after(engine, keys_file):
    core = await start_core(engine, keys_file, rate_limit=3)
    try:
        address = f"127.0.0.1:{core.port}"
        async with gateway_for(grpc_address=address, api_keys_file=keys_file) as http:
            acme = {"X-API-Key": ACME_KEY}
            codes = [
                (await http.post("/chat", json={"message": "hi"}, headers=acme)).status_code
                for _ in range(4)
            ]
            limited = await http.post("/chat", json={"message": "hi"}, headers=acme)
            other = await http.post(
                "/chat", json={"message": "hi"}, headers={"X-API-Key": GLOBEX_KEY}
            )
    finally:
        await core.server.stop(None)
    assert codes == [200, 200, 200, 429]
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert "Rate limit" in limited.json()["detail"]
    assert other.status_code == 200  # the other tenant's bucket is its own


async def test_past_max_concurrent_rpcs_a_call_is_refused(engine):
    engine.hang_after = 1  # streams stay open
    core = await create_server("127.0.0.1:0", engine, max_concurrent_rpcs=2)
    await core.server.start()
    await core.set_serving(True)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            open_streams = [
                stub.ChatStream(chat_pb2.ChatStreamRequest(message="hi")) for _ in range(2)
            ]
            for stream in open_streams:
                await stream.read()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Chat(chat_pb2.ChatRequest(message="hi"))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for stream in open_streams:
                stream.cancel()
    finally:
        await core.server.stop(None)
