"""API key on both protocols, TLS and a Unix socket between gateway and core,
and requests whose bytes do not parse (against the fake engine; the same key
checks against real processes: tests/e2e/test_reliability.py)."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inference_server.server import CoreServer, TlsFiles, create_server
from llamachat.v1 import chat_pb2, chat_pb2_grpc
from llamachat_process.tenants import load_key_ring
from tests.fake_engine import FakeEngine

from .conftest import gateway_for

KEY = "s3cret-key"
BEARER = (("authorization", f"Bearer {KEY}"),)


@pytest.fixture
async def locked_core(engine: FakeEngine) -> AsyncIterator[CoreServer]:
    core = await create_server("127.0.0.1:0", engine, keys=load_key_ring(KEY, None, None))
    await core.server.start()
    await core.set_serving(True)
    yield core
    await core.server.stop(None)


@pytest.fixture
async def locked_stub(locked_core: CoreServer) -> AsyncIterator[chat_pb2_grpc.ChatServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{locked_core.port}") as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer wrong"),), (("authorization", KEY),), (("x-api-key", KEY),)],
    ids=["none", "wrong key", "no Bearer", "other header"],
)
async def test_grpc_without_the_key_is_unauthenticated(locked_stub, engine, metadata):
    for call in (
        locked_stub.Chat(chat_pb2.ChatRequest(message="hi"), metadata=metadata),
        locked_stub.ListSessions(chat_pb2.ListSessionsRequest(), metadata=metadata),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "API key" in (caught.value.details() or "")
    stream = locked_stub.ChatStream(chat_pb2.ChatStreamRequest(message="hi"), metadata=metadata)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [m async for m in stream]
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert engine.requests == []  # refused before the engine saw anything


async def test_grpc_with_the_key_is_served_and_health_needs_none(locked_stub, locked_core):
    reply = await locked_stub.Chat(chat_pb2.ChatRequest(message="hi"), metadata=BEARER)
    assert reply.text == "Hello, world!"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{locked_core.port}") as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
async def locked_http(locked_core: CoreServer):
    async with gateway_for(grpc_address=f"127.0.0.1:{locked_core.port}", api_key=KEY) as http:
        yield http


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEY}"}, {"X-API-Key": "x"}],
    ids=["none", "wrong bearer", "basic", "wrong x-api-key"],
)
async def test_rest_without_the_key_is_401_everywhere_but_public_paths(locked_http, headers):
    for method, path, body in [
        ("POST", "/chat", {"message": "hi"}),
        ("POST", "/chat/stream", {"message": "hi"}),
        ("POST", "/chat/clear", {"session_id": "x"}),
        ("GET", "/sessions", None),
        ("GET", "/sessions/x", None),
    ]:
        response = await locked_http.request(method, path, json=body, headers=headers)
        assert response.status_code == 401, path
        assert "API key" in response.json()["detail"]
        assert response.headers["www-authenticate"] == "Bearer"
    for path in ("/", "/health", "/docs", "/redoc", "/openapi.json"):
        assert (await locked_http.get(path, headers=headers)).status_code == 200, path


@pytest.mark.parametrize(
    "headers", [{"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}], ids=["bearer", "x-api-key"]
)
async def test_rest_with_the_key_reaches_the_locked_core(locked_http, headers):
    response = await locked_http.post("/chat", json={"message": "hi"}, headers=headers)
    assert response.status_code == 200
    assert response.json()["response"] == "Hello, world!"
    async with locked_http.stream(
        "POST", "/chat/stream", json={"message": "hi"}, headers=headers
    ) as stream:
        assert stream.status_code == 200
        assert '"done": true' in "".join([line async for line in stream.aiter_lines()])


async def test_a_gateway_without_the_key_gets_401_from_a_locked_core(locked_core):
    async with gateway_for(grpc_address=f"127.0.0.1:{locked_core.port}") as http:
        response = await http.post("/chat", json={"message": "hi"})
    assert response.status_code == 401
    assert "API key" in response.json()["detail"]


@pytest.mark.parametrize(
    "method, payload",
    [
        ("Chat", b"\x0a\x02\xff\xfe"),  # message = two bytes that are not UTF-8
        ("Chat", b"\x0a\x05hi"),  # message's length runs past the end
        ("ChatStream", b"\xff\xff\xff"),  # not a protobuf message at all
        ("Clear", b"\x0a\x01\x80"),
        ("GetSession", b"\x0a\x01\xc3"),
    ],
)
async def test_request_bytes_that_do_not_parse_are_invalid_argument(channel, method, payload):
    call = f"/llamachat.v1.ChatService/{method}"
    if method == "ChatStream":
        invoke = channel.unary_stream(call)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [m async for m in invoke(payload)]
    else:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(call)(payload)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a valid" in (caught.value.details() or "")


async def test_get_session_returns_the_kept_exchanges_or_not_found(stub, http):
    first = await stub.Chat(chat_pb2.ChatRequest(message="one"))
    await stub.Chat(chat_pb2.ChatRequest(message="two", session_id=first.session_id))
    reply = await stub.GetSession(chat_pb2.GetSessionRequest(session_id=first.session_id))
    assert [(e.user, e.assistant) for e in reply.exchanges] == [
        ("one", "Hello, world!"),
        ("two", "Hello, world!"),
    ]
    response = await http.get(f"/sessions/{first.session_id}")
    assert response.json() == {
        "session_id": first.session_id,
        "exchanges": [
            {"user": "one", "assistant": "Hello, world!"},
            {"user": "two", "assistant": "Hello, world!"},
        ],
    }
    missing = await http.get("/sessions/nobody")
    assert (missing.status_code, missing.json()) == (404, {"detail": "Session not found"})


def self_signed_certificate(folder: Path) -> TlsFiles:
    """A certificate for 127.0.0.1 and localhost, made by the openssl command."""
    tls = TlsFiles(folder / "cert.pem", folder / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(tls.private_key), "-out", str(tls.certificate)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return tls


async def test_gateway_reaches_a_tls_core_and_a_plaintext_client_cannot(engine, tmp_path):
    tls = self_signed_certificate(tmp_path)
    core = await create_server("127.0.0.1:0", engine, tls=tls)
    await core.server.start()
    await core.set_serving(True)
    try:
        address = f"localhost:{core.port}"
        async with gateway_for(grpc_address=address, grpc_tls_ca=tls.certificate) as http:
            assert (await http.get("/health")).json()["model_loaded"] is True
            assert (await http.post("/chat", json={"message": "hi"})).status_code == 200
        async with gateway_for(grpc_address=address) as plaintext:
            assert (await plaintext.post("/chat", json={"message": "hi"})).status_code == 503
    finally:
        await core.server.stop(None)


async def test_gateway_reaches_the_core_over_a_unix_socket(engine, tmp_path):
    address = f"unix:{tmp_path / 'core.sock'}"
    core = await create_server(address, engine)
    await core.server.start()
    await core.set_serving(True)
    try:
        async with gateway_for(grpc_address=address) as http:
            assert (await http.post("/chat", json={"message": "hi"})).status_code == 200
    finally:
        await core.server.stop(None)
