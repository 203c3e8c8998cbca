"""Reliability with real processes on the real model: kill -9 and restart, 100
streams of which 10 drop, 2x overload, bad input on both protocols, SIGTERM
drain, a core restarted under a running gateway, and the API key. (A dropped
SSE or gRPC stream stopping generation: test_service.py.)"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llamachat.v1 import chat_pb2, chat_pb2_grpc
from tests.bad_inputs import (
    BAD_REST_BODIES,
    JSON_HEADERS,
    MALFORMED_REST_BODIES,
    MISDIRECTED_REST_REQUESTS,
    bad_chat_inputs,
    json_body,
)
from tests.e2e.conftest import Running, Service, service_env, start, start_both, stop, wait_healthy
from tests.helpers import free_port

N_CTX = 4096  # the core's default, which the module's service runs with
GREEDY = {"temperature": 0.0}


@contextmanager
def launched(tmp_path: Path, **settings: object) -> Iterator[Running]:
    """A core and a gateway with ``settings`` (environment variables), stopped
    with SIGTERM afterwards; both must exit 0."""
    env = {
        **service_env(free_port(), free_port(), tmp_path),
        **{k: str(v) for k, v in settings.items()},
    }
    running = start_both(env, tmp_path)
    try:
        yield running
    finally:
        codes = (stop(running.gateway), stop(running.core))
    assert codes == (0, 0), f"exit codes {codes}; logs in {tmp_path}"


def chat(url: str, message: str, **fields: Any) -> dict[str, Any]:
    reply = httpx.post(f"{url}/chat", json={"message": message, **fields}, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


def snapshot(url: str) -> dict[str, list[dict[str, str]]]:
    """Every session (in the listed order) with the exchanges it keeps."""
    ids = httpx.get(f"{url}/sessions", timeout=10).json()["sessions"]
    return {sid: httpx.get(f"{url}/sessions/{sid}", timeout=10).json()["exchanges"] for sid in ids}


def events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if line.startswith("data: "):
            yield json.loads(line[6:])


def test_kill_9_mid_stream_and_restart_keep_every_acknowledged_exchange(tmp_path):
    env = service_env(free_port(), free_port(), tmp_path)
    before = start_both(env, tmp_path, "before-")
    try:
        ids = []
        for n in range(3):
            first = chat(before.url, f"Name a colour, number {n}.", max_tokens=12, **GREEDY)
            chat(before.url, "And another?", session_id=first["session_id"], max_tokens=12)
            ids.append(first["session_id"])
        acknowledged = snapshot(before.url)
        assert list(acknowledged) == ids and all(len(w) == 2 for w in acknowledged.values())
        body = {"message": "Tell me a long story.", "session_id": ids[0], "max_tokens": 400}
        with httpx.stream("POST", f"{before.url}/chat/stream", json=body, timeout=60) as reply:
            assert "token" in next(events(reply.iter_lines()))
            before.core.kill()  # SIGKILL: no shutdown code runs
            before.gateway.kill()
            before.core.wait(), before.gateway.wait()
    finally:
        for process in (before.core, before.gateway):
            if process.poll() is None:
                process.kill()
    after = start_both(env, tmp_path, "after-")
    try:
        assert snapshot(after.url) == acknowledged  # nothing lost, no half exchange
        answer = chat(after.url, "One more?", session_id=ids[0], max_tokens=8)
        window = snapshot(after.url)[ids[0]]
        assert window[:2] == acknowledged[ids[0]]
        assert window[2] == {"user": "One more?", "assistant": answer["response"]}
    finally:
        assert (stop(after.gateway), stop(after.core)) == (0, 0)


@dataclass
class StreamOutcome:
    status: int
    text: str = ""
    done: bool = False


async def stream_reply(
    client: httpx.AsyncClient, message: str, drop_after: int | None
) -> StreamOutcome:
    """One SSE chat; with ``drop_after``, the client goes away after that many tokens."""
    body = {"message": message, "max_tokens": 24, **GREEDY}
    async with client.stream("POST", "/chat/stream", json=body) as reply:
        outcome = StreamOutcome(reply.status_code)
        tokens = 0
        async for line in reply.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            if event.get("done"):
                outcome.done = True
            else:
                outcome.text += event["token"]
                tokens += 1
            if tokens == drop_after:
                return outcome  # leaving the block closes the connection
    return outcome


async def storm(url: str, messages: list[str], dropped: set[int]) -> list[StreamOutcome]:
    limits = httpx.Limits(max_connections=len(messages))
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        return await asyncio.gather(
            *(
                stream_reply(client, message, 3 if index in dropped else None)
                for index, message in enumerate(messages)
            )
        )


def test_100_streams_of_which_10_drop_the_other_90_equal_their_greedy_replies_alone(tmp_path):
    prompts = [f"Write one sentence about the number {n}." for n in range(10)]
    with launched(tmp_path, N_SLOTS=8, MAX_QUEUE=100) as service:
        alone = [asyncio.run(storm(service.url, [prompt], set()))[0] for prompt in prompts]
        assert all(outcome.done and outcome.text for outcome in alone)
        dropped = set(range(7, 100, 10))
        outcomes = asyncio.run(storm(service.url, [prompts[i % 10] for i in range(100)], dropped))
        for index, outcome in enumerate(outcomes):
            assert outcome.status == 200
            if index in dropped:
                assert not outcome.done
            else:
                assert outcome.done, index
                assert outcome.text == alone[index % 10].text, index
        # The 10 sessions of the lone replies and the 90 completed ones; no dropped one.
        assert httpx.get(f"{service.url}/sessions").json()["count"] == 100


async def overload(url: str, requests: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=requests)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one(index: int) -> httpx.Response:
            path = "/chat" if index % 2 else "/chat/stream"
            body = {"message": f"Count to {index + 5}.", "max_tokens": 24}
            response = await client.post(path, json=body)
            return response

        return await asyncio.gather(*(one(i) for i in range(requests)))


def test_twice_the_capacity_gets_only_200_or_429_with_retry_after(tmp_path):
    with launched(tmp_path, N_SLOTS=2, MAX_QUEUE=2) as service:  # capacity 4
        responses = asyncio.run(overload(service.url, 8))
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 4 and statuses.count(429) >= 1, statuses
    for response in responses:
        if response.status_code == 429:
            assert response.headers["retry-after"] == "1"
            assert "Server busy" in response.json()["detail"]


@pytest.mark.parametrize("path", ["/chat", "/chat/stream"])
@pytest.mark.parametrize(("fields", "detail"), bad_chat_inputs(N_CTX))
def test_bad_values_over_rest_get_400(service: Service, path, fields, detail):
    reply = httpx.post(
        f"{service.url}{path}", content=json_body(fields), headers=JSON_HEADERS, timeout=30
    )
    assert reply.status_code == 400 and detail in reply.json()["detail"]


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [(body, 422, detail) for body, detail in MALFORMED_REST_BODIES]
    + [(body, 400, detail) for body, detail in BAD_REST_BODIES]
    + [('{"message": "' + "x" * 1_100_000 + '"}', 413, "the limit is 1048576")],
)
def test_bad_bodies_over_rest_get_a_4xx_saying_what_is_wrong(
    service: Service, body, status, detail
):
    reply = httpx.post(f"{service.url}/chat", content=body, headers=JSON_HEADERS, timeout=30)
    assert reply.status_code == status and detail in reply.json()["detail"]


@pytest.mark.parametrize(("method", "path", "body", "status"), MISDIRECTED_REST_REQUESTS)
def test_misdirected_requests_get_their_4xx(service: Service, method, path, body, status):
    reply = httpx.request(method, f"{service.url}{path}", json=body, timeout=30)
    assert reply.status_code == status and reply.json()["detail"]


def grpc_bad_calls() -> list[tuple[str, Any, grpc.StatusCode, str]]:
    """(method, request message or raw bytes, expected code, phrase of the detail)."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    missing = grpc.StatusCode.NOT_FOUND
    too_big = grpc.StatusCode.RESOURCE_EXHAUSTED
    calls: list[tuple[str, Any, grpc.StatusCode, str]] = []
    for fields, detail in bad_chat_inputs(N_CTX):
        calls.append(("Chat", chat_pb2.ChatRequest(**fields), invalid, detail))
        calls.append(("ChatStream", chat_pb2.ChatStreamRequest(**fields), invalid, detail))
    calls += [
        ("Chat", b"\x0a\x02\xff\xfe", invalid, "is not a valid"),
        ("Chat", b"\x0a\x05hi", invalid, "is not a valid"),
        ("ChatStream", b"\xff\xff\xff", invalid, "is not a valid"),
        ("Clear", b"\x0a\x01\x80", invalid, "is not a valid"),
        ("GetSession", b"\x0a\x01\xc3", invalid, "is not a valid"),
        ("Clear", chat_pb2.ClearRequest(), missing, "Session not found"),
        ("Clear", chat_pb2.ClearRequest(session_id="gone"), missing, "Session not found"),
        ("GetSession", chat_pb2.GetSessionRequest(session_id="gone"), missing, "not found"),
        ("Chat", chat_pb2.ChatRequest(message="x" * 1_100_000), too_big, "larger than max"),
    ]  # fmt: skip
    return calls


