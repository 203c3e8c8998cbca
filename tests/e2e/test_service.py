"""The running service over real HTTP and real gRPC: the client library, the
terminal client, bad input, cancellation and disconnects."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients import GrpcChatClient, LLMChatClient, SessionNotFoundError
from llamachat.v1 import chat_pb2, chat_pb2_grpc
from tests.bad_inputs import JSON_HEADERS, bad_chat_inputs, json_body
from tests.e2e.conftest import ROOT, Service

N_CTX = 4096  # the core's default context size


def test_rest_client_chats_streams_lists_and_clears(service: Service):
    with LLMChatClient(service.url) as client:
        reply = client.chat("Name a color.", temperature=0, max_tokens=30)
        session = client.session_id
        assert reply and session in client.sessions()
        with LLMChatClient(service.url) as other:
            streamed = "".join(other.stream("Name a color.", temperature=0, max_tokens=30))
            assert streamed == reply  # same greedy text, streamed or not
            other.clear()
        client.clear()
        assert client.session_id is None and session not in client.sessions()


def test_grpc_client_chats_streams_lists_and_clears(service: Service):
    with GrpcChatClient(service.grpc_address) as client:
        reply = client.chat("Name a fruit.", temperature=0, max_tokens=30)
        assert reply.text and reply.usage.completion_tokens > 0
        assert reply.finish_reason in (chat_pb2.FINISH_REASON_STOP, chat_pb2.FINISH_REASON_LENGTH)
        session = client.session_id
        assert session in client.sessions()
        client.session_id = None
        assert "".join(client.stream("Name a fruit.", temperature=0, max_tokens=30)) == reply.text
        client.clear()
        client.session_id = session
        client.clear()
        assert session not in client.sessions()
        client.session_id = session
        with pytest.raises(SessionNotFoundError):
            client.clear()


def test_rest_and_grpc_share_sessions(service: Service):
    with GrpcChatClient(service.grpc_address) as over_grpc:
        over_grpc.chat("Hello!", max_tokens=5)
        sessions = httpx.get(f"{service.url}/sessions").json()
        assert over_grpc.session_id in sessions["sessions"]
        assert sessions["count"] == len(sessions["sessions"])
        over_grpc.clear()


def test_grpc_health_is_serving(service: Service):
    with grpc.insecure_channel(service.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "llamachat.v1.ChatService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(("fields", "detail"), bad_chat_inputs(N_CTX))
def test_bad_input_over_rest_is_400(service: Service, fields, detail):
    reply = httpx.post(
        f"{service.url}/chat", content=json_body(fields), headers=JSON_HEADERS, timeout=30
    )
    assert reply.status_code == 400
    assert detail in reply.json()["detail"]


@pytest.mark.parametrize(("fields", "detail"), bad_chat_inputs(N_CTX))
def test_bad_input_over_grpc_is_invalid_argument(service: Service, fields, detail):
    with grpc.insecure_channel(service.grpc_address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Chat(chat_pb2.ChatRequest(**fields), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in (caught.value.details() or "")


def test_a_body_over_one_mib_is_413_over_rest(service: Service):
    reply = httpx.post(f"{service.url}/chat", json={"message": "x" * 2_000_000}, timeout=30)
    assert reply.status_code == 413
    assert "the limit is 1048576" in reply.json()["detail"]


def test_cancelled_grpc_stream_stops_and_keeps_no_half_exchange(service: Service):
    with grpc.insecure_channel(service.grpc_address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        call = stub.ChatStream(
            chat_pb2.ChatStreamRequest(
                message="Write a long poem.", session_id="cut-grpc", max_tokens=400
            )
        )
        pieces = [next(call).text for _ in range(3)]
        call.cancel()
        assert all(pieces)
        # The core is free again at once: the next request is answered.
        after = stub.Chat(chat_pb2.ChatRequest(message="Hi", max_tokens=3), timeout=30)
        assert after.usage.completion_tokens <= 3
        listed = stub.ListSessions(chat_pb2.ListSessionsRequest(), timeout=5).session_ids
        assert "cut-grpc" not in listed
    # The core stopped generating long before max_tokens.
    assert_cancelled_early(service.generation_logs("cut-grpc"), max_tokens=400)


def assert_cancelled_early(log_lines: list[str], max_tokens: int) -> None:
    (log_line,) = log_lines
    assert "finish=cancelled" in log_line
    found = re.search(r" completion_tokens=(\d+)", log_line)
    assert found is not None, log_line
    produced = int(found[1])
    assert 3 <= produced < max_tokens


def test_sse_disconnect_stops_generation_and_keeps_no_half_exchange(service: Service):
    with httpx.Client(base_url=service.url, timeout=30) as http:
        body = {"message": "Write a long poem.", "session_id": "cut-sse", "max_tokens": 400}
        with http.stream("POST", "/chat/stream", json=body) as reply:
            tokens = []
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    tokens.append(json.loads(line[6:])["token"])
                if len(tokens) == 3:
                    break
        after = http.post("/chat", json={"message": "Hi", "max_tokens": 3})
        assert after.status_code == 200
        assert "cut-sse" not in http.get("/sessions").json()["sessions"]
    assert_cancelled_early(service.generation_logs("cut-sse"), max_tokens=400)


def run_terminal_client(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clients", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_terminal_client_streams_a_reply_and_continues_a_session(service: Service):
    first = run_terminal_client("--url", service.url, "chat", "--max-tokens", "20", "Hello!")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip()
    session = first.stderr.strip().removeprefix("(session ").removesuffix(")")
    again = run_terminal_client(
        "--grpc", service.grpc_address, "chat", "--session", session, "--max-tokens", "5", "And?"
    )
    assert again.returncode == 0, again.stderr
    listed = run_terminal_client("--url", service.url, "sessions")
    assert session in listed.stdout.split()
    cleared = run_terminal_client("--url", service.url, "clear", session)
    assert (
        cleared.returncode == 0
        and session not in run_terminal_client("--url", service.url, "sessions").stdout
    )
    missing = run_terminal_client("--url", service.url, "clear", session)
    assert missing.returncode == 1 and "Session not found" in missing.stderr


def test_terminal_client_interactive_chat(service: Service):
    done = subprocess.run(
        [sys.executable, "-m", "clients", "--url", service.url, "chat", "--max-tokens", "10"],
        cwd=ROOT,
        input="Hello!\n/clear\nHi again\n/quit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    replies = [line for line in done.stdout.splitlines() if line.startswith("bot> ")]
    assert len(replies) == 2 and all(len(r) > len("bot> ") for r in replies)
    assert "(new conversation)" in done.stderr