@pytest.mark.parametrize(("method", "request_", "code", "detail"), grpc_bad_calls())
def test_bad_calls_over_grpc_get_their_status_never_internal(
    service: Service, method, request_, code, detail
):
    payload = request_ if isinstance(request_, bytes) else request_.SerializeToString()
    with grpc.insecure_channel(service.grpc_address) as channel:
        path = f"/llamachat.v1.ChatService/{method}"
        with pytest.raises(grpc.RpcError) as caught:
            if method == "ChatStream":
                stream: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(path)
                list(stream(payload, timeout=30))
            else:
                unary: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(path)
                unary(payload, timeout=30)
    assert caught.value.code() == code
    assert detail.lower() in (caught.value.details() or "").lower()


def test_there_are_at_least_30_bad_inputs_per_protocol():
    rest = 2 * len(bad_chat_inputs(N_CTX)) + len(MALFORMED_REST_BODIES) + len(BAD_REST_BODIES)
    rest += 1 + len(MISDIRECTED_REST_REQUESTS)
    assert rest >= 30 and len(grpc_bad_calls()) >= 30


def health_of(grpc_address: str) -> str:
    """The core's health, or the gRPC code that answered instead."""
    with grpc.insecure_channel(grpc_address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def refused(url: str) -> bool:
    try:
        return httpx.post(f"{url}/chat", json={"message": "Hi"}, timeout=5).status_code == 503
    except httpx.TransportError:
        return True


def test_sigterm_drains_a_stream_in_flight_then_both_exit_0(tmp_path):
    env = service_env(free_port(), free_port(), tmp_path)
    url = f"http://127.0.0.1:{env['PORT']}"
    service = start(["api_service.py"], env, tmp_path / "api_service.log")
    try:
        wait_healthy(url, [service])
        body = {"message": "Write a long story about a dragon.", "max_tokens": 200, **GREEDY}
        with httpx.stream("POST", f"{url}/chat/stream", json=body, timeout=60) as reply:
            stream = events(reply.iter_lines())
            assert "token" in next(stream)
            service.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while not refused(url) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert refused(url)  # new requests are refused...
            assert health_of(env["GRPC_ADDRESS"]) in ("NOT_SERVING", "UNAVAILABLE")
            rest = list(stream)  # ...while the stream in flight goes on to its end
        assert len(rest) > 1 and rest[-1]["done"] is True, rest[-1:]
        assert service.wait(timeout=30) == 0, (tmp_path / "api_service.log").read_text()
    finally:
        stop(service)


def test_a_core_restarted_under_a_running_gateway_is_used_again_without_a_gateway_restart(
    tmp_path,
):
    env = service_env(free_port(), free_port(), tmp_path)
    service = start_both(env, tmp_path, "first-")
    body: dict[str, Any] = {"message": "Hi", "max_tokens": 3}
    try:
        session = chat(service.url, **body)["session_id"]
        service.core.kill()
        service.core.wait()
        wait_healthy(service.url, [service.gateway], expected_status=503)
        down = httpx.post(f"{service.url}/chat", json=body, timeout=30)
        assert down.status_code == 503 and down.json()["detail"]
        core = start(["-m", "inference_server"], env, tmp_path / "second-core.log")
        try:
            wait_healthy(service.url, [service.gateway, core])
            again = chat(service.url, "Hello again", session_id=session, max_tokens=3)
            assert again["session_id"] == session
            assert len(snapshot(service.url)[session]) == 2  # the first exchange survived
        finally:
            assert stop(core) == 0
    finally:
        assert stop(service.gateway) == 0
        if service.core.poll() is None:
            service.core.kill()


def test_api_key_guards_both_protocols_but_not_health(tmp_path):
    with launched(tmp_path, API_KEY="k3y") as service:
        body = {"message": "Hi", "max_tokens": 3}
        assert httpx.post(f"{service.url}/chat", json=body).status_code == 401
        allowed = httpx.post(f"{service.url}/chat", json=body, headers={"X-API-Key": "k3y"})
        assert allowed.status_code == 200
        assert httpx.get(f"{service.url}/health").status_code == 200
        with grpc.insecure_channel(service.grpc_address) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ListSessions(chat_pb2.ListSessionsRequest(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            sessions = stub.ListSessions(
                chat_pb2.ListSessionsRequest(), metadata=[("authorization", "Bearer k3y")]
            )
            assert list(sessions.session_ids) == [allowed.json()["session_id"]]
        assert health_of(service.grpc_address) == "SERVING"
